"""Readers: every input form, every item accounted for, problems turned into rows."""
from __future__ import annotations

import io
import json
import os
import re
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
    reader = readers.ReadUnits(max_member_bytes=1 << 20)
    return [r for b in readers.in_batches(units, reader.items, reader.raw, {}) for r in b.to_pylist()]


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


# --- hostile inputs (tests/jobs/test_hostile.py runs them end to end) -----------------------------


def test_tar_duplicates_and_odd_names_get_one_unique_row_each(tmp_path):
    link = tarfile.TarInfo("l.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    p = tmp_path / "d.tar"
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tf:
        for name, data in [
            ("a.jpg", b"first"), ("a.jpg", b"second"), ("a.txt", b"cap a"),  # same key and extension twice
            ("../x.jpg", b"1"), ("../x.jpg", b"2"), ("l.jpg", None), ("l.jpg", None),  # unsafe, twice each
            ("b.jpg", b"B"), ("b.json", b"[" * 50_000 + b"]" * 50_000),  # nested past the recursion limit
            ("c.jpg", b"C"), ("c.json", b'{"caption": 42}'),  # not a caption
            ("big.jpg", bytes(2 << 20)), ("big.txt", b"too large"),  # one row for the sample, not two
            ("n\udcffo.jpg", b"N"), ("n\udcfeo.jpg", b"M"),  # names that are not UTF-8
        ]:
            if data is None:
                tf.addfile(link)
                continue
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    rows = _rows([{"format": "tar", "uri": str(p)}])
    by_key = {r["source_key"]: r for r in rows}
    assert len(by_key) == len(rows) == len({r["sample_id"] for r in rows}) == 11
    assert by_key["a"]["image"] == b"first" and by_key["a"]["caption"] == "cap a" and by_key["a"]["error"] is None
    assert by_key["a.jpg"]["error"] == "duplicate_member"
    assert [by_key[k]["error"] for k in ("../x.jpg", "../x.jpg#1", "l.jpg", "l.jpg#1")] == ["unsafe_member"] * 4
    assert "/etc/passwd" in by_key["l.jpg"]["error_detail"]
    assert by_key["b"]["error"] == "meta_invalid" and "RecursionError" in by_key["b"]["error_detail"]
    assert by_key["c"]["error"] is None and by_key["c"]["caption"] is None
    assert by_key["big"]["error"] == "read_error" and "max_member_bytes" in by_key["big"]["error_detail"]
    assert by_key["n\\udcffo"]["image"] == b"N" and by_key["n\\udcfeo"]["image"] == b"M"


def test_tar_members_hidden_by_a_damaged_header_or_a_second_archive_are_reported(tmp_path):
    def tar_bytes(names):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for n in names:
                ti = tarfile.TarInfo(n)
                ti.size = 600
                tf.addfile(ti, io.BytesIO(bytes(600)))
        return buf.getvalue()

    clean, damaged, concatenated = tmp_path / "clean.tar", tmp_path / "damaged.tar", tmp_path / "cat.tar"
    clean.write_bytes(tar_bytes(["1.jpg", "2.jpg", "3.jpg"]))
    data = bytearray(clean.read_bytes())
    header = data.index(b"2.jpg")
    data[header + 148: header + 156] = b"garbage!"  # the checksum: tarfile would stop here silently
    damaged.write_bytes(bytes(data))
    concatenated.write_bytes(tar_bytes(["1.jpg"]) + tar_bytes(["2.jpg"]))
    assert [r["source_key"] for r in _rows([{"format": "tar", "uri": str(clean)}])] == ["1", "2", "3"]
    rows = _rows([{"format": "tar", "uri": str(damaged)}])
    assert [(r["source_key"], r["error"]) for r in rows] == [("1", None), ("@error", "read_error")]
    assert "damaged tar header" in rows[-1]["error_detail"]
    rows = _rows([{"format": "tar", "uri": str(concatenated)}])
    assert [(r["source_key"], r["error"]) for r in rows] == [("1", None), ("@error", "read_error")]
    assert "after the end-of-archive marker" in rows[-1]["error_detail"]


def test_a_tar_cut_inside_a_sample_quarantines_that_sample(tmp_path):
    p = tmp_path / "cut.tar"
    _tar(p, [("1.jpg", bytes(3000)), ("1.txt", b"one"), ("2.jpg", bytes(3000)), ("2.txt", b"two")])
    data = p.read_bytes()
    p.write_bytes(data[: data.index(b"2.jpg") + 512 + 1000])  # inside 2.jpg's data
    rows = _rows([{"format": "tar", "uri": str(p)}])
    assert [(r["source_key"], r["error"]) for r in rows] == [("1", None), ("2", "read_error"), ("@error", "read_error")]


def test_tables_duplicate_keys_bad_text_and_files_that_are_not_regular(tmp_path):
    import os
    import signal

    (tmp_path / "ok.jpg").write_bytes(b"IMG")
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "t.jsonl").write_bytes(b"\n".join([
        b'{"key": "k", "image_path": "ok.jpg", "caption": "a \\udc00 b"}',
        b'{"key": "k", "image_path": "ok.jpg", "caption": "again"}',
        b'{"key": "fifo", "image_path": "fifo.jpg"}',
        b'{"key": "dev", "image_path": "/dev/zero"}',
        b"[" * 50_000 + b"]" * 50_000,
        b'{"key": "latin1", "caption": "caf\xe9"}',
    ]) + b"\n")
    signal.alarm(30)  # opening the FIFO would block forever: fail instead of hanging
    try:
        rows = _rows([{"format": "table", "uri": str(tmp_path / "t.jsonl")}])
    finally:
        signal.alarm(0)
    got = [(r["source_key"], r["error"]) for r in rows]
    assert got == [("k", None), ("k#1", "duplicate_member"), ("fifo", "read_error"), ("dev", "read_error"),
                   ("line4", "read_error"), ("line5", "read_error")]
    assert rows[0]["caption"] == "a \ufffd b"  # a lone surrogate Arrow could not hold
    assert "FIFO" in rows[2]["error_detail"] and "device" in rows[3]["error_detail"]
    assert "RecursionError" in rows[4]["error_detail"]
    pq.write_table(pa.table({"key": ["a", "a", "big"], "caption": ["x", "y", "z"],
                             "jpg": [b"A", b"B", bytes(2 << 20)]}), tmp_path / "t.parquet")
    rows = _rows([{"format": "table", "uri": str(tmp_path / "t.parquet")}])
    assert [(r["source_key"], r["error"]) for r in rows] == [("a", None), ("a#1", "duplicate_member"),
                                                             ("big", "read_error")]


