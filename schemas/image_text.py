"""Image-text pairs: the row that flows through the image_text pipeline.

Readers produce RAW; each stage appends its own columns (declared in the stage module).
"""
from __future__ import annotations

import pyarrow as pa

from schemas.common import ERROR_FIELDS, IDENTITY_FIELDS

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
    ]
    + ERROR_FIELDS
)

# Added by filters.decode.Decode
WIDTH, HEIGHT, CONTENT_SHA, SOURCE_BYTES, PHASH, PIXEL_STD = (
    "width", "height", "content_sha", "source_bytes", "phash", "pixel_std")
# Added by filters.caption.CaptionLanguage
CAPTION_ORIGINAL, CAPTION_WORDS, CAPTION_CHARS, LANGUAGE, LANGUAGE_SCORE = (
    "caption_original", "caption_words", "caption_chars", "language", "language_score")
# Added by filters.clip.ClipScore
CLIP_SCORE = "clip_score"
# Added by filters.balance
CONCEPTS = "concepts"
# Added by filters.recaption.Recaption
RECAPTION = "recaption"
