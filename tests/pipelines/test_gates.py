"""Quality gates: the suites on small hand-made tables (clean ones pass, planted violations fail by
name, warnings never fail), and one end-to-end job whose CLIP checkpoint yields NaN scores: the job
exits with 3 naming the expectation, and its shards are not published."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from pipelines import gates, kinds
from pipelines.recipe import load
from tests.jobs.test_build_pretrain import ROOT, submit
from tests.util import read_bytes, read_json

KIND = "image_text"
SPEC = kinds.get(KIND)


def ledger_frame(rows: list[tuple]) -> pd.DataFrame:
    """(sample_id, status, reason, duplicate_of, shard) -> the ledger table with keeper_status and
    parent_status, made as a run makes it from the ledger on the driver (Arrow-backed columns)."""
    import pyarrow as pa

    n = len(rows)
    sample_id, status, reason, duplicate_of, shard = (list(c) for c in zip(*rows))
    whole = pa.table({"sample_id": sample_id, "kind": [KIND] * n, "unit": ["pair"] * n,
                      "parent_id": pa.nulls(n, pa.string()), "status": status, "reason": pa.array(reason, pa.string()),
                      "duplicate_of": pa.array(duplicate_of, pa.string()), "shard": pa.array(shard, pa.string())})
    table, info = gates.ledger_table(None, KIND, n=n, whole=whole)
    assert info["engine"] == "pandas"
    return table


def contract(clip: dict):
    return SPEC.contract(load().image_text, {"clip": clip})


CLEAN = [
    ("000000000000000000000000000000a1", "kept", None, None, "image_text-000000.tar"),
    ("000000000000000000000000000000a2", "kept", None, None, "image_text-000000.tar"),
    ("000000000000000000000000000000b1", "dropped", "near_duplicate", "000000000000000000000000000000a1", None),
    ("000000000000000000000000000000b2", "dropped", "image_too_small", None, None),
    ("000000000000000000000000000000c1", "quarantined", "image_empty", None, None),
]


def run_suite(tmp_path, name: str, table: pd.DataFrame, checks: list) -> dict:
    results = gates.validate({name: table}, {name: checks}, str(tmp_path))
    out = {"suites": results}
    out["failed_critical"] = [c["name"] for c in gates.failed(out)]
    return out


def test_clean_ledger_passes_and_data_docs_are_built(tmp_path):
    res = run_suite(tmp_path, f"{KIND}.ledger", ledger_frame(CLEAN), gates.ledger_checks(SPEC))
    assert res["failed_critical"] == []
    assert res["suites"][f"{KIND}.ledger"]["success"]
    assert os.path.isfile(tmp_path / gates.GX_DOCS)
    assert os.path.isfile(tmp_path / res["suites"][f"{KIND}.ledger"]["data_docs"])  # its validation page
    gates.enforce(res)  # does not raise


def test_planted_violations_fail_by_name(tmp_path):
    rows = CLEAN + [
        CLEAN[0],  # the same sample_id twice
        ("000000000000000000000000000000d1", "dropped", "blurry", None, None),  # a reason nobody declared
        ("000000000000000000000000000000d2", "dropped", "exact_duplicate", "ffffffffffffffffffffffffffffffff", None),  # keeper not in the ledger
    ]
    res = run_suite(tmp_path, f"{KIND}.ledger", ledger_frame(rows), gates.ledger_checks(SPEC))
    p = f"{KIND}.ledger."
    assert set(res["failed_critical"]) == {p + "sample_id_unique", p + "reason_known", p + "dropped_reason",
                                           p + "duplicate_keeper_exists"}
    with pytest.raises(gates.GateFailed) as err:
        gates.enforce(res)
    assert p + "sample_id_unique" in str(err.value) and p + "reason_known" in str(err.value)
    assert "blurry" in str(err.value)  # the offending value is named too
    unique = next(c for c in res["suites"][f"{KIND}.ledger"]["expectations"] if c["name"] == p + "sample_id_unique")
    assert unique["unexpected_count"] == 2 and unique["severity"] == "critical"


def test_the_ledger_suite_gives_the_same_results_in_pandas_and_above_the_cap_in_spark(spark, tmp_path):
    from schemas import ledger as L
    from schemas.common import spark_type

    rows = CLEAN + [CLEAN[0], ("000000000000000000000000000000d1", "dropped", "blurry", None, None),
                    ("000000000000000000000000000000d2", "dropped", "exact_duplicate", "f" * 32, None)]
    ledger = spark.createDataFrame(
        [{"sample_id": i, "kind": KIND, "source": "s", "source_key": f"k{n}", "unit": "pair", "parent_id": None,
          "status": st, "reason": r, "detail": None, "duplicate_of": d, "shard": sh}
         for n, (i, st, r, d, sh) in enumerate(rows)], spark_type(L.SCHEMA))
    name = f"{KIND}.ledger"
    results = {}
    # the statuses joined in Spark and looked up on the driver in the whole ledger fetched once: the same table
    joined, _ = gates.ledger_table(ledger, KIND)
    looked_up, info = gates.ledger_table(ledger, KIND, whole=ledger.toArrow())
    assert info == {"rows": 8, "engine": "pandas"}
    order = ["sample_id", "status"]
    pd.testing.assert_frame_equal(looked_up.sort_values(order).reset_index(drop=True),
                                  joined.sort_values(order).reset_index(drop=True))
    assert set(looked_up["keeper_status"]) == {"none", "kept", "missing"} and set(looked_up["parent_status"]) == {"none"}
    for cap in (gates.LEDGER_CAP, 3):
        table, info = gates.ledger_table(ledger, KIND, cap=cap)
        assert info == {"rows": 8, "engine": "pandas" if cap > 8 else "spark"}
        assert isinstance(table, pd.DataFrame) == (cap > 8)
        suite = gates.validate({name: table}, {name: gates.ledger_checks(SPEC)}, str(tmp_path / str(cap)))[name]
        assert suite["rows"] == 8
        # (Spark reports no count where a row condition selects no row; pandas reports 0)
        results[info["engine"]] = {c["name"]: (c["success"], c["unexpected_count"] or 0) for c in suite["expectations"]}
    assert results["spark"] == results["pandas"]
    p = f"{KIND}.ledger."
    assert {n for n, (ok, _) in results["spark"].items() if not ok} == {
        p + "sample_id_unique", p + "reason_known", p + "dropped_reason", p + "duplicate_keeper_exists"}
    assert results["spark"][p + "sample_id_unique"] == (False, 2)


def test_warnings_are_recorded_but_do_not_fail(tmp_path):
    totals = pd.DataFrame([{"input": 1000, "kept": 1, "dropped": 400, "quarantined": 599, "accounted": 1000,
                            "distinct_ids": 1000, "input_all_units": 1000, "kept_all_units": 1,
                            "rows_with_shard": 1, "shard_samples": 1, "kept_fraction": 0.001,
                            "quarantined_fraction": 0.599, "assert_clip_real_weights": False,
                            "fatal_clip_score_invalid": 0}])
    assertions = [{"name": "clip_real_weights", "severity": "warning", "ok": False, "description": "real weights"}]
    res = run_suite(tmp_path, f"{KIND}.totals", totals, gates.totals_checks(SPEC, assertions))
    assert res["failed_critical"] == []
    warned = {c["name"] for c in gates.failed(res, gates.WARNING)}
    assert warned == {f"{KIND}.totals.kept_fraction", f"{KIND}.totals.quarantined_fraction",
                      f"{KIND}.totals.clip_real_weights"}
    gates.enforce(res)

    bad = totals.assign(accounted=999)  # counts that do not add up are critical
    res = run_suite(tmp_path, f"{KIND}.totals", bad, gates.totals_checks(SPEC, assertions))
    assert res["failed_critical"] == [f"{KIND}.totals.counts_add_up"]

    # a critical run assertion of the plan (dedup left candidates undecided) fails the run
    skipped = [*assertions, {"name": "dedup_skipped", "severity": "critical", "ok": False, "description": "d"}]
    res = run_suite(tmp_path, f"{KIND}.totals", totals.assign(assert_dedup_skipped=False),
                    gates.totals_checks(SPEC, skipped))
    assert res["failed_critical"] == [f"{KIND}.totals.dedup_skipped"]

    bad = totals.assign(fatal_clip_score_invalid=3)  # a reason the kind declares fatal fails the run
    res = run_suite(tmp_path, f"{KIND}.totals", bad, gates.totals_checks(SPEC, assertions))
    assert res["failed_critical"] == [f"{KIND}.totals.no_clip_score_invalid"]


def _write_shard(path, docs: list[dict]) -> None:
    import webdataset as wds
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 10, 10)).save(buf, format="JPEG")
    with wds.TarWriter(str(path), encoder=False) as w:
        for d in docs:
            w.write({"__key__": d["sample_id"], "jpg": buf.getvalue(), "txt": d["caption"].encode(),
                     "json": json.dumps(d).encode()})


def _doc(sid: str, score: float, **kw) -> dict:
    doc = {"sample_id": sid, "source": "s", "source_key": sid, "url": None, "width": 320, "height": 240,
           "language": "en", "language_score": 0.9, "clip_score": score, "phash": "0123456789abcdef",
           "concepts": [], "caption": "a red square on a page", "caption_original": "a red square on a page",
           "recaption": None, "text_source": "caption", "meta": None}
    doc.update(kw)
    return doc


def test_shard_metadata_checks_threshold_and_contract(tmp_path):
    shard = "image_text-000000.tar"
    docs = [_doc("000000000000000000000000000000a1", 0.35), _doc("000000000000000000000000000000a2", 0.12),  # below 0.3: slipped through
            _doc("000000000000000000000000000000a3", 0.40, width=100)]  # shorter side below rules.min_side
    _write_shard(tmp_path / shard, docs)
    clip = {"enabled": True, "real_weights": True, "threshold_applied": True, "threshold": 0.3}
    table = gates.read_shard_metadata(str(tmp_path), [shard], contract(clip))
    assert list(table["key"]) == [d["sample_id"] for d in docs]
    assert list(table["contract_ok"]) == [True, False, False]
    assert "clip_score" in table["contract_problems"][1] and "short_side" in table["contract_problems"][2]
    _write_shard(tmp_path / "twice.tar", [docs[0], docs[0]])  # one key twice in a tar: two rows, not one
    assert list(gates.read_shard_metadata(str(tmp_path), ["twice.tar"], contract(clip))["sample_id"]) == \
        [docs[0]["sample_id"]] * 2
    table["ledger_shard"] = shard
    checks = gates.shard_checks(contract(clip), expected_rows=3)
    res = run_suite(tmp_path / "gx", f"{KIND}.shards", table, checks)
    assert set(res["failed_critical"]) == {f"{KIND}.shards.clip_score_range", f"{KIND}.shards.short_side_range",
                                           f"{KIND}.shards.contract"}

    # with random weights the threshold is not applied, so it is not checked either
    clip = dict(clip, real_weights=False, threshold_applied=False)
    table = gates.read_shard_metadata(str(tmp_path), [shard], contract(clip))
    table["ledger_shard"] = shard
    res = run_suite(tmp_path / "gx", f"{KIND}.shards", table.drop(columns=["recaption"]),
                    gates.shard_checks(contract(clip), expected_rows=3))
    assert set(res["failed_critical"]) == {f"{KIND}.shards.required_fields", f"{KIND}.shards.short_side_range",
                                           f"{KIND}.shards.contract"}
    required = next(c for c in res["suites"][f"{KIND}.shards"]["expectations"]
                    if c["name"] == f"{KIND}.shards.required_fields")
    assert required["details"]["mismatched"]["missing"] == ["recaption"]


def test_no_kept_samples_is_not_a_failure(tmp_path):
    clip = {"enabled": True, "real_weights": True, "threshold_applied": True, "threshold": 0.3}
    table = gates.read_shard_metadata(str(tmp_path), [], contract(clip))
    table["ledger_shard"] = pd.Series(dtype=object)
    res = run_suite(tmp_path, f"{KIND}.shards", table, gates.shard_checks(contract(clip), expected_rows=0))
    assert res["failed_critical"] == []


def test_shard_table_reads_the_shards_in_the_executors(spark, tmp_path):
    from pipelines.io import shards as shard_io
    from schemas import ledger as L
    from schemas.common import spark_type

    out = str(tmp_path)
    staging = shard_io.staging_dir(out, KIND)
    os.makedirs(staging)
    ids = [f"{i:032x}" for i in range(1, 7)]
    _write_shard(os.path.join(staging, "image_text-000000.tar"), [_doc(i, 0.35) for i in ids[:3]])
    _write_shard(os.path.join(staging, "image_text-000001.tar"), [_doc(i, 0.35) for i in ids[3:5]]
                 + [_doc(ids[5], 0.35, width=100)])  # below rules.min_side: breaks the contract
    shard = {i: "image_text-000000.tar" if n < 3 else "image_text-000001.tar" for n, i in enumerate(ids)}
    ledger = spark.createDataFrame(
        [{"sample_id": i, "kind": KIND, "source": "s", "source_key": i, "unit": "pair", "parent_id": None,
          "status": "kept", "reason": None, "detail": None, "duplicate_of": None, "shard": shard[i]} for i in ids],
        spark_type(L.SCHEMA))
    stats = [{"shard": "image_text-000000.tar", "nsamples": 3, "bytes": 1},
             {"shard": "image_text-000001.tar", "nsamples": 3, "bytes": 1}]
    clip = {"enabled": True, "real_weights": True, "threshold_applied": True, "threshold": 0.3}
    table, expected, info = gates.shard_table(ledger, KIND, out, stats, contract(clip))
    assert list(table["key"]) == ids and expected == 6
    assert list(table["contract_ok"]) == [True] * 5 + [False]
    assert list(table["ledger_shard"]) == list(table["shard_file"]) == [shard[i] for i in ids]
    assert info == {"shards": 2, "shards_read": 2, "samples_read": 6, "samples": 6, "sampled": False}
    table, expected, info = gates.shard_table(ledger, KIND, out, stats, contract(clip), cap=3)  # every 2nd shard
    assert list(table["key"]) == ids[:3] and expected == 3 and info["sampled"] and info["shards_read"] == 1


def test_pick_shards_caps_whole_shards_evenly():
    stats = [{"shard": f"s{i:03d}", "nsamples": 100, "bytes": 1} for i in range(50)]
    assert gates.pick_shards(stats, cap=10_000) == stats
    picked = gates.pick_shards(stats, cap=1_000)
    assert [s["shard"] for s in picked] == [f"s{i:03d}" for i in range(0, 50, 5)]


# --- end to end: a broken CLIP checkpoint, the job refuses to publish ------------------------------


@pytest.fixture(scope="module")
def failed_run(sample_dir, tmp_path_factory):
    """The job on the sample with a 'real' CLIP checkpoint whose text projection is NaN: every score
    is NaN; the pipeline quarantines those rows as clip_score_invalid and the totals gate fails."""
    import open_clip
    import torch

    tmp = tmp_path_factory.mktemp("gate_fail")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None)  # open_clip's smallest text+vision pair
    state = {k: v.half() for k, v in model.state_dict().items()}
    state["text_projection"].fill_(float("nan"))
    ckpt = str(tmp / "nan_clip.pt")
    torch.save(state, ckpt)
    del model, state
    out = str(tmp / "out")
    proc = submit("--input", f"image_text={sample_dir}", "--output", out, "--set", "shards.max_samples=8",
                  "--set", "image_text.clip.model=ViT-S-32", "--set", f"image_text.clip.pretrained={ckpt}", check=False)
    os.remove(ckpt)
    return proc, out


def test_failed_gate_exits_3_and_names_the_expectation(failed_run):
    proc, out = failed_run
    # main() prints to stderr; spark-submit's PythonRunner merges the driver's stderr into its stdout
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-4000:]
    assert "quality gate failed; shards NOT published. Failed critical expectation(s): " \
           "image_text.totals.no_clip_score_invalid" in output
    summary = read_json(os.path.join(out, "reports", "summary.json"))
    assert summary["gates"]["passed"] is False
    assert summary["gates"]["failed_critical"] == ["image_text.totals.no_clip_score_invalid"]
    assert summary["kinds"]["image_text"]["kept"] == 0  # NaN scores never pass the threshold
    assert summary["kinds"]["image_text"]["quarantined"]["clip_score_invalid"] > 0
    assert summary["kinds"]["image_text"]["facts"]["clip"]["real_weights"]


def test_failed_run_publishes_no_shards(failed_run):
    _, out = failed_run
    shards = os.path.join(out, "shards")
    assert not os.path.exists(os.path.join(shards, "image_text"))
    staging = os.path.join(shards, ".staging-image_text")
    staged = os.listdir(staging) if os.path.isdir(staging) else []  # nothing was kept, so maybe no tar
    assert "index.json" not in staged and "sizes.json" not in staged
    # the report is still written, so a person can see why
    page = read_bytes(os.path.join(out, "reports", "index.html")).decode("utf-8")
    assert "Quality gates FAILED" in page and "image_text.totals.no_clip_score_invalid" in page
    assert "not published" in page


def test_great_expectations_is_imported_without_what_no_suite_uses():
    """scipy.stats and altair (imported by great_expectations for its KL-divergence expectation) stay
    unloaded through the import and a validation, and load when something does use them."""
    code = """
