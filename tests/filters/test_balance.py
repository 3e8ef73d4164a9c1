"""Concept matching (Aho-Corasick, word boundaries) and MetaCLIP-style balancing."""
from __future__ import annotations

import pyarrow as pa

from filters.balance import Balance, balance_drops


def _vocab(tmp_path, words):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(words))
    return str(p)


def test_matches_on_word_boundaries_case_insensitively(tmp_path):
    stage = Balance(vocabulary=_vocab(tmp_path, ["cat", "hot dog", "dog", "Golden Retriever"]))
    batch = pa.RecordBatch.from_pylist([
        {"caption": "A Cat eating a hot dog"},
        {"caption": "category of concatenated things"},
        {"caption": "my golden retriever, a good dog!"},
        {"caption": None},
    ])
    rows = stage.apply(batch).to_pylist()
    assert [r["concepts"] for r in rows] == [["cat", "dog", "hot dog"], [], ["Golden Retriever", "dog"], []]


def test_default_vocabulary_is_imagenet_from_open_clip():
    stage = Balance()
    (row,) = stage.apply(pa.RecordBatch.from_pylist([{"caption": "a goldfish next to a tabby cat"}])).to_pylist()
    assert "goldfish" in row["concepts"]


def test_balancing_caps_head_concepts_and_keeps_tail(spark):
    rows = [(f"id{i:05d}", ["sky"]) for i in range(2000)] + [(f"rare{i}", ["okapi"]) for i in range(5)]
    rows += [(f"both{i}", ["sky", "okapi"]) for i in range(3)]
    df = spark.createDataFrame(rows, "sample_id string, concepts array<string>")
    cfg = Balance(t=100)
    drops = {r.sample_id for r in balance_drops(df, cfg, seed=0).collect()}
    kept_sky = 2000 - len([d for d in drops if d.startswith("id")])
    assert 60 <= kept_sky <= 140  # about t of the head concept survive
    assert not any(d.startswith(("rare", "both")) for d in drops)  # tail entries keep every pair
    again = {r.sample_id for r in balance_drops(df, cfg, seed=0).collect()}
    other = {r.sample_id for r in balance_drops(df, cfg, seed=1).collect()}
    assert again == drops and other != drops  # deterministic per seed


def test_unmatched_are_dropped_only_when_asked(spark):
    df = spark.createDataFrame([("a", []), ("b", ["sky"])], "sample_id string, concepts array<string>")
    assert balance_drops(df, Balance(), 0).count() == 0
    assert [r.reason for r in balance_drops(df, Balance(drop_unmatched=True), 0).collect()] == ["no_concept"]
