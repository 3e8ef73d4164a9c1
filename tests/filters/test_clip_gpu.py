"""filters/clip_gpu.py on CPU: the overlapped scorer gives the sequential loop's scores to one unit of their
rounding (real open_clip code, random weights, real photos as JPEG), decoding overlaps the model, the GPU a
task gets from Spark, the driver-side check of the Spark settings, and bin/gpu-discovery with a fake
nvidia-smi. The same code on a GPU is measured by benchmarks/clip_gpu.py; the cluster test is
tests/jobs/test_clip_gpu_cluster.py."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pyarrow as pa
import pytest

from filters import clip
from filters.clip import ClipScore, normalise
from filters.clip_gpu import (
    EXECUTOR_AMOUNT,
    EXECUTOR_DISCOVERY,
    TASK_AMOUNT,
    VENDOR,
    WORKER_RESOURCES_FILE,
    GpuClip,
    OverlappedScorer,
    run_stage,
    spark_gpu_settings,
    task_device,
)
from jobs.make_sample import PHOTOS, jpeg, load_photo

MODEL = "ViT-S-32-alt"  # the smallest open_clip ViT: a fraction of a second per batch on one core
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DISCOVERY = os.path.join(ROOT, "bin", "gpu-discovery")


@pytest.fixture(scope="module")
def clip_parts():
    """(model, pixels, tokenizer) as ClipScore.setup makes them: random weights, seeded."""
    import open_clip
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    model.eval()
    pixels = clip.ClipPixels(open_clip.get_model_preprocess_cfg(model), preprocess)
    return model, pixels, open_clip.get_tokenizer(MODEL)


@pytest.fixture(scope="module")
def rows():
    """Photos in varied sizes and crops as JPEG, captions; one missing image and one empty caption."""
    from benchmarks.corpus import _variant

    rng = np.random.default_rng(0)
    photos = [(load_photo(name).convert("RGB"), caption) for name, caption in PHOTOS.items()]
    images, captions = [], []
    for k in range(22):
        photo, caption = photos[k % len(photos)]
        images.append(jpeg(_variant(rng, photo), quality=int(rng.integers(70, 95))))
        captions.append(f"{caption} ({k})")
    images[5] = None
    captions[11] = ""
    return images, captions


def sequential(encoder, pixels, tokenizer, images, captions, batch_size):
    """ClipScore.process's loop: sub-batches of the valid rows, one after the other."""
    scores = [None] * len(images)
    todo = [i for i, (im, cap) in enumerate(zip(images, captions)) if im is not None and cap]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        img = normalise(encoder.encode_image(pixels.from_bytes([images[i] for i in idx])))
        txt = normalise(encoder.encode_text(tokenizer([captions[i] for i in idx]).numpy()))
        for i, s in zip(idx, (img * txt).sum(-1)):
            scores[i] = float(np.round(s, 6))
    return scores


def same(got, want):
    """Scores are rounded to 6 decimals; the same rows in another batch or through torch rather than numpy
    may sum in another order on some CPUs (CI's gave -0.006980 for -0.006981), so one unit of rounding."""
    return [s is None for s in got] == [s is None for s in want] and all(
        abs(a - b) <= 1.5e-6 for a, b in zip(got, want) if a is not None)


def test_overlapped_scores_equal_the_sequential_loop(clip_parts, rows):
    model, pixels, tokenizer = clip_parts
    images, captions = rows
    want = sequential(clip._TorchClip(model, "cpu"), pixels, tokenizer, images, captions, 4)
    assert want[5] is None and want[11] is None and sum(s is not None for s in want) == 20
    # GpuClip's asynchronous path and a numpy encoder's; default pieces, one image a piece, uneven pieces
    for encoder, threads, piece in ((GpuClip(model, "cpu", "float32"), 2, 0), (GpuClip(model, "cpu", "float32"), 3, 1),
                                    (clip._TorchClip(model, "cpu"), 1, 3)):
        scorer = OverlappedScorer(encoder, pixels, tokenizer, batch_size=4, threads=threads, piece=piece)
        try:
            assert same(scorer(images, captions), want), (type(encoder).__name__, threads, piece)
        finally:
            scorer.close()


def test_overlapped_scores_equal_clip_score_process(clip_parts, rows):
    """The stage's own process() and set-up, with the overlapped scorer on the same state."""
    images, captions = rows
    stage = ClipScore(model=MODEL, pretrained="", batch_size=4, device="cpu")
    encoder, pixels, tokenizer = stage.setup(threads=1)
    batch = pa.RecordBatch.from_pydict({"image": images, "caption": captions})
    want = stage.process(batch, (encoder, pixels, tokenizer))["clip_score"]
    scorer = OverlappedScorer(GpuClip(encoder.model, "cpu", "float32"), pixels, tokenizer, stage.batch_size, 2)
    assert same(scorer(images, captions), want)
    scorer.close()


