"""bin/vlcurate: the job from a fresh shell (no venv activated, no Spark variables) and from any folder.
The end-to-end run of tests/jobs/test_all_kinds.py goes through it too."""
from __future__ import annotations

import os
import subprocess
import sys

import pyspark

from tests.jobs.test_build_pretrain import ROOT

VLCURATE = os.path.join(ROOT, "bin", "vlcurate")
FRESH = {"PATH": "/usr/bin:/bin"}  # what `env -i` leaves, plus a PATH without the venv


def test_fresh_shell_reaches_the_jobs_arguments(tmp_path):
    """spark-submit finds its SPARK_HOME and the driver runs on the venv's python: the job imports the
    project's stage dependencies (imagehash, pyarrow, ...) before it parses its arguments, which the
    system python3 does not have."""
    proc = subprocess.run([VLCURATE, "--help"], cwd=tmp_path, env=FRESH, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "usage: build_pretrain" in proc.stdout and "--input KIND=URI" in proc.stdout
    assert "SPARK_HOME" not in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert os.listdir(tmp_path) == []  # --help writes nothing where it was started


def fake_venv(root) -> str:
    """A venv whose python is the real one and whose spark-submit prints what it was handed."""
    bin_dir = root / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "spark-submit").write_text(
        '#!/bin/sh\nfor v in SPARK_HOME PYSPARK_PYTHON PYSPARK_DRIVER_PYTHON PYTHONPATH SPARK_LOCAL_IP; do\n'
        '  printenv "$v" || echo "$v unset"\ndone\nfor a in "$@"; do echo "arg $a"; done\n')
    for name in ("python", "spark-submit"):
        os.chmod(bin_dir / name, 0o755)
    return str(root / "venv")


def local_conf(cores: int) -> list[str]:
    """What bin/vlcurate adds for a local master of `cores` cores."""
    return ["arg --conf", "arg spark.python.daemon.module=pipelines.pyspark_daemon", "arg --conf",
            "arg spark.sql.adaptive.enabled=false", "arg --conf", f"arg spark.sql.shuffle.partitions={2 * cores}"]


def test_environment_and_arguments_handed_to_spark_submit(tmp_path):
    venv = fake_venv(tmp_path)
    python = os.path.join(venv, "bin", "python")
    env = {**FRESH, "VLCURATE_VENV": venv}
    lines = subprocess.run([VLCURATE, "--input", "image_text=in dir", "--set", "a.b=1"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert lines == [os.path.dirname(pyspark.__file__), python, python, ROOT, "127.0.0.1",
                     "arg --properties-file", f"arg {ROOT}/spark-defaults.conf",
                     *local_conf(len(os.sched_getaffinity(0))), f"arg {ROOT}/jobs/build_pretrain.py", "arg --input", "arg image_text=in dir", "arg --set", "arg a.b=1"]

    def handed(**extra) -> list[str]:
        return subprocess.run([VLCURATE], cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True,
                              timeout=60, check=True).stdout.splitlines()[4:]

    # spark-submit flags go before the job, as written (no glob expansion of local[2] against the folder)
    (tmp_path / "local2").touch()  # what an unquoted local[2] would match
    assert handed(VLCURATE_SPARK_ARGS="--master local[2] --conf spark.ui.enabled=false") == [
        "127.0.0.1", "arg --properties-file", f"arg {ROOT}/spark-defaults.conf", *local_conf(2), "arg --master",
        "arg local[2]", "arg --conf", "arg spark.ui.enabled=false", f"arg {ROOT}/jobs/build_pretrain.py"]
    # local settings follow the master's cores (local = 1); a cluster keeps spark-defaults.conf's AQE and Spark's
    # own daemon (its executors may not have this checkout)
    assert handed(VLCURATE_SPARK_ARGS="--master local")[3:9] == local_conf(1)
    assert handed(VLCURATE_SPARK_ARGS="--master=local[8,2]")[3:9] == local_conf(8)
    for master in ("spark://h:7077", "local-cluster[2,1,1024]"):
        cluster = handed(VLCURATE_SPARK_ARGS=f"--master {master}")
        assert not any("pyspark_daemon" in line or "adaptive" in line for line in cluster)
        assert f"arg {master}" in cluster
    # a user's SPARK_LOCAL_IP is kept; a cluster master gets Spark's own choice of address
    assert handed(SPARK_LOCAL_IP="10.1.2.3")[0] == "10.1.2.3"
    assert handed(VLCURATE_SPARK_ARGS="--master spark://h:7077")[0] == "SPARK_LOCAL_IP unset"
    assert handed(VLCURATE_SPARK_ARGS="--master=yarn")[0] == "SPARK_LOCAL_IP unset"
    lines = subprocess.run([VLCURATE], cwd=tmp_path, env={**env, "PYTHONPATH": "/opt/lib"}, capture_output=True,
                           text=True, timeout=60, check=True).stdout.splitlines()
    assert lines[3] == f"{ROOT}:/opt/lib"  # the checkout first, the user's path kept


def test_missing_environment_is_a_clear_error(tmp_path):
    proc = subprocess.run([VLCURATE], cwd=tmp_path, env={**FRESH, "VLCURATE_VENV": str(tmp_path / "none")},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"vlcurate: no Python environment with pyspark at {tmp_path}/none " \
                                  f"(run 'make setup' in {ROOT})"


def test_class_archive_is_made_then_mapped_and_a_stale_one_is_ignored(tmp_path):
    """`make setup` makes the driver JVM's class archive with VLCURATE_CLASS_ARCHIVE_DUMP=1; later runs map
    it (the JVM loads classes from it: 'shared objects file (top)'), unless it was made for another Java
    or Spark, which is said once and otherwise ignored."""
    archive = tmp_path / "jvm" / "classes.jsa"
    env = {**FRESH, "VLCURATE_CLASS_ARCHIVE": str(archive)}

    def run(*, log=None, check=False, **extra) -> subprocess.CompletedProcess:
        e = {**env, **extra}
        if log:
            e["SPARK_SUBMIT_OPTS"] = f"-Xlog:class+load=info:file={log}"
        return subprocess.run([VLCURATE, "--help"], cwd=tmp_path, env=e, capture_output=True, text=True,
                              timeout=300, check=check)

    assert run(VLCURATE_CLASS_ARCHIVE_CHECK="1").returncode == 1  # none yet
    made = run(VLCURATE_CLASS_ARCHIVE_DUMP="1")
    assert made.returncode == 0 and "usage: build_pretrain" in made.stdout, made.stderr[-3000:]
    assert archive.stat().st_size > 1_000_000 and not (tmp_path / "jvm" / "classes.jsa.tmp").exists()
    assert run(VLCURATE_CLASS_ARCHIVE_CHECK="1").returncode == 0

    used = run(log=tmp_path / "used.log", check=True)
    assert "usage: build_pretrain" in used.stdout and "vlcurate:" not in used.stderr
    assert (tmp_path / "used.log").read_text().count("source: shared objects file (top)") > 1000

    key = tmp_path / "jvm" / "classes.jsa.key"
    key.write_text(key.read_text().replace(os.path.dirname(pyspark.__file__), "/another/spark"))
    assert run(VLCURATE_CLASS_ARCHIVE_CHECK="1").returncode == 1
    stale = run(log=tmp_path / "stale.log", check=True)
    assert "usage: build_pretrain" in stale.stdout
    assert f"vlcurate: {archive} was made for another Java or Spark; not used" in stale.stderr
    assert "shared objects file (top)" not in (tmp_path / "stale.log").read_text()
