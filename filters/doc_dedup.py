"""Document dedup across the run: exact text, near-duplicate text (MinHash LSH), repeated paragraphs.

Reads, on document rows still in play: `sample_id`, `words`, `text_hash`, `minhash`, `paragraphs`,
`paragraph_chars` (filters.doc_text.DocText). Returns (`sample_id`, `reason`, `duplicate_of`) drops.

- Exact: documents with the same normalised-text hash; the keeper is the one with the most words, then
  the smallest sample_id.
- Near: MinHash over word 5-gram shingles (120 values), LSH banding (`bands` x `rows` = 120; default
  20 x 6: a pair with Jaccard J becomes a candidate with p = 1 - (1 - J^6)^20: 0.92 at J = 0.7, 0.998 at
  0.8, 0.03 at 0.3). Candidate pairs come from a join on (band, band value); each is confirmed by its
  estimated Jaccard (share of equal MinHash values, std <= 0.046) >= `jaccard` (default 0.7: the
  same article under another site template, or lightly edited, measures 0.75-0.95 on planted pages;
  unrelated pages of one site < 0.2). Keepers: the greedy keeper-centred selection of filters.dedup
  (`_keepers`: no chaining), ranked by words then sample_id.
- Repeated paragraphs: a paragraph (normalised line of >= DocText.min_paragraph_chars characters) found
  in >= `paragraph_min_docs` documents of the run is boilerplate that survived extraction: it is
  removed from every document's text when the shards are written (`repeated_paragraph_table`), and a
  document whose text is more than `max_repeated_share` such paragraphs (by characters) is dropped.
"""
from __future__ import annotations

import dataclasses

from filters.dedup import DROPPED, KEEPER, _keepers, drops_frame
from schemas.common import SAMPLE_ID


@dataclasses.dataclass(frozen=True)
class DocDedup:
    exact: bool = True
    near: bool = True
    jaccard: float = 0.7  # estimated word-shingle Jaccard at or above which two documents are near duplicates
    bands: int = 20  # LSH bands; bands * rows must equal doc_text.num_perm
    rows: int = 6
    max_rounds: int = 50  # keeper-selection rounds (filters.dedup._keepers)
    paragraphs: bool = True
    paragraph_min_docs: int = 3  # a paragraph in this many documents is boilerplate
    max_repeated_share: float = 0.5  # characters of boilerplate paragraphs / all; above it the document goes


def _rank(F):
    # ascending: most words first, then the smallest sample_id
    return F.concat(F.lpad((F.lit(1 << 40) - F.col("words").cast("long")).cast("string"), 13, "0"), F.lit(":"),
                    F.col(SAMPLE_ID))


def exact_duplicates(docs):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("text_hash").orderBy(_rank(F))
    ranked = docs.filter(F.col("text_hash").isNotNull()).withColumn("_keeper", F.first(SAMPLE_ID).over(w))
    return ranked.filter(F.col("_keeper") != F.col(SAMPLE_ID)).select(
        SAMPLE_ID, F.lit("text_exact_duplicate").alias("reason"), F.col("_keeper").alias("duplicate_of"))


