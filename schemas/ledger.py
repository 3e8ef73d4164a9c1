"""The ledger: exactly one row per input item, whatever happened to it."""
from __future__ import annotations

import pyarrow as pa

from schemas.common import IDENTITY_FIELDS

STATUS, REASON, DETAIL, DUPLICATE_OF, SHARD = "status", "reason", "detail", "duplicate_of", "shard"
KEPT, DROPPED, QUARANTINED = "kept", "dropped", "quarantined"

SCHEMA = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(DUPLICATE_OF, pa.string()),
        pa.field(SHARD, pa.string()),
    ]
)

# Every reason the pipeline can write, with its status. Tests and the quality gates check against this.
QUARANTINE_REASONS = {
    "read_error": "the file, tar member or table row could not be read (missing, not a regular file, above "
                  "read.max_member_bytes, malformed); '@error' rows: a tar or table that broke off or hides members",
    "unsafe_member": "tar member is a link, device or FIFO, or has an absolute / '..' path",
    "duplicate_member": "a tar or table holds the same key twice (in a tar: the same key and extension, or a key "
                        "that returns after other keys); the later copy is quarantined, the first one is used",
    "image_missing": "no image bytes, path or URL for the item",
    "meta_invalid": "the item's JSON side-car does not parse",
    "image_empty": "zero-byte image",
    "image_undecodable": "Pillow cannot identify or decode the image",
    "image_truncated": "image data ends early",
    "image_too_many_pixels": "pixel count above decode.max_pixels (decompression-bomb guard)",
    "clip_score_invalid": "CLIP gave a NaN or out-of-range score (broken weights); the quality gates fail the run",
    "download_failed": "connection error, DNS failure or timeout after retries",
    "download_http_error": "HTTP status other than 200 after retries",
    "download_too_large": "body larger than download.max_bytes",
    "download_too_many_redirects": "more than download.max_redirects redirects",
    "download_blocked_address": "URL resolves to a private, link-local or loopback address",
    "download_bad_url": "not an http(s) URL",
}
DROP_REASONS = {
    "opted_out": "the server sent an X-Robots-Tag noai / noimageai opt-out",
    "caption_missing": "no caption, or nothing left after clean-up",
    "caption_too_short": "fewer than rules.min_caption_words words or rules.min_caption_chars characters",
    "caption_too_long": "more than rules.max_caption_chars characters",
    "image_too_small": "shorter side below rules.min_side",
    "aspect_ratio": "longer/shorter side above rules.max_aspect_ratio",
    "solid_color": "pixel standard deviation below rules.min_pixel_std (blank or solid image)",
    "language": "fastText language not in rules.languages or below rules.min_language_score",
    "exact_duplicate": "same bytes as another kept item (duplicate_of names it)",
    "near_duplicate": "perceptual hash within dedup.hamming_radius of another item (duplicate_of names it)",
    "clip_low_similarity": "CLIP image-text cosine below clip.threshold (only with real weights)",
    "concept_balance": "not drawn by concept-balanced resampling",
    "no_concept": "caption matched no concept and balance.drop_unmatched is set",
}
REASONS = {**QUARANTINE_REASONS, **DROP_REASONS}
