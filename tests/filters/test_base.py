"""filters.base: what every Python task of the pipeline does first."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_arrow_only_keeps_pandas_out_of_a_worker_yet_importable():
    # pyarrow imports pandas (~80 MiB per worker) the first time it converts a Python list; after
    # arrow_only() it does not, and a task that does want pandas still gets it, with to_pandas()
    code = """
import sys
import pyarrow as pa
from filters.base import arrow_only
arrow_only()
pa.RecordBatch.from_pylist([{"a": 1, "b": "x", "c": [1.5], "d": {"e": None}}])
pa.array(["x", None]); pa.table({"a": [1, 2]})
assert "pandas" not in sys.modules, "pyarrow imported pandas"
import pandas
assert pa.table({"a": [1, 2]}).to_pandas()["a"].sum() == 3
assert pa.array(pandas.Series([1, 2])).to_pylist() == [1, 2]
arrow_only()  # once pandas is loaded: a no-op
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_without_arrow_only_pyarrow_imports_pandas():
    # the control: the saving above is real only if pyarrow does import pandas on its own
    code = "import sys, pyarrow as pa; pa.array(['x']); print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip() == "True", out.stderr


def _pool_after_arrow_only(env: dict) -> str:
    code = ("import pyarrow as pa\nfrom filters.base import arrow_only\narrow_only()\n"
            "pa.array([b'x' * 100000])\nprint(pa.default_memory_pool().backend_name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                         env={k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"} | env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_an_arrow_task_allocates_from_jemalloc_unless_the_user_names_a_pool():
    # pyarrow's wheels default to mimalloc; every Arrow task of ours (arrow_only) switches its process to
    # jemalloc, where the wheel has it, and leaves a pool named in ARROW_DEFAULT_MEMORY_POOL alone
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow is built without jemalloc")
    assert _pool_after_arrow_only({}) == "jemalloc"
    assert _pool_after_arrow_only({"ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}) == "mimalloc"
    assert _pool_after_arrow_only({"ARROW_DEFAULT_MEMORY_POOL": "system"}) == "system"