def test_folder_special_files_and_names_that_are_not_utf8(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with open(os.fsencode(str(tmp_path / "\udce9t\udce9.jpg")), "wb") as f:
        f.write(b"LATIN1")
    units = [u for t in readers.plan_units([str(tmp_path), str(tmp_path / "loop.jpg")], 10) for u in t]
    assert len(units) == 4  # dir.jpg is no item; loop.jpg listed twice is one
    assert all(u["uri"].encode("utf-8") for u in units)  # Spark and Arrow can carry every unit
    rows = {r["source_key"]: r for r in _rows(units)}
    assert {k: r["error"] for k, r in rows.items()} == {
        "fifo": "read_error", "dangling": "read_error", "loop": "read_error", "\\udce9t\\udce9": None}
    assert rows["\\udce9t\\udce9"]["image"] == b"LATIN1"


# --- every item exactly once: img2dataset folders, tables beside loose files, transient errors, splits --


def _plan_rows(paths, **kw):
    return _rows([u for t in readers.plan_units([str(p) for p in paths], 10, **kw) for u in t])


def test_img2dataset_output_folder_is_read_as_its_samples_once(tmp_path):
    # img2dataset: the tar holds the successful samples, the parquet every sample's status
    _tar(tmp_path / "00000.tar", [
        ("000000000.jpg", b"IMG0"), ("000000000.txt", b"cap 0"), ("000000000.json", b'{"status": "success"}'),
        ("000000002.jpg", b"IMG2"), ("000000002.txt", b"cap 2"), ("000000002.json", b'{"status": "success"}'),
    ])
    pq.write_table(pa.table({
        "url": [f"http://h/{i}.jpg" for i in range(4)], "caption": [f"cap {i}" for i in range(4)],
        "key": [f"{i:09d}" for i in range(4)],
        "status": ["success", "failed_to_download", "success", "failed_to_resize"],
        "error_message": [None, "HTTP Error 404: Not Found", None, "image file is truncated"],
    }), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text('{"count": 4, "successes": 2}')
    rows = _plan_rows([tmp_path])
    got = sorted((r["source_key"], r["error"]) for r in rows)
    assert got == [("000000000", None), ("000000001", "download_failed"), ("000000002", None),
                   ("000000003", "download_failed")]
    failed = {r["source_key"]: r for r in rows if r["error"]}
    assert "HTTP Error 404" in failed["000000001"]["error_detail"] and failed["000000001"]["url"] == "http://h/1.jpg"
    assert "truncated" in failed["000000003"]["error_detail"]
    ok = {r["source_key"]: r for r in rows if not r["error"]}
    assert ok["000000000"]["image"] == b"IMG0" and ok["000000000"]["source"].endswith("00000.tar::000000000")
    # a parquet with no tar beside it is a URL table as before: every row an item
    (tmp_path / "00000.tar").unlink()
    assert len(_plan_rows([tmp_path])) == 4


def test_a_table_owns_only_the_files_it_references_and_every_decodable_extension_is_read(tmp_path):
    t = tmp_path / "t"
    t.mkdir()
    (t / "x.jpg").write_bytes(b"X")
    (t / "x.txt").write_text("side-car of a referenced image: the table's")
    (t / "rows.jsonl").write_text('{"image_path": "x.jpg", "caption": "from table"}\n'
                                  '{"image_path": "../up.png", "caption": "outside the folder"}\n')
    (tmp_path / "up.png").write_bytes(b"UP")
    for name in ("beside.jpg", "a.jpe", "b.jfif", "c.tif", "d.ico", "e.avif"):
        (t / name).write_bytes(name.encode())
    (t / "beside.txt").write_text("a loose image the table does not name")
    rows = {r["source_key"]: r for r in _plan_rows([tmp_path])}
    assert set(rows) == {"line0", "line1", "beside", "a", "b", "c", "d", "e"}
    assert rows["line0"]["image"] == b"X" and rows["line1"]["image"] == b"UP"
    assert rows["beside"]["caption"] == "a loose image the table does not name" and rows["e"]["image"] == b"e.avif"
    assert {"jpe", "jfif", "tif", "ico", "avif", "jpg", "png", "webp"} <= set(readers.IMAGE_EXTS)


class _BreaksOnce:
    """A file whose reads raise ConnectionResetError once `after` bytes were read (the first time only)."""
    broken = 0

    def __init__(self, path, after):
        self.f, self.after = open(path, "rb"), after  # noqa: SIM115 - closed by __exit__

    def read(self, n=-1):
        if _BreaksOnce.broken == 0 and self.f.tell() >= self.after:
            _BreaksOnce.broken += 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return self.f.read(n if n is None or n < 0 or self.f.tell() + n <= self.after or _BreaksOnce.broken
                           else self.after - self.f.tell())

    def __iter__(self):
        while line := self._readline():
            yield line

    def _readline(self):
        out = b""
        while not out.endswith(b"\n"):
            c = self.read(1)
            if not c:
                break
            out += c
        return out

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def test_a_transient_error_raises_so_spark_retries_and_the_retry_reads_everything(tmp_path, monkeypatch):
    import pytest

    _tar(tmp_path / "a.tar", [(f"{i}.jpg", bytes(2000)) for i in range(4)])
    (tmp_path / "t.jsonl").write_text("".join(f'{{"url": "http://h/{i}.jpg"}}\n' for i in range(6)))
    real_open = readers.storage.open_read
    for name, n in (("a.tar", 4), ("t.jsonl", 6)):
        _BreaksOnce.broken = 0
        monkeypatch.setattr(readers.storage, "open_read", lambda uri: _BreaksOnce(uri, 3000 if "tar" in uri else 40))
        unit = {"format": "tar" if name.endswith("tar") else "table", "uri": str(tmp_path / name)}
        with pytest.raises(ConnectionResetError):  # not one '@error' row hiding the unread items
            _rows([unit])
        monkeypatch.setattr(readers.storage, "open_read", real_open)
        rows = _rows([unit])  # Spark's retry
        assert len(rows) == n and not any(r["error"] for r in rows)
    # a loose file and a table's image path: the same
    (tmp_path / "i.jpg").write_bytes(b"I")
    monkeypatch.setattr(readers.storage, "read_bytes", lambda *a: (_ for _ in ()).throw(TimeoutError("timed out")))
    with pytest.raises(TimeoutError):
        _rows([{"format": "file", "uri": str(tmp_path / "i.jpg")}])


def test_transient_or_permanent():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    for e in (client_error("SlowDown", 503), client_error("InternalError", 500), client_error("X", 429),
              EndpointConnectionError(endpoint_url="http://s3"), ReadTimeoutError(endpoint_url="http://s3"),
              ConnectionResetError(), OSError(110, "Connection timed out")):
        assert readers.is_transient(e), e
    wrapped = OSError("read failed")
    wrapped.__cause__ = ConnectionResetError(104, "reset")
    assert readers.is_transient(wrapped)
    for e in (client_error("NoSuchKey", 404), client_error("AccessDenied", 403), FileNotFoundError(2, "gone"),
              ValueError("malformed"), tarfile.ReadError("bad"), EOFError()):
        assert not readers.is_transient(e), e


def test_a_parquet_that_breaks_after_its_metadata_gives_a_row_per_unread_row(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(9)], "url": [f"http://h/{i}" for i in range(9)]}),
                   p, row_group_size=3, compression="none")
    data = bytearray(p.read_bytes())
    md = pq.ParquetFile(p).metadata
    col = md.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start: start + col.total_compressed_size] = b"\xff" * col.total_compressed_size  # row group 1 unreadable
    p.write_bytes(bytes(data))
    rows = _rows([{"format": "table", "uri": str(p)}])
    assert [(r["source_key"], r["error"]) for r in rows] == [
        ("k0", None), ("k1", None), ("k2", None), ("row3", "read_error"), ("row4", "read_error"),
        ("row5", "read_error"), ("k6", None), ("k7", None), ("k8", None)]
    assert "row group 1" in rows[3]["error_detail"]
    assert len({r["sample_id"] for r in rows}) == 9


