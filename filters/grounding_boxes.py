"""Grounding stages: load an image by path, check and convert its boxes, and give every box a row.

- `LoadImage` reads `path` (rows with no bytes and no URL): writes `image`, or `error` =
  `image_missing` (no such file) / `read_error` (anything else); transient storage errors raise.
- `GroundBoxes` reads `candidates` (the reader's boxes, in their input convention), `caption`,
  `width`/`height` (decode), `declared_width`/`declared_height`: converts every box to pixels
  (schemas.boxes), clips and checks it, drops low scores, merges duplicates of one phrase by IoU and
  writes `phrases` (the sample's phrases with 0-999 boxes and caption spans), `caption` (built from the
  category names kept, for COCO), `valid_boxes`, and `verdicts` (per candidate: its reason or null).
- `ExplodeBoxes` appends one `box` row per candidate (unit `box`, `parent_id` the image) carrying
  `box_reason`, `box_duplicate_of` (the sample_id of the box it was merged into) and `box_score`;
  it removes `candidates` and `verdicts`, so later steps move narrow rows.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from schemas import boxes as B
from schemas import grounding as S
from schemas import ledger as L
from schemas.common import ERROR, ERROR_DETAIL, SAMPLE_ID, SOURCE, SOURCE_KEY, make_sample_id

VERDICTS = "verdicts"


@dataclasses.dataclass(frozen=True)
class LoadImage(Stage):
    name: ClassVar[str] = "load_image"
    max_bytes: int = 64_000_000

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.IMAGE, pa.binary()), pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        from pipelines.io import storage
        from pipelines.io.readers import is_transient

        out: dict[str, list] = {S.IMAGE: [], ERROR: [], ERROR_DETAIL: []}
        cols = [batch.column(c).to_pylist() for c in (S.IMAGE, S.PATH, S.URL, ERROR, ERROR_DETAIL)]
        for image, path, url, err, det in zip(*cols):
            if image is None and err is None and path and not url:
                try:
                    image = storage.read_bytes(path, self.max_bytes)
                except FileNotFoundError:
                    err, det = "image_missing", f"no image file {path}"
                except Exception as e:  # a broken file belongs to its item
                    if is_transient(e):
                        raise
                    msg = f"{type(e).__name__}: {e}"
                    err = "image_missing" if "NoSuchKey" in msg or "(404)" in msg else "read_error"
                    det = f"{path}: {msg}"[:300]
            out[S.IMAGE].append(image)
            out[ERROR].append(err)
            out[ERROR_DETAIL].append(det)
        return out


@dataclasses.dataclass(frozen=True)
class GroundBoxes(Stage):
    """Box checks; knobs from the recipe's grounding section."""

    name: ClassVar[str] = "boxes"
    min_box_side: float = 2.0  # pixels, after clipping
    min_score: float = 0.0  # detector confidence (GRIT's, a served detector's); boxes without a score pass
    merge_iou: float = 0.9  # boxes of one phrase at least this similar are one box

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.PHRASES, pa.string()), pa.field(S.CAPTION, pa.string()),
                pa.field(S.VALID_BOXES, pa.int32()), pa.field(VERDICTS, pa.string())]

    def ground(self, candidates: list[dict], caption: str | None, width: int, height: int,
               declared: tuple[int | None, int | None]) -> dict[str, Any]:
        """One image: {phrases, caption, valid_boxes, verdicts}."""
        sx = width / declared[0] if declared[0] else 1.0
        sy = height / declared[1] if declared[1] else 1.0
        verdicts: list[dict] = []
        ok: list[tuple[int, tuple, float | None]] = []  # (candidate index, pixel box, score)
        for i, c in enumerate(candidates):
            reason, pixel = c.get("error"), None
            score = c.get("score")
            if reason is None:
                raw = c.get("box")
                try:
                    if c.get("coords") == "unit":
                        pixel = B.from_unit(*raw, width, height)
                    elif c.get("coords") == "xyxy":
                        pixel = (raw[0] * sx, raw[1] * sy, raw[2] * sx, raw[3] * sy)
                    else:
                        x, y, w, h = raw
                        pixel = B.from_xywh(x * sx, y * sy, w * sx, h * sy)
                except (TypeError, ValueError):
                    pixel = None
                pixel, reason = B.check(pixel, width, height, self.min_box_side) if pixel is not None else (None, B.INVALID)
            if reason is None and score is not None and score < self.min_score:
                reason = "box_low_score"
            if reason is None and caption is not None:
                span = c.get("span")
                if not span or not 0 <= span[0] < span[1] <= len(caption):
                    reason = "unlinked_phrase"
            verdicts.append({"key": c["key"], "reason": reason, "twin": None, "score": score})
            if reason is None:
                ok.append((i, pixel, score))
        # group by phrase, merge duplicates inside a phrase
        groups: dict[tuple, list[tuple[int, tuple, float | None]]] = {}
        for item in ok:
            c = candidates[item[0]]
            groups.setdefault((c.get("text"), tuple(c["span"]) if caption is not None else None), []).append(item)
        phrases = []
        for (text, span), items in groups.items():
            twins = B.merge([p for _, p, _ in items], [s for _, _, s in items], self.merge_iou)
            kept = []
            for (i, pixel, _), twin in zip(items, twins):
                if twin is None:
                    kept.append(B.to_grid(pixel, width, height))
                else:
                    verdicts[i].update(reason="box_duplicate", twin=candidates[items[twin][0]]["key"])
            kept.sort(key=lambda b: (b[1], b[0], b[3], b[2]))
            phrases.append({"text": text, "span": list(span) if span else None, "boxes": kept,
                            "_first": min(i for i, _, _ in items)})
        if caption is None:  # COCO: the caption names the categories kept, in order of first annotation
            phrases.sort(key=lambda p: p["_first"])
            parts, at = [], 0
            for p in phrases:
                if parts:
                    at += 2
                p["span"] = [at, at + len(p["text"])]
                at += len(p["text"])
                parts.append(p["text"])
            caption = ", ".join(parts)
        for p in phrases:
            del p["_first"]
            p["text"] = caption[p["span"][0]:p["span"][1]]
        phrases.sort(key=lambda p: (p["span"][0], p["span"][1]))
        return {"phrases": phrases, "caption": caption, "valid_boxes": B.count_boxes(phrases), "verdicts": verdicts}

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        out: dict[str, list] = {S.PHRASES: [], S.CAPTION: [], S.VALID_BOXES: [], VERDICTS: []}
        names = (S.CANDIDATES, S.CAPTION, "width", "height", S.DECLARED_W, S.DECLARED_H, ERROR)
        for cands, caption, w, h, dw, dh, err in zip(*(batch.column(c).to_pylist() for c in names)):
            candidates = json.loads(cands) if cands else []
            if err is not None or not w or not h:
                out[S.PHRASES].append(None)
                out[S.CAPTION].append(caption)
                out[S.VALID_BOXES].append(None)
                out[VERDICTS].append(json.dumps([{"key": c["key"], "reason": None, "twin": None,
                                                   "score": c.get("score")} for c in candidates]))
                continue
            g = self.ground(candidates, caption, w, h, (dw, dh))
            out[S.PHRASES].append(json.dumps(g["phrases"], ensure_ascii=False))
            out[S.CAPTION].append(g["caption"])
            out[S.VALID_BOXES].append(g["valid_boxes"])
            out[VERDICTS].append(json.dumps(g["verdicts"]))
        return out


