"""filters.video_download on Arrow batches: the download stage's address policy and reasons for video
URL rows, local rows passed through untouched (no JVM, no server: a refused address opens no socket)."""
from __future__ import annotations

import pyarrow as pa

from filters.video_download import DownloadVideo, is_url, local_name
from schemas.common import ERROR, ERROR_DETAIL


def _batch(paths, errors=None):
    errors = errors or [None] * len(paths)
    return pa.RecordBatch.from_pydict({"path": paths, ERROR: errors, ERROR_DETAIL: [None] * len(paths)})


def test_refused_and_bad_urls_get_download_reasons_local_rows_pass(tmp_path):
    stage = DownloadVideo(retries=0, directory=str(tmp_path))  # loopback refused by default
    batch = _batch(["http://127.0.0.1:9/a.mp4", "ftp://example.com/b.mp4", "/data/c.mp4",
                    "http://127.0.0.1:9/d.mp4"], [None, None, None, "read_error"])
    out = stage.apply(batch).to_pydict()
    assert out[ERROR] == ["download_blocked_address", None, None, "read_error"]
    assert "loopback" in out[ERROR_DETAIL][0]
    assert out["path"] == ["http://127.0.0.1:9/a.mp4", "ftp://example.com/b.mp4", "/data/c.mp4",
                           "http://127.0.0.1:9/d.mp4"]
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_url_already_downloaded_is_not_fetched_again(tmp_path):
    url = "http://127.0.0.1:9/clip.webm?x=1"
    assert is_url(url) and not is_url("/x/clip.mp4") and local_name(url).endswith(".webm")
    (tmp_path / local_name(url)).write_bytes(b"video bytes")
    # the address would be refused: the file already there is used instead, for both rows
    out = DownloadVideo(directory=str(tmp_path)).apply(_batch([url, url])).to_pydict()
    assert out[ERROR] == [None, None] and out["path"] == [str(tmp_path / local_name(url))] * 2


def test_bodies_stream_to_the_file_and_failures_leave_nothing(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    clip = bytes(range(256)) * 1200  # 300 kB: several writes
    accepts = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            accepts.append(self.headers.get("Accept"))
            body = {"/clip.mp4": clip, "/big.mp4": b"\0" * 600_000}.get(self.path.split("?")[0])
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)  # no Content-Length: HTTP/1.0, the body ends with the connection
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        stage = DownloadVideo(directory=str(tmp_path / "v"), allow_loopback=True, retries=0, timeout_s=5.0,
                              max_bytes=500_000)
        urls = [f"{base}/clip.mp4", f"{base}/big.mp4", f"{base}/gone.mp4", f"{base}/clip.mp4"]
        out = stage.apply(_batch(urls)).to_pydict()
    finally:
        httpd.shutdown()
        httpd.server_close()
    target = tmp_path / "v" / local_name(urls[0])
    assert out["path"] == [str(target), urls[1], urls[2], str(target)]
    assert out[ERROR] == [None, "download_too_large", "download_http_error", None]
    assert target.read_bytes() == clip
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [target.name]  # no temporary file left
    assert accepts and all(a.startswith("video/*") for a in accepts)
    assert len(accepts) == 3  # the repeated URL was fetched once