def _split_fixtures(tmp_path):
    keys = ["a", "b", "a", "c", None, "a#1", "d", "b", "row4", "e", "a", "f"]
    pq.write_table(pa.table({"key": keys, "url": [f"http://h/{i}.jpg" for i in range(12)]}),
                   tmp_path / "keyed.parquet", row_group_size=2)
    pq.write_table(pa.table({"url": [f"http://h/{i}.jpg" for i in range(12)]}), tmp_path / "plain.parquet",
                   row_group_size=2)
    lines = []
    for i in range(30):
        lines.append("" if i % 7 == 3 else "not json" if i % 11 == 5 else
                     json.dumps({"key": f"k{i % 9}", "url": f"http://h/{i}.jpg", "caption": "x" * (i * 3)}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return [tmp_path / "keyed.parquet", tmp_path / "plain.parquet", tmp_path / "rows.jsonl"]


def test_large_tables_are_split_and_keys_do_not_depend_on_the_split(tmp_path, spark):
    from pipelines.io.readers import ReadUnits

    paths = _split_fixtures(tmp_path)
    whole = sorted((r["source"], r["source_key"], r["sample_id"], r["error"], r["url"]) for r in _plan_rows(paths))
    for rows_per_unit, bytes_per_unit in ((4, 301), (6, 777)):
        plan = readers.read_plan(spark, [str(p) for p in paths], 10, rows_per_unit, bytes_per_unit)
        units = plan.collect()
        assert len(units) > 3 and all(u["part"] for u in units if u["format"] == "table")
        parts = [json.loads(u["part"]) for u in units]
        assert all(p.get("row_groups") is not None or p.get("start") is not None for p in parts)
        got = readers.apply_stages(plan, [ReadUnits(max_member_bytes=1 << 20)]).collect()
        got = sorted((r["source"], r["source_key"], r["sample_id"], r["error"], r["url"]) for r in got)
        assert got == whole, (rows_per_unit, bytes_per_unit)
    keyed = {r[1]: r[3] for r in whole if r[0].split("::")[0].endswith("keyed.parquet")}
    assert keyed["a"] is None and keyed["a#1"] == keyed["a#2"] == "duplicate_member" and keyed["a#1#1"] is None
    assert keyed["row4"] is None and keyed["row4#1"] == "duplicate_member"


def test_task_table_makes_each_list_one_partition_in_order(spark):
    schema = pa.schema([pa.field("uri", pa.string()), pa.field("n", pa.int64())])
    tasks = [[(f"t{i}/u{j}", j) for j in range(k)] for i, k in enumerate((3, 1, 5, 2, 4, 1, 7))]
    df = readers.task_table(spark, tasks, schema)
    assert df.columns == ["uri", "n"]
    assert df.rdd.glom().map(lambda rows: [(r["uri"], r["n"]) for r in rows]).collect() == tasks
    # no Python worker builds the partitions (the RDD lineage of the parallelize(...).flatMap(...).toDF()
    # this replaced had a PythonRDD in it), and on Spark 4.1+ no executor is sent every task's rows
    plan = df._jdf.queryExecution().toRdd().toDebugString()
    assert "PythonRDD" not in plan
    if hasattr(df, "repartitionById"):
        assert "Broadcast" not in df._jdf.queryExecution().executedPlan().toString()
    # more tasks than the session's shuffle partitions, and empty tasks, keep their places too
    many = [[(f"t{i}", i)] if i % 3 else [] for i in range(150)]
    assert readers.task_table(spark, many, schema).rdd.glom().map(lambda rows: [(r["uri"], r["n"]) for r in rows]).collect() == many


def test_small_tables_share_read_tasks_and_ids_do_not_depend_on_it(tmp_path, spark):
    """URL lists in many small tables: a task per table pays a task's fixed cost per 500 URLs; they are
    read a few together (about TASKS_PER_CORE tasks per core, at least MIN_ROWS_PER_TASK rows each), in
    listing order, and every item keeps the id it has when each table is a task of its own."""
    from pipelines.io.readers import MIN_ROWS_PER_TASK, ReadUnits

    paths = []
    for i in range(7):
        p = tmp_path / f"urls-{i}.parquet"
        pq.write_table(pa.table({"url": [f"http://h/{i}/{j}.jpg" for j in range(300)],
                                 "caption": [f"item {j} of table {i}" for j in range(300)]}), p)
        paths.append(p)
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"url": f"http://h/j/{j}.jpg"}) + "\n" for j in range(5)))
    assert MIN_ROWS_PER_TASK == 1_000  # 7 x 300 rows on 2 cores: 3 tasks of near-equal rows
    tasks = readers.plan_units([str(tmp_path)], 10, cores=2)
    shapes = sorted([u["uri"].rsplit("/", 1)[1] for u in t] for t in tasks)
    assert shapes == [["more.jsonl"], ["urls-0.parquet", "urls-1.parquet"],
                      ["urls-2.parquet", "urls-3.parquet", "urls-4.parquet"], ["urls-5.parquet", "urls-6.parquet"]]
    assert len(readers.plan_units([str(tmp_path)], 10)) == 8  # no cores given: a task per table

    def sizes(rows, cores, per_unit=50_000):
        tasks = readers.group_units([{"rows": n} for n in rows], cores, "rows", MIN_ROWS_PER_TASK, per_unit)
        return [[u["rows"] for u in t] for t in tasks]

    assert sizes([500] * 40, 2) == [[500] * 5] * 8  # 20,000 URLs on 2 cores: 8 tasks
    assert sizes([500] * 4, 2) == [[500, 500]] * 2  # 2,000: one task per core, 1,000 rows each
    assert sizes([500] * 40, 400) == [[500]] * 40  # a big cluster keeps every table a task
    assert sizes([3000] * 40, 1, 5_000) == [[3000]] * 40  # never over rows_per_unit where units allow
    assert sizes([300, 300, 50_000, 300], 2) == [[300, 300], [50_000], [300]]
    assert readers.group_units([{"uri": "a.jsonl"}, {"rows": 0}], 2, "rows", 1000, 50_000) == [
        [{"uri": "a.jsonl"}], [{"rows": 0}]]
    mixed = readers.group_units([{"rows": 500}, {"uri": "a.jsonl"}, {"rows": 500}], 1, "rows", 1000, 50_000)
    assert mixed == [[{"rows": 500}], [{"uri": "a.jsonl"}], [{"rows": 500}]]  # a JSONL table stays alone

    plan = readers.read_plan(spark, [str(tmp_path)], 10)
    assert plan.rdd.getNumPartitions() == 4
    got = readers.apply_stages(plan, [ReadUnits(max_member_bytes=1 << 20)]).collect()
    key = lambda r: (r["source"], r["source_key"], r["sample_id"], r["url"], r["caption"])
    assert sorted(map(key, got)) == sorted(map(key, _rows([u for t in readers.plan_units([str(tmp_path)], 10)
                                                            for u in t])))
    assert len(got) == 7 * 300 + 5


