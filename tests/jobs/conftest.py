"""Two local runs of the job on the sample, shared across test modules (each run is a whole spark-submit,
about a minute), and the helpers that compare another run's output with them.

- sample_run: what test_build_pretrain (item by item, shards read back) and test_report (the page) read;
  spark-submit itself, as users with a Spark of their own run the job.
- clean_run: the same arguments with keep_work=true, through bin/vlcurate (the README's command); the
  reference the reliability and cluster tests compare against, and test_build_pretrain's second run (two
  runs, two ways, the same shards byte for byte).
Tests only read these folders (test_report rebuilds the page in place and checks it is byte-identical)."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from tests.jobs.test_build_pretrain import submit

# the arguments every compared run uses (random CLIP weights: no download, the same scores every run; the
# small ViT-S-32-alt, 43M parameters against the default ViT-B-32's 151M: each Python worker builds and runs
# it ~3x faster, and these runs test the pipeline, not the scores)
ARGS = ("--set", "shards.max_samples=8", "--set", "image_text.clip.pretrained=",
        "--set", "image_text.clip.model=ViT-S-32-alt")
# names only a run that did not finish, or did not clean up, leaves behind
TEMPORARY = (".tmp", ".staging-", ".previous-", "_temporary", "_work")


@pytest.fixture(scope="session")
def sample_run(sample_dir, tmp_path_factory) -> str:
    """OUT of an uninterrupted run on the sample, cleaned up as any good run is (no stage checkpoints), made
    by spark-submit itself (every other local run goes through bin/vlcurate: test_build_pretrain checks
    that both give the same shards)."""
    out = str(tmp_path_factory.mktemp("sample_run"))
    submit("--input", f"image_text={sample_dir}", "--output", out, *ARGS, plain=True)
    return out


@pytest.fixture(scope="session")
def clean_run(sample_dir, tmp_path_factory) -> str:
    """OUT of an uninterrupted run. keep_work=true keeps its stage checkpoints: their folder names are
    a fingerprint of the inputs and recipe, so the restart test knows the names a rerun will use."""
    out = str(tmp_path_factory.mktemp("clean"))
    submit("--input", f"image_text={sample_dir}", "--output", out, *ARGS, "--set", "keep_work=true")
    return out


def shard_files(out: str) -> dict[str, bytes]:
    """Every file of the published image_text shard folder (tars and manifests), by name."""
    folder = os.path.join(out, "shards", "image_text")
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def ledger_decisions(out: str) -> set[tuple]:
    return {(r["sample_id"], r["status"], r["reason"])
            for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}


def leftovers(out: str) -> list[str]:
    """Temporary files and folders under OUT (stage checkpoints included: removed after a good run)."""
    found = []
    for dirpath, dirnames, files in os.walk(out):
        for name in dirnames + files:
            if any(t in name for t in TEMPORARY):
                found.append(os.path.relpath(os.path.join(dirpath, name), out))
    return sorted(found)


def assert_same_output(out: str, clean: str) -> None:
    """The same shards byte for byte (manifests included) and the same ledger decisions."""
    got, want = shard_files(out), shard_files(clean)
    assert sorted(got) == sorted(want)
    assert [n for n in want if got[n] != want[n]] == []
    assert ledger_decisions(out) == ledger_decisions(clean)
    assert leftovers(out) == []