def test_half_precision_scores_equal_its_sequential_loop_and_are_near_fp32(clip_parts, rows):
    model, pixels, tokenizer = clip_parts
    images, captions = rows
    fp32 = sequential(clip._TorchClip(model, "cpu"), pixels, tokenizer, images, captions, 8)
    half = GpuClip(copy.deepcopy(model), "cpu", "bfloat16")  # fp16 on cuda; bfloat16 is what a CPU runs
    scorer = OverlappedScorer(half, pixels, tokenizer, batch_size=8, threads=2)
    got = scorer(images, captions)
    scorer.close()
    assert same(got, sequential(half, pixels, tokenizer, images, captions, 8))
    assert got != fp32  # it really ran in bfloat16 ...
    assert max(abs(a - b) for a, b in zip(got, fp32) if a is not None) < 0.02  # ... and scores barely move


def test_stream_spans_batches_and_keeps_their_order(clip_parts, rows):
    """Sub-batches are cut across the input batches (small Arrow batches feed a large GPU batch); each
    batch's scores come back in order, batches without a valid row included."""
    model, pixels, tokenizer = clip_parts
    images, captions = rows
    want = sequential(clip._TorchClip(model, "cpu"), pixels, tokenizer, images, captions, 8)
    cuts = [0, 3, 3, 4, 11, 12, 22]  # an empty batch, one of a single row, one whose rows are all invalid
    chunks = [(images[a:b], captions[a:b]) for a, b in itertools.pairwise(cuts)]
    chunks.insert(4, ([None, b"x"], ["no image", ""]))
    scorer = OverlappedScorer(GpuClip(model, "cpu", "float32"), pixels, tokenizer, batch_size=8, threads=2)
    got = list(scorer.stream(iter(chunks)))
    scorer.close()
    assert [len(s) for s in got] == [len(c[0]) for c in chunks]
    assert got.pop(4) == [None, None]
    assert same([s for part in got for s in part], want)


def test_decoding_overlaps_the_model():
    """While the model runs sub-batch 0, the pool is already decoding sub-batch 1 (the fake encoder
    waits for that, so a sequential loop would fail here rather than be slow)."""
    decoding_next = threading.Event()
    overlapped = []

    def pixels(blobs):
        if any(b.startswith(b"1") for b in blobs):
            decoding_next.set()
        return np.zeros((len(blobs), 3, 2, 2), np.float32) + np.array([float(b) for b in blobs])[:, None, None, None]

    class Encoder:
        def encode_image(self, px):
            if not decoding_next.is_set():
                overlapped.append(decoding_next.wait(timeout=10))
            return np.stack([px[:, 0, 0, 0] + 1, np.ones(len(px))], axis=1)

        def encode_text(self, tokens):
            return np.ones((len(tokens), 2))

    images = [b"0.5", b"0.5", b"1.5", b"1.5"]
    scorer = OverlappedScorer(Encoder(), pixels, lambda caps: np.zeros((len(caps), 3), np.int64), 2, threads=2)
    scores = scorer(images, ["a", "b", "c", "d"])
    scorer.close()
    assert overlapped == [True]
    want = float(np.round((normalise(np.array([[1.5, 1.0]])) * normalise(np.ones((1, 2)))).sum(-1)[0], 6))
    assert scores[:2] == [want, want]


def test_a_corrupt_image_fails_the_batch_and_the_scorer_carries_on(clip_parts, rows):
    """As in ClipScore.process, a sample that cannot be decoded raises (decode quarantines those before
    CLIP); the work queued behind it is dropped and the next batch scores normally."""
    model, pixels, tokenizer = clip_parts
    images, captions = rows
    scorer = OverlappedScorer(GpuClip(model, "cpu", "float32"), pixels, tokenizer, batch_size=2, threads=2)
    with pytest.raises(Exception, match="cannot identify image file"):
        scorer([images[0], b"not a jpeg", *images[1:4]], captions[:5])
    assert same(scorer(images[:4], captions[:4]),
                sequential(GpuClip(model, "cpu", "float32"), pixels, tokenizer, images[:4], captions[:4], 2))
    scorer.close()


