"""The ledger is written in sample_id order: a small one as one file sorted in one task, a big one by a
global sort; both give the same rows in the same order."""
from __future__ import annotations

import pyarrow.parquet as pq

from pipelines import build


def test_small_and_big_ledgers_are_written_in_sample_id_order(spark, tmp_path, monkeypatch):
    rows = [(f"{(i * 7919) % 1000:016x}", "image_text", "kept" if i % 3 else "dropped") for i in range(1000)]
    ledger = spark.createDataFrame(rows, "sample_id string, kind string, status string").repartition(4)
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    build.write_parquet(build.sorted_ledger(ledger, 1000), small)
    monkeypatch.setattr(build, "LEDGER_ONE_FILE", 999)
    build.write_parquet(build.sorted_ledger(ledger, 1000), big)
    want = sorted(r[0] for r in rows)
    got_small = pq.read_table(small).column("sample_id").to_pylist()
    assert got_small == want and len(pq.ParquetDataset(small).files) == 1
    assert pq.read_table(big).column("sample_id").to_pylist() == want
