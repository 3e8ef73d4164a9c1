"""Spark jobs in a thread of their own, beside the run's main thread.

A run is a chain of Spark jobs; many are small, and their planning (one JVM thread per Python thread)
and driver-side work leave the cores idle between them. Work that does not feed the next job (a
kind's shard writing, the report material, the gates) runs beside the main thread instead, and the
run waits for it where its result is needed.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def beside(fn: Callable[[], Any], name: str) -> Callable[[], Any]:
    """Start fn() in a thread of its own (pyspark's InheritableThread: its Spark jobs get their own JVM
    thread and local properties); the returned callable waits for it and returns its result or raises
    its exception, as often as it is called."""
    from pyspark import InheritableThread

    done: Future = Future()

    def target() -> None:
        try:
            done.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread, which raises it
            done.set_exception(e)

    thread = InheritableThread(target=target, name=name, daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        return done.result()

    return wait