def test_run_stage_adds_the_column_as_apply_does(clip_parts, rows):
    """The stage on Arrow batches: each batch with clip_score added, Stage.apply's values; setup is the
    state of this task's device (cpu here, outside Spark)."""
    images, captions = rows

    @dataclasses.dataclass(frozen=True)
    class OverlappedClip(ClipScore):
        def setup(self, threads):  # what ClipScore.setup gives on cuda: a tuple with a GpuClip encoder
            encoder, pixels, tokenizer = super().setup(threads)
            return GpuClip(encoder.model, self.device, "float32"), pixels, tokenizer

    stage = OverlappedClip(model=MODEL, pretrained="", batch_size=3, device="cpu")
    plain = ClipScore(model=MODEL, pretrained="", batch_size=3, device="cpu")
    # every batch has exactly batch_size valid rows, so the sub-batches are the same as per-batch apply's
    cuts = [0, 3, 7, 10, 14]  # rows 5 (no image) and 11 (empty caption) fall in the 2nd and 4th batches
    batches = [pa.RecordBatch.from_pydict({"id": list(range(a, b)), "image": images[a:b], "caption": captions[a:b]})
               for a, b in itertools.pairwise(cuts)]
    timing = [0.0]
    got = list(run_stage(stage, iter(batches), threads=2, timing=timing))
    want = [plain.apply(b, plain.state(1)) for b in batches]
    assert [b.to_pydict() for b in got] == [b.to_pydict() for b in want]
    assert [b.schema for b in got] == [b.schema for b in want]
    assert timing[0] > 0


# --- the device a task gets ----------------------------------------------------------------------

class _Context:
    def __init__(self, addresses):
        from pyspark.resource import ResourceInformation

        self._resources = {"gpu": ResourceInformation("gpu", addresses)} if addresses is not None else {}

    def resources(self):
        return self._resources


def test_task_device_outside_spark():
    assert task_device() == "cuda:0"
    assert task_device("cpu") == "cpu"
    assert task_device("cuda:2") == "cuda:2"


@pytest.mark.parametrize(("addresses", "visible", "want"), [
    (["1"], None, "cuda:1"),
    (["3", "2"], None, "cuda:3"),  # a task given two GPUs uses the first
    (["3"], "2,3", "cuda:1"),  # the cluster manager narrowed the visible GPUs: CUDA renumbers them from 0
    (["1"], "GPU-0e4c,GPU-77ab", "cuda:1"),  # UUIDs: the address is already CUDA's ordinal
    (None, None, "cuda:0"),  # Spark assigned no GPU (local mode)
])
def test_task_device_maps_the_address_spark_assigned(monkeypatch, addresses, visible, want):
    from pyspark import TaskContext

    monkeypatch.setattr(TaskContext, "get", classmethod(lambda cls: _Context(addresses)))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert task_device() == want


def test_task_device_refuses_an_address_that_is_no_index(monkeypatch):
    from pyspark import TaskContext

    monkeypatch.setattr(TaskContext, "get", classmethod(lambda cls: _Context(["GPU-0e4c"])))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match="discovery script must print indices"):
        task_device()


# --- the Spark settings ------------------------------------------------------------------------------

READY = {EXECUTOR_AMOUNT: "1", TASK_AMOUNT: "1", EXECUTOR_DISCOVERY: "/opt/vlcurate/bin/gpu-discovery"}


@pytest.mark.parametrize("master", ["local", "local[4]", "local[*, 3]", " local[2] "])
def test_a_local_master_needs_nothing(master):
    assert spark_gpu_settings({}, master, 2) == ({}, [])


def test_a_cluster_with_the_keys_set_is_ready():
    assert spark_gpu_settings(READY, "spark://head:7077", 1) == ({}, [])
    assert spark_gpu_settings({**READY, TASK_AMOUNT: "0.25", EXECUTOR_AMOUNT: "4"}, "yarn", 4) == ({}, [])


def test_a_cluster_without_gpu_scheduling_names_the_keys():
    for master in ("spark://head:7077", "yarn", "local-cluster[2,1,1024]"):
        settings, problems = spark_gpu_settings({}, master, 2)
        assert settings == {TASK_AMOUNT: "0.5"}  # follows from tasks_per_gpu
        text = "\n".join(problems)
        assert len(problems) == 2 and f"master {master}" in text
        assert EXECUTOR_AMOUNT in problems[0] and f"{TASK_AMOUNT}=0.5" in problems[0]
        assert EXECUTOR_DISCOVERY in problems[1] and "bin/gpu-discovery" in problems[1]


