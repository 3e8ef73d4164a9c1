"""The progress line: tasks, items, rate and time left of the phase in progress, read from Spark's status
tracker while real tasks run; one line per phase when the output is not a terminal."""
from __future__ import annotations

import dataclasses
import io
import re
import time
from typing import ClassVar

import pyarrow as pa
import pytest

from filters.base import Stage, StageTimer, apply_stage
from pipelines import progress
from pipelines.beside import beside


@dataclasses.dataclass(frozen=True)
class Slow(Stage):
    """Doubles `id`, slowly: tasks that last long enough for the poller to see them run."""

    name: ClassVar[str] = "slow"
    seconds: float = 0.3

    def adds(self):
        return [pa.field("twice", pa.int64())]

    def process(self, batch, state):
        time.sleep(self.seconds)
        return {"twice": [2 * v for v in batch.column("id").to_pylist()]}


def _run(spark, stream, live: bool, rows: int = 400, parts: int = 8):
    timer = StageTimer(spark)
    with progress.Progress(spark, timer, interval=0.2, stream=stream, live=live) as shown:
        with progress.phase(spark, "toy slow"):
            out = apply_stage(spark.range(rows, numPartitions=parts), Slow(), timer)
            total = out.agg({"twice": "sum"}).first()[0]
        with progress.phase(spark, "toy count"):
            spark.range(10).count()
    return shown.report(), timer.report(), total


def test_live_progress_counts_tasks_and_items_and_estimates_time_left(spark):
    stream = io.StringIO()
    phases, stages, total = _run(spark, stream, live=True)
    assert total == 2 * sum(range(400))
    text = stream.getvalue()
    updates = [(int(d), int(t)) for d, t in re.findall(r"\[toy slow\] (\d+)/(\d+) tasks", text) if t != "0"]
    assert updates, text  # the poller printed while the tasks ran (0/0: the job had not started)
    assert all(t in (8, 9) and d <= t for d, t in updates), text  # the map stage, then the sum's stage
    assert re.search(r"\[toy slow\] \d+/\d+ tasks, [\d,]+ items, [\d,]+ items/s, ~\d:\d\d:\d\d left", text), text
    assert re.search(r"\[toy slow\] done: \d+ tasks, 400 items in \d:\d\d:\d\d \([\d,]+ items/s\)", text), text
    assert phases["toy slow"]["items"] == 400 and phases["toy slow"]["tasks"] >= 8
    assert phases["toy slow"]["items_per_second"] > 0
    assert phases["toy count"]["items"] == 0  # no row-wise stage ran in it
    # the summary keeps each row-wise stage's own rate
    assert stages["slow"]["rows"] == 400 and stages["slow"]["rows_per_task_second"] > 0


def test_quiet_off_a_terminal_one_line_per_phase(spark):
    stream = io.StringIO()
    _run(spark, stream, live=False, rows=40, parts=2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[toy slow] done: ") and "40 items" in lines[0]
    assert lines[1].startswith("[toy count] done: ")
    assert "\r" not in stream.getvalue()


def test_jobs_in_a_phase_carry_its_name_as_job_group(spark):
    tracker = spark.sparkContext.statusTracker()
    with progress.phase(spark, "toy group"):
        spark.range(5).count()
    jobs = tracker.getJobIdsForGroup("toy group")
    assert jobs
    spark.range(5).count()  # after the phase: no group
    assert sorted(tracker.getJobIdsForGroup("toy group")) == sorted(jobs)


def _sleepy(batches):
    for b in batches:
        time.sleep(1.0)
        yield b


def test_overlapping_phases_are_shown_together_and_keep_their_own_counts(spark):
    """The report material and the gates run side by side (pipelines/beside.py): the line shows both
    phases, each keeps its own tasks, and a phase without row-wise stages counts none of the other's
    items."""
    stream = io.StringIO()
    timer = StageTimer(spark)
    with progress.Progress(spark, timer, interval=0.1, stream=stream, live=True) as shown:
        def beside_phase() -> str:
            with progress.phase(spark, "toy beside", items=False):
                spark.range(4, numPartitions=4).mapInArrow(_sleepy, "id long").collect()
            return "done beside"

        wait = beside(beside_phase, "toy-beside")
        with progress.phase(spark, "toy slow"):
            apply_stage(spark.range(400, numPartitions=8), Slow(), timer).agg({"twice": "sum"}).first()
        assert wait() == "done beside"
    phases = shown.report()
    assert phases["toy slow"]["items"] == 400 and phases["toy beside"]["items"] == 0
    assert phases["toy beside"]["tasks"] == 4 and phases["toy slow"]["tasks"] >= 8
    text = stream.getvalue()
    assert re.search(r"\[toy (slow|beside)\] \d+/\d+ tasks[^|\r]* \| \[toy (slow|beside)\] \d+/\d+ tasks", text), text
    # each phase's jobs carry its own group, set in its own thread
    tracker = spark.sparkContext.statusTracker()
    assert len(tracker.getJobIdsForGroup("toy beside")) == 1


def test_beside_hands_back_the_result_or_the_exception(spark):
    assert beside(lambda: 42, "toy-answer")() == 42

    def fails():
        raise ValueError("gates broke")

    with pytest.raises(ValueError, match="gates broke"):
        beside(fails, "toy-fails")()
