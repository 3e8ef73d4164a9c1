"""Accounting that can fail: the reader counts the items of every read unit as it reads them, and the
ledger is reconciled with those counts before anything is published. A bug that loses rows between
the reader and the ledger (planted with the test-only fault hook) fails the run naming the unit; a
shard writer that fails (in its own thread, beside the ledger's jobs) fails the run with its error."""
from __future__ import annotations

import json
import os
import threading

import pytest

from jobs.make_sample import PHOTOS, load_photo
from pipelines.build import run_build
from pipelines.kind import AccountingError
from pipelines.recipe import load

pytestmark = pytest.mark.slow  # whole-job runs: `pytest -m "not slow"` for a quick pass

NAMES = list(PHOTOS)[:6]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("acct")
    files = root / "in" / "files"
    files.mkdir(parents=True)
    rows = []
    for i, n in enumerate(NAMES):
        img = load_photo(n).convert("RGB")
        if i < 3:  # three loose files with side-car captions
            img.save(files / f"{n}.jpg", quality=90)
            (files / f"{n}.txt").write_text(PHOTOS[n])
        else:  # three rows of a JSONL table with the image path
            img.save(root / "in" / f"{n}.png")
            rows.append({"key": n, "image_path": f"{n}.png", "caption": PHOTOS[n]})
    (root / "in" / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _recipe(out: str, corpus) -> object:
    return load(None, ["image_text.clip.enabled=false", "image_text.balance.enabled=false", "shards.max_samples=4"],
                [f"image_text={corpus / 'in'}"], out)


def test_read_counts_reconcile_with_the_ledger(spark, corpus, tmp_path):
    import dataclasses

    work = str(tmp_path / "work")
    recipe = dataclasses.replace(_recipe(str(tmp_path / "out"), corpus), keep_work=True, work_dir=work)
    summary = run_build(spark, recipe, dict(recipe.inputs), str(tmp_path / "out"))
    k = summary["kinds"]["image_text"]
    assert k["read"] == {"units": 2, "items": 6} and k["input"] == 6
    # a rerun reuses the features checkpoint (nothing is read) and still reconciles from the saved counts
    again = run_build(spark, recipe, dict(recipe.inputs), str(tmp_path / "out2"))
    assert again["stages"]["image_text-features"]["reused"]
    assert again["kinds"]["image_text"]["read"] == {"units": 2, "items": 6}


def test_rows_lost_mid_pipeline_fail_the_run_naming_the_unit(spark, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("VLCURATE_FAULT_DROP_ROWS", "caption")  # one row per batch vanishes after caption
    out = str(tmp_path / "out")
    recipe = _recipe(out, corpus)
    with pytest.raises(AccountingError, match=r"read unit .*(table\.jsonl|files).*the reader read \d+ items, "
                                              r"the ledger holds \d+"):
        run_build(spark, recipe, dict(recipe.inputs), out)
    assert not os.path.exists(os.path.join(out, "shards", "image_text", "index.json"))  # nothing published
    # the report material, started beside the accounting, was waited for: no thread or Spark job of the run is left
    assert not [t for t in threading.enumerate() if t.name == "vlcurate-report"]
    assert spark.sparkContext.statusTracker().getActiveJobsIds() == []


def test_a_failed_shard_writer_fails_the_run_and_is_waited_for(spark, corpus, tmp_path, monkeypatch):
    """The shards are written in a thread beside the ledger's jobs: a sample that breaks the shard
    contract (a pipeline bug) fails the run with the writer's error, nothing is published, and no
    thread or Spark job of the run is left behind."""
    from pipelines import image_text

    def broken(cfg, seed):
        def convert(row: dict) -> dict:
            return {"__key__": row["sample_id"], "txt": b"no image, no json"}

        return convert

    monkeypatch.setattr(image_text, "to_sample", broken)
    out = str(tmp_path / "out")
    recipe = _recipe(out, corpus)
    with pytest.raises(Exception, match="ContractViolation"):
        run_build(spark, recipe, dict(recipe.inputs), out)
    assert not os.path.exists(os.path.join(out, "shards", "image_text", "index.json"))
    ours = ("vlcurate-report", "vlcurate-gates", "vlcurate-image_text-shards")
    left = [t.name for t in threading.enumerate() if t.name in ours]
    assert not left, left
    assert spark.sparkContext.statusTracker().getActiveJobsIds() == []
