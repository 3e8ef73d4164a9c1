"""Image-text pairs: the row that flows through the image_text pipeline.

Readers produce RAW; each stage appends its own columns (declared in the stage module).
"""
from __future__ import annotations

import pyarrow as pa

from schemas import ledger as L
from schemas.common import ERROR_FIELDS, IDENTITY_FIELDS, READ_UNIT, SAMPLE_ID_REGEX
from schemas.contract import Check, Contract, Field, Member

KIND = "image_text"

URL = "url"
IMAGE = "image"  # encoded image bytes (normalised to JPEG or kept as the original JPEG by decode)
CAPTION = "caption"
META = "meta"  # the item's own JSON side-car / row fields, as JSON text

RAW = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(URL, pa.string()),
        pa.field(IMAGE, pa.binary()),
        pa.field(CAPTION, pa.string()),
        pa.field(META, pa.string()),
        pa.field(READ_UNIT, pa.string()),
    ]
    + ERROR_FIELDS
)

# Added by filters.decode.Decode
WIDTH, HEIGHT, CONTENT_SHA, SOURCE_BYTES, PHASH, PIXEL_STD = (
    "width", "height", "content_sha", "source_bytes", "phash", "pixel_std")
# 256-bit dHash (imagehash.dhash, hash_size=16, of pHash's 32x32 thumbnail), 32 bytes: dedup's second tier
PHASH256 = "phash256"
# Added by filters.caption.CaptionLanguage
CAPTION_ORIGINAL, CAPTION_WORDS, CAPTION_CHARS, LANGUAGE, LANGUAGE_SCORE = (
    "caption_original", "caption_words", "caption_chars", "language", "language_score")
# Added by filters.clip.ClipScore
CLIP_SCORE = "clip_score"
# Added by filters.balance
CONCEPTS = "concepts"
# Added by filters.recaption.Recaption
RECAPTION = "recaption"

# --- ledger: units and reasons ---------------------------------------------------------------------
UNITS = ("pair",)
REASONS = L.reasons(
    L.READ, L.DOWNLOAD, L.IMAGE[:5],
    (
        L.Reason("caption_missing", L.DROPPED, "rules", "no caption, or nothing left after clean-up"),
        *L.IMAGE[5:],
        L.Reason("caption_too_short", L.DROPPED, "rules",
                 "fewer than rules.min_caption_words words or rules.min_caption_chars characters",
                 shows=("caption_chars",)),
        L.Reason("caption_too_long", L.DROPPED, "rules", "more than rules.max_caption_chars characters",
                 shows=("caption_chars",)),
        L.Reason("language", L.DROPPED, "rules",
                 "fastText language not in rules.languages or below rules.min_language_score",
                 shows=("language", "language_score")),
    ),
    L.DEDUP, L.CLIP,
    (
        L.Reason("concept_balance", L.DROPPED, "balance", "not drawn by concept-balanced resampling"),
        L.Reason("no_concept", L.DROPPED, "balance", "caption matched no concept and balance.drop_unmatched is set"),
    ),
)


# --- the shard contract ------------------------------------------------------------------------------
def _short_side(doc: dict):
    return min(doc["width"], doc["height"])


def _aspect(doc: dict):
    return max(doc["width"], doc["height"]) / min(doc["width"], doc["height"])


def _txt_is_training_text(members: dict, doc: dict) -> bool:
    want = doc.get("recaption") if doc.get("text_source") == "recaption" else doc.get("caption")
    return members.get("txt", b"").decode("utf-8") == want


def _marks(*pairs) -> tuple:
    return tuple((v, f"{name} {v}") for name, v in pairs if v is not None)


def contract(cfg=None, facts: dict | None = None) -> Contract:
    """`{sample_id}.jpg` + `.txt` (the training text) + `.json` (the fields below). `cfg`: the recipe's
    image_text section (its rules and clip threshold bound the values); None: the layout only."""
    rules = getattr(cfg, "rules", None)
    clip = (facts or {}).get("clip", {})
    threshold = clip.get("threshold") if clip.get("threshold_applied") else None
    rng = (lambda name, default: getattr(rules, name) if rules is not None else default)
    min_chars, max_chars = rng("min_caption_chars", None), rng("max_caption_chars", None)
    max_aspect = rng("max_aspect_ratio", None)
    languages = tuple(rules.languages) if rules is not None and rules.languages else None
    return Contract(
        kind=KIND,
        members=(
            Member("jpg", "jpeg", thumbnail=True, description="the image: the original JPEG, or a re-encode"),
            Member("txt", "text", description="the text to train on: the caption or the recaption"),
            Member("json", "json", description="the fields below"),
        ),
        fields=(
            Field("sample_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("source", "str", False), Field("source_key", "str", False), Field("url", "str"),
            Field("width", "int", False, 1, 65535), Field("height", "int", False, 1, 65535),
            Field("language", "str", False, values=languages, plot="bars", description="language (fastText lid.176)"),
            Field("language_score", "float", True, 0.0, 1.0),
            Field("clip_score", "float", not clip.get("enabled", True), -1.0 if threshold is None else threshold - 5e-5,
                  1.0, plot="hist", marks=_marks(("threshold", clip.get("threshold"))),
                  description="CLIP image-text cosine" + ("" if clip.get("real_weights", True) else
                                                          " (RANDOM weights: threshold not applied)")),
            Field("phash", "str", False, regex=r"[0-9a-f]{16}"),
            Field("concepts", "list", False, items=Field("concept", "str", False), plot="bars",
                  description="concepts matched (MetaCLIP balancing)"),
            Field("caption", "str", False), Field("caption_original", "str", False), Field("recaption", "str"),
            Field("text_source", "str", False, values=("caption", "recaption")),
            Field("meta", "any"),
            Field("short_side", "int", True, rng("min_side", None), derive=_short_side, plot="loghist",
                  marks=_marks(("min_side", rng("min_side", None))), description="shorter side (px)"),
            Field("aspect_ratio", "float", True, 1.0, None if max_aspect is None else max_aspect * (1 + 1e-9),
                  derive=_aspect, plot="hist", marks=_marks(("max", max_aspect)),
                  description="aspect ratio (longer / shorter side)"),
            Field("caption_chars", "int", True, min_chars, max_chars, derive=lambda d: len(d["caption"]),
                  plot="loghist", marks=_marks(("min_caption_chars", min_chars), ("max_caption_chars", max_chars)),
                  description="caption length (characters after clean-up)"),
        ),
        checks=(Check("txt_is_training_text", "the .txt member is the caption or recaption named by text_source",
                      _txt_is_training_text),),
        text_field="caption",
    )
