"""The stage protocol, and the one adapter that runs a stage on a Spark DataFrame.

A row-wise stage is a frozen dataclass: its fields are its knobs (they come straight from the recipe).
`adds()` declares the columns it appends (or replaces), `setup()` loads heavy state once per Python
worker, and `process()` maps one Arrow record batch to those columns. Stages never import Spark, so
they are tested on plain pyarrow batches; `apply_stages` is the only bridge to `DataFrame.mapInArrow`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.abc
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pyarrow as pa

_STATE: dict[Any, Any] = {}  # per Python worker: stage config -> loaded state (models, automata)
_PANDAS_CHECKED = False


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("pandas is kept out of this Python worker (filters.base.arrow_only)", name=name)


def _give_back() -> None:
    """At the end of a task: hand the memory it freed back to the system (Arrow's pool, glibc's heap),
    so an idle worker waiting for its next task holds what it uses, not its peak. (No gc.collect():
    in workers holding models it costs CPU for little.)"""
    import ctypes

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


_POOL_SET = False


def arrow_pool() -> None:
    """Arrow's jemalloc pool as this process's default (once). pyarrow's wheels
    default to mimalloc, which in a worker that builds batches of image bytes with the download thread
    beside it keeps asking the kernel for fresh pages (2 MiB huge pages among them, perf:
    do_huge_pmd_anonymous_page under mi_page_free_list_extend), each zeroed on first touch; jemalloc
    reuses its own. At 20,000 URLs, 4 of 4 alternating pairs ran faster, with 1-3 CPU s less a run
    (benchmarks/HISTORY.md, the fourteenth round). ARROW_DEFAULT_MEMORY_POOL, where set, wins; a pyarrow
    built without jemalloc keeps its default. Called by the driver and at every Arrow task's start."""
    global _POOL_SET
    if not _POOL_SET:
        _POOL_SET = True
        if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
            try:
                pa.set_memory_pool(pa.jemalloc_memory_pool())
            except NotImplementedError:
                pass


def arrow_only() -> None:
    """Keep pandas out of this Python worker. The first time pyarrow converts a Python list it imports
    pandas (~80 MiB resident, per worker), only to ask whether the list is a pandas object; no worker
    code uses pandas. Here pyarrow's one check runs with pandas absent, and pyarrow remembers that for
    the process; an explicit `import pandas` later still works (and so does `to_pandas()`). Called at
    the start of every Arrow task of the pipeline (mapInArrow), which also picks Arrow's pool there
    (`arrow_pool`); a no-op once done or where pandas is loaded."""
    global _PANDAS_CHECKED
    arrow_pool()
    if _PANDAS_CHECKED or "pandas" in sys.modules:
        return
    _PANDAS_CHECKED = True
    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([None])  # pyarrow's pandas check, once per process
    finally:
        sys.meta_path.remove(finder)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: ClassVar[str] = "stage"

    def adds(self) -> list[pa.Field]:
        """Columns this stage appends to (or replaces in) every batch."""
        raise NotImplementedError

    def drops(self) -> list[str]:
        """Columns this stage removes (e.g. bytes it moved to a file and replaced by a reference)."""
        return []

    def cache_key(self) -> Any:
        """What this stage's output depends on, for checkpoint keys: by default every knob. A stage
        whose output does not depend on some knobs (a threshold applied later, a batch size) leaves
        them out, so changing them reuses the checkpoint."""
        return self

    def setup(self, threads: int) -> Any:
        """Heavy state (a model, an automaton), built once per worker and reused for every batch."""
        return None

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, Iterable]:
        """Values of every column in `adds()` for the rows of `batch`."""
        raise NotImplementedError

    # --- machinery, not meant to be overridden -------------------------------------------------
    def state(self, threads: int = 1) -> Any:
        key = (self, threads)
        if key not in _STATE:
            _STATE[key] = self.setup(threads)
        return _STATE[key]

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        for name in self.drops():
            schema = schema.remove(schema.get_field_index(name))
        for f in self.adds():
            i = schema.get_field_index(f.name)
            schema = schema.set(i, f) if i >= 0 else schema.append(f)
        return schema

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        """Apply the stage to every batch; `timing[0]` accumulates the seconds spent in this stage only
        (set-up included), not in producing the input batches."""
        t0 = time.perf_counter()
        state = self.task_state(threads)
        if timing is not None:
            timing[0] += time.perf_counter() - t0
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                t0 = time.perf_counter()
                out = self.apply(batch, state)
                if timing is not None:
                    timing[0] += time.perf_counter() - t0
                yield out
        finally:
            self.end_task(state)

    def task_state(self, threads: int) -> Any:
        """The state one task's batches share: by default the worker's (a model stays loaded). A stage
        that keeps something per task (an open file) returns a fresh one and closes it in end_task."""
        return self.state(threads)

    def end_task(self, state: Any) -> None:
        """Called once a task's batches are done (or failed)."""

    def apply(self, batch: pa.RecordBatch, state: Any = None) -> pa.RecordBatch:
        state = self.state() if state is None else state
        values = self.process(batch, state)
        columns = {name: batch.column(name) for name in batch.schema.names}
        fields = {f.name: f for f in batch.schema}
        for name in self.drops():
            del columns[name], fields[name]
        for f in self.adds():
            columns[f.name] = pa.array(values[f.name], type=f.type)
            fields[f.name] = f
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=pa.schema(list(fields.values())))


