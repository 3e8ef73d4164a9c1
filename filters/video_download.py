"""Download videos that a table names by http(s) URL (WebVid / Panda-70M rows) into the run's work dir.

Reads `path` and `error`; for rows with `error` null and an http(s) `path`, fetches the URL with
`filters.download.Download` (its address policy, timeouts, retries with back-off, redirects checked hop
by hop, size cap, user agent, X-Robots-Tag opt-out, and its requests kept in flight across batches) and
writes the body once to `directory/{sha1(url)}{ext}` (atomically; a URL already there is not fetched
again). Writes `path` (the local file, which the probe, scene and frame stages then read unchanged) and
`error` / `error_detail`: the shared `download_*` reason codes of schemas.ledger on failure, `opted_out`
(a drop, not a quarantine) for an X-Robots-Tag noai answer. Other rows pass through untouched.
Bodies are never held in memory (a retry or a redirect hop starts the temporary file over).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from typing import ClassVar
from urllib.parse import urlsplit

import pyarrow as pa

from filters.download import FAILED, OK, OPTED_OUT, Body, Download, Outcome
from schemas import video as S
from schemas.common import ERROR, ERROR_DETAIL

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp")


def is_url(path: str | None) -> bool:
    return isinstance(path, str) and path.strip().lower().startswith(("http://", "https://"))


def local_name(url: str) -> str:
    """The file a URL is downloaded to: its sha1 and, when the URL's path names one, its video suffix."""
    suffix = os.path.splitext(urlsplit(url).path)[1].lower()
    return hashlib.sha1(url.encode()).hexdigest() + (suffix if suffix in VIDEO_SUFFIXES else ".mp4")


@dataclasses.dataclass(frozen=True)
class DownloadVideo(Download):
    """The recipe section `video.download`: `filters.download.Download`'s knobs, video-sized."""

    name: ClassVar[str] = "video_download"
    accept: ClassVar[str] = "video/*,*/*;q=0.8"
    concurrency: int = 4
    timeout_s: float = 60.0
    max_bytes: int = 200_000_000
    directory: str = ""  # set by the plan: a folder of the run's work dir

    def cache_key(self):
        return dataclasses.replace(self, directory="")

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.PATH, pa.string()), pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]

    # --- hooks of Download: a file already there is the outcome; bodies go straight to a file -------
    def _known(self, url: str) -> Outcome | None:
        target = os.path.join(self.directory, local_name(url))
        if os.path.isfile(target):  # fetched before (the same URL on another row, or a resumed run)
            return Outcome(OK, detail=target)
        return None

    def _body(self, url: str) -> Body:
        return _FileBody(self.directory, os.path.join(self.directory, local_name(url)))

    # --- batches (Download.run keeps requests in flight across batches and calls these) ---------
    @staticmethod
    def _todo(batch: pa.RecordBatch) -> list[tuple[int, str]]:
        """(row, url) of the rows to fetch, each distinct URL once (its first row)."""
        seen: set[str] = set()
        out = []
        for i, (p, err) in enumerate(zip(batch.column(S.PATH).to_pylist(), batch.column(ERROR).to_pylist())):
            if err is None and is_url(p) and p.strip() not in seen:
                seen.add(p.strip())
                out.append((i, p))
        return out

    def _columns(self, batch: pa.RecordBatch, outcomes: dict[int, Outcome]) -> dict[str, list]:
        paths = batch.column(S.PATH).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        details = batch.column(ERROR_DETAIL).to_pylist()
        by_url = {paths[i].strip(): o for i, o in outcomes.items()}
        out: dict[str, list] = {S.PATH: [], ERROR: [], ERROR_DETAIL: []}
        for i, p in enumerate(paths):
            o = by_url.get(p.strip()) if errors[i] is None and is_url(p) else None
            if o is None:
                row = (p, errors[i], details[i])
            elif o.status == OK:
                row = (o.detail, None, None)
            elif o.status == OPTED_OUT:
                row = (p, OPTED_OUT, o.detail)
            else:
                row = (p, o.status, o.detail)
            for name, value in zip(out, row):
                out[name].append(value)
        return out


class _FileBody(Body):
    """A body written to `{target}.{random}.tmp` as it arrives (the file opened at the first byte) and
    renamed to `target` by finish(); discard() removes the temporary file."""

    __slots__ = ("directory", "file", "target", "tmp")

    def __init__(self, directory: str, target: str):
        super().__init__()
        self.directory, self.target = directory, target
        self.file = None
        self.tmp: str | None = None

    def _open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.tmp = f"{self.target}.{uuid.uuid4().hex}.tmp"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish() or discard()

    def write(self, data: bytes) -> None:
        if self.file is None:
            self._open()
        self.file.write(data)

    def restart(self) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()

    def finish(self) -> Outcome:
        try:
            if self.file is None:  # an empty body: still a file
                self._open()
            self.file.close()
            os.replace(self.tmp, self.target)
        except OSError as e:
            self.discard()
            return Outcome(FAILED, detail=f"cannot write {self.target}: {e}"[:300])
        self.file = self.tmp = None
        return Outcome(OK, detail=self.target)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tmp is not None and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.file = self.tmp = None