def test_a_large_row_group_is_read_in_row_slices_and_keys_do_not_depend_on_it(tmp_path, spark, monkeypatch):
    """A URL list written as one row group (pandas and pyarrow write up to 1,048,576 rows a group) is cut
    into row slices, so it is not one read task whatever the cores; duplicate keys across slices are
    claimed as one reader of the whole table claims them."""
    from pipelines.io.readers import ReadUnits

    keys = [["a", "b", "a", None, "row4", "c"][i % 6] if i % 5 else f"k{i}" for i in range(3000)]
    pq.write_table(pa.table({"key": keys, "url": [f"http://h/{i}.jpg" for i in range(3000)]}), tmp_path / "one.parquet")
    pq.write_table(pa.table({"url": [f"http://h/{i}.jpg" for i in range(2500)]}), tmp_path / "two.parquet",
                   row_group_size=1000)  # groups of 1000, 1000, 500
    whole = sorted((r["source"], r["source_key"], r["sample_id"], r["error"], r["url"])
                   for r in _plan_rows([tmp_path / "one.parquet", tmp_path / "two.parquet"]))
    tasks = readers.plan_units([str(tmp_path)], 10, cores=1)  # 5,500 rows, 4 tasks: a share is 1,375
    parts = [json.loads(u["part"]) for t in tasks for u in t]
    assert [(p["row_groups"], p.get("skip"), p["rows"]) for p in parts] == [
        ([0], 0, 1000), ([0], 1000, 1000), ([0], 2000, 1000), ([0], None, 1000), ([1], None, 1000), ([2], None, 500)]
    assert [len(t) for t in tasks] == [1, 2, 1, 2]  # then grouped by rows
    assert len(readers.plan_units([str(tmp_path)], 10)) == 2  # no cores given: a task per table
    many = readers.plan_units([str(tmp_path / "two.parquet")], 10, cores=8)  # no slice under 1,000 rows
    assert [(json.loads(u["part"])["row_groups"], json.loads(u["part"])["rows"]) for t in many for u in t] == [
        ([0], 1000), ([1], 1000), ([2], 500)]
    assert readers.slice_rows(2_000_000, 100 << 20, 50_000) == 62_500  # at most 32 slices a group
    assert readers.slice_rows(20_000, 300 << 20, 2_500) == 20_000  # too large to decode once per slice

    plan = readers.read_plan(spark, [str(tmp_path)], 10)  # the test session's 2 cores: 6 tasks
    assert plan.rdd.getNumPartitions() == 6
    got = sorted((r["source"], r["source_key"], r["sample_id"], r["error"], r["url"])
                 for r in readers.apply_stages(plan, [ReadUnits(max_member_bytes=1 << 20)]).collect())
    assert got == whole and len(got) == 5500
    one = {r[1]: r[3] for r in whole if r[0].split("::")[0].endswith("one.parquet")}
    assert one["a"] is None and one["a#1"] == "duplicate_member" and one["row4"] is None
    # 2,000 rows carry one of 4 keys (400 more have none, 600 a unique one): all but 4 are repeats
    assert sum(e == "duplicate_member" for e in one.values()) == 2000 - 4

    monkeypatch.setattr(readers, "SLICED_GROUP_BYTES", 1000)  # a group of image bytes stays whole
    assert [len(t) for t in readers.plan_units([str(tmp_path / "one.parquet")], 10, cores=2)] == [1]


