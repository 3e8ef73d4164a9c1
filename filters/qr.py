"""QR codes and barcodes in images (zxing-cpp): such images are removed from interleaved documents.

Reads `image` (bytes or its spooled reference); writes `barcode`: the formats zxing-cpp found (e.g.
"QRCode", "EAN13"), comma-separated, or null. The image is scanned at most `max_side` pixels on its
longer side (codes in web images are large; scanning full-size photos costs seconds each).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from filters.media import column_bytes

BARCODE = "barcode"


def find_barcodes(data: bytes, max_side: int = 640) -> str | None:
    import zxingcpp
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.draft("L", (max_side, max_side))
        img = img.convert("L")
        img.thumbnail((max_side, max_side))
        found = zxingcpp.read_barcodes(img)
    except Exception:  # noqa: BLE001 - an image zxing cannot read holds no code we can see
        return None
    names = sorted({str(b.format).rsplit(".", 1)[-1] for b in found if b.valid})
    return ",".join(names) or None


@dataclasses.dataclass(frozen=True)
class Barcodes(Stage):
    name: ClassVar[str] = "qr"
    max_side: int = 640

    def adds(self) -> list[pa.Field]:
        return [pa.field(BARCODE, pa.string())]

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        return {BARCODE: [None if d is None else find_barcodes(d, self.max_side)
                          for d in column_bytes(batch, "image")]}
