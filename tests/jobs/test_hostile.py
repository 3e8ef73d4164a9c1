"""One spark-submit run over a corpus of hostile inputs (tests/hostile.py) mixed with valid items:
the job finishes, every item lands in the ledger with the specific reason below, the valid items
beside the bad ones are kept, and nothing is written outside the output folder."""
from __future__ import annotations

import json
import os
import socket
import stat
import tarfile

import pyarrow.parquet as pq
import pytest

from schemas import ledger as L
from tests import hostile
from tests.jobs.test_build_pretrain import ROOT, submit

pytestmark = pytest.mark.slow  # whole-job runs: `pytest -m "not slow"` for a quick pass

Q, D, K = "quarantined", "dropped", "kept"
EXPECT = {
    # hostile.tar: bytes that are not a usable image
    "truncated_jpeg": (Q, "image_truncated"),
    "empty_image": (Q, "image_empty"),
    "random_bytes": (Q, "image_undecodable"),
    "html_as_jpg": (Q, "image_undecodable"),
    "svg_as_jpg": (Q, "image_undecodable"),
    "eps_as_jpg": (Q, "image_undecodable"),  # not an accepted format: Ghostscript never runs
    "decompression_bomb": (Q, "image_too_many_pixels"),
    "huge_dims_png_header": (Q, "image_too_many_pixels"),
    "huge_dims_jpeg_sof": (Q, "image_too_many_pixels"),
    "big_dims_tiny_file": (Q, "image_truncated"),  # 144 Mpx declared (under the cap), 100 bytes of data
    # modes and containers decode normalises
    "cmyk": (K, None), "gray16_png": (K, None), "palette_png": (K, None), "alpha_png": (K, None),
    "animated_gif": (K, None), "animated_webp": (K, None), "animated_png": (K, None), "exif_rotated": (K, None),
    # captions
    "bad_utf8_caption": (K, None), "control_chars_caption": (K, None), "html_caption": (K, None),
    "caption_1mb": (D, "caption_too_long"),
    "caption_only_control": (D, "caption_missing"),
    "caption_zero_width": (D, "caption_missing"),
    "no_caption": (D, "caption_missing"),
    "meta_caption_number": (D, "caption_missing"),  # {"caption": 42} is not a caption
    "meta_invalid": (Q, "meta_invalid"),
    "meta_deep": (Q, "meta_invalid"),  # 100,000 nested brackets
    "image_missing": (Q, "image_missing"),
    "oversized_member": (Q, "read_error"),
    # tar structure
    "tar_dotdot": (Q, "unsafe_member"), "tar_dotdot_sibling": (Q, "unsafe_member"), "tar_absolute": (Q, "unsafe_member"),
    "tar_symlink": (Q, "unsafe_member"), "tar_symlink_escape": (Q, "unsafe_member"), "tar_hardlink": (Q, "unsafe_member"),
    "tar_fifo": (Q, "unsafe_member"), "tar_device": (Q, "unsafe_member"),
    "dup_ext_first": (K, None), "dup_ext_second": (Q, "duplicate_member"),
    "dup_key_first": (K, None), "dup_key_again": (Q, "duplicate_member"),
    "key_with_dots": (K, None), "name_not_utf8": (K, None),
    "good_first": (K, None), "after_unsafe": (K, None), "between": (K, None),
    # broken tars: what was read before the break is kept, the break is one '@error' row
    "truncated_tar_t1": (K, None), "truncated_tar_t2": (K, None), "truncated_tar_t3": (Q, "read_error"),
    "truncated_tar_error": (Q, "read_error"),
    "damaged_tar_d1": (K, None), "damaged_tar_error": (Q, "read_error"),
    "concat_tar_c1": (K, None), "concat_tar_error": (Q, "read_error"),
    "not_a_tar": (Q, "read_error"), "empty_tar": (Q, "read_error"),
    # loose files (unreadable ones without chmod: the tests run as root)
    "folder_valid": (K, None),
    "folder_dangling_symlink": (Q, "read_error"), "folder_symlink_loop": (Q, "read_error"),
    "folder_fifo": (Q, "read_error"), "folder_orphan_caption": (Q, "image_missing"),
    "folder_name_not_utf8": (K, None),
    # JSONL
    "jsonl_path_ok": (K, None), "jsonl_not_json": (Q, "read_error"), "jsonl_array": (Q, "read_error"),
    "jsonl_string": (Q, "read_error"), "jsonl_path_missing": (Q, "read_error"), "jsonl_path_fifo": (Q, "read_error"),
    "jsonl_path_device": (Q, "read_error"), "jsonl_dup_key": (Q, "duplicate_member"), "jsonl_deep": (Q, "read_error"),
    "jsonl_bad_utf8": (Q, "read_error"), "jsonl_lone_surrogate": (K, None), "jsonl_no_image": (Q, "image_missing"),
    "jsonl_image_as_string": (Q, "read_error"), "jsonl_caption_number": (D, "caption_too_short"),
    # Parquet
    "pq_ok": (K, None), "pq_dup_key": (Q, "duplicate_member"), "pq_no_image": (Q, "image_missing"),
    "pq_garbage_bytes": (Q, "image_undecodable"), "pq_wrong_type_1": (Q, "read_error"),
    "pq_wrong_type_2": (Q, "read_error"), "pq_hf_bytes": (K, None),
    "pq_hf_path_only": (Q, "image_missing"),  # a datasets Image struct's own path is not followed
    "pq_not_parquet": (Q, "read_error"), "pq_truncated": (Q, "read_error"),
    # URLs: a local server on 127.0.0.1; private addresses are refused before any connection
    "url_ok": (K, None),
    "url_closed_port": (Q, "download_failed"),
    "url_redirect_loop": (Q, "download_too_many_redirects"),
    "url_too_large_declared": (Q, "download_too_large"),
    "url_too_large_streamed": (Q, "download_too_large"),
    "url_private": (Q, "download_blocked_address"),
    "url_metadata": (Q, "download_blocked_address"),
    "url_userinfo_private": (Q, "download_blocked_address"),
    "url_redirect_to_private": (Q, "download_blocked_address"),
    "url_not_found": (Q, "download_http_error"),
    "url_html": (Q, "image_undecodable"),
    "url_file_scheme": (Q, "download_bad_url"),
    "url_opt_out": (D, "opted_out"),
}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(top: str, skip: str) -> dict[str, tuple]:
    """Every path under `top` but `skip`, with its type, and size and mtime for what is not a folder
    (a folder's mtime changes when `skip` is created in it; its entries are listed themselves)."""
    out = {}
    for dirpath, dirnames, files in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != skip]
        for name in dirnames + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            is_dir = stat.S_ISDIR(st.st_mode)
            out[os.path.relpath(p, top)] = (st.st_mode, None if is_dir else st.st_size, None if is_dir else st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    top = str(tmp_path_factory.mktemp("hostile"))
    root, out = os.path.join(top, "root"), os.path.join(top, "root", "out")
    os.makedirs(os.path.join(top, "outside"))
    srv = hostile.serve()
    try:
        corpus = hostile.write_corpus(root, f"http://127.0.0.1:{srv.server_address[1]}", _closed_port())
        before = _snapshot(top, skip=out)
        proc = submit("--input", f"image_text={corpus.input_dir}", "--output", out,
                      "--set", "image_text.clip.enabled=false",
                      "--set", f"read.max_member_bytes={hostile.MAX_MEMBER_BYTES}",
                      "--set", "image_text.download.allow_loopback=true",
                      "--set", "image_text.download.retries=0",
                      "--set", "image_text.download.timeout_s=5",
                      "--set", f"image_text.download.max_bytes={hostile.MAX_DOWNLOAD_BYTES}",
                      "--set", "shards.max_samples=16", check=False)
        after = _snapshot(top, skip=out)
    finally:
        srv.shutdown()
    return {"proc": proc, "corpus": corpus, "out": out, "top": top, "before": before, "after": after}


def _ledger_by_label(run) -> dict[str, dict]:
    corpus, out = run["corpus"], run["out"]
    rows = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    where = {}
    for r in rows:
        src, key = r["source"], r["source_key"]
        container = src[: -len(key) - 2] if src.endswith(f"::{key}") else None
        rel = os.path.relpath(container or src, corpus.input_dir)
        where[f"{rel}::{key}" if container else rel] = r
    assert len(where) == len(rows)  # no two rows for one place
    labels = {loc: label for label, loc in corpus.items.items()}
    unknown = sorted(set(where) - set(labels))
    assert not unknown, f"ledger rows that are no item of the corpus: {unknown}"
    return {labels[loc]: r for loc, r in where.items()}


def test_job_finishes(hostile_run):
    proc = hostile_run["proc"]
    assert proc.returncode == 0, f"job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_every_item_has_its_specific_outcome(hostile_run):
    assert hostile_run["proc"].returncode == 0
    corpus = hostile_run["corpus"]
    assert set(EXPECT) == set(corpus.items), "the test's table and the generator disagree"
    assert len(EXPECT) >= 30
    by_label = _ledger_by_label(hostile_run)
    assert sorted(set(EXPECT) - set(by_label)) == []  # nothing lost
    got = {label: (r[L.STATUS], r[L.REASON]) for label, r in by_label.items()}
    wrong = {label: (got[label], want) for label, want in EXPECT.items() if got[label] != want}
    assert not wrong, "got vs expected:\n" + "\n".join(f"  {k}: {g} != {w}" for k, (g, w) in sorted(wrong.items()))
    assert all(r[L.DETAIL] for r in by_label.values() if r[L.STATUS] == Q)  # every quarantine says why
    with open(os.path.join(hostile_run["out"], "reports", "summary.json")) as f:
        summary = json.load(f)
    k = summary["kinds"]["image_text"]
    assert k["input"] == len(by_label) == len(EXPECT)
    assert k["kept"] == sum(1 for s, _ in EXPECT.values() if s == K)


def test_kept_samples_are_clean_in_the_shards(hostile_run):
    assert hostile_run["proc"].returncode == 0
    by_label = _ledger_by_label(hostile_run)
    shard_dir = os.path.join(hostile_run["out"], "shards", "image_text")
    docs = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as tf:
                for m in tf:
                    if m.name.endswith(".json"):
                        doc = json.loads(tf.extractfile(m).read())
                        docs[doc["sample_id"]] = doc
    kept = {label for label, (status, _) in EXPECT.items() if status == K}
    assert set(docs) == {by_label[label]["sample_id"] for label in kept}
    for label, fields in hostile_run["corpus"].expect_in_shards.items():
        doc = docs[by_label[label]["sample_id"]]
        assert {f: doc[f] for f in fields} == fields, label
    for doc in docs.values():
        assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c == "\ufffd" for c in doc["caption"]), doc["caption"]


def test_nothing_is_written_outside_the_output(hostile_run):
    corpus, top = hostile_run["corpus"], hostile_run["top"]
    assert hostile_run["before"] == hostile_run["after"]  # inputs and their surroundings untouched
    for target in corpus.escape_targets:
        assert not os.path.lexists(target), target
    names = {os.path.basename(t) for t in corpus.escape_targets}
    for dirpath, dirnames, files in os.walk(top):
        assert not names & set(files + dirnames), dirpath
    # where an extraction relative to the job's cwd or to the output folders would have put them
    out = hostile_run["out"]
    members = ["../../escape-dotdot.jpg", "../sibling/escape-dotdot2.jpg"]
    for base in (ROOT, out, os.path.join(out, "shards", "image_text"), os.path.join(out, "_work")):
        for m in members:
            assert not os.path.lexists(os.path.normpath(os.path.join(base, m))), (base, m)
    for path in corpus.no_item:  # a directory named like an image is no item (and no crash)
        assert os.path.isdir(path)
