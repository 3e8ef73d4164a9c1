"""A kind defined only in the tests (tests/pipelines/toy_kind.py) goes through the whole spine:
recipe section, ledger with a sub-item per item, accounting per unit, quality gates, report, shard
contract, and a trainer formatter reading the shards the writer produced."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import gates, kinds
from pipelines.build import run_build
from pipelines.recipe import RecipeError, load
from tests.pipelines import toy_kind
from tests.util import read_json


def _card(folder, name: str, caption: str, kind: str) -> None:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    if kind == "noise":
        arr = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    elif kind == "solid_centre":  # textured border, one flat colour in the middle: the crop is solid
        arr = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
        arr[30:90, 50:110] = (10, 120, 200)
    else:  # "solid": the card itself
        arr = np.full((120, 160, 3), 200, dtype=np.uint8)
    Image.fromarray(arr).save(os.path.join(folder, name + ".png"))
    with open(os.path.join(folder, name + ".txt"), "w", encoding="utf-8") as f:
        f.write(caption)


CARDS = [
    ("a", "a red card with speckles", "noise"),  # kept, with its crop
    ("b", "a green card with a calm centre", "solid_centre"),  # kept, its crop dropped as solid_color
    ("c", "a card of no particular hue", "noise"),  # dropped: no colour word; its crop: parent_removed
    ("d", "a blue card that is one flat colour", "solid"),  # dropped: solid_color; its crop too (solid)
    ("e", "a yellow card", "broken"),  # not an image: quarantined, and its crop
]


def _cards(tmp):
    """tmp/cards: the CARDS as files, the broken one not an image at all."""
    folder = tmp / "cards"
    folder.mkdir()
    for name, caption, kind in CARDS:
        if kind == "broken":
            (folder / f"{name}.png").write_bytes(b"this is not a png at all")
            (folder / f"{name}.txt").write_text(caption)
        else:
            _card(str(folder), name, caption, kind)
    return folder


@pytest.fixture(scope="module")
def toy_run(spark, tmp_path_factory):
    kinds.register(toy_kind.KIND)
    tmp = tmp_path_factory.mktemp("toy")
    folder = _cards(tmp)
    out = str(tmp / "out")
    try:
        recipe = load(None, ["toy_cards.crop=0.3", "shards.max_samples=1"], [f"toy_cards={folder}"], out)
        summary = run_build(spark, recipe, dict(recipe.inputs), out)
    finally:
        kinds.unregister(toy_kind.NAME)
    return out, summary


def test_the_recipe_has_a_section_per_registered_kind_only():
    with pytest.raises(RecipeError, match="unknown recipe key 'toy_cards'"):
        load(None, ["toy_cards.crop=0.3"])
    kinds.register(toy_kind.KIND)
    try:
        assert load(None, ["toy_cards.crop=0.3"]).toy_cards.crop == 0.3
        with pytest.raises(RecipeError, match="toy_cards.crop"):
            load(None, ["toy_cards.crop=lots"])
    finally:
        kinds.unregister(toy_kind.NAME)


def test_ledger_has_every_item_and_sub_item_once(toy_run):
    out, _ = toy_run
    rows = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    by_key = {r["source_key"]: r for r in rows}
    assert len(rows) == 2 * len(CARDS) == len(by_key)
    want = {
        "a": ("kept", None), "a#crop": ("kept", None),
        "b": ("kept", None), "b#crop": ("dropped", "solid_color"),
        "c": ("dropped", "no_colour_word"), "c#crop": ("dropped", "parent_removed"),
        "d": ("dropped", "solid_color"), "d#crop": ("dropped", "solid_color"),
        "e": ("quarantined", "image_undecodable"), "e#crop": ("quarantined", "image_undecodable"),
    }
    assert {k: (r["status"], r["reason"]) for k, r in by_key.items()} == want
    for name, *_ in CARDS:
        card, crop = by_key[name], by_key[name + "#crop"]
        assert card["unit"] == "card" and card["parent_id"] is None
        assert crop["unit"] == "crop" and crop["parent_id"] == card["sample_id"]
    assert by_key["a#crop"]["shard"] == by_key["a"]["shard"]  # a kept sub-item sits in its parent's shard


def test_accounting_per_unit_and_gates(toy_run):
    _, summary = toy_run
    k = summary["kinds"]["toy_cards"]
    assert k["unit"] == "card" and k["input"] == 5 and k["kept"] == 2
    assert k["units"]["card"] == {"input": 5, "kept": 2, "dropped": {"no_colour_word": 1, "solid_color": 1},
                                  "quarantined": {"image_undecodable": 1}}
    assert k["units"]["crop"] == {"input": 5, "kept": 1, "dropped": {"parent_removed": 1, "solid_color": 2},
                                  "quarantined": {"image_undecodable": 1}}
    assert k["facts"] == {"toy": {"crop": 0.3}}
    g = summary["gates"]
    assert g["passed"], g["failed_critical"]
    assert {"toy_cards.ledger", "toy_cards.totals", "toy_cards.shards"} <= set(g["suites"])
    names = {c["name"] for s in g["suites"].values() for c in s["expectations"]}
    assert {"toy_cards.totals.crop_counts_add_up", "toy_cards.shards.colour_values", "toy_cards.shards.contract",
            "toy_cards.totals.some_crops_kept", "toy_cards.ledger.sub_items_have_a_parent"} <= names


def test_a_reason_not_declared_for_the_kind_fails_its_gate(toy_run, tmp_path):
    out, _ = toy_run
    table = pq.read_table(os.path.join(out, "ledger")).to_pandas()
    table["keeper_status"] = "none"
    ids = dict(zip(table.sample_id, table.status))
    table["parent_status"] = [("none" if p is None else ids.get(p, "missing")) for p in table.parent_id]
    table.loc[table.source_key == "c", "reason"] = "language"  # an image_text reason: not toy_cards'
    res = gates.validate({"toy_cards.ledger": table}, {"toy_cards.ledger": gates.ledger_checks(toy_kind.KIND)},
                         str(tmp_path))
    failed = {c["name"] for c in gates.failed({"suites": res})}
    assert failed == {"toy_cards.ledger.reason_known", "toy_cards.ledger.dropped_reason"}


def test_report_follows_the_contract(toy_run):
    out, _ = toy_run
    with open(os.path.join(out, "reports", "index.html"), encoding="utf-8") as f:
        page = f.read()
    for anchor in ("kind-toy_cards", "funnel-toy_cards", "units-toy_cards", "gallery-toy_cards-no_colour_word",
                   "plot-colour", "plot-caption_chars"):
        assert f"id='{anchor}'" in page, anchor
    assert "parent_removed" in page and "the caption names no colour" in page
    meta = read_json(os.path.join(out, "reports", "material", "toy_cards", "material.json"))
    assert meta["unit"] == "card" and meta["rows"] == 10
    assert [p["name"] for p in meta["plots"]] == ["colour", "caption_chars"]


def test_trainer_formatter_reads_the_shards_the_writer_made(toy_run):
    out, _ = toy_run
    from trainer import formatters, shards
    from trainer.formatters import FormatContext, Formatted, _finish, image_block
    from trainer.images import ImageConfig, image_patches
    from trainer.tokenizer import train_bpe

    contract = toy_kind.contract()

    @formatters.register("toy_cards")
    class ToyCards:  # the kind's formatter, reading the members its contract declares
        def format(self, sample: dict, ctx: FormatContext) -> Formatted:
            ids, images = [], []
            for ext in ("jpg", "crop.jpg"):
                if ext in sample:
                    patches, grid = image_patches(sample[ext], ctx.image)
                    ids += image_block(ctx, grid)
                    images.append((patches, grid))
            ids += ctx.tokenizer.encode(sample["txt"].decode())
            return _finish(ids, images, ctx, sample, "toy_cards")

        def texts(self, sample: dict) -> list[str]:
            return [sample["txt"].decode()]

    found = shards.find_kinds(os.path.join(out, "shards"), ["toy_cards"])["toy_cards"]
    samples = list(shards.iter_raw_samples([s.url for s in found]))
    assert len(samples) == 2 and all(contract.violations(s) == [] for s in samples)
    tok = train_bpe([t for s in samples for t in formatters.get("toy_cards").texts(s)] * 20, vocab_size=300,
                    min_frequency=1)
    ctx = FormatContext(tok, ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784), max_len=512)
    formatted = [formatters.get("toy_cards").format(s, ctx) for s in samples]
    assert sorted(len(f.images) for f in formatted) == [1, 2]  # card b lost its crop; card a kept it
    for s, f in zip(samples, formatted):
        doc = json.loads(s["json"])
        assert len(f.images) == 1 + doc["has_crop"]
        assert Image.open(io.BytesIO(s["jpg"])).size == (doc["width"], doc["height"])
        assert tok.decode(f.ids).endswith(doc["caption"] + "<|endoftext|>")
    formatters.REGISTRY.pop("toy_cards")


def test_a_step_that_drops_nothing_leaves_no_join_behind(spark):
    from pyspark.sql import functions as F

    from pipelines.checkpoint import truncated

    rows = spark.range(1000).select(F.col("id").cast("string").alias("sample_id"))
    nothing = truncated(spark.createDataFrame([], "sample_id string, reason string"))
    some = truncated(rows.filter("sample_id < '10'").select("sample_id", F.lit("x").alias("reason")))
    assert nothing.count() == 0 and some.count() == 2  # '0' and '1' sort before '10'

    def plan(drops):
        return rows.join(drops.select("sample_id"), "sample_id", "left_anti")._jdf.queryExecution().executedPlan().toString()

    # an empty decision table is folded away (it was a checkpoint of unknown size: a sort-merge join that
    # shuffled every row in play); a non-empty one stays and is broadcast
    assert "Join" not in plan(nothing)
    assert "BroadcastHashJoin" in plan(some) and "SortMergeJoin" not in plan(some)


def test_small_tables_travel_in_the_plan_and_large_ones_are_checkpoints(spark, monkeypatch):
    """Up to LOCAL_ROWS rows a truncated table is a local relation (a broadcast of it runs no Spark job);
    above, a local checkpoint. Both keep the rows and the schema."""
    from pyspark.sql import functions as F

    from pipelines import checkpoint

    rows = spark.range(200).select(F.format_string("%032x", "id").alias("sample_id"),
                                   (F.col("id") / 7).cast("float").alias("score"),
                                   F.array(F.col("id").cast("string")).alias("tags"))
    monkeypatch.setattr(checkpoint, "LOCAL_ROWS", 200)
    small = checkpoint.truncated(rows)
    monkeypatch.setattr(checkpoint, "LOCAL_ROWS", 199)
    large = checkpoint.truncated(rows)
    for table in (small, large):
        assert table.schema == rows.schema
        assert sorted(map(tuple, table.collect())) == sorted(map(tuple, rows.collect()))

    def plan(df):
        return df._jdf.queryExecution().executedPlan().toString()

    assert "LocalTableScan" in plan(small) and "ExistingRDD" not in plan(small)
    assert "ExistingRDD" in plan(large) and "LocalTableScan" not in plan(large)
    joined = spark.range(1000).select(F.format_string("%032x", "id").alias("sample_id")).join(
        small.select("sample_id"), "sample_id", "left_anti")
    assert "BroadcastHashJoin" in plan(joined) and joined.count() == 800


def test_a_reason_step_runs_no_spark_job_of_its_own(spark):
    """A decision on each row alone (Step.reason) filters the rows in play inside the next query that
    reads them: it starts no job, and its drops carry its reason."""
    from pyspark.sql import functions as F

    from pipelines.kind import Step, _run_step

    rows = spark.range(10).select(F.format_string("%032x", "id").alias("sample_id"), F.col("id").alias("n"))
    step = Step("rules", reason=lambda F: F.when(F.col("n") % 3 == 0, F.lit("multiple_of_three")))
    sc = spark.sparkContext
    sc.setJobGroup("toy reason step", "toy reason step")
    try:
        found: list = []
        alive = _run_step(None, None, step, {}, rows, [], found)
        assert sc.statusTracker().getJobIdsForGroup("toy reason step") == []
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert alive.columns == rows.columns
    assert sorted(r.n for r in alive.collect()) == [1, 2, 4, 5, 7, 8]
    drops = found[0].collect()
    assert sorted(r.sample_id for r in drops) == [f"{i:032x}" for i in (0, 3, 6, 9)]
    assert {(r.reason, r.duplicate_of) for r in drops} == {("multiple_of_three", None)}


def test_the_ledger_reads_leading_reasons_in_its_own_scan(spark, tmp_path):
    """The quarantine and the `reason` steps that lead a plan are evaluated in the ledger's one scan of
    the features (nothing joined for them); a `reason` step after a `decide` is joined like a decision.
    Both give each row the reason of the first step that removed it."""
    import dataclasses

    from pyspark.sql import functions as F

    from filters.base import StageTimer
    from pipelines.kind import Context, Step, run_kind

    folder = _cards(tmp_path)
    kinds.register(toy_kind.KIND)
    try:
        recipe = load(None, ["toy_cards.crop=0.3"], [f"toy_cards={folder}"], str(tmp_path / "out"))
    finally:
        kinds.unregister(toy_kind.NAME)

    def no_red(alive):
        red = alive.filter(F.col("caption").contains("red"))
        return red.select("sample_id", F.lit("no_colour_word").alias("reason"))

    late = Step("late", reason=lambda F: F.when(F.col("caption").contains("green"), F.lit("no_colour_word")))

    def ledger_of(extra: list[Step], name: str):
        ctx = Context(spark=spark, recipe=recipe, cfg=recipe.toy_cards, uris=[str(folder)], out=str(tmp_path / name),
                      work_dir=str(tmp_path / f"work-{name}"), timer=StageTimer(spark))
        plan = toy_kind.plan(ctx)
        res = run_kind(toy_kind.KIND, ctx, dataclasses.replace(plan, steps=[*plan.steps, *extra]))
        res.written()
        got = {r.source_key: (r.status, r.reason) for r in res.ledger.collect()}
        return got, res.ledger._jdf.queryExecution().sparkPlan().toString().count("FileScan parquet")

    leading, scans = ledger_of([], "leading")
    assert scans == 1  # the features once: the quarantine and the rules are columns of that scan
    assert leading["e"] == ("quarantined", "image_undecodable") and leading["c"] == ("dropped", "no_colour_word")
    assert leading["a"] == leading["b"] == ("kept", None)

    later, scans = ledger_of([Step("no_red", decide=no_red), late], "later")
    assert scans == 2  # the late reason's drops: a second scan, joined
    # a (red) goes in the decision, b (green) in the late rule, their crops with them; b's crop had
    # already gone to the leading rules (solid) and keeps that reason
    want = dict(leading, a=("dropped", "no_colour_word"), b=("dropped", "no_colour_word"),
                **{"a#crop": ("dropped", "parent_removed")})
    assert later == want
