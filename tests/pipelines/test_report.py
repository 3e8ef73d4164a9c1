"""Report material from a small hand-made pipeline Result on the local[2] session, and rendering
from that material alone: deterministic bytes, the sections a person needs, the shards' state."""
from __future__ import annotations

import io
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import image_text, kinds, report
from pipelines.kind import Result
from pipelines.recipe import load
from pipelines.report import material as M
from pipelines.report import page as R

KIND = "image_text"
SPEC = kinds.get(KIND)
CFG = load().image_text
CLIP = {"real_weights": True, "threshold": 0.3, "threshold_applied": True, "enabled": True,
        "model": "ViT-B-32", "pretrained": "x.pt", "message": "local checkpoint x.pt"}


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def jpeg(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


# sample_id, status, reason, duplicate_of, image, (w, h), caption, clip score, concepts
ITEMS = [
    ("000000000000000a", "kept", None, None, jpeg((400, 300), (220, 30, 30)), "a red photo of a tabby cat", 0.31, ["tabby cat"]),
    ("000000000000000b", "kept", None, None, jpeg((300, 300), (30, 30, 220)), "a blue square on a wall", 0.42, []),
    ("000000000000000c", "dropped", "near_duplicate", "000000000000000a", jpeg((200, 150), (220, 30, 30)),
     "a smaller red photo copy", None, None),
    ("000000000000000d", "dropped", "image_too_small", None, jpeg((50, 40), (10, 200, 10)), "a tiny green thing", None, None),
    ("000000000000000e", "quarantined", "image_undecodable", None, b"<html>not an image</html>", "a web page", None, None),
    ("000000000000000f", "dropped", "clip_low_similarity", None, jpeg((640, 480), (90, 90, 90)),
     "completely unrelated words here", 0.05, None),
    ("0000000000000010", "dropped", "concept_balance", None, jpeg((500, 500), (240, 200, 0)), "another tabby cat",
     0.5, ["tabby cat"]),
]


@pytest.fixture(scope="module")
def result(spark):
    from pyspark.sql import functions as F

    from schemas import ledger as L
    from schemas.common import spark_type

    feats, ledger = [], []
    for sid, status, reason, dup, img, caption, score, cons in ITEMS:
        decodable = img.startswith(b"\xff\xd8")
        w, h = Image.open(io.BytesIO(img)).size if decodable else (None, None)
        scored = reason not in ("near_duplicate", "image_too_small", "image_undecodable")
        feats.append((sid, img, caption, w, h, len(caption), len(caption.split()), "en", 0.9, 30.0,
                      0x0F0F0F0F0F0F0F0F if sid in ("000000000000000a", "000000000000000c") else int(sid, 16),
                      score if scored else None, cons if scored else None))
        ledger.append({"sample_id": sid, "kind": KIND, "source": "src", "source_key": f"key_{sid[-2:]}", "unit": "pair",
                       "parent_id": None, "status": status,
                       "reason": reason, "detail": "cannot identify image" if status == "quarantined" else None,
                       "duplicate_of": dup, "shard": "image_text-000000.tar" if status == "kept" else None})
    feats_df = spark.createDataFrame(feats, "sample_id string, image binary, caption string, width int, height int, "
                                     "caption_chars int, caption_words int, language string, language_score float, "
                                     "pixel_std float, phash long, clip_score float, concepts array<string>")
    cols = image_text.report_columns(CFG)
    rows = feats_df.select("sample_id", *[fn(F).alias(n) for n, fn in cols.items()], "image", "caption")
    ledger_df = spark.createDataFrame(ledger, spark_type(L.SCHEMA))
    shards = [{"shard": "image_text-000000.tar", "nsamples": 2, "bytes": 10240}]
    return Result(ledger=ledger_df, written=lambda: shards,
                  rows=rows, facts={"clip": CLIP}, assertions=[], thumbnail="image", text="caption",
                  report_columns=tuple(cols), stages_run=("rules", "dedup", "clip", "balance"))


def write_summary(out: str, res: Result) -> dict:
    counts = {"input": 7, "kept": 2,
              "dropped": {"clip_low_similarity": 1, "concept_balance": 1, "image_too_small": 1, "near_duplicate": 1},
              "quarantined": {"image_undecodable": 1}}
    summary = {
        "kinds": {KIND: {**counts, "unit": "pair", "units": {"pair": counts},
                         "shards": {"count": 1, "samples": 2, "bytes": 10240, "files": res.shards},
                         "facts": res.facts, "assertions": [], "stages_run": list(res.stages_run),
                         "reasons": {c: {"status": r.status, "stage": r.stage, "text": r.text, "fatal": r.fatal,
                                         "shows": list(r.shows)} for c, r in SPEC.reasons.items()}}},
        "output": out, "started_at": "2026-01-01T00:00:00+00:00", "elapsed_seconds": 1.0,
        "stages": {"decode": {"task_seconds": 1.0, "wall_seconds": None}}, "versions": {"python": "3"},
        "recipe": load().to_dict(),
        "gates": {"passed": True, "failed_critical": [], "failed_warnings": [], "data_docs": "gx/x.html", "suites": {}},
    }
    os.makedirs(os.path.join(out, "reports"), exist_ok=True)
    with open(os.path.join(out, "reports", "summary.json"), "w") as f:
        json.dump(summary, f)
    return summary


@pytest.fixture(scope="module")
def out(result, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    meta = report.collect_material(SPEC, result, result.ledger, out, None, CFG)
    write_summary(out, result)
    return out, meta


def test_thumbnail_stage_on_arrow_batches():
    batch = pa.RecordBatch.from_pylist([{"image": jpeg((1000, 500), (1, 2, 3))}, {"image": b"junk"}, {"image": None}])
    thumbs = M.Thumbnail().apply(batch).column("thumb").to_pylist()
    assert Image.open(io.BytesIO(thumbs[0])).size == (160, 80)
    assert thumbs[1] is None and thumbs[2] is None


def test_material_tables(out):
    out, meta = out
    mdir = M.material_dir(out, KIND)
    assert meta["rows"] == meta["rows_in_material"] == 7 and not meta["sampled"]
    assert meta["duplicates"] == {"groups": 1, "dropped": 1, "sizes": {"2": 1}}
    assert meta["bars"]["concepts"] == {"rows": 3, "with_values": 2, "distinct": 1, "list": True}
    assert meta["documents"] is None and not os.path.exists(os.path.join(mdir, "documents.parquet"))  # no layout
    rows = pq.read_table(os.path.join(mdir, "rows.parquet")).to_pylist()
    assert [r["sample_id"] for r in rows] == sorted(i[0] for i in ITEMS)
    concepts = pq.read_table(os.path.join(mdir, "bars-concepts.parquet")).to_pylist()
    assert concepts == [{"value": "tabby cat", "status": "dropped", "n": 1}, {"value": "tabby cat", "status": "kept", "n": 1}]
    gallery = pq.read_table(os.path.join(mdir, "gallery.parquet")).to_pylist()
    sections = {r["section"] for r in gallery}
    assert sections == {"kept", "near_duplicate", "image_too_small", "image_undecodable", "clip_low_similarity",
                        "concept_balance", "dup:000000000000000a"}
    dup = [r for r in gallery if r["section"] == "dup:000000000000000a"]
    assert sorted(r["sample_id"] for r in dup) == ["000000000000000a", "000000000000000c"]
    for r in gallery:
        if r["reason"] == "image_undecodable":
            assert r["thumb"] is None and r["detail"] == "cannot identify image"
        else:
            assert max(Image.open(io.BytesIO(r["thumb"])).size) <= 160
    copy = next(r for r in dup if r["sample_id"] == "000000000000000c")
    assert image_text.hamming(copy["phash"], copy["keeper_phash"]) == 0


def test_rows_are_a_hash_sample_above_the_cap(result, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "ROW_CAP", 3)
    monkeypatch.setattr(M, "GALLERY_KEPT", 1)
    monkeypatch.setattr(M, "OVERSAMPLE", 1)  # the kept section is thinned by a hash before ranking
    meta = report.collect_material(SPEC, result, result.ledger, str(tmp_path), None, CFG)
    mdir = M.material_dir(str(tmp_path), KIND)
    assert meta["sampled"] and 0 < meta["rows_in_material"] < 7 and meta["rows"] == 7
    ids = pq.read_table(os.path.join(mdir, "rows.parquet")).column("sample_id").to_pylist()
    assert len(ids) == meta["rows_in_material"] and set(ids) <= {i[0] for i in ITEMS}
    gallery = pq.read_table(os.path.join(mdir, "gallery.parquet")).to_pylist()
    assert len([r for r in gallery if r["section"] == "kept"]) <= 1
    # language counts stay exact
    langs = pq.read_table(os.path.join(mdir, "bars-language.parquet")).to_pylist()
    assert sum(r["n"] for r in langs) == 7


def test_bars_keep_the_top_values_with_exact_counts(result, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "BARS_TOP", 1)
    meta = report.collect_material(SPEC, result, result.ledger, str(tmp_path), None, CFG)
    mdir = M.material_dir(str(tmp_path), KIND)
    langs = pq.read_table(os.path.join(mdir, "bars-language.parquet")).to_pylist()
    assert {r["value"] for r in langs} == {"en"} and sum(r["n"] for r in langs) == 7
    assert meta["bars"]["language"] == {"rows": 7, "with_values": 7, "distinct": 1, "list": False}
    assert meta["bars"]["concepts"]["distinct"] == 1


def material_files(out: str) -> dict:
    """Every material table as (column names and types, rows), and material.json, by file name."""
    mdir = M.material_dir(out, KIND)
    got = {}
    for name in sorted(os.listdir(mdir)):
        if name.endswith(".parquet"):
            t = pq.read_table(os.path.join(mdir, name))
            got[name] = ([(f.name, str(f.type)) for f in t.schema], t.to_pylist())
        else:
            got[name] = read_json(os.path.join(mdir, name))
    return got


@pytest.mark.parametrize("caps", [{}, {"GALLERY_KEPT": 1, "OVERSAMPLE": 1, "GALLERY_PER_REASON": 1},
                                  {"BARS_TOP": 1, "DUP_GROUPS": 0}, {"DUP_MEMBERS": 0, "GALLERY_KEPT": 0}])
def test_driver_and_spark_give_the_same_material(result, tmp_path, monkeypatch, caps):
    """A kind of at most ROW_CAP rows in the driver's copy of the ledger is computed there from one fetch: the
    same tables, picks and counts as the Spark path gives, under caps that thin, cut and empty sections."""
    for k, v in caps.items():
        monkeypatch.setattr(M, k, v)
    spark_out, driver_out = str(tmp_path / "spark"), str(tmp_path / "driver")
    in_spark = report.collect_material(SPEC, result, result.ledger, spark_out, None, CFG)
    on_driver = report.collect_material(SPEC, result, result.ledger, driver_out, None, CFG, whole=result.ledger.toArrow())
    assert on_driver == in_spark
    assert material_files(driver_out) == material_files(spark_out)


def test_material_runs_a_few_small_spark_jobs(result, tmp_path, spark):
    """The report reads its rows in one pass and derives every table from one persisted table: a
    bounded number of jobs, each over few partitions, whatever the run's size."""
    sc = spark.sparkContext
    sc.setJobGroup("report-jobs", "report-jobs")
    try:
        report.collect_material(SPEC, result, result.ledger, str(tmp_path), None, CFG)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    tracker = sc.statusTracker()
    jobs = tracker.getJobIdsForGroup("report-jobs")
    tasks = sum(tracker.getStageInfo(s).numTasks for j in jobs for s in tracker.getJobInfo(j).stageIds
                if tracker.getStageInfo(s) is not None)
    assert len(jobs) <= 20, len(jobs)
    assert tasks <= 60, tasks

    sc.setJobGroup("report-driver", "report-driver")  # the count known and small: one fetch and the gallery
    try:
        report.collect_material(SPEC, result, result.ledger, str(tmp_path), None, CFG, whole=result.ledger.toArrow())
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert len(tracker.getJobIdsForGroup("report-driver")) < len(jobs) - 2, (jobs, tracker.getJobIdsForGroup("report-driver"))


def test_charts_drawn_beforehand_give_the_same_page(out, monkeypatch):
    """A run draws each kind's charts while its gates validate (build.draw_charts) and hands them to
    the page: the same bytes as drawing them in render; a chart that failed is drawn by render."""
    from pipelines import build
    from pipelines.report import page as P

    out, _ = out
    drawn = build.draw_charts(out, ["image_text"])
    assert "id='plot-short_side'" in drawn["image_text"]
    assert R.render(out, in_run=True, drawn=drawn) == R.render(out, in_run=True)
    monkeypatch.setattr(P, "draw", lambda out, kind: 1 / 0)
    assert build.draw_charts(out, ["image_text"]) == {}
    assert "id='plot-short_side'" in R.render(out, in_run=True, drawn={})


def test_render_is_deterministic_and_complete(out):
    out, _ = out
    page = R.render(out, in_run=True)
    assert page == R.render(out, in_run=True)
    for anchor in ("funnel-image_text", "units-image_text", "distributions-image_text", "galleries-image_text", "duplicates-image_text",
                   "shards-image_text", "gates", "run"):
        assert f"id='{anchor}'" in page or f"id={anchor}" in page, anchor
    for plot in ("short_side", "aspect_ratio", "caption_chars", "clip_score", "language", "concepts"):
        assert f"id='plot-{plot}'" in page
    assert page.count("data:image/jpeg;base64,") >= 6
    assert "CLIP 0.050 &lt; 0.3" in page  # the score that decided, beside the threshold
    assert "400×300" not in page or "shorter side 40 &lt; 200" in page
    # self-contained: every src and href is inline data, an anchor or a relative path (the Data Docs)
    refs = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", page)
    assert refs and all(r.startswith(("data:", "#")) or "://" not in r for r in refs), refs
    assert not [r for r in refs if r.startswith(("http:", "https:", "//"))]
    assert "published" in page


def test_rebuild_checks_that_the_shards_were_published(out):
    out, _ = out
    assert R.publish_state(out, KIND, read_json(os.path.join(out, "reports", "summary.json")), True)[1] == "published"
    summary = read_json(os.path.join(out, "reports", "summary.json"))
    assert R.publish_state(out, KIND, summary, in_run=False)[1] == "index.json missing"
    from pipelines.io import shards

    os.makedirs(shards.final_dir(out, KIND), exist_ok=True)
    shards.write_index(shards.final_dir(out, KIND), summary["kinds"][KIND]["shards"]["files"])
    assert R.publish_state(out, KIND, summary, in_run=False)[1] == "published"
    summary["gates"]["passed"] = False
    assert R.publish_state(out, KIND, summary, in_run=False)[1] == "not published"


def test_decided_by_names_the_value_and_the_threshold():
    recipe = load().to_dict()[KIND]
    k = {"_kind": KIND, "facts": {"clip": {"threshold": 0.3, "threshold_applied": True}}}
    assert R.decided_by({"status": "dropped", "reason": "image_too_small", "width": 150, "height": 400}, k, recipe) \
        == "150×400: shorter side 150 < 200"
    assert R.decided_by({"status": "dropped", "reason": "aspect_ratio", "width": 1000, "height": 250}, k, recipe) \
        == "1000×250: ratio 4.00 > 3.0"
    assert R.decided_by({"status": "kept", "clip_score": 0.31234}, k, recipe) == "CLIP 0.312 ≥ 0.3"
    assert R.decided_by({"status": "quarantined", "reason": "image_truncated", "detail": "ends early"}, k, recipe) \
        == "ends early"


def test_log_axes_are_labelled_in_plain_numbers_and_warm_draws_nothing_lasting():
    """Log-scale charts label ticks as plain numbers (matplotlib's default mathtext, 2×10², was a third
    of the drawing); warm() draws throw-away charts so that a run's first real one is not the slow one."""
    import base64

    import numpy as np

    from pipelines.report import plots

    plt = plots.pyplot()[1]
    before = plt.get_fignums()
    plots.warm()
    assert plt.get_fignums() == before  # every warm-up figure closed
    uri = plots.histogram("Short side", "short_side (log scale)",
                          {"kept": np.array([210.0, 300, 450, 640]), "dropped": np.array([40.0, 90])}, log=True,
                          lines=[(200.0, "min_side")])
    svg = base64.b64decode(uri.split(",", 1)[1]).decode()
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "100" in labels and not [t for t in labels if "$" in t or "times" in t or "10^" in t], labels
    assert uri == plots.histogram("Short side", "short_side (log scale)",
                                  {"kept": np.array([210.0, 300, 450, 640]), "dropped": np.array([40.0, 90])},
                                  log=True, lines=[(200.0, "min_side")])


def test_charts_keep_every_text_inside_the_figure(monkeypatch):
    """The charts are laid out from their own texts (plots._layout), not by drawing them twice: the
    widest tick label, the axis labels, the title and the legend below must still fit the figure,
    and stay clear of each other where they share an edge."""
    import numpy as np

    from pipelines.report import plots

    _, plt = plots.pyplot()
    drawn = []
    monkeypatch.setattr(plots, "to_uri", lambda fig: drawn.append(fig) or "")  # keep the figures, laid out
    plots.histogram("Caption length", "characters", {"kept": np.arange(1.0, 200_000.0, 7.0),
                                                     "dropped": np.array([3.0, 5.0])}, lines=[(10.0, "min")])
    plots.stacked_bars("Language", ["en", "a-very-long-language-label-xx"], {"kept": [3, 1], "dropped": [1, 0]})
    plots.paired_bars("Concepts", ["a red motorcycle in a garage", "cat"], [30, 4], [20, 4])
    plots.stacked_bars("Language", [], {})
    try:
        for fig in drawn:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            box = fig.bbox
            ax = fig.axes[0]
            (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
            xticks = [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]  # the drawn ones
            yticks = [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
            texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *yticks, *xticks]
            texts += [t for legend in fig.legends for t in legend.get_texts()]
            for t in texts:
                if not t.get_text() or not t.get_visible():
                    continue
                e = t.get_window_extent(renderer)
                assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, \
                    (ax.get_title(), t.get_text(), e, box)
            ticks = [t.get_window_extent(renderer) for t in xticks if t.get_text()]
            for legend in fig.legends:  # the legend sits below the x tick labels and the x label
                top = legend.get_window_extent(renderer).y1
                assert all(top <= e.y0 + 1 for e in ticks), ax.get_title()
                if ax.get_xlabel():
                    assert top <= ax.xaxis.label.get_window_extent(renderer).y0 + 1, ax.get_title()
            if ax.get_ylabel():  # the y label clear of the widest tick label
                right = ax.yaxis.label.get_window_extent(renderer).x1
                assert all(right <= t.get_window_extent(renderer).x0 + 1 for t in yticks if t.get_text())
    finally:
        for fig in drawn:
            plt.close(fig)
