"""Interleaved image-text documents: the rows that flow through the interleaved pipeline, its ledger units
and reasons, and its shard contract.

One row per document (unit `document`) and one per `<img>` the document names (unit `image`,
`parent_id` = the document), including images the main-content extraction removed with the
boilerplate around them, so the ledger can say what became of every `<img>` of every page.

A sample is one document: `{sample_id}.json` with OBELICS-style aligned lists `texts` and `images`
(exactly one of the two non-null at each position; an image entry names its member, e.g. `0003.jpg`,
the position in the lists) and the images as members `{sample_id}.0003.jpg`.
"""
from __future__ import annotations

import json

import pyarrow as pa

from schemas import image_text as IT
from schemas import ledger as L
from schemas.common import ERROR_FIELDS, IDENTITY_FIELDS, READ_UNIT, SAMPLE_ID_REGEX
from schemas.contract import Check, Contract, Field, Member

KIND = "interleaved"
LONG_SET = "interleaved_long"  # shard set (OUT/shards/interleaved_long/) of documents over tokens.long_context
DOCUMENT, IMAGE_UNIT = "document", "image"
UNITS = (DOCUMENT, IMAGE_UNIT)

# the image columns are the shared ones (filters.decode, filters.clip read and write them by these names)
IMAGE, URL, CAPTION, WIDTH, HEIGHT = IT.IMAGE, IT.URL, IT.CAPTION, IT.WIDTH, IT.HEIGHT
CLIP_SCORE, CONTENT_SHA, PIXEL_STD = IT.CLIP_SCORE, IT.CONTENT_SHA, IT.PIXEL_STD
LANGUAGE, LANGUAGE_SCORE = IT.LANGUAGE, IT.LANGUAGE_SCORE

# written by the reader (filters.html_extract)
TITLE = "title"  # document: the page's <title>
SEGMENTS = "segments"  # document: JSON list, in reading order, of {"text": str} and {"image": position}
POSITION = "position"  # image: index of the <img> among the page's <img> elements (document order)
SRC = "src"  # image: the src attribute exactly as written
ALT = "alt"  # image: its alt text
LINK = "link"  # image: href of the <a> around it (ads)
DECLARED_WIDTH, DECLARED_HEIGHT = "declared_width", "declared_height"  # image: width/height attributes
IS_LAST = "is_last"  # image: placed after the document's last text
PAGE_HOST = "page_host"  # image: host of its page's URL ("" for a local file)
PAGE_URL = "page_url"  # document: the page's URL (WARC target URI, a table's url); null for a local file
MATCHED_SIM = "matched_sim"  # image: a similarity the input gives (MMC4's CLIP ViT-L/14 matched_sim)

RAW = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(L.UNIT, pa.string()), pa.field(L.PARENT_ID, pa.string()), pa.field(READ_UNIT, pa.string()),
        pa.field(URL, pa.string()), pa.field(IMAGE, pa.binary()), pa.field(CAPTION, pa.string()),
        pa.field(TITLE, pa.string()), pa.field(SEGMENTS, pa.string()),
        pa.field(POSITION, pa.int32()), pa.field(SRC, pa.string()), pa.field(ALT, pa.string()),
        pa.field(LINK, pa.string()), pa.field(DECLARED_WIDTH, pa.int32()), pa.field(DECLARED_HEIGHT, pa.int32()),
        pa.field(IS_LAST, pa.bool_()), pa.field(PAGE_HOST, pa.string()), pa.field(PAGE_URL, pa.string()),
        pa.field(MATCHED_SIM, pa.float32()),
    ]
    + ERROR_FIELDS
)

# --- ledger: units and reasons ---------------------------------------------------------------------------
_d, _q = L._d, L._q
EXTRACT = (
    _q("html_unparsable", "read", "the page could not be decoded or parsed as HTML"),
    _d("no_main_content", "extract", "main-content extraction left no text"),
    _d("image_boilerplate", "extract", "the <img> sits in boilerplate (navigation, header, footer) that main-content "
       "extraction removed"),
    _q("image_outside_input", "read", "the src names a file outside the input root, or a scheme we do not fetch"),
    _q("row_invalid", "read", "a table row is not a document: texts/images of different lengths, a position with "
       "both a text and an image, or a field of the wrong type"),
)
TEXT = (
    _d("language", "rules", "fastText language not in text.languages or below text.min_language_score",
       shows=("language", "language_score")),
    _d("too_few_words", "rules", "fewer words than text.min_words", shows=("words",)),
    _d("too_many_words", "rules", "more words than text.max_words", shows=("words",)),
    _d("mean_word_length", "rules", "mean word length outside text.min/max_mean_word_length (Gopher; not for CJK)",
       shows=("mean_word_length",)),
    _d("symbol_ratio", "rules", "'#' and '...' per word above text.max_symbol_ratio (Gopher)", shows=("symbol_ratio",)),
    _d("bullet_lines", "rules", "share of lines starting with a bullet above text.max_bullet_lines (Gopher)"),
    _d("ellipsis_lines", "rules", "share of lines ending in an ellipsis above text.max_ellipsis_lines (Gopher)"),
    _d("alpha_words", "rules", "share of words with a letter below text.min_alpha_words (Gopher)"),
    _d("duplicate_lines", "rules", "share of lines (or their characters) that repeat within the document above "
       "text.max_duplicate_lines / max_duplicate_line_chars (Gopher)", shows=("dup_line_frac",)),
    _d("top_ngram", "rules", "the most frequent 2/3/4-gram covers more characters than text.max_top_ngram "
       "allows (Gopher)"),
    _d("duplicate_ngrams", "rules", "characters in repeated 5..10-grams above text.max_duplicate_ngrams (Gopher)"),
)
DOC_DEDUP = (
    _d("text_exact_duplicate", "dedup", "same normalised text as another document (duplicate_of names it)"),
    _d("text_near_duplicate", "dedup", "estimated word-shingle Jaccard >= dedup.jaccard with another document "
       "(MinHash LSH; duplicate_of names the one kept)"),
    _d("repeated_paragraphs", "dedup", "most of the text is paragraphs found in >= dedup.paragraph_min_docs "
       "documents of the run (boilerplate that survived extraction)"),
)
IMAGE_RULES = (
    _d("image_repeated", "images", "the same image bytes appear in >= images.max_documents documents "
       "(logos, icons, banners)"),
    _d("qr_code", "images", "a QR code or barcode was found in the image (zxing-cpp)"),
    _d("ad_image", "images", "advertising: a link to an ad server, a standard banner size or an ad alt text"),
    _d("low_knowledge", "images", "knowledge-density score below knowledge.min_score (only when it is > 0)",
       shows=("knowledge_score",)),
)
DOC_RULES = (
    _d("photo_album", "album", "images per 100 words above album.max_images_per_100_words (dense in images, "
       "sparse in text)"),
    _d("no_images", "album", "fewer kept images than album.min_images"),
)
REASONS = L.reasons(L.READ, EXTRACT, L.DOWNLOAD, L.IMAGE, TEXT, IMAGE_RULES, DOC_DEDUP, L.CLIP, DOC_RULES,
                    L.STRUCTURE)


