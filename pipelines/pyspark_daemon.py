"""The Python workers' daemon (`spark.python.daemon.module`): pyspark's own, started once Python imports pyspark
from the installed package rather than from the Spark distribution's zip.

Spark puts `$SPARK_HOME/python/lib/pyspark.zip` (and py4j's zip) first on the path of the driver it
launches and of every Python worker. Python cannot cache compiled code for modules in a zip, so each
process compiles pyspark's sources again: 0.7-0.8 CPU s for `import pyspark.daemon, pyspark.worker`
against 0.25 s from the package's .pyc files, paid by the daemon and again by each worker it forks
(they import the worker module after the fork), on the critical path of a run's first Python task.
When SPARK_HOME is the pip package itself (bin/vlcurate, the README's commands), the zip holds the same
files as the installed package: drop it from the path. A Spark of one's own (its zip elsewhere) is
left alone.
"""
from __future__ import annotations

import os
import sys


def prefer_installed() -> list[str]:
    """Remove from sys.path the zips that ship inside the installed pyspark package (pyspark.zip, and
    py4j's source zip where the installed py4j is that version), before pyspark is imported. Returns
    what was removed; a no-op once pyspark is imported or where no installed package owns the zips."""
    if "pyspark" in sys.modules:
        return []
    installed = None
    for entry in sys.path:
        if entry and not entry.endswith(".zip") and os.path.isfile(os.path.join(entry, "pyspark", "__init__.py")):
            installed = entry
            break
    if installed is None:
        return []
    lib = os.path.join(os.path.realpath(installed), "pyspark", "python", "lib")
    py4j = _py4j_version(installed)
    drop = []
    for entry in sys.path:
        if not entry.endswith(".zip") or os.path.dirname(os.path.realpath(entry)) != lib:
            continue
        name = os.path.basename(entry)
        if name == "pyspark.zip" or (py4j and name == f"py4j-{py4j}-src.zip"):
            drop.append(entry)
    for entry in drop:
        sys.path.remove(entry)
    return drop


def _py4j_version(site: str) -> str | None:
    """The version of the py4j package installed beside pyspark (from its dist-info), if any."""
    try:
        names = os.listdir(site)
    except OSError:
        return None
    for name in names:
        if name.startswith("py4j-") and name.endswith(".dist-info") and os.path.isdir(os.path.join(site, "py4j")):
            return name[len("py4j-"):-len(".dist-info")]
    return None


if __name__ == "__main__":
    prefer_installed()
    from pyspark import daemon

    daemon.manager()
