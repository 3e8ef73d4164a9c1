"""benchmarks/clip_gpu.py runs its whole code path on the CPU (--device cpu, a small model), and refuses to
pretend without CUDA. The figures themselves are measured on a GPU machine."""
from __future__ import annotations

import json

import pytest

from benchmarks import clip_gpu


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
