"""Readers: every input form, every item accounted for, problems turned into rows."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import readers


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            if isinstance(data, tarfile.TarInfo):
                tf.addfile(data)
                continue
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _rows(units):
    return [r for b in readers.read_units(units, 1 << 20) for r in b.to_pylist()]


def test_tar_groups_by_key_and_quarantines_unsafe_members(tmp_path):
    link = tarfile.TarInfo("evil.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    p = tmp_path / "a.tar"
    _tar(p, [
        ("x/0001.jpg", b"JPEGDATA"), ("x/0001.txt", b"a caption"), ("x/0001.json", b'{"k": 1}'),
        ("0002.jpg", b"IMG2"),
        ("0003.txt", b"caption only"),
        ("../escape.jpg", b"bad"), ("/abs.jpg", b"bad"), (None, link),
        ("0004.tar.gz.jpg", b"dots"), ("0004.tar.gz.txt", b"dotted key"),
        ("0005.json", b"{not json"), ("0005.jpg", b"IMG5"),
        ("0001.jpg", b"again"),
    ])
    rows = {r["source_key"]: r for r in _rows([{"format": "tar", "uri": str(p)}])}
    assert rows["x/0001"]["image"] == b"JPEGDATA" and rows["x/0001"]["caption"] == "a caption"
    assert json.loads(rows["x/0001"]["meta"]) == {"k": 1}
    assert rows["0002"]["caption"] is None and rows["0002"]["error"] is None
    assert rows["0003"]["error"] == "image_missing"
    assert rows["../escape.jpg"]["error"] == "unsafe_member" and rows["/abs.jpg"]["error"] == "unsafe_member"
    assert rows["evil.jpg"]["error"] == "unsafe_member" and "link" in rows["evil.jpg"]["error_detail"]
    assert rows["0004"]["caption"] == "dotted key"  # webdataset's key rule: up to the first dot
    assert rows["0005"]["error"] == "meta_invalid"
    assert rows["0001"]["image"] == b"again"
    assert len({r["sample_id"] for r in rows.values()}) == len(rows)


def test_truncated_tar_keeps_what_was_read_and_reports_the_rest(tmp_path):
    p = tmp_path / "t.tar"
    _tar(p, [(f"{i:04d}.jpg", bytes(3000)) for i in range(5)])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    rows = _rows([{"format": "tar", "uri": str(p)}])
    assert rows[-1]["error"] == "read_error" and rows[-1]["source_key"] == "@error"
    assert 1 <= len(rows) - 1 < 5


def test_parquet_and_jsonl_tables(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"IMG-A")
    pq.write_table(pa.table({
        "key": ["k1", "k2", "k3", "k4"],
        "caption": ["bytes row", "path row", "url row", "nothing"],
        "jpg": [b"IMG-1", None, None, None],
        "image_path": [None, "imgs/a.jpg", None, None],
        "url": [None, None, "http://127.0.0.1:9/x.jpg", None],
    }), tmp_path / "t.parquet")
    rows = {r["source_key"]: r for r in _rows([{"format": "table", "uri": str(tmp_path / "t.parquet")}])}
    assert rows["k1"]["image"] == b"IMG-1" and rows["k2"]["image"] == b"IMG-A"
    assert rows["k3"]["image"] is None and rows["k3"]["url"].endswith("x.jpg") and rows["k3"]["error"] is None
    assert rows["k4"]["error"] == "image_missing"
    (tmp_path / "t.jsonl").write_text('{"url": "http://h/a.jpg", "caption": "ok"}\nnot json\n[1]\n'
                                      '{"image_path": "imgs/missing.jpg", "caption": "gone"}\n')
    rows = _rows([{"format": "table", "uri": str(tmp_path / "t.jsonl")}])
    assert [r["error"] for r in rows] == [None, "read_error", "read_error", "read_error"]


def test_folder_with_sidecars_and_table_owned_images(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"A")
    (tmp_path / "a.txt").write_text("caption a")
    (tmp_path / "b.png").write_bytes(b"B")
    (tmp_path / "c.txt").write_text("orphan caption")
    (tmp_path / "README.md").write_text("not an item")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.jpg").write_bytes(b"X")
    (tmp_path / "t" / "rows.jsonl").write_text('{"image_path": "x.jpg", "caption": "from table"}\n')
    tasks = readers.plan_units([str(tmp_path)], files_per_task=2)
    units = [u for t in tasks for u in t]
    rows = {r["source_key"]: r for r in _rows(units)}
    assert set(rows) == {"a", "b", "c", "line0"}
    assert rows["a"]["caption"] == "caption a" and rows["b"]["caption"] is None
    assert rows["c"]["error"] == "image_missing" and rows["line0"]["image"] == b"X"
