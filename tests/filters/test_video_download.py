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