# --- the shard contract ------------------------------------------------------------------------------------
IMAGE_MEMBER = r"\d{4}\.jpg"  # {sample_id}.0003.jpg: the image at position 3 of texts/images


def member_name(position: int) -> str:
    return f"{position:04d}.jpg"


def _aligned(members: dict, doc: dict) -> bool:
    texts, images = doc["texts"], doc["images"]
    if len(texts) != len(images) or not texts:
        return False
    for t, im in zip(texts, images):
        if (t is None) == (im is None):
            return False
    return True


def _members_match(members: dict, doc: dict) -> bool:
    named = {im["member"] for im in doc["images"] if im is not None}
    want = {member_name(i) for i, im in enumerate(doc["images"]) if im is not None}
    present = {k for k in members if not k.startswith("__") and k != "json"}
    return named == want == present


def _images(doc: dict) -> int:
    return sum(im is not None for im in doc["images"])


def contract(cfg=None, facts: dict | None = None) -> Contract:
    """`{sample_id}.json` + one `{sample_id}.NNNN.jpg` per image position. `cfg`: the recipe's interleaved
    section (its thresholds bound the values); None: the layout only (what the trainer needs)."""
    text = getattr(cfg, "text", None)
    album = getattr(cfg, "album", None)
    clip = (facts or {}).get("clip", {})
    threshold = clip.get("threshold") if clip.get("threshold_applied") else None
    languages = tuple(text.languages) if text is not None and text.languages else None
    image_entry = Field("image", "dict", True)
    return Contract(
        kind=KIND,
        members=(
            Member("json", "json", description="the document: metadata and aligned texts/images lists"),
            Member("0000.jpg", "jpeg", required=False, pattern=IMAGE_MEMBER, thumbnail=True,
                   description="the image at that position of texts/images"),
        ),
        fields=(
            Field("sample_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("source", "str", False), Field("source_key", "str", False), Field("url", "str"),
            Field("title", "str"),
            Field("language", "str", False, values=languages, plot="bars", description="language (fastText lid.176)"),
            Field("language_score", "float", True, 0.0, 1.0),
            Field("texts", "list", False, items=Field("text", "str", True)),
            Field("images", "list", False, items=image_entry),
            Field("words", "int", False, 0, None,
                  plot="loghist", description="words of text (after repeated paragraphs were removed)"),
            Field("tokens", "int", False, 1, None, plot="loghist",
                  description="text + image tokens (an image: one token per 28x28 px after GLM-4.1V's resize)"),
            Field("long_context", "bool", False, description="more than tokens.long_context tokens"),
            Field("clip_real_weights", "bool", False),
            Field("num_images", "int", True, getattr(album, "min_images", 0), None, derive=_images, plot="hist",
                  description="images kept in the document"),
            Field("min_clip", "float", True, -1.0 if threshold is None else threshold - 5e-5, 1.0,
                  derive=lambda d: min((im["clip_score"] for im in d["images"] if im and im["clip_score"] is not None),
                                       default=None)),
        ),
        checks=(
            Check("texts_images_aligned", "texts and images have the same length, and exactly one of them is "
                  "non-null at each position", _aligned),
            Check("image_members", "one NNNN.jpg member per image position, named by its entry", _members_match),
        ),
        text_field="title",
    )


def image_entry(position: int, width: int, height: int, alt: str | None, src: str | None,
                clip_score: float | None, source_key: str, matched_sim: float | None = None,
                knowledge_score: float | None = None) -> dict:
    """An `images` entry of the sample json."""
    if src and src[:5].lower() == "data:" and len(src) > 64:  # the ledger's source_key keeps it whole
        src = src[:64] + "..."
    return {"member": member_name(position), "width": width, "height": height, "alt": alt, "src": src,
            "clip_score": None if clip_score is None else round(float(clip_score), 4), "source_key": source_key,
            "matched_sim": None if matched_sim is None else round(float(matched_sim), 4),
            "knowledge_score": None if knowledge_score is None else round(float(knowledge_score), 4)}


def segments_json(segments: list[dict]) -> str:
    return json.dumps(segments, ensure_ascii=False, separators=(",", ":"))
