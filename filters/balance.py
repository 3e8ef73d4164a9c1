"""Concept-balanced resampling, MetaCLIP style (GLM-4.1V's image-text pool).

`ConceptMatch` (row-wise) reads `caption`, writes `concepts`: the vocabulary entries found in the
caption (case-insensitive, on word boundaries, with an Aho-Corasick automaton). `balance_drops`
(global) counts the pairs per entry (n) and keeps each (pair, entry) with probability min(1, t/n),
drawn from a hash of (seed, sample_id, entry) so reruns draw the same; a pair survives if any of its
entries draws it. Head concepts are thinned, tail concepts kept whole.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from schemas import image_text as S
from schemas.common import SAMPLE_ID


def default_vocabulary() -> list[str]:
    """The 1,000 ImageNet class names as shipped by open_clip (its zero-shot metadata)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def load_vocabulary(path: str) -> list[str]:
    if not path:
        return default_vocabulary()
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


@dataclasses.dataclass(frozen=True)
class Balance(Stage):
    name: ClassVar[str] = "concepts"
    enabled: bool = True
    vocabulary: str = ""  # a file with one entry per line; empty: ImageNet class names from open_clip
    t: int = 20_000  # MetaCLIP's per-entry cap
    drop_unmatched: bool = False  # MetaCLIP drops pairs that match no entry; with a small vocabulary, keep them

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.CONCEPTS, pa.list_(pa.string()))]

    def setup(self, threads: int) -> Any:
        import ahocorasick

        automaton = ahocorasick.Automaton()
        for entry in load_vocabulary(self.vocabulary):
            key = entry.lower()
            automaton.add_word(key, (len(key), entry))
        automaton.make_automaton()
        return automaton

    def match(self, caption: str, automaton: Any) -> list[str]:
        text = caption.lower()
        found = set()
        for end, (length, entry) in automaton.iter(text):
            start = end - length + 1
            before = text[start - 1] if start > 0 else " "
            after = text[end + 1] if end + 1 < len(text) else " "
            if not before.isalnum() and not after.isalnum():
                found.add(entry)
        return sorted(found)

    def process(self, batch: pa.RecordBatch, automaton: Any) -> dict[str, list]:
        return {S.CONCEPTS: [self.match(c, automaton) if c else [] for c in batch.column(S.CAPTION).to_pylist()]}


def balance_drops(df, cfg: Balance, seed: int):
    """(sample_id, reason) for pairs not drawn by the resampling (and unmatched ones if configured)."""
    from pyspark.sql import functions as F

    pairs = df.select(SAMPLE_ID, F.explode(S.CONCEPTS).alias("concept"))
    counts = pairs.groupBy("concept").agg(F.count("*").alias("n"))
    # uniform in [0, 1) from 53 bits of a 64-bit hash: deterministic for (seed, sample_id, concept)
    u = F.xxhash64(F.lit(seed), F.col(SAMPLE_ID), F.col("concept")).bitwiseAND((1 << 53) - 1) / float(1 << 53)
    drawn = (pairs.join(counts, "concept")
             .withColumn("keep", u < F.least(F.lit(1.0), F.lit(float(cfg.t)) / F.col("n")))
             .groupBy(SAMPLE_ID).agg(F.max(F.col("keep").cast("int")).alias("keep")))
    drops = drawn.filter(F.col("keep") == 0).select(SAMPLE_ID, F.lit("concept_balance").alias("reason"))
    if cfg.drop_unmatched:
        unmatched = df.filter(F.size(S.CONCEPTS) == 0).select(SAMPLE_ID, F.lit("no_concept").alias("reason"))
        drops = drops.unionByName(unmatched)
    return drops
