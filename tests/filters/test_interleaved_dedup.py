"""Document dedup on the spark fixture: exact copies, MinHash-LSH near duplicates (planted: real handbook
pages with 2 % of their words changed and another site's boilerplate around them), and paragraphs repeated
across the run."""
from __future__ import annotations

import json
import os

import pyarrow as pa

from filters.doc_dedup import (
    DocDedup,
    exact_duplicates,
    near_duplicates,
    repeated_paragraph_drops,
    repeated_paragraph_table,
)
from filters.doc_text import DocText, words_of
from filters.html_extract import document_text, extract_page
from schemas import interleaved as S
from tests.filters.test_interleaved_stages import HANDBOOK, _perturb, read_text

BOILER = "Subscribe to the Example Weekly newsletter for more articles like this one every week."


def _docs(n: int) -> list[str]:
    pages = sorted(p for p in os.listdir(os.path.join(HANDBOOK, "en-US")) if p.startswith("sect."))
    out = []
    for p in pages:
        text = document_text(extract_page(read_text(os.path.join(HANDBOOK, "en-US", p))).segments)
        if 150 < len(words_of(text)) < 3000:
            out.append(text)
        if len(out) == n:
            return out
    return out


def test_exact_near_and_repeated_paragraphs(spark):
    originals = _docs(20)
    near = [f"Home News Contact\n{' '.join(_perturb(t.split(), 0.02, i))}\nAll rights reserved"
            for i, t in enumerate(originals)]
    boiler = [f"{t}\n{BOILER}" for t in _docs(24)[20:24]]  # 4 documents share one line
    mostly = f"{BOILER}\nA short note.\n"  # a document that is mostly that line
    texts = originals + near + [originals[0]] + boiler + [mostly]
    ids = [f"{i:032x}" for i in range(len(texts))]
    batch = pa.RecordBatch.from_pylist([{S.SEGMENTS: json.dumps([{"text": t}])} for t in texts],
                                       schema=pa.schema([pa.field(S.SEGMENTS, pa.string())]))
    stats = DocText(min_paragraph_chars=20).apply(batch).to_pylist()
    rows = [{"sample_id": i, "words": s["words"], "text_hash": s["text_hash"], "minhash": s["minhash"],
             "paragraphs": s["paragraphs"], "paragraph_chars": s["paragraph_chars"]} for i, s in zip(ids, stats)]
    docs = spark.createDataFrame(rows, "sample_id string, words int, text_hash string, minhash binary, "
                                       "paragraphs array<bigint>, paragraph_chars array<int>")
    cfg = DocDedup(paragraph_min_docs=3, max_repeated_share=0.5)
    exact = {r["sample_id"]: r["duplicate_of"] for r in exact_duplicates(docs).collect()}
    assert exact == {ids[40]: ids[0]}  # the copy of document 0 names it (same words: smaller id kept)
    rest = docs.filter(~docs.sample_id.isin(list(exact)))
    drops, facts = near_duplicates(rest, cfg, 120)
    found = {r["sample_id"]: r["duplicate_of"] for r in drops.collect()}
    pairs = {ids[20 + i]: ids[i] for i in range(20)}
    recall = sum(found.get(a) == b or found.get(b) == a for a, b in pairs.items()) / len(pairs)
    false = [k for k, v in found.items() if (k, v) not in pairs.items() and (v, k) not in pairs.items()]
    assert recall == 1.0 and false == [] and facts["skipped"] == 0
    table = repeated_paragraph_table(rest, cfg)
    repeated = {r["sample_id"]: r for r in table.collect()}
    assert set(repeated) == set(ids[41:46])  # the four documents and the one made mostly of that line
    assert {r["sample_id"] for r in repeated_paragraph_drops(table, cfg).collect()} == {ids[45]}
