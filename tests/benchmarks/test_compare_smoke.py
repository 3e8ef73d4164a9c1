"""Smoke test of benchmarks/compare.py on ~70 items: the dedup-quality scoring and the plain script.

No img2dataset, no HTTP server, no spark-submit: the full comparison is `python -m benchmarks.compare`.
"""
from __future__ import annotations

import glob
import io
import json
import os

import pytest

from benchmarks.compare import TRANSFORMS, dedup_quality, plain_curate, score
from benchmarks.corpus import generate


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    truth: dict = {}
    tars = generate(str(tmp_path_factory.mktemp("corpus")), n=24, per_shard=12, truth=truth)
    return tars, truth


def test_dedup_quality_ours_finds_what_exact_phash_equality_finds(spark, corpus, tmp_path):
    tars, truth = corpus
    q = dedup_quality(spark, tars, truth, originals=4, work=str(tmp_path), distinct=26)
    planted = q["planted"]
    assert (planted["distinct"], planted["originals"]) == (26, 4)
    assert planted["copies"] == 4 * len(TRANSFORMS) and planted["items"] == 26 + 4 * len(TRANSFORMS)
    assert q["corpus"]["items"] == 24
    ours, exact = planted["ours"], planted["exact_phash_equality"]
    assert set(ours["per_transform"]) == set(TRANSFORMS)
    assert ours["recall"] >= exact["recall"]
    assert ours["recall"] >= 0.8  # re-encoded, resized, 2 % cropped and watermarked copies are within radius
    assert ours["precision"] >= 0.9 and ours["distinct_lost"] <= 1
    for t in ("reencoded_q35", "resized_0.5", "watermarked"):
        assert ours["per_transform"][t]["recall"] == 1.0, (t, ours["per_transform"][t])
    corpus_copies = q["corpus"]["ours"]["per_transform"]["corpus_copy_0.9"]
    assert corpus_copies["found"] == corpus_copies["copies"] == q["corpus"]["copies"]


def test_score_counts_pairs_of_groups():
    truth = {"a": {"photo": "p", "copy_of": None}, "a1": {"photo": "p", "copy_of": "a", "transform": "watermarked"},
             "b": {"photo": "p", "copy_of": None}, "c": {"photo": "q", "copy_of": None}}
    s = score([("a1", "a"), ("b", "a")], list(truth), truth)  # one right pair, two wrong (b with a and a1)
    assert (s["predicted_pairs"], s["true_pairs"], s["true_positive_pairs"]) == (3, 1, 1)
    assert (s["removed"], s["should_remove"], s["distinct_lost"], s["copies_left"]) == (2, 1, 1, 0)
    assert s["recall"] == 1.0 and s["precision"] == pytest.approx(0.333, abs=1e-3)
    assert s["false_pairs_same_source_photo"] == 2
    assert s["per_transform"]["watermarked"] == {"copies": 1, "found": 1, "recall": 1.0, "precision": 0.5}


