"""Decode and validate images; compute the image features later stages decide on.

Reads `image`; writes `image` (JPEG bytes: the original file when it is already a plain RGB/greyscale
JPEG with no EXIF rotation, else a re-encode after EXIF orientation, mode conversion and alpha
flattening), `width`, `height`, `content_sha` (sha256 of the input bytes), `source_bytes` (their length), `phash` (64-bit DCT
perceptual hash, as a signed int64), `phash256` (256-bit difference hash of pHash's 32x32 thumbnail, 32 bytes:
dedup's second tier) and `pixel_std` (grey-level standard deviation of the same
thumbnail). Items that cannot be decoded get `error` set and are quarantined downstream.
A JPEG that is passed through is decoded in libjpeg's reduced-size draft mode (every block is still
read, so truncation and corrupt streams are caught) to at least 64x64 luma: the features need no more.

Only the formats in `formats` are opened (Pillow's other plugins include EPS, which runs Ghostscript
on the file). Any exception a corrupt file raises while it is opened, decoded or converted belongs to
that item: it becomes `image_truncated` or `image_undecodable`, never a failed task.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from typing import Any, ClassVar

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from filters.base import Stage
from schemas import image_text as S
from schemas.common import ERROR, ERROR_DETAIL

# Decompression bombs are handled by our own max_pixels check before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


# What web image corpora hold. Deliberately not EPS (Pillow renders it with Ghostscript), nor the
# scientific and legacy formats whose parsers see little use and much fuzzing.
# (Multi-picture JPEGs open through the JPEG entry and report format "MPO".)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "AVIF")
FEATURE_SIZE = 64  # the features' 32x32 thumbnail is resampled from at least twice its size, no more
_TRUNCATED = ("truncated", "premature", "expected to read", "unexpected end", "buffer is not large enough")


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: palette and alpha flattened on white, CMYK converted, 16-bit scaled."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


@dataclasses.dataclass(frozen=True)
class Decode(Stage):
    name: ClassVar[str] = "decode"
    max_pixels: int = 178_956_970  # 2x Pillow's bomb limit; above it nothing is decoded
    jpeg_quality: int = 95
    keep_original_jpeg: bool = True  # pass plain JPEGs through byte for byte (no generation loss)
    keep_metadata: bool = False  # passed-through JPEGs keep EXIF/XMP/IPTC/comments (GPS, serials): off by default
    formats: tuple[str, ...] = FORMATS  # Pillow format names that may be opened; empty: any Pillow knows

    def __post_init__(self) -> None:
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:  # a typo would otherwise quarantine every image of that format, one by one
            raise ValueError(f"image_text.decode.formats: {unknown} are not Pillow formats "
                             f"(this Pillow opens {', '.join(sorted(Image.OPEN))})")

    def adds(self) -> list[pa.Field]:
        return [
            pa.field(S.IMAGE, pa.binary()),
            pa.field(S.WIDTH, pa.int32()),
            pa.field(S.HEIGHT, pa.int32()),
            pa.field(S.CONTENT_SHA, pa.string()),
            pa.field(S.SOURCE_BYTES, pa.int64()),
            pa.field(S.PHASH, pa.int64()),
            pa.field(S.PHASH256, pa.binary()),
            pa.field(S.PIXEL_STD, pa.float32()),
            pa.field(ERROR, pa.string()),
            pa.field(ERROR_DETAIL, pa.string()),
        ]

    def decode_one(self, data: bytes | None) -> dict[str, Any]:
        if data is None:
            raise DecodeError("image_missing", "no image bytes")
        if len(data) == 0:
            raise DecodeError("image_empty", "zero-byte image")
        try:
            with warnings.catch_warnings():  # damaged files make Pillow warn per file: noise in executor logs
                warnings.simplefilter("ignore")
                return self._decode(data)
        except (DecodeError, MemoryError):
            raise
        except UnidentifiedImageError as e:
            accepted = f" among {', '.join(self.formats)}" if self.formats else ""
            raise DecodeError("image_undecodable", f"not an image format{accepted} (starts with {data[:16]!r})") from e
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ... on bad files
            msg = f"{type(e).__name__}: {e}"[:200]
            reason = "image_truncated" if any(t in msg.lower() for t in _TRUNCATED) else "image_undecodable"
            raise DecodeError(reason, msg) from e

    def _decode(self, data: bytes) -> dict[str, Any]:
        img = Image.open(io.BytesIO(data), formats=list(self.formats) or None)
        w, h = img.size
        if w * h > self.max_pixels:
            raise DecodeError("image_too_many_pixels", f"{w}x{h} > max_pixels {self.max_pixels}")
        fmt = img.format
        img.seek(0)
        orientation = img.getexif().get(0x0112, 1)
        if self.keep_original_jpeg and fmt == "JPEG" and img.mode in ("RGB", "L") and orientation in (1, None):
            # passed through byte for byte, so only the features need pixels: libjpeg decodes every
            # block (a damaged stream still fails) but scales in the DCT and emits luma only, which is
            # several times cheaper than a full-size RGB decode
            img.draft("L", (FEATURE_SIZE, FEATURE_SIZE))
            img.load()
            out, gray = data if self.keep_metadata else strip_metadata(data), img.convert("L")
        else:
            img.load()
            rotated = ImageOps.exif_transpose(img) if orientation not in (1, None) else img
            rgb = to_rgb(rotated)
            w, h = rgb.size
            if w == 0 or h == 0:
                raise DecodeError("image_empty", "zero-sized image")
            # the features are taken at the scale a JPEG draft would give (1/2, 1/4 or 1/8 by box
            # averaging, as the DCT scaling does), so they do not depend on which path a file took
            gray = rgb.convert("L")
            gray = gray.reduce(draft_factor(w, h)) if draft_factor(w, h) > 1 else gray
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=self.jpeg_quality)
            out = buf.getvalue()
        return {S.IMAGE: out, S.WIDTH: w, S.HEIGHT: h, S.CONTENT_SHA: hashlib.sha256(data).hexdigest(),
                S.SOURCE_BYTES: len(data), **gray_features(gray)}

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        cols = {f.name: [] for f in self.adds()}
        images = batch.column(S.IMAGE).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        details = batch.column(ERROR_DETAIL).to_pylist()
        for data, err, det in zip(images, errors, details):
            row: dict[str, Any] = {S.IMAGE: None, ERROR: err, ERROR_DETAIL: det}
            if err is None:
                try:
                    row.update(self.decode_one(data))
                except DecodeError as e:
                    row.update({ERROR: e.reason, ERROR_DETAIL: e.detail})
            for name, values in cols.items():
                values.append(row.get(name))
        return cols


# The 8x32 corner of the DCT-II matrix (scipy's unnormalised type II: 2 cos(pi k (2n + 1) / 2N)): pHash
# keeps only the 8x8 lowest frequencies of its 32x32 DCT, so two small products give them
_N, _K = 32, 8
_DCT = 2.0 * np.cos(np.pi * np.arange(_K)[:, None] * (2 * np.arange(_N)[None, :] + 1) / (2 * _N))


def phash(gray: Image.Image) -> int:
    """imagehash.phash's 64-bit hash (32x32 Lanczos grey thumbnail, 2-D DCT-II, the 8x8 lowest
    frequencies against their median), as an unsigned int. The same hash without imagehash's
    `scipy.fftpack` import, which costs each Python worker ~26 MiB and 0.25 s: a product with the
    8x32 corner of the DCT matrix gives the 64 coefficients; tests check it equals imagehash.phash on
    photos. Rounded to 1e-6 first: where the image makes coefficients exactly zero (a gradient along one
    axis), floating-point noise of ~1e-10 would otherwise decide their bits, differently per library or
    CPU."""
    return _dct_hash(_thumbnail(gray))


def _thumbnail(gray: Image.Image) -> Image.Image:
    """pHash's 32x32 Lanczos grey thumbnail."""
    return gray.convert("L").resize((_N, _N), Image.Resampling.LANCZOS)