import json, sys, tempfile
import pandas as pd
from pipelines import gates
gx = gates.import_gx()
suite = {"t.rows": [gates._expect("ExpectColumnValuesToNotBeNull", "t.rows.id", "ids", column="id")]}
result = gates.validate({"t.rows": pd.DataFrame({"id": [1, 2, 3]})}, suite, tempfile.mkdtemp())
unused = [m for m in ("scipy.stats._stats_py", "altair.vegalite") if m in sys.modules]
from scipy import stats  # what great_expectations's expectation module holds: the stand-in
import altair as alt
entropy = float(stats.entropy([0.5, 0.5], [0.9, 0.1]))
print(json.dumps({"unused_loaded": unused, "ok": result["t.rows"]["success"], "entropy": round(entropy, 4),
                  "chart": alt.Chart.__name__, "real": type(sys.modules["scipy.stats"]).__name__}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"unused_loaded": [], "ok": True, "entropy": 0.5108, "chart": "Chart", "real": "module"}


def test_data_docs_templates_are_compiled_once_per_user():
    """great-expectations makes a Jinja environment per Data Docs page; each gets Jinja's bytecode cache."""
    import jinja2
    gates.import_gx()
    from great_expectations.render.view import view

    env = view.Environment(loader=jinja2.DictLoader({"t.html": "{{ 1 + 1 }} {{ x }}"}))
    assert isinstance(env.bytecode_cache, jinja2.FileSystemBytecodeCache)
    assert env.get_template("t.html").render(x="<b>") == "2 <b>"  # as GE's own: its options still apply
    again = view.Environment(loader=jinja2.DictLoader({"t.html": "{{ 1 + 1 }} {{ x }}"}))
    assert again.get_template("t.html").render(x="a") == "2 a"  # loaded from the cache


def test_s3_data_docs_staging_is_removed_when_the_gates_stop_half_way():
    """For s3:// output the Data Docs are built in a local temp dir and uploaded; a gates thread stopped
    by a failed summary (before the upload) leaves no temp dir behind."""
    with pytest.raises(RuntimeError, match="summary lost"), gates._docs_root("s3://bucket/curated") as root:
        staged = root
        assert os.path.isdir(staged) and not staged.startswith("s3://")
        raise RuntimeError("summary lost")
    assert not os.path.exists(staged)
    with gates._docs_root(str(os.sep + "out")) as root:  # local output: OUT/reports itself, nothing made
        assert root == os.path.join(os.sep + "out", "reports")