def test_small_tars_share_read_tasks_by_size_local_and_on_s3(tmp_path, spark, s3_server, monkeypatch):
    """Tars are grouped like tables, by bytes: a local tar's size from a stat, an S3 one's from the listing
    (no request per object); ids and rows as when each tar is a task."""
    from pipelines.io import storage
    from pipelines.io.readers import ReadUnits

    monkeypatch.setattr(readers, "MIN_TAR_BYTES_PER_TASK", 45_000)
    for i in range(6):
        _tar(tmp_path / f"part-{i}.tar", [m for j in range(5) for m in (
            (f"k{i}-{j}.jpg", bytes([i, j]) * 1000), (f"k{i}-{j}.txt", f"caption {i} {j}".encode()))])
    size = os.path.getsize(tmp_path / "part-0.tar")
    assert size == 20_480  # 6 tars of 20 KB: 3 tasks of 2 on 2 cores, none under 45 KB
    tasks = readers.plan_units([str(tmp_path)], 10, cores=2)
    assert [[u["uri"].rsplit("/", 1)[1] for u in t] for t in tasks] == [
        ["part-0.tar", "part-1.tar"], ["part-2.tar", "part-3.tar"], ["part-4.tar", "part-5.tar"]]
    assert all(u["bytes"] == size for t in tasks for u in t)
    assert len(readers.plan_units([str(tmp_path)], 10)) == 6

    plan = readers.read_plan(spark, [str(tmp_path)], 10)
    assert plan.rdd.getNumPartitions() == 3
    got = readers.apply_stages(plan, [ReadUnits(max_member_bytes=1 << 20)]).collect()
    key = lambda r: (r["source"], r["source_key"], r["sample_id"], r["caption"], r["image"])
    whole = _rows([u for t in readers.plan_units([str(tmp_path)], 10) for u in t])
    assert sorted(map(key, got)) == sorted(map(key, whole)) and len(got) == 30

    storage.s3_client.cache_clear()
    client = storage.s3_client()
    client.create_bucket(Bucket="tars")
    for i in range(6):
        client.upload_file(str(tmp_path / f"part-{i}.tar"), "tars", f"in/part-{i}.tar")
    assert storage.list_sized("s3://tars/in/") == [(f"s3://tars/in/part-{i}.tar", size) for i in range(6)]
    remote = readers.plan_units(["s3://tars/in/"], 10, cores=2)
    assert [[u["uri"].rsplit("/", 1)[1] for u in t] for t in remote] == [
        [u["uri"].rsplit("/", 1)[1] for u in t] for t in tasks]


