"""The loop end to end on CPU: --help, the loss falls, resume equals not stopping, two gloo ranks."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from trainer.__main__ import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "torchrun" in proc.stdout and "--shards" in proc.stdout
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_short_run_loss_falls(shards_root, tokenizer_file, tiny_flags, tmp_path):
    out = str(tmp_path / "run")
    main(["--shards", shards_root, "--mix", "image_text=1", "--out", out, "--tokenizer", tokenizer_file,
          "--steps", "40", "--warmup", "5", "--lr", "3e-3", "--workers", "0", *tiny_flags])
    loss = losses(out)
    assert len(loss) == 40
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (38, 39, 40)) / 3
    assert last < first - 1.5, (first, last)
    assert os.path.exists(os.path.join(out, "checkpoints", "step_0000040.pt"))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_resume_equals_an_uninterrupted_run(shards_root, tiny_flags, tmp_path):
    # no --tokenizer: the run trains its own and stores it in the checkpoint; two data workers, gradient
    # accumulation, two kinds mixed, and an epoch length that puts the checkpoint mid-epoch
    common = ["--shards", shards_root, "--mix", "image_text=3,grounding=1", "--steps", "6", "--warmup", "2",
              "--grad-accum", "2", "--workers", "2", "--epoch-batches", "3", "--vocab-size", "400",
              *tiny_flags]
    full = str(tmp_path / "full")
    main([*common, "--out", full, "--checkpoint-every", "3"])
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copy(os.path.join(full, "checkpoints", "step_0000003.pt"), os.path.join(resumed, "checkpoints"))
    main([*common, "--out", resumed, "--resume", "auto"])
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert a[4] != a[5]  # (the losses do move: equal values are not an accident of a constant)


def test_resume_refuses_changed_data_flags(shards_root, tokenizer_file, tiny_flags, tmp_path):
    out = str(tmp_path / "run")
    args = ["--shards", shards_root, "--out", out, "--tokenizer", tokenizer_file, "--steps", "1",
            "--workers", "0", *tiny_flags]
    main(args)
    with pytest.raises(ValueError, match="seq_len"):
        main([*args, "--resume", "auto", "--steps", "2", "--seq-len", "128"])


def test_two_gloo_ranks_under_torchrun(shards_root, tokenizer_file, tiny_flags, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer", "--shards", shards_root, "--out", out, "--tokenizer", tokenizer_file,
           "--steps", "3", "--warmup", "1", "--grad-accum", "2", "--workers", "1", "--device", "cpu",
           *tiny_flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    done = {int(m.group(1)): json.loads(m.group(2))
            for m in re.finditer(r"\[rank (\d)\] finished: (\{[^{}]*\})", proc.stdout + proc.stderr)}
    assert sorted(done) == [0, 1]
    assert done[0]["world"] == 2 and done[0]["batches"] == done[1]["batches"] == 6
    assert done[0]["loss"] == done[1]["loss"]  # the logged loss is the global mean, the same on both
    assert len(losses(out)) == 3


def test_the_trainer_never_imports_pyspark():
    code = ("import sys, trainer.train, trainer.data, trainer.tokenizer, trainer.__main__; "
            "sys.exit('pyspark' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, check=False).returncode == 0
