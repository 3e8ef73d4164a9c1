"""benchmarks/clip_gpu.py runs its whole code path on the CPU (--device cpu, a small model), and refuses to
pretend without CUDA. The figures themselves are measured on a GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import clip_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "clip_gpu.json"
    got = clip_gpu.main(["--device", "cpu", "--images", "16", "--batch", "8", "--model", "ViT-S-32-alt",
                         "--threads", "2", "--arrow-batch", "5", "--seconds", "0.2", "--out", str(out)])
    assert json.loads(out.read_text()) == got
    assert got["device"] == "cpu" and got["dtype"] == "float32" and got["gpu"] is None
    for key in ("stage_images_per_s", "bare_model_images_per_s", "decode_images_per_s"):
        assert got[key] > 0, key
    assert got["gpu_busy_share"] is None and got["meets_targets"] is None  # nothing to measure on a CPU


def test_without_cuda_it_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the benchmark would run")
    with pytest.raises(SystemExit) as exit_:
        clip_gpu.main(["--images", "4", "--out", "/nonexistent/clip_gpu.json"])
    assert exit_.value.code == 2
    assert "CUDA is not available here" in capsys.readouterr().err


TINY = ["--device", "cpu", "--model", "ViT-S-32-alt", "--images", "12", "--batch", "4", "--threads", "2",
        "--arrow-batch", "5", "--seconds", "0.1", "--check", "6"]
# What a lent GPU machine's python3 has (benchmarks/gpu_device.sh), and open_clip and webdataset, carried
ON_A_GPU_MACHINE = {"torch", "torchvision", "numpy", "PIL", "pyarrow", "skimage", "tokenizers", "yaml", "open_clip",
                    "webdataset"}
ABSENT_ON_A_GPU_MACHINE = ("pyspark", "py4j", "fasttext", "pycurl", "great_expectations", "imagehash",
                           "boto3", "av")


@pytest.mark.slow
def test_the_device_script_runs_every_configuration(tmp_path):
    """benchmarks/gpu_device.sh, the one call a GPU lease gets, on the CPU with a tiny model: every CLIP
    configuration writes its JSON, with the agreement against fp32, the trainer runs its steps on
    synthetic shards, and the log ends with a table of both."""
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable,
           "TRAINER_ARGS": "--steps 2 --log-every 1 --workers 0", "GPU_TASKS": "2"}
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_device.sh"), *TINY], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["clip_gpu_b512.json", "clip_gpu_bf16.json", "clip_gpu_half-threads.json", "clip_gpu_tasks2.json",
                     "clip_gpu_vit-l-14.json", "gpu_device.log", "trainer.log"]
    bf16 = json.loads((tmp_path / "clip_gpu_bf16.json").read_text())
    assert bf16["dtype"] == "bfloat16" and bf16["model"] == "ViT-S-32-alt"  # the caller's arguments come last
    check = bf16["agreement_with_fp32_cpu"]
    assert check["pairs"] == 6 and 0 < check["score_max_abs_diff"] <= clip_gpu.TARGET_SCORE_DIFF
    assert check["sequential_max_abs_diff"] <= clip_gpu.SEQUENTIAL_DIFF  # bf16 both ways, the same sub-batches
    low, high = check["reference_score_range"]
    assert high - low > 10 * check["score_max_abs_diff"]  # the scores differ by more than bf16 moves them
    assert min(check["image_embedding_cosine_min"], check["text_embedding_cosine_min"]) >= 0.99
    assert "spark_stage" not in check  # ClipScore loads its model in the default dtype: nothing to compare
    fp32 = json.loads((tmp_path / "clip_gpu_b512.json").read_text())["agreement_with_fp32_cpu"]
    assert fp32["score_max_abs_diff"] == 0  # the same weights, dtype and code path: the same scores
    # ClipScore's own setup from a saved checkpoint, through run_stage: the stage's scores (as float32)
    assert fp32["spark_stage"]["rows"] == 12 and fp32["spark_stage"]["max_abs_diff"] <= clip_gpu.SEQUENTIAL_DIFF
    # two processes, each every other Arrow batch, put back in order: every row's score is what one
    # process gives it (the sequential loop's for the first 6; ClipScore's through run_stage for all 12)
    tasks = json.loads((tmp_path / "clip_gpu_tasks2.json").read_text())
    assert tasks["processes"] == 2 and tasks["gpu_kernel_share"] is None
    check = tasks["agreement_with_fp32_cpu"]
    assert check["sequential_max_abs_diff"] <= clip_gpu.SEQUENTIAL_DIFF and check["score_max_abs_diff"] == 0
    assert check["spark_stage"]["rows"] == 12 and check["spark_stage"]["max_abs_diff"] <= clip_gpu.SEQUENTIAL_DIFF
    log = (tmp_path / "gpu_device.log").read_text()
    assert "torch " in log and log.count(" images/s (") == 5 and "FAILED" not in log
    table = log.split("--- results")[1].splitlines()[2:]  # the summary the log ends with, a row a result
    assert [row.split()[0] for row in table[:5]] == [f"clip_gpu_{name}" for name in
                                                  ("b512", "tasks2", "bf16", "half-threads", "vit-l-14")]
    assert all(row.split()[-2:] == ["True", "None"] for row in table[:5])  # agrees; no GPU, no targets
    # the trainer's own log lines (python -m trainer on the CPU here): throughput and data wait, then its end
    assert [row.split()[:2] for row in table[5:]] == [["trainer:", "step"], ["trainer:", "step"], ["[rank", "0]"]]
    assert "tok/s" in table[5] and "data wait" in table[5] and '"steps": 2' in table[7]


def test_the_device_script_imports_only_what_a_gpu_machine_has():
    """A lent GPU machine is offline and has no Spark, fastText or libcurl: the CLIP benchmark and the
    trainer run with those unimportable, and the project's modules they load import only the packages
    that machine has (or lazily, where they never go)."""
    code = f"""