def test_plain_script_writes_readable_shards(corpus, tmp_path):
    import webdataset as wds
    from PIL import Image

    tars, truth = corpus
    counts = plain_curate(tars, str(tmp_path), per_shard=8)
    assert counts["input"] == 24
    copies = sum(1 for t in truth.values() if t["copy_of"])
    assert copies and counts.get("near_duplicate", 0) + counts.get("exact_duplicate", 0) >= copies - 1
    assert 0 < counts["kept"] < 24
    assert counts["input"] == counts["kept"] + sum(v for k, v in counts.items() if k not in ("input", "kept"))
    shards = sorted(glob.glob(os.path.join(str(tmp_path), "*.tar")))
    assert len(shards) == -(-counts["kept"] // 8)
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == counts["kept"]
    for s in samples:
        assert Image.open(io.BytesIO(s["jpg"])).size == tuple(json.loads(s["json"])[k] for k in ("width", "height"))
        assert s["txt"].decode()


def test_rounds_give_the_median_run_and_the_median_of_per_round_ratios():
    from benchmarks.compare import _ratio_text, _wall_text, median_run, round_ratios, with_ratios

    def run(wall, rc=0, n=1000):
        return {"rc": rc, "wall_s": wall, "input": n}

    base = [run(10.0), run(20.0), run(12.0)]  # the machine slowed down in round 2: both tools felt it
    ours = [run(20.0), run(30.0), run(30.0, rc=1)]
    ratios = round_ratios(ours, base)
    assert ratios == [0.5, 0.667]  # the failed round is no ratio
    picked = with_ratios(median_run(ours), ratios)
    assert picked["wall_s"] == 20.0 and picked["rounds_wall_s"] == [20.0, 30.0, 30.0]  # median of the finished
    assert picked["ratio"] == 0.584
    assert _ratio_text(picked, median_run(base)) == "0.58x (rounds 0.50-0.67, median of 2)"
    assert _wall_text(picked) == "20.0 (20.0, 30.0, 30.0)"
    one = median_run([run(8.0)])  # one round: the run as it was, the ratio from the rates
    assert "rounds_wall_s" not in one and _ratio_text(one, run(16.0)) == "2.00x" and _wall_text(one) == "8.0"


def test_a_partial_run_writes_the_tables_of_its_parts(tmp_path, monkeypatch):
    """`--parts download` (the 20,000-URL measurement) gets compare.md with the URL table, our runs'
    breakdown and the notes that apply; no table of a part it did not run."""
    from benchmarks import compare as C

    def run(tool, wall, cpu, peak, **kw):
        x = {"rc": 0, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak, "input": 20000, "written": 20000,
             "tool": tool, "load_before": [2.0], "load_after": [2.5],
             "by_process": {"cpu_s": {"jvm": 20.0, "python driver": 6.0, "python workers": 30.0},
                            "peak_rss_mib": {"jvm": 600.0, "python driver": 350.0, "python workers": 330.0}}}
        return x | kw

    ours = {"in_job_s": 45.0, "report_and_gates_s": 9.0, "task_s": {"decode": 40.0, "caption": 2.0, "download": 1.0}}
    r = {"command": "python -m benchmarks.compare --n 20000 --parts download", "n": 20000, "cpu_count": 2,
         "machine": "x86_64", "load_start": [2.0], "load_end": [3.0], "img2dataset_version": "1.47.0", "rounds": 1,
         "corpus": {"pairs": 20000, "image_mib": 671.2},
         "download": {"2": {"img2dataset": run("img2dataset", 40.0, 58.0, 826.0),
                            "ours_rules_dedup_off": run("vlcurate", 50.0, 74.0, 1278.0, **ours),
                            "ours_defaults": run("vlcurate", 47.0, 67.0, 1313.0, **ours)}},
         "local": {"ours": []}}
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    C.write_outputs(r)
    md = (tmp_path / "compare.md").read_text()
    assert "Parts measured: download" in md and "## URL list -> WebDataset shards" in md
    assert "| vlcurate | 2 | rules + dedup off (img2dataset's work) | 20000 | 20000 | 50.0 |" in md
    assert "0.80x" in md and "| URL list, defaults, local[2] | 47.0 | 2.0 | 9.0 |" in md
    assert "## Local tars" not in md and "## Near-duplicate" not in md
    assert json.loads((tmp_path / "compare.json").read_text())["notes"] == r["notes"]


def test_rounds_rotate_the_order_of_the_tools():
    # over as many rounds as tools, each tool runs once in each position and never always after the same one
    from benchmarks.compare import rotated

    tools = ["img2dataset", "ours_off", "ours_defaults"]
    orders = [rotated(tools, k) for k in range(3)]
    assert orders[0] == tools
    assert all(sorted(o) == sorted(tools) for o in orders)
    assert all(sorted(o[i] for o in orders) == sorted(tools) for i in range(3))  # every position, every tool
    assert rotated(tools, 3) == tools and rotated([], 2) == []