def test_a_split_unit_reads_only_its_part(tmp_path, monkeypatch):
    paths = _split_fixtures(tmp_path)
    units = [u for t in readers.plan_units([str(paths[1])], 10, rows_per_unit=4) for u in t]
    assert [json.loads(u["part"])["row_groups"] for u in units] == [[0, 1], [2, 3], [4, 5]]
    assert [r["source_key"] for r in _rows(units[1:2])] == ["row4", "row5", "row6", "row7"]
    units = [u for t in readers.plan_units([str(paths[2])], 10, bytes_per_unit=200) for u in t]
    assert len(units) > 2


def test_split_tables_on_s3_are_read_by_ranges(tmp_path, s3_server):
    from pipelines.io import storage

    storage.s3_client.cache_clear()
    plain = _split_fixtures(tmp_path)[1]
    lines = tmp_path / "urls.jsonl"
    lines.write_text("".join("\n" if i % 5 == 2 else json.dumps({"url": f"http://h/{i}.jpg"}) + "\n" for i in range(40)))
    client = storage.s3_client()
    client.create_bucket(Bucket="splits")
    for p in (plain, lines):
        client.upload_file(str(p), "splits", f"in/{p.name}")

    def keys(units):
        return [(r["source"].rsplit("/", 1)[-1], r["source_key"], r["error"], r["url"]) for r in _rows(units)]

    local = keys([u for t in readers.plan_units([str(plain), str(lines)], 10) for u in t])
    heads = []
    client.meta.events.register("before-parameter-build.s3.HeadObject", lambda params, **kw: heads.append(params["Key"]))
    units = [u for t in readers.plan_units(["s3://splits/in/plain.parquet", "s3://splits/in/urls.jsonl"], 10,
                                           rows_per_unit=4, bytes_per_unit=300) for u in t]
    assert len(units) > 5 and all(u["part"] for u in units)
    assert "in/urls.jsonl" not in heads  # its byte ranges come from the listing's size, not a HEAD request
    first = 0  # what resolve_splits does with Spark: each JSONL range's first line number
    for u in units:
        part = json.loads(u["part"])
        if "start" in part:
            count = sum(1 for _ in readers._jsonl_lines(u["uri"], {**part, "first": 0}))
            part.update(first=first, keys={})
            first += count
            u["part"] = json.dumps(part)
    assert keys(units) == local


