"""Box the phrases of plain captions with an open-vocabulary detector the user serves over HTTP (GLIP,
Grounding DINO, ...: no detector weights ship in any wheel, so vlcurate only speaks to one).

Reads `image` (decoded JPEG), `width`, `height`, `caption`, `candidates`; only rows whose `candidates`
is null (a caption table without GRIT spans) and without an `error` are sent. Writes `candidates` (the
detections as the grounding reader writes boxes: pixel corners of the full image, caption spans,
scores) and, when the detector cannot answer, `error` = `detector_failed`.

Protocol: POST `endpoint` with JSON `{"caption": str, "image": base64 JPEG, "width": w, "height": h}`
(the image resized so its longer side is at most `max_side`; w, h its size as sent). The answer is
`{"detections": [{"span": [start, end], "box": [x1, y1, x2, y2], "score": float}, ...]}`: `span` indexes
the caption's characters, `box` is in pixels of the image as sent (scaled back here). Connection
errors, timeouts and 5xx are retried `retries` times; anything else is the row's `detector_failed`.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from schemas import grounding as S
from schemas.common import ERROR, ERROR_DETAIL

FAILED = "detector_failed"


class DetectorError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Detector(Stage):
    name: ClassVar[str] = "detect"
    endpoint: str = ""  # "" = no detector: caption tables without spans are refused on the driver
    timeout_s: float = 60.0
    retries: int = 2
    concurrency: int = 4  # requests in flight per task
    max_side: int = 1024

    def cache_key(self) -> Any:
        return dataclasses.replace(self, concurrency=0)

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.CANDIDATES, pa.string()), pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]

    def setup(self, threads: int) -> Any:
        import requests

        return requests.Session()

    def _payload(self, image: bytes, caption: str) -> tuple[dict, float]:
        from PIL import Image

        img = Image.open(io.BytesIO(image)).convert("RGB")
        scale = min(1.0, self.max_side / max(img.size))
        if scale < 1.0:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        return {"caption": caption, "image": base64.b64encode(buf.getvalue()).decode("ascii"),
                "width": img.width, "height": img.height}, scale

    def detect(self, session, image: bytes, caption: str) -> list[dict]:
        """The caption's candidates (see the module docstring); raises DetectorError."""
        payload, scale = self._payload(image, caption)
        answer = None
        for attempt in range(self.retries + 1):
            try:
                resp = session.post(self.endpoint, json=payload, timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - connection errors and timeouts are retried
                err = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    answer = resp
                    break
                err = f"HTTP {resp.status_code}"
                if resp.status_code < 500 and resp.status_code != 429:
                    raise DetectorError(err)
            if attempt < self.retries:
                time.sleep(0.2 * 2**attempt)
        if answer is None:
            raise DetectorError(err)
        try:
            dets = answer.json()["detections"]
            out = []
            for i, d in enumerate(dets):
                s, e = (int(v) for v in d["span"])
                out.append({"key": f"det:{i}", "text": caption[s:e], "span": [s, e],
                            "box": [float(v) / scale for v in d["box"]], "coords": "xyxy",
                            "score": None if d.get("score") is None else float(d["score"]), "error": None})
            return out
        except (ValueError, KeyError, TypeError) as e:
            raise DetectorError(f"malformed answer: {type(e).__name__}: {e}") from e

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        cols = {c: batch.column(c).to_pylist() for c in (S.IMAGE, S.CAPTION, S.CANDIDATES, ERROR, ERROR_DETAIL)}
        out = {S.CANDIDATES: list(cols[S.CANDIDATES]), ERROR: list(cols[ERROR]), ERROR_DETAIL: list(cols[ERROR_DETAIL])}
        todo = [i for i in range(batch.num_rows) if cols[S.CANDIDATES][i] is None and cols[ERROR][i] is None
                and cols[S.IMAGE][i] is not None and cols[S.CAPTION][i]]
        if not todo or not self.endpoint:
            return out

        def one(i):
            try:
                return i, json.dumps(self.detect(state, cols[S.IMAGE][i], cols[S.CAPTION][i])), None
            except DetectorError as e:
                return i, None, str(e)[:300]
            except Exception as e:  # noqa: BLE001 - an image Pillow cannot re-read: this row's problem
                return i, None, f"{type(e).__name__}: {e}"[:300]

        with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            for i, cands, err in pool.map(one, todo):
                if err is None:
                    out[S.CANDIDATES][i] = cands
                else:
                    out[ERROR][i], out[ERROR_DETAIL][i] = FAILED, f"{self.endpoint}: {err}"
        return out
