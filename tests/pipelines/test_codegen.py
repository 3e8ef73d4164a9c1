"""Code generation by run size (pipelines/codegen.py): features passes are interpreted, small runs
interpret the queries after their features pass, large ones compile them, a user's own setting wins,
and both give the same run."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipelines import codegen
from pipelines.build import run_build
from pipelines.recipe import load


@pytest.fixture
def restore(spark):
    before = {k: spark.conf.get(k, None) for k in (codegen.WHOLE_STAGE, codegen.FACTORY, codegen.LIMIT)}
    yield
    for k, v in before.items():
        if v is None:
            spark.conf.unset(k)
        else:
            spark.conf.set(k, v)


def _compiled_plan(spark) -> bool:
    df = spark.range(100).selectExpr("id % 7 AS k").groupBy("k").count()
    df.collect()
    return "*(1)" in df._jdf.queryExecution().executedPlan().toString()  # a whole-stage code id


def test_small_counts_interpret_and_large_or_unknown_ones_compile(spark, restore):
    spark.conf.set(codegen.LIMIT, "1000")
    assert codegen.choose(spark, 1000) is False
    assert spark.conf.get(codegen.WHOLE_STAGE) == "false" and spark.conf.get(codegen.FACTORY) == "NO_CODEGEN"
    assert not _compiled_plan(spark)
    assert codegen.choose(spark, 1001) is True
    assert spark.conf.get(codegen.WHOLE_STAGE) == "true" and spark.conf.get(codegen.FACTORY) == "FALLBACK"
    assert _compiled_plan(spark)
    assert codegen.choose(spark, 0) is False
    assert codegen.choose(spark, None) is True  # unknown: Spark's default
    assert codegen.features_pass(spark) is False
    assert spark.conf.get(codegen.WHOLE_STAGE) == "false" and spark.conf.get(codegen.FACTORY) == "NO_CODEGEN"


def test_a_users_own_setting_is_left_alone():
    class Conf(dict):
        def contains(self, key):
            return key in self

        def set(self, key, value):
            raise AssertionError(f"{key} changed although the user set code generation")

    class Session:
        conf = Conf()

        class sparkContext:  # stands in for SparkContext: its SparkConf, as set at launch
            _conf = Conf({codegen.WHOLE_STAGE: "true"})

    assert codegen.choose(Session(), 10) is None
    assert codegen.features_pass(Session()) is None


def _run(spark, sample_dir, tmp, limit: str) -> dict:
    out = str(tmp / f"out-{limit}")
    spark.conf.set(codegen.LIMIT, limit)
    recipe = load(None, ["image_text.clip.enabled=false", "shards.max_samples=8"], [f"image_text={sample_dir}"], out)
    summary = run_build(spark, recipe, dict(recipe.inputs), out)
    ledger = pq.read_table(os.path.join(out, "ledger")).sort_by("sample_id").to_pylist()
    shard_dir = os.path.join(out, "shards", "image_text")
    tars = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with open(os.path.join(shard_dir, name), "rb") as f:
                tars[name] = f.read()
    return {"ledger": ledger, "tars": tars, "kept": summary["kinds"]["image_text"]["kept"],
            "dropped": summary["kinds"]["image_text"]["dropped"]}


@pytest.mark.slow  # two whole runs of the sample
def test_interpreted_and_compiled_runs_are_the_same(spark, sample_dir, tmp_path, restore, monkeypatch):
    chosen = []
    real, features = codegen.choose, codegen.features_pass
    monkeypatch.setattr(codegen, "choose", lambda s, n: chosen.append((n, real(s, n))) or chosen[-1][1])
    monkeypatch.setattr(codegen, "features_pass", lambda s: chosen.append(("features", features(s))) or chosen[-1][1])
    interpreted = _run(spark, sample_dir, tmp_path, "1000")
    # the features pass (its task table included): interpreted; after it (the items read) and the ledger,
    # report, gates too
    assert [c for _, c in chosen] == [False, False, False] and chosen[0][0] == "features" and chosen[1][0] > 0
    chosen.clear()
    compiled = _run(spark, sample_dir, tmp_path, "0")
    assert [c for _, c in chosen] == [False, True, True]
    assert interpreted["kept"] > 0 and interpreted["dropped"] and interpreted["tars"]
    assert interpreted == compiled