def test_ids_are_128_bits_and_do_not_change_when_the_corpus_moves(tmp_path):
    import shutil

    from schemas.common import SAMPLE_ID_REGEX

    a = tmp_path / "store-a" / "corpus"
    a.mkdir(parents=True)
    _tar(a / "00000.tar", [("k1.jpg", b"\xff\xd8\xff1"), ("k1.txt", b"one"), ("k2.jpg", b"\xff\xd8\xff2")])
    (a / "loose.jpg").write_bytes(b"\xff\xd8\xff3")
    (a / "loose.txt").write_text("three")
    b = tmp_path / "elsewhere" / "deeper" / "corpus"
    shutil.copytree(a, b)

    def ids(root, dataset=""):
        units = [u for task in readers.plan_units([str(root)], 16) for u in task]
        rows = [r for u in units for r in readers.read_unit(u, 1 << 20, dataset)]
        return {r["source_key"]: r["sample_id"] for r in rows}

    moved, here = ids(b), ids(a)
    assert here == moved and len(here) == 3
    assert all(re.fullmatch(SAMPLE_ID_REGEX, i) for i in here.values())
    assert ids(a, "laion-subset") != here  # the recipe's dataset name is part of the id
    renamed = tmp_path / "store-a" / "other-name"
    shutil.copytree(a, renamed)
    assert ids(renamed) != here and ids(renamed, "corpus") == here  # default dataset: the input folder's name