def test_discovery_by_the_workers_is_enough():
    conf = {EXECUTOR_AMOUNT: "2", TASK_AMOUNT: "1"}
    assert spark_gpu_settings({**conf, WORKER_RESOURCES_FILE: "/etc/spark/gpus.json"}, "spark://h:7077", 1) == ({}, [])
    _, problems = spark_gpu_settings(conf, "spark://h:7077", 1)
    assert len(problems) == 1 and WORKER_RESOURCES_FILE in problems[0]


@pytest.mark.parametrize(("change", "tasks_per_gpu", "says"), [
    ({TASK_AMOUNT: "1"}, 2, "runs 1 task(s) per GPU but tasks_per_gpu is 2"),
    ({TASK_AMOUNT: "0.7"}, 1, "a share of at most 0.5"),
    ({TASK_AMOUNT: "2", EXECUTOR_AMOUNT: "2"}, 1, "each task would hold 2 GPUs but CLIP uses one"),
    ({TASK_AMOUNT: "2"}, 1, "no task could ever be scheduled"),
    ({EXECUTOR_AMOUNT: "1.5"}, 1, "must be a whole number"),
    ({EXECUTOR_AMOUNT: "one"}, 1, "'one' is not a number"),
])
def test_inconsistent_settings_are_problems(change, tasks_per_gpu, says):
    _, problems = spark_gpu_settings({**READY, **change}, "spark://head:7077", tasks_per_gpu)
    assert any(says in p for p in problems), problems


def test_kubernetes_gets_the_vendor_and_bad_tasks_per_gpu_is_refused():
    assert spark_gpu_settings(READY, "k8s://https://api:6443", 1) == ({VENDOR: "nvidia.com"}, [])
    assert spark_gpu_settings({}, "local[2]", 0)[1] == ["tasks_per_gpu must be a whole number >= 1, got 0"]


# --- bin/gpu-discovery -------------------------------------------------------------------------------

def _fake_nvidia_smi(folder, script: str) -> dict:
    path = os.path.join(folder, "nvidia-smi")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + script)
    os.chmod(path, 0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_discovery_lists_nvidia_smis_indices(tmp_path):
    assert os.access(DISCOVERY, os.X_OK)
    env = _fake_nvidia_smi(tmp_path, 'test "$*" = "--query-gpu=index --format=csv,noheader" || exit 3\n'
                                     'printf "0\\n1\\n 2 \\n"\n')
    out = subprocess.run([DISCOVERY], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": ["0", "1", "2"]}


def test_discovery_without_nvidia_smi_finds_no_gpu(tmp_path):
    # PATH holds nothing but what the script needs from outside (bash): no nvidia-smi anywhere
    os.symlink(shutil.which("bash"), tmp_path / "bash")
    out = subprocess.run([str(tmp_path / "bash"), DISCOVERY], env={"PATH": str(tmp_path)}, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": []}


def test_discovery_fails_loudly_when_nvidia_smi_does(tmp_path):
    env = _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed because it could not communicate with the '
                                     'NVIDIA driver"; exit 9\n')
    done = subprocess.run([DISCOVERY], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert "could not communicate with the NVIDIA driver" in done.stderr


# --- ClipScore on a GPU: dispatch and the driver's check --------------------------------------------

def test_clip_score_takes_the_gpu_path_only_for_torch_on_cuda(monkeypatch):
    import torch

    assert ClipScore(device="cuda").on_gpu()
    assert not ClipScore(device="cpu").on_gpu()
    assert not ClipScore(device="cuda", backend="onnx").on_gpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not ClipScore(device="auto").on_gpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ClipScore(device="auto").on_gpu()


def test_the_driver_refuses_cuda_on_a_cluster_without_gpu_scheduling():
    from filters.clip import ClipConfigError, check_gpu_scheduling

    check_gpu_scheduling(ClipScore(device="cuda"), "image_text.clip", {}, "local[4]")  # local: nothing needed
    check_gpu_scheduling(ClipScore(device="cpu"), "image_text.clip", {}, "spark://h:7077")
    with pytest.raises(ClipConfigError, match=r"image_text.clip.device=cuda on spark://h:7077: .*"
                                              r"spark.executor.resource.gpu.amount"):
        check_gpu_scheduling(ClipScore(device="cuda"), "image_text.clip", {}, "spark://h:7077")
    ready = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
             "spark.executor.resource.gpu.discoveryScript": "bin/gpu-discovery"}
    check_gpu_scheduling(ClipScore(device="cuda"), "image_text.clip", ready, "spark://h:7077")
    with pytest.raises(ClipConfigError, match="spark.task.resource.gpu.amount is not set"):
        check_gpu_scheduling(ClipScore(device="cuda"), "image_text.clip",
                             {k: v for k, v in ready.items() if "task" not in k}, "spark://h:7077")