def near_pairs(docs, cfg: DocDedup, num_perm: int):
    """(src, dst, jaccard): candidate pairs from LSH banding, confirmed by estimated Jaccard; src and dst
    are rank keys (`words:sample_id`), src the better ranked."""
    from pyspark.sql import functions as F

    if cfg.bands * cfg.rows != num_perm:
        raise ValueError(f"interleaved.dedup: bands x rows = {cfg.bands * cfg.rows} must equal "
                         f"interleaved.doc_text.num_perm = {num_perm}")
    width = 4 * cfg.rows
    items = docs.filter(F.col("minhash").isNotNull()).select(_rank(F).alias("rank"), "minhash")
    banded = items.select("rank", "minhash", F.explode(F.array(*[
        F.struct(F.lit(b).alias("band"), F.substring("minhash", b * width + 1, width).alias("value"))
        for b in range(cfg.bands)])).alias("b")).select("rank", "minhash", "b.band", "b.value")
    a = banded.select(F.col("rank").alias("src"), F.col("minhash").alias("ma"), "band", "value")
    b = banded.select(F.col("rank").alias("dst"), F.col("minhash").alias("mb"), "band", "value")
    pairs = (a.join(b, ["band", "value"]).filter(F.col("src") < F.col("dst"))
             .select("src", "dst", "ma", "mb").dropDuplicates(["src", "dst"]))
    equal = F.expr(f"aggregate(sequence(0, {num_perm - 1}), 0, (acc, i) -> "
                   f"acc + IF(substring(ma, i * 4 + 1, 4) = substring(mb, i * 4 + 1, 4), 1, 0))")
    return (pairs.select("src", "dst", (equal / F.lit(float(num_perm))).alias("jaccard"))
            .filter(F.col("jaccard") >= cfg.jaccard))


def near_duplicates(docs, cfg: DocDedup, num_perm: int):
    """(drops, facts): drops with reason text_near_duplicate and duplicate_of the keeper."""
    from pyspark.sql import functions as F

    edges = near_pairs(docs, cfg, num_perm).localCheckpoint()
    n_edges = edges.count()
    if n_edges == 0:  # nothing to choose between: no keeper rounds
        return drops_frame(docs.sparkSession), {"near_pairs": 0, "rounds": 0, "skipped": 0}
    state, rounds, undecided = _keepers(edges.select("src", "dst"), cfg.max_rounds)
    kept = state.filter(F.col("state") == KEEPER).select(F.col("node").alias("src"))
    dropped = state.filter(F.col("state") == DROPPED).select(F.col("node").alias("dst"))
    assign = edges.join(kept, "src").join(dropped, "dst").groupBy("dst").agg(F.min("src").alias("src"))
    drops = assign.select(F.split("dst", ":").getItem(1).alias(SAMPLE_ID), F.lit("text_near_duplicate").alias("reason"),
                          F.split("src", ":").getItem(1).alias("duplicate_of"))
    return drops, {"near_pairs": n_edges, "rounds": rounds, "skipped": undecided}


def repeated_paragraph_table(docs, cfg: DocDedup):
    """(sample_id, repeated: array<bigint>, repeated_chars, total_chars) for documents holding at least one
    paragraph found in >= paragraph_min_docs documents."""
    from pyspark.sql import functions as F

    paras = docs.select(SAMPLE_ID, F.posexplode_outer("paragraphs").alias("i", "h"),
                        F.col("paragraph_chars")).filter(F.col("h").isNotNull())
    paras = paras.select(SAMPLE_ID, "h", F.element_at("paragraph_chars", F.col("i") + 1).alias("chars"))
    common = (paras.select(SAMPLE_ID, "h").distinct().groupBy("h").agg(F.count("*").alias("docs"))
              .filter(F.col("docs") >= cfg.paragraph_min_docs).select("h"))
    hit = paras.join(common, "h").groupBy(SAMPLE_ID).agg(F.collect_set("h").alias("repeated"),
                                                         F.sum("chars").alias("repeated_chars"))
    total = docs.select(SAMPLE_ID, F.aggregate("paragraph_chars", F.lit(0).cast("long"),
                                               lambda acc, x: acc + x).alias("total_chars"))
    return hit.join(total, SAMPLE_ID)


def repeated_paragraph_drops(table, cfg: DocDedup):
    from pyspark.sql import functions as F

    # a document made only of such paragraphs goes whatever the share allows: nothing would be left of it
    too_much = (F.col("repeated_chars") > F.col("total_chars") * cfg.max_repeated_share) | (
        F.col("repeated_chars") >= F.col("total_chars"))
    return table.filter(too_much).select(
        SAMPLE_ID, F.lit("repeated_paragraphs").alias("reason"))
