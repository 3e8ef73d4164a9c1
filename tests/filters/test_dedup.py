"""Dedup on Spark: recall and precision on transformed copies of real photos."""
from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import ImageDraw, ImageEnhance

from filters.decode import Decode
from filters.dedup import Dedup, components, components_distributed, components_on_driver, find_duplicates
from jobs.make_sample import PHOTOS, load_photo


def _jpeg(img, q=90):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def _watermark(img):
    img = img.convert("RGB").copy()
    w, h = img.size
    ImageDraw.Draw(img).text((w * 0.55, h * 0.88), "(c) photo-agency.example 2026", fill=(255, 255, 255))
    return img


def _crop(img, f):
    w, h = img.size
    return img.crop((int(w * f), int(h * f), w - int(w * f), h - int(h * f)))


TRANSFORMS = {
    "reencoded": lambda im: _jpeg(im, 35),
    "resized": lambda im: _jpeg(im.resize((im.width // 2, im.height // 2))),
    "cropped": lambda im: _jpeg(_crop(im, 0.02)),
    "brighter": lambda im: _jpeg(ImageEnhance.Brightness(im.convert("RGB")).enhance(1.25)),
    "watermarked": lambda im: _jpeg(_watermark(im)),
    "png": lambda im: (lambda b: (im.convert("RGB").save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
}


@pytest.fixture(scope="module")
def corpus(spark):
    rows, family = [], {}
    for name in PHOTOS:
        img = load_photo(name)
        items = {f"{name}": _jpeg(img), f"{name}~exact": _jpeg(img)}
        items.update({f"{name}~{t}": fn(img) for t, fn in TRANSFORMS.items()})
        for key, data in items.items():
            rows.append({"sample_id": key, "image": data, "error": None, "error_detail": None})
            family[key] = name
    feats = Decode().apply(pa.RecordBatch.from_pylist(rows)).to_pylist()
    df = spark.createDataFrame(
        [(r["sample_id"], r["content_sha"], r["phash"], r["width"], r["height"]) for r in feats],
        "sample_id string, content_sha string, phash long, width int, height int")
    return df, family


def test_near_duplicate_recall_and_precision(corpus):
    df, family = corpus
    drops = find_duplicates(df, Dedup()).collect()
    dropped = {r.sample_id: r for r in drops}
    assert len(dropped) == len(drops), "an item was dropped twice"
    wrong = [(r.sample_id, r.duplicate_of) for r in drops if family[r.sample_id] != family[r.duplicate_of]]
    precision = 1 - len(wrong) / max(1, len(drops))
    should_drop = len(family) - len(PHOTOS)  # one survivor per family
    recall = sum(1 for r in drops if family[r.sample_id] == family[r.duplicate_of]) / should_drop
    print(f"dedup precision={precision:.3f} recall={recall:.3f} on {len(family)} images")
    assert precision == 1.0, wrong
    assert recall >= 0.95
    # survivors: exactly one per family, and the keeper is never itself dropped
    assert all(r.duplicate_of not in dropped for r in drops)
    assert {family[k] for k in family if k not in dropped} == set(PHOTOS)


def test_exact_duplicates_are_reported_as_exact(corpus):
    df, family = corpus
    drops = {r.sample_id: r for r in find_duplicates(df, Dedup(near=False)).collect()}
    assert set(drops) == {f"{n}~exact" for n in PHOTOS}
    assert all(r.reason == "exact_duplicate" for r in drops.values())


def test_keeper_is_the_largest_image(corpus):
    df, family = corpus
    drops = {r.sample_id: r for r in find_duplicates(df, Dedup()).collect()}
    assert drops["astronaut~resized"].duplicate_of != "astronaut~resized"
    assert "~resized" not in drops["astronaut~resized"].duplicate_of


def test_components_of_a_chain(spark):
    edges = spark.createDataFrame([("a", "b"), ("b", "c"), ("c", "d"), ("x", "y")], "src string, dst string")
    labels = {r.node: r.label for r in components(edges, 10).collect()}
    assert labels == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}


def _reference_labels(pairs):
    """Smallest node of each component, by breadth-first search in plain Python."""
    graph: dict[str, set[str]] = {}
    for a, b in pairs:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set()).add(a)
    labels: dict[str, str] = {}
    for start in graph:
        if start in labels:
            continue
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        for node in seen:
            labels[node] = min(seen)
    return labels


def _graphs():
    import random

    rng = random.Random(7)
    chain = [(f"c{i:04d}", f"c{i + 1:04d}") for i in range(200)]
    rng.shuffle(chain)
    star = [("s000", f"s{i:03d}") for i in range(1, 30)]
    cycle = [(f"y{i}", f"y{(i + 1) % 12}") for i in range(12)]
    nodes = [f"r{i:03d}" for i in range(300)]
    rand = [tuple(rng.sample(nodes, 2)) for _ in range(260)]
    return {"chain": chain, "mixed": star + cycle + [("p", "q"), ("q", "p")], "random": rand}


@pytest.mark.parametrize("name", ["chain", "mixed", "random"])
def test_both_component_paths_match_a_reference(spark, name, caplog):
    pairs = _graphs()[name]
    edges = spark.createDataFrame(pairs, "src string, dst string")
    want = _reference_labels(pairs)
    on_driver = {r.node: r.label for r in components(edges, 12, driver_max_edges=10_000).collect()}
    # the chain of 201 nodes needs ~8 large-star/small-star rounds; min-label propagation needed 200
    with caplog.at_level("INFO", logger="filters.dedup"):
        distributed = {r.node: r.label for r in components(edges, 12, driver_max_edges=0).collect()}
    assert on_driver == want
    assert distributed == want
    assert "did not converge" not in caplog.text
    rounds = [r.args[0] for r in caplog.records if "converged in" in r.getMessage()]
    assert len(rounds) == 1 and rounds[0] <= 12, rounds


def test_distributed_rounds_grow_like_log_n_on_a_chain(spark, caplog):
    pairs = [(f"c{i:04d}", f"c{i + 1:04d}") for i in range(199)]  # 200 nodes, in chain order
    edges = spark.createDataFrame(pairs, "src string, dst string")
    with caplog.at_level("INFO", logger="filters.dedup"):
        labels = {r.node: r.label for r in components_distributed(edges, max_iterations=20).collect()}
    assert labels == {f"c{i:04d}": "c0000" for i in range(200)}
    rounds = [r.args[0] for r in caplog.records if "converged in" in r.getMessage()]
    assert rounds and rounds[0] <= 20, rounds  # measured: 8


def test_components_of_no_edges_and_self_loops(spark):
    empty = spark.createDataFrame([], "src string, dst string")
    assert components_on_driver(empty).collect() == []
    assert components_distributed(empty, 5).collect() == []
    loops = spark.createDataFrame([("a", "a"), ("b", "c"), ("c", "c"), ("c", "b")], "src string, dst string")
    want = {"a": "a", "b": "b", "c": "b"}
    assert {r.node: r.label for r in components_on_driver(loops).collect()} == want
    assert {r.node: r.label for r in components_distributed(loops, 5).collect()} == want


def test_components_path_is_chosen_by_edge_count(spark, caplog):
    edges = spark.createDataFrame(_graphs()["chain"], "src string, dst string")
    with caplog.at_level("WARNING", logger="filters.dedup"):
        few_rounds = {r.node: r.label for r in components(edges, 1, driver_max_edges=0).collect()}
    assert "did not converge" in caplog.text  # one distributed round cannot finish a long chain
    assert set(few_rounds.values()) != {"c0000"}
    on_driver = {r.node: r.label for r in components(edges, 1, driver_max_edges=1000).collect()}
    assert set(on_driver.values()) == {"c0000"}  # the driver's union-find has no rounds to run out of