def box_id(image_id: str, key: str) -> str:
    """A box's sample_id: from its image's id (itself location-independent) and its key in the image."""
    return make_sample_id(S.KIND + ":box", image_id, str(key))


@dataclasses.dataclass(frozen=True)
class ExplodeBoxes(Stage):
    """Image rows in; the same image rows plus one `box` row per candidate out."""

    name: ClassVar[str] = "explode_boxes"

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.BOX_REASON, pa.string()), pa.field(S.BOX_DUPLICATE_OF, pa.string()),
                pa.field(S.BOX_SCORE, pa.float32())]

    def drops(self) -> list[str]:
        return [S.CANDIDATES, VERDICTS]

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            t0 = time.perf_counter()
            out = self.explode(batch)
            if timing is not None:
                timing[0] += time.perf_counter() - t0
            yield out

    def apply(self, batch: pa.RecordBatch, state: Any = None) -> pa.RecordBatch:
        return self.explode(batch)

    def explode(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        schema = self.output_schema(batch.schema)
        rows = batch.to_pylist()
        out = []
        for r in rows:
            verdicts = json.loads(r.pop(VERDICTS) or "[]")
            r.pop(S.CANDIDATES, None)
            out.append({**r, S.BOX_REASON: None, S.BOX_DUPLICATE_OF: None, S.BOX_SCORE: None})
            parent = r[SAMPLE_ID]
            for v in verdicts:
                box = {f.name: None for f in schema}
                box.update({SAMPLE_ID: box_id(parent, v["key"]), "kind": r["kind"], SOURCE: r[SOURCE],
                            SOURCE_KEY: f"{r[SOURCE_KEY]}#box:{v['key']}", L.UNIT: "box", L.PARENT_ID: parent,
                            S.FORMAT: r.get(S.FORMAT), "read_unit": r.get("read_unit"),
                            S.BOX_REASON: v["reason"],
                            S.BOX_DUPLICATE_OF: box_id(parent, v["twin"]) if v.get("twin") is not None else None,
                            S.BOX_SCORE: v.get("score")})
                out.append(box)
        return pa.RecordBatch.from_pylist(out, schema=schema)


@dataclasses.dataclass(frozen=True)
class DrawBoxes(Stage):
    """Reads `image` (bytes) and `boxes` (JSON: a list of objects with `boxes` or `box`, 0-999); writes
    `out`: a JPEG of at most `size` px with the boxes drawn, the report's thumbnail (grounding, gui)."""

    name: ClassVar[str] = "draw_boxes"
    image: str = S.IMAGE
    boxes: str = S.PHRASES
    out: str = "boxed"
    size: int = 320

    def adds(self) -> list[pa.Field]:
        return [pa.field(self.out, pa.binary())]

    def draw(self, data: bytes | None, items: str | None) -> bytes | None:
        import io

        from PIL import Image, ImageDraw

        if not data or items is None:
            return None
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            img.thumbnail((self.size, self.size))
            w, h = img.size
            draw = ImageDraw.Draw(img)
            colours = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180))
            for i, item in enumerate(json.loads(items)):
                for b in item.get("boxes") or [item.get("box")]:
                    if b:
                        draw.rectangle((b[0] * w / B.GRID, b[1] * h / B.GRID, b[2] * w / B.GRID, b[3] * h / B.GRID),
                                       outline=colours[i % len(colours)], width=2)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - a thumbnail only; decode or render has named the image's problem
            return None

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        return {self.out: [self.draw(d, b) for d, b in zip(batch.column(self.image).to_pylist(),
                                                            batch.column(self.boxes).to_pylist())]}
