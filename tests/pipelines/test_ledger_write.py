"""The ledger is written in sample_id order: a small one as one file sorted in one task, a big one by a
global sort; both give the same rows in the same order."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines import build


def test_ledgers_on_the_driver_and_in_spark_are_written_alike(spark, tmp_path):
    """OUT/ledger in sample_id order, with the ledger schema's columns and types, whether the driver
    holds the ledger (sorted and written there) or Spark sorts and writes it; the driver writes one file."""
    from pyspark.sql import functions as F

    from schemas import ledger as L
    from schemas.common import READ_UNIT

    rows = [(f"{(i * 7919) % 1000:016x}", "image_text", "kept" if i % 3 else "dropped") for i in range(1000)]
    ledger = spark.createDataFrame(rows, "sample_id string, kind string, status string").repartition(4)
    ledger = ledger.select(*[F.col(f.name) if f.name in ledger.columns else F.lit(f"{f.name}-x" if not f.nullable else None)
                             .cast("string").alias(f.name) for f in L.SCHEMA], F.lit("u").alias(READ_UNIT))
    on_driver, in_spark = str(tmp_path / "driver"), str(tmp_path / "spark")
    build.write_ledger(ledger, ledger.toArrow(), on_driver)
    build.write_ledger(ledger, None, in_spark)
    want = sorted(r[0] for r in rows)
    got = pq.read_table(on_driver)
    assert got.column("sample_id").to_pylist() == want and len(pq.ParquetDataset(on_driver).files) == 1
    assert got.to_pylist() == pq.read_table(in_spark).to_pylist()
    for table in (got, pq.read_table(in_spark)):
        assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in L.SCHEMA]


@pytest.mark.parametrize("engine", ["spark", "arrow"])
def test_ledger_counts_per_kind_and_for_the_run(spark, engine):
    """The ledger counted by (kind, unit, status, reason, read unit), and each kind's rows, distinct ids,
    kept rows and rows naming a shard; the run's rows and ids are the sums over its kinds, so a sample
    id that appears twice within a kind still shows as rows != ids (the accounting's check). One Spark
    job counts a big ledger, Arrow on the driver a small one (`materialise`): the same counts."""
    from schemas.common import make_sample_id

    rows = [(make_sample_id("image_text", "s", k), "image_text", "pair", None, st, rs, sh, "u1")
            for k, st, rs, sh in [("a", "kept", None, "image_text-00000"), ("b", "dropped", "near_duplicate", None),
                                  ("c", "kept", None, "image_text-00000")]]
    rows.append(rows[0])  # the same item twice: a pipeline bug the counts must show
    doc = make_sample_id("interleaved", "s", "a")
    rows += [(doc, "interleaved", "document", None, "kept", None, "interleaved-00000", "u2"),
             (make_sample_id("interleaved", "s", "a#0"), "interleaved", "image", doc, "dropped", "image_too_small",
              None, "u2")]
    ledger = spark.createDataFrame(rows, "sample_id string, kind string, unit string, parent_id string, "
                                         "status string, reason string, shard string, read_unit string")
    counts, total = build.ledger_counts(ledger, ledger.toArrow() if engine == "arrow" else None)
    assert total == {"n": 6, "ids": 5, "kinds": {
        "image_text": {"n": 4, "ids": 3, "kept": 3, "with_shard": 3},
        "interleaved": {"n": 2, "ids": 2, "kept": 1, "with_shard": 1}}}
    got = sorted((r["kind"], r["unit"], r["status"], r["reason"], r["read_unit"], r["n"]) for r in counts)
    assert got == [("image_text", "pair", "dropped", "near_duplicate", "u1", 1), ("image_text", "pair", "kept", None, "u1", 3),
                   ("interleaved", "document", "kept", None, "u2", 1),
                   ("interleaved", "image", "dropped", "image_too_small", None, 1)]  # a sub-item is not read


@pytest.mark.parametrize("engine", ["spark", "arrow"])
def test_accounting_finds_a_sub_item_whose_parent_is_not_an_item_of_its_kind(spark, engine):
    """A sub-item names its parent: an item of the same kind in the ledger. The check runs in Spark on a
    big ledger and in Arrow on the driver's copy of a small one; both find the same orphan."""
    from types import SimpleNamespace

    from pipelines.kind import AccountingError
    from schemas.common import make_sample_id

    doc, other = make_sample_id("interleaved", "s", "a"), make_sample_id("image_text", "s", "b")
    rows = [(doc, "interleaved", "document", None, "kept", None, "interleaved-00000", "u"),
            (make_sample_id("interleaved", "s", "a#0"), "interleaved", "image", doc, "kept", None, None, None),
            (other, "image_text", "pair", None, "dropped", "near_duplicate", None, "u")]
    results = {"interleaved": SimpleNamespace(shards=[{"nsamples": 1}], read_counts=None),
               "image_text": SimpleNamespace(shards=[], read_counts=None)}
    schema = ("sample_id string, kind string, unit string, parent_id string, status string, reason string, "
              "shard string, read_unit string")

    def check(rows):
        ledger = spark.createDataFrame(rows, schema)
        whole = ledger.toArrow() if engine == "arrow" else None
        counts, total = build.ledger_counts(ledger, whole)
        build.check_accounting(ledger, results, counts, total, whole)

    check(rows)
    # the image's parent is an item, but of another kind
    orphan = (make_sample_id("interleaved", "s", "a#1"), "interleaved", "image", other, "kept", None, None, None)
    with pytest.raises(AccountingError, match="1 ledger rows name a parent_id"):
        check([*rows, orphan])