def _dct_hash(thumb: Image.Image) -> int:
    low = np.round(_DCT @ np.asarray(thumb, dtype=np.float64) @ _DCT.T, 6)
    return int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")


def dhash256(thumb: Image.Image) -> bytes:
    """imagehash.dhash (hash_size=16: 17x16 Lanczos, each pixel against its left neighbour) of pHash's
    32x32 thumbnail, packed into 32 bytes. Taken from the thumbnail rather than the whole draft image: a
    quarter of the cost (~28 us against ~80 per image), and on the benchmark's photos 5 bits of 256 apart
    on average from the whole image's dHash (dedup's second tier allows 64)."""
    return np.packbits(imagehash.dhash(thumb, hash_size=16).hash.ravel()).tobytes()


def signed64(h: int) -> int:
    """An unsigned 64-bit hash as the int64 that Arrow and Spark store."""
    return h - (1 << 64) if h >= (1 << 63) else h


def gray_features(gray: Image.Image) -> dict[str, Any]:
    """The image features dedup and the rules read, from the grey image at draft scale: `phash`
    (int64), `phash256` (`dhash256` of the same 32x32 thumbnail, 32 bytes) and `pixel_std` (of that
    thumbnail too: a separate 64x64 bilinear one cost ~60 us an image, a quarter of the features, for
    a std 0.99x as large at the median, 0.83x at the 1st percentile, on the benchmark's photos). Every
    kind that writes these columns computes them here."""
    thumb = _thumbnail(gray)
    return {
        S.PHASH: signed64(_dct_hash(thumb)),
        S.PHASH256: dhash256(thumb),
        S.PIXEL_STD: float(np.asarray(thumb, dtype=np.float32).std()),
    }


def draft_factor(w: int, h: int) -> int:
    """The scale libjpeg's draft mode picks for FEATURE_SIZE: the largest of 1, 2, 4, 8 that keeps both
    sides at least FEATURE_SIZE."""
    k = 8
    while k > 1 and (w // k < FEATURE_SIZE or h // k < FEATURE_SIZE):
        k //= 2
    return k


# JPEG segments that carry metadata and no pixels or colour: APP1 (EXIF, XMP), APP3-APP12, APP13
# (IPTC/Photoshop), APP15, COM. Kept: APP0 (JFIF), APP2 (ICC profile), APP14 (Adobe colour transform).
_METADATA_MARKERS = {0xE1, *range(0xE3, 0xED), 0xED, 0xEF, 0xFE}


def strip_metadata(data: bytes) -> bytes:
    """A JPEG without its metadata segments, the entropy-coded data untouched (no re-encode): the
    same pixels. EXIF orientation need not survive, as only JPEGs without a rotation pass through.
    Anything that does not parse as a plain segment list is returned as it is."""
    if data[:2] != b"\xff\xd8":
        return data
    out, i, n = [data[:2]], 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return data
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA or not (0xC0 <= marker <= 0xFE):  # start of scan: the rest is image data
            out.append(data[i:])
            return b"".join(out)
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return data
        if marker not in _METADATA_MARKERS:
            out.append(data[i:i + 2 + length])
        i += 2 + length
    return data


def phash_hex(value: int | None) -> str | None:
    return None if value is None else f"{value & ((1 << 64) - 1):016x}"
