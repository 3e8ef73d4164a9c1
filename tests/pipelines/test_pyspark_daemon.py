"""pipelines/pyspark_daemon.py: Python processes import pyspark from the installed package, not from the copy of
it zipped inside that package (which Python recompiles in every process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyspark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB = os.path.join(os.path.dirname(pyspark.__file__), "python", "lib")


def _fresh(path_head: list[str]) -> dict:
    """In a fresh interpreter with `path_head` first on sys.path: what prefer_installed removed, and where
    pyspark and py4j were then imported from."""
    code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
            "from pipelines.pyspark_daemon import prefer_installed; dropped = prefer_installed();"
            "import pyspark, py4j; print(json.dumps({'dropped': dropped, 'pyspark': pyspark.__file__, "
            "'py4j': py4j.__file__}))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(path_head), ROOT], capture_output=True, text=True,
                         check=True, cwd="/")
    return json.loads(out.stdout)


def test_zips_inside_the_installed_package_are_dropped():
    zips = sorted(os.path.join(LIB, n) for n in os.listdir(LIB) if n.endswith(".zip"))
    assert any(n.endswith("pyspark.zip") for n in zips) and any("py4j" in n for n in zips)
    got = _fresh(zips)
    assert sorted(got["dropped"]) == zips
    assert ".zip" not in got["pyspark"] and ".zip" not in got["py4j"]
    assert got["pyspark"] == pyspark.__file__


def test_a_spark_of_ones_own_is_left_alone(tmp_path):
    """A zip that is not the installed package's own (another Spark's distribution) stays first."""
    import shutil

    other = tmp_path / "spark" / "python" / "lib"
    other.mkdir(parents=True)
    shutil.copy(os.path.join(LIB, "pyspark.zip"), other / "pyspark.zip")
    got = _fresh([str(other / "pyspark.zip")])
    assert got["dropped"] == []
    assert got["pyspark"].startswith(str(other / "pyspark.zip"))


def test_workers_import_the_installed_pyspark(spark):
    """The session (tests/conftest.py, like bin/vlcurate) starts its workers from pipelines.pyspark_daemon:
    a Python task sees pyspark from the package, and its zip is not on the worker's path."""
    import pyarrow as pa

    def where(batches):
        import sys as worker_sys

        import pyspark as worker_pyspark

        for _ in batches:
            zipped = [p for p in worker_sys.path if p.endswith("pyspark.zip")]
            yield pa.RecordBatch.from_pylist([{"file": worker_pyspark.__file__, "zipped": len(zipped)}])

    assert spark.conf.get("spark.python.daemon.module") == "pipelines.pyspark_daemon"
    rows = spark.range(4, numPartitions=2).mapInArrow(where, "file string, zipped long").collect()
    assert rows and all(r["file"] == pyspark.__file__ and r["zipped"] == 0 for r in rows)