def task_threads() -> int:
    """CPU cores Spark gave this task (spark.task.cpus); 1 outside Spark."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        return max(1, int(ctx.cpus())) if ctx is not None else 1
    except Exception:  # noqa: BLE001 - outside a Spark task
        return 1


class StageTimer:
    """Task-seconds and rows per stage, summed across executors with Spark accumulators (they reach the
    driver as tasks end)."""

    def __init__(self, spark):
        self.spark = spark
        self.accumulators: dict[str, Any] = {}
        self.row_accumulators: dict[str, Any] = {}
        self.passes = spark.sparkContext.accumulator(0)  # rows out of every row-wise pass, counted once
        self.wall: dict[str, float] = {}
        self.reused: dict[str, bool] = {}  # checkpoint name -> True when a finished one was read back

    def accumulator(self, name: str):
        if name not in self.accumulators:
            self.accumulators[name] = self.spark.sparkContext.accumulator(0.0)
        return self.accumulators[name]

    def rows_accumulator(self, name: str):
        if name not in self.row_accumulators:
            self.row_accumulators[name] = self.spark.sparkContext.accumulator(0)
        return self.row_accumulators[name]

    def rows_done(self) -> int:
        """Rows that finished a row-wise pass so far (the progress line's items)."""
        return self.passes.value

    def add_wall(self, name: str, seconds: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + seconds

    def mark_checkpoint(self, name: str, reused: bool) -> None:
        self.reused[name] = reused

    def report(self) -> dict[str, dict[str, Any]]:
        names = sorted(set(self.accumulators) | set(self.wall) | set(self.reused))
        out: dict[str, dict[str, Any]] = {}
        for n in names:
            task_s = self.accumulators[n].value if n in self.accumulators else None
            out[n] = {
                "task_seconds": None if task_s is None else round(task_s, 3),
                "wall_seconds": round(self.wall[n], 3) if n in self.wall else None,
            }
            if n in self.row_accumulators:
                rows = self.row_accumulators[n].value
                out[n]["rows"] = rows
                # the stage's own rate, per core: rows over the task-seconds spent in it
                out[n]["rows_per_task_second"] = round(rows / task_s, 1) if task_s else None
            if n in self.reused:
                out[n]["reused"] = self.reused[n]
        return out


# --- test-only fault injection -------------------------------------------------------------------
FAULT_RATE_ENV = "VLCURATE_FAULT_RATE"
FAULT_SEED_ENV = "VLCURATE_FAULT_SEED"
FAULT_STALL_ENV = "VLCURATE_FAULT_STALL_S"
FAULT_SITES_ENV = "VLCURATE_FAULT_SITES"
FAULT_DROP_ENV = "VLCURATE_FAULT_DROP_ROWS"  # test only: stage names after which rows silently vanish


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook (FaultPlan), never by real work."""


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """TEST ONLY: fail the first attempt of a fixed share of the tasks at one site (a stage or the shard
    writer), so tests can check that retried and speculative attempts give a clean run's output.

    Off unless VLCURATE_FAULT_RATE (0..1) is set on the driver; VLCURATE_FAULT_SEED picks which tasks,
    VLCURATE_FAULT_SITES (comma-separated stage names and/or `shards`; default all) where,
    VLCURATE_FAULT_STALL_S makes a chosen attempt stall that long first (a straggler for speculation
    to copy). The choice is a hash of (seed, site, partition), so it is the same on every run, and only
    attempt 0 fails: retries and speculative copies (attempt >= 1) run clean. Local mode retries only
    with a master like local[2,4]. Read on the driver and shipped in the closure: executors need no
    environment.
    """

    site: str
    rate: float
    seed: str = "0"
    stall_s: float = 0.0

    @classmethod
    def from_env(cls, site: str) -> FaultPlan | None:
        rate = float(os.environ.get(FAULT_RATE_ENV) or 0)
        sites = os.environ.get(FAULT_SITES_ENV)
        if rate <= 0 or (sites and site not in sites.split(",")):
            return None
        return cls(site, rate, os.environ.get(FAULT_SEED_ENV, "0"), float(os.environ.get(FAULT_STALL_ENV) or 0))

    def chosen(self, partition: int) -> bool:
        digest = hashlib.sha1(f"{self.seed}/{self.site}/{partition}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < self.rate

    def strike(self) -> None:
        """Call inside a task where a failure hurts most (partial output exists): raises on attempt 0 of a
        chosen partition, does nothing otherwise."""
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is None or ctx.attemptNumber() != 0 or not self.chosen(ctx.partitionId()):
            return
        if self.stall_s > 0:
            time.sleep(self.stall_s)
        raise InjectedFault(f"vlcurate injected fault (test only): site={self.site} "
                            f"partition={ctx.partitionId()} attempt=0")


def apply_stage(df, stage: Stage, timer: StageTimer | None = None):
    """Run one row-wise stage over a DataFrame (see apply_stages)."""
    return apply_stages(df, [stage], timer)


def apply_stages(df, stages: list[Stage], timer: StageTimer | None = None):
    """Run row-wise stages over a DataFrame in one mapInArrow: one Python worker pass, each batch
    handed from stage to stage in memory. (Chained mapInArrow calls are not fused by Spark: each would
    ship every batch, image bytes included, JVM -> Python -> JVM again.) Task-seconds are still
    accounted per stage; the output schema comes from the stages."""
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    out_schema = to_arrow_schema(df.schema)
    for stage in stages:
        out_schema = stage.output_schema(out_schema)
    accs = [timer.accumulator(s.name) if timer is not None else None for s in stages]
    row_accs = [timer.rows_accumulator(s.name) if timer is not None else None for s in stages]
    passes = timer.passes if timer is not None else None
    faults = [FaultPlan.from_env(s.name) for s in stages]  # all None outside fault-injection tests
    losing = [s.name in (os.environ.get(FAULT_DROP_ENV) or "").split(",") for s in stages]  # tests only

    def run_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        arrow_only()
        threads = task_threads()
        spent = [[0.0] for _ in stages]
        for stage, fault, t, lose in zip(stages, faults, spent, losing):
            batches = stage.run(batches, threads, t)
            if fault is not None:
                batches = _strike_after_first(batches, fault)
            if lose:
                batches = (b.slice(1) for b in batches)  # a bug that loses a row per batch, silently
        rows = 0
        for b in batches:
            rows += b.num_rows
            yield b
        for acc, t in zip(accs, spent):
            if acc is not None:
                acc.add(t[0])
        for acc in row_accs:
            if acc is not None:
                acc.add(rows)
        if passes is not None:
            passes.add(rows)
        _give_back()

    return df.mapInArrow(run_partition, from_arrow_schema(out_schema))


def _strike_after_first(batches: Iterator[pa.RecordBatch], fault: FaultPlan) -> Iterator[pa.RecordBatch]:
    """Test only: a chosen first attempt fails after its first batch went downstream (partial output
    exists), or at its end when it had none."""
    struck = False
    for out in batches:
        yield out
        if not struck:
            struck = True
            fault.strike()
    if not struck:
        fault.strike()
