"""The ledger: exactly one row per input item and per sub-item, whatever happened to it.

`unit` says what a row counts (a `pair`, a `document`, an `image` of a document, a `clip` of a video,
...) and `parent_id` points a sub-item at the item it sits in (null for input items). Each kind declares
its units and its reasons (`Reason`); the groups below are shared by every kind whose items have
them (reading, downloading, decoding an image, dedup), declared once here and reused.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas.common import IDENTITY_FIELDS

UNIT, PARENT_ID = "unit", "parent_id"
STATUS, REASON, DETAIL, DUPLICATE_OF, SHARD = "status", "reason", "detail", "duplicate_of", "shard"
KEPT, DROPPED, QUARANTINED = "kept", "dropped", "quarantined"

SCHEMA = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(UNIT, pa.string(), nullable=False),
        pa.field(PARENT_ID, pa.string()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(DUPLICATE_OF, pa.string()),
        pa.field(SHARD, pa.string()),
    ]
)


@dataclasses.dataclass(frozen=True)
class Reason:
    """A stable reason code. `stage`: where it is decided (the report's funnel rows); `fatal`: any row
    with it fails the run's quality gates (a sign of a broken model, not of bad data); `shows`: the
    report columns that hold the deciding value."""

    code: str
    status: str  # DROPPED or QUARANTINED
    stage: str
    text: str
    fatal: bool = False
    shows: tuple[str, ...] = ()


def reasons(*groups: tuple[Reason, ...]) -> dict[str, Reason]:
    """A kind's reasons: code -> Reason, in funnel order; a code declared twice is a bug."""
    out: dict[str, Reason] = {}
    for group in groups:
        for r in group:
            if r.code in out and out[r.code] != r:
                raise ValueError(f"reason {r.code!r} declared twice with different meanings")
            out[r.code] = r
    return out


def _q(code, stage, text, **kw) -> Reason:
    return Reason(code, QUARANTINED, stage, text, **kw)


def _d(code, stage, text, **kw) -> Reason:
    return Reason(code, DROPPED, stage, text, **kw)


READ = (
    _q("read_error", "read", "the file, tar member or table row could not be read (missing, not a regular file, "
       "above read.max_member_bytes, malformed); '@error' rows: a tar or table that broke off or hides members"),
    _q("unsafe_member", "read", "tar member is a link, device or FIFO, or has an absolute / '..' path"),
    _q("duplicate_member", "read", "a tar or table holds the same key twice (in a tar: the same key and extension, "
       "or a key that returns after other keys); the later copy is quarantined, the first one is used"),
    _q("meta_invalid", "read", "the item's JSON side-car does not parse"),
)
DOWNLOAD = (
    _q("download_failed", "download", "connection error, DNS failure or timeout after retries"),
    _q("download_http_error", "download", "HTTP status other than 200 after retries"),
    _q("download_too_large", "download", "body larger than download.max_bytes"),
    _q("download_too_many_redirects", "download", "more than download.max_redirects redirects"),
    _q("download_blocked_address", "download", "URL resolves to a private, link-local or loopback address"),
    _q("download_bad_url", "download", "not an http(s) URL"),
    _d("opted_out", "download", "the server sent an X-Robots-Tag noai / noimageai opt-out"),
)
IMAGE = (  # filters.decode and filters.rules' image checks, for an image wherever it sits
    _q("image_missing", "decode", "no image bytes, path or URL for the item"),
    _q("image_empty", "decode", "zero-byte image"),
    _q("image_undecodable", "decode", "Pillow cannot identify or decode the image"),
    _q("image_truncated", "decode", "image data ends early"),
    _q("image_too_many_pixels", "decode", "pixel count above decode.max_pixels (decompression-bomb guard)"),
    _d("image_too_small", "rules", "shorter side below rules.min_side", shows=("short_side",)),
    _d("aspect_ratio", "rules", "longer/shorter side above rules.max_aspect_ratio", shows=("aspect_ratio",)),
    _d("solid_color", "rules", "pixel standard deviation below rules.min_pixel_std (blank or solid image)",
       shows=("pixel_std",)),
)
DEDUP = (
    _d("exact_duplicate", "dedup", "same bytes as another kept item (duplicate_of names it)"),
    _d("near_duplicate", "dedup", "perceptual hash within dedup.hamming_radius of another item (duplicate_of names it)"),
)
CLIP = (
    _q("clip_score_invalid", "clip", "CLIP gave a NaN or out-of-range score (broken weights); the quality gates "
       "fail the run", fatal=True, shows=("clip_score",)),
    _d("clip_low_similarity", "clip", "CLIP image-text cosine below clip.threshold (only with real weights)",
       shows=("clip_score",)),
)
# set by the spine, for every kind with sub-items: a sub-item that passed its own checks but whose
# parent was removed goes with it
STRUCTURE = (
    _d("parent_removed", "structure", "the item this sub-item belongs to was dropped or quarantined"),
)
DUPLICATE_REASONS = tuple(r.code for r in DEDUP)