import ast, json, os, sys
for absent in {ABSENT_ON_A_GPU_MACHINE!r}:
    sys.modules[absent] = None  # import raises ImportError, as there
import tempfile
from benchmarks import clip_gpu
clip_gpu.main({TINY + ["--out", os.devnull]!r})
from benchmarks.trainer_bench import synthetic_shards
from trainer.__main__ import main
with tempfile.TemporaryDirectory() as tmp:
    main(["--shards", synthetic_shards(os.path.join(tmp, "shards"), n=8), "--out", os.path.join(tmp, "run"),
          "--steps", "1", "--workers", "0", "--device", "cpu"])
root, used = os.getcwd(), set()
for mod in list(sys.modules.values()):
    path = getattr(mod, "__file__", None) or ""
    if not path.startswith(root + os.sep) or os.sep + ".venv" + os.sep in path:
        continue
    for node in ast.walk(ast.parse(open(path).read())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        used.update(n.split(".")[0] for n in names if sys.modules.get(n.split(".")[0]) is not None)
print(json.dumps(sorted(used - set(sys.stdlib_module_names))))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    used = set(json.loads(run.stdout.strip().splitlines()[-1]))
    project = {name for name in used if os.path.isdir(os.path.join(ROOT, name))}
    assert {"filters", "benchmarks", "jobs", "trainer", "schemas"} <= project
    assert used - project <= ON_A_GPU_MACHINE, used - project - ON_A_GPU_MACHINE


def test_a_failed_stage_process_fails_the_run_with_its_reason():
    """--processes: a process that fails (here before the common start) stops the run with its own error,
    rather than leaving the parent waiting at the barrier for it."""
    import argparse

    a = argparse.Namespace(model="no-such-model", threads=1, device="cpu", dtype="", batch=4, images=8,
                           arrow_batch=5, processes=2)
    with pytest.raises(RuntimeError, match="a stage process failed: process [01]: RuntimeError: .*no-such-model"):
        clip_gpu.stage_in_processes(a, None)


def test_the_sequential_check_catches_rows_scored_out_of_place(tmp_path, monkeypatch):
    """A scheduling bug that hands a row another row's score (here: each chunk's scores reversed) fails the
    comparison with the device's own sequential loop, which needs no second model and no tolerance."""
    from filters.clip_gpu import OverlappedScorer

    stream = OverlappedScorer.stream
    monkeypatch.setattr(OverlappedScorer, "stream", lambda self, chunks: (s[::-1] for s in stream(self, chunks)))
    got = clip_gpu.main([*TINY, "--out", str(tmp_path / "clip_gpu.json")])
    check = got["agreement_with_fp32_cpu"]
    assert check["sequential_max_abs_diff"] > 100 * clip_gpu.SEQUENTIAL_DIFF and not clip_gpu.agrees(check)


def test_the_device_script_without_cuda_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the script would measure it")
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_device.sh")], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2 and "no CUDA device" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_device.log"]
