"""Media bytes travel by reference, not through Spark.

An item's bytes are read once, in the fused read pass. Bytes that must be kept (an original JPEG,
a re-encode, a download, later a frame or a render) are spooled by `Spool` into one file per task
attempt under the run's work dir, and the row carries only a reference `<path>#<offset>:<size>`
(`<column>_ref`) and the size (`<column>_size`). Every later step (checkpoints, joins, dedup, the
writer's shuffle) moves these narrow rows; stages that need the bytes (CLIP, recaption, report
thumbnails, the shard writer) read them back with `read_ref` / `column_bytes`.

A retried or speculative attempt writes its own file (partition, attempt and a random suffix in the
name), so the references a committed attempt hands on always point at its own, complete file. The
work dir must be a POSIX path every executor can read (a local folder for local runs, a shared mount
on a cluster); the files go when the work dir's run folder is removed.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
import uuid
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage

REF, SIZE = "_ref", "_size"
_FDS: collections.OrderedDict[str, int] = collections.OrderedDict()  # per worker: path -> open fd
_FDS_LOCK = threading.Lock()
MAX_OPEN = 64


def ref_column(column: str) -> str:
    return column + REF


def size_column(column: str) -> str:
    return column + SIZE


def make_ref(path: str, offset: int, size: int) -> str:
    return f"{path}#{offset}:{size}"


def parse_ref(ref: str) -> tuple[str, int, int]:
    path, _, span = ref.rpartition("#")
    offset, _, size = span.partition(":")
    return path, int(offset), int(size)


def _fd(path: str) -> int:
    with _FDS_LOCK:
        fd = _FDS.get(path)
        if fd is not None:
            _FDS.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY)
        _FDS[path] = fd
        while len(_FDS) > MAX_OPEN:
            os.close(_FDS.popitem(last=False)[1])
        return fd


def read_ref(ref: str | None) -> bytes | None:
    """The bytes a reference names (None for None). Raises OSError when the spool file is gone or
    short: a broken reference is an infrastructure failure (Spark retries), not a data problem."""
    if ref is None:
        return None
    path, offset, size = parse_ref(ref)
    data = os.pread(_fd(path), size, offset)
    if len(data) != size:
        raise OSError(f"spooled media {ref}: read {len(data)} of {size} bytes")
    return data


def column_bytes(batch: pa.RecordBatch, column: str) -> list[bytes | None]:
    """The bytes of an image (or any media) column, whether the batch carries them or a reference."""
    names = batch.schema.names
    if column in names:
        return batch.column(column).to_pylist()
    if ref_column(column) in names:
        return [read_ref(r) for r in batch.column(ref_column(column)).to_pylist()]
    raise KeyError(f"batch has neither {column!r} nor {ref_column(column)!r} (columns: {names})")


def spool_path(directory: str) -> str:
    """A file name no other task attempt uses."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
    except ImportError:
        ctx = None
    part = f"part-{ctx.partitionId():05d}-{ctx.attemptNumber()}" if ctx is not None else "part-local"
    return os.path.join(directory, f"{part}-{uuid.uuid4().hex[:12]}.bin")


@dataclasses.dataclass(frozen=True)
class Spool(Stage):
    """Moves the bytes of `columns` into this task's spool file under `directory`; each column is
    replaced by `<column>_ref` (null where there were no bytes) and `<column>_size`."""

    name: ClassVar[str] = "spool"
    directory: str = ""
    columns: tuple[str, ...] = ("image",)

    def adds(self) -> list[pa.Field]:
        out = []
        for c in self.columns:
            out += [pa.field(ref_column(c), pa.string()), pa.field(size_column(c), pa.int64())]
        return out

    def drops(self) -> list[str]:
        return list(self.columns)

    def task_state(self, threads: int) -> dict[str, Any]:
        return {"file": None, "path": None, "offset": 0}  # this task attempt's own spool file, opened lazily

    def end_task(self, state: dict[str, Any]) -> None:
        if state["file"] is not None:
            state["file"].close()

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        out: dict[str, list] = {}
        for c in self.columns:
            refs, sizes = [], []
            for data in batch.column(c).to_pylist():
                if data is None:
                    refs.append(None)
                    sizes.append(None)
                    continue
                if state["file"] is None:
                    os.makedirs(self.directory, exist_ok=True)
                    state["path"] = spool_path(self.directory)
                    state["file"] = open(state["path"], "wb")  # noqa: SIM115 - closed when the task's batches end
                state["file"].write(data)
                refs.append(make_ref(state["path"], state["offset"], len(data)))
                sizes.append(len(data))
                state["offset"] += len(data)
            out[ref_column(c)], out[size_column(c)] = refs, sizes
        if state["file"] is not None:
            state["file"].flush()  # a later batch's reader in this worker may look before the task ends
        return out
