"""Progress a person can follow: per phase of a run, Spark tasks done, items done, rate and time left.

A phase is a named part of the run (`image_text features`, `image_text dedup`, `image_text shards`,
`ledger`, `report`, `gates`). Spark jobs started inside `phase(spark, name)` carry the name as their
job group; a daemon thread polls Spark's status tracker (no UI needed) and prints, at most every
`interval` seconds:

    [image_text features] 12/40 tasks, 3,072 items, 640 items/s, ~0:00:44 left

Items are the rows that the phase's row-wise stages finished (`StageTimer` counts them per task), so
they move when tasks end; time left extrapolates the task rate over the tasks of the stages started
so far. On a terminal the line is refreshed in place; elsewhere (logs, CI) only one line is printed
per phase, when it ends. `Progress.report()` (-> summary.json `phases`) keeps each phase's seconds,
tasks, items and rate, in the order the phases began.

Phases may overlap (the report material and the gates run side by side, each in its own thread):
the line then shows each phase in progress, separated by ` | `. Items count every row-wise pass
that ends while a phase is open, so a phase without row-wise stages says so (`items=False`) and
counts none of a neighbour's.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, TextIO

log = logging.getLogger(__name__)
_ACTIVE: Progress | None = None  # the reporter of the run in progress in this driver


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Polls Spark's status tracker for the current phase and prints its progress."""

    def __init__(self, spark, timer=None, interval: float = 5.0, stream: TextIO | None = None,
                 live: bool | None = None):
        self.sc = spark.sparkContext
        self.timer = timer
        self.interval = interval
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.phases: dict[str, dict[str, Any]] = {}
        self._open: dict[str, tuple[float, int | None]] = {}  # phase in progress -> (started, rows at start)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the run's side -----------------------------------------------------------------------------
    def __enter__(self):
        global _ACTIVE
        _ACTIVE = self
        self._thread = threading.Thread(target=self._poll, name="vlcurate-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if _ACTIVE is self:
            _ACTIVE = None

    def begin(self, name: str, items: bool = True) -> None:
        with self._lock:
            self._open[name] = (time.perf_counter(), self._rows() if items else None)
            self.phases.setdefault(name, {"seconds": 0.0, "tasks": 0, "items": 0, "items_per_second": None})

    def end(self, name: str) -> None:
        with self._lock:
            started, rows0 = self._open.pop(name)
            state = self._state(name)
            seconds = time.perf_counter() - started
            items = self._rows() - rows0 if rows0 is not None else 0
            prev = self.phases[name]
            total = {"seconds": round(prev["seconds"] + seconds, 2), "tasks": prev["tasks"] + state["done"],
                     "items": prev["items"] + items}
            total["items_per_second"] = round(total["items"] / total["seconds"], 1) if total["seconds"] else None
            self.phases[name] = total
        line = f"[{name}] done: {state['done']} tasks, {items:,} items in {_fmt_seconds(seconds)}"
        if items and seconds > 0:
            line += f" ({items / seconds:,.0f} items/s)"
        self._print(line, final=True)

    def report(self) -> dict[str, dict[str, Any]]:
        return dict(self.phases)

    # --- the poller's side --------------------------------------------------------------------------
    def _rows(self) -> int:
        return self.timer.rows_done() if self.timer is not None else 0

    def _state(self, name: str) -> dict[str, int]:
        """Tasks done / in all stages started so far by the phase's jobs (a stage a job skipped, its
        output already computed, is left out; stages not started yet are not known)."""
        tracker = self.sc.statusTracker()
        active = set(tracker.getActiveStageIds())
        done = total = 0
        for job in tracker.getJobIdsForGroup(name):
            info = tracker.getJobInfo(job)
            for stage in (info.stageIds if info else []):
                s = tracker.getStageInfo(stage)
                if s is not None and (stage in active or s.numCompletedTasks > 0):
                    done += s.numCompletedTasks
                    total += s.numTasks
        return {"done": done, "total": total}

    def line(self) -> str | None:
        """The progress line of the phases in progress (None between phases)."""
        with self._lock:
            now_open = dict(self._open)
        return " | ".join(self._phase_line(name, *at) for name, at in now_open.items()) or None

    def _phase_line(self, name: str, started: float, rows0: int | None) -> str:
        state = self._state(name)
        elapsed = time.perf_counter() - started
        items = self._rows() - rows0 if rows0 is not None else 0
        parts = [f"[{name}] {state['done']}/{state['total']} tasks"]
        if items:
            parts.append(f"{items:,} items, {items / max(elapsed, 1e-9):,.0f} items/s")
        if 0 < state["done"] < state["total"]:
            parts.append(f"~{_fmt_seconds(elapsed * (state['total'] - state['done']) / state['done'])} left")
        return ", ".join(parts)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.live:
                continue
            try:
                text = self.line()
            except Exception:  # a tracker hiccup must never hurt the run
                log.debug("progress: status tracker not readable", exc_info=True)
                continue
            if text:
                self._print(text, final=False)

    def _print(self, text: str, final: bool) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


@contextlib.contextmanager
def phase(spark, name: str, items: bool = True):
    """Run the enclosed Spark jobs as phase `name`: their job group (this thread's), and the progress
    line's label. items=False: the phase runs no row-wise stage, so it counts no items."""
    sc = spark.sparkContext
    sc.setJobGroup(name, name)
    reporter = _ACTIVE
    if reporter is not None:
        reporter.begin(name, items)
    try:
        yield
    finally:
        if reporter is not None:
            reporter.end(name)
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)
