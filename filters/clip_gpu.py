"""CLIP on a GPU: the model in half precision on the GPU Spark gave the task, fed by CPU threads.

Why overlap. On a GPU the model stops being the slow part: ViT-B-32 in fp16 on an H100-class GPU embeds
well over ten thousand image-caption pairs a second, while decoding and resizing one web JPEG costs a CPU
core a millisecond or more. Run one after the other (ClipScore.process's loop), the GPU idles while the CPU
decodes and the CPU idles while the GPU computes. `OverlappedScorer` decodes and preprocesses the next
sub-batches on a pool of `threads` CPU threads (PIL and numpy release the GIL, so the threads run in
parallel) while the current sub-batch is on the device, and `GpuClip` keeps two sub-batches in flight there
(the next one's upload on a copy stream while the current one computes), so the GPU does not wait for the
host between sub-batches. Spark's Arrow batches are small (128 rows in spark-defaults.conf), far below a
good GPU batch (256-1024), so the scorer streams across them (`run_stage`): sub-batches of `batch_size`
rows are cut from consecutive Arrow batches, and each Arrow batch comes out, in order, once all its rows
are scored. Scores are exactly those of the sequential loop over the same sub-batches: the same pixels,
tokens and model calls, only scheduled differently (see tests/filters/test_clip_gpu.py).

Why fp16. Tensor cores run half precision several times faster than fp32 and it halves the model's
memory traffic; CLIP was trained in mixed precision and OpenAI's released model ran in fp16. Scores move
by about 1e-3, far below what separates kept from dropped pairs at the 0.3 threshold. Pixels travel in
fp32 from pinned host memory (non-blocking copies) and are cast on the device, where the cast is free:
host CPU time is what limits the stage, not PCIe. `dtype` is a knob so the same code runs on CPU in
tests (bfloat16 or float32).

Which GPU. With Spark's resource scheduling every task is handed GPU addresses
(`TaskContext.resources()["gpu"]`); `task_device()` turns the first into `cuda:N` (through
CUDA_VISIBLE_DEVICES when the cluster manager narrowed it), and is `cuda:0` where Spark assigned
nothing (local mode, or outside Spark). `run_stage` keeps one loaded state per device: a reused Python
worker may run tasks on different GPUs over its life, and must follow Spark's assignment.

Spark settings (`spark_gpu_settings` checks them on the driver, before any Spark work). Local mode needs
none. On a cluster: `spark.executor.resource.gpu.amount` (GPUs per executor), `spark.task.resource.gpu.amount`
(1 / tasks per GPU: 1, 0.5, 0.25), and a way for Spark to find the GPUs' addresses:
`spark.executor.resource.gpu.discoveryScript` (bin/gpu-discovery, a path on every executor host), or, in
standalone mode, the workers' own `spark.worker.resource.gpu.discoveryScript` / `spark.worker.resourcesFile`.
`spark.task.cpus` is the decode pool per task: give a GPU as many cores as it can eat (at ~1-2 ms a
JPEG, 16 cores decode roughly 8,000-16,000 images/s). For example, executors of one GPU and 16 cores,
two tasks sharing each GPU:

    SPARK_WORKER_OPTS="-Dspark.worker.resource.gpu.amount=8 -Dspark.worker.resource.gpu.discoveryScript=$PWD/bin/gpu-discovery" \\
        $SPARK_HOME/sbin/start-worker.sh spark://head:7077        # once per GPU host
    spark-submit --master spark://head:7077 --properties-file spark-defaults.conf \\
        --conf spark.executor.cores=16 --conf spark.task.cpus=8 \\
        --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=0.5 \\
        --conf spark.executor.resource.gpu.discoveryScript=$PWD/bin/gpu-discovery \\
        jobs/build_pretrain.py --set image_text.clip.device=cuda --set image_text.clip.batch_size=512 ...
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

GPU = "gpu"  # Spark's resource name for GPUs (the discovery script's "name")
EXECUTOR_AMOUNT = "spark.executor.resource.gpu.amount"
TASK_AMOUNT = "spark.task.resource.gpu.amount"
EXECUTOR_DISCOVERY = "spark.executor.resource.gpu.discoveryScript"
WORKER_DISCOVERY = "spark.worker.resource.gpu.discoveryScript"
WORKER_RESOURCES_FILE = "spark.worker.resourcesFile"
DISCOVERY_PLUGIN = "spark.resources.discoveryPlugin"
VENDOR = "spark.executor.resource.gpu.vendor"


# --- which GPU --------------------------------------------------------------------------------------

def task_gpu_addresses() -> list[str]:
    """The GPU addresses Spark's scheduler assigned to the running task; [] outside Spark or without any."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
    except ImportError:
        return []
    if ctx is None:
        return []
    info = ctx.resources().get(GPU)
    return list(info.addresses) if info is not None else []


def task_device(default: str = "cuda") -> str:
    """The torch device for this task: `cuda:<address>` for the first GPU Spark assigned to it; where it
    assigned none (local mode, outside Spark), `default`, with a bare "cuda" meaning cuda:0.

    Discovery scripts report nvidia-smi's indices, which ignore CUDA_VISIBLE_DEVICES; where the cluster
    manager set that variable (YARN, Kubernetes), the address is looked up in it (CUDA renumbers the
    visible GPUs from 0)."""
    addresses = task_gpu_addresses()
    if not addresses:
        return "cuda:0" if default == "cuda" else default
    address = addresses[0].strip()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if address in visible:
        return f"cuda:{visible.index(address)}"
    if not address.isdigit():
        raise ValueError(f"Spark assigned GPU address {address!r}, which is not a device index nor in "
                         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}: the discovery script "
                         "must print indices (bin/gpu-discovery does)")
    return f"cuda:{address}"


# --- Spark settings --------------------------------------------------------------------------------

def is_local_master(master: str) -> bool:
    """local, local[4], local[*, 2]: one JVM, no resource scheduling. local-cluster[...] is a cluster."""
    m = (master or "").strip()
    return m == "local" or m.startswith("local[")


def spark_gpu_settings(conf: Mapping[str, str], master: str, tasks_per_gpu: int = 1
                       ) -> tuple[dict[str, str], list[str]]:
    """What a run with `clip.device: cuda` needs from Spark, checked on the driver before any Spark work.

    `conf` is the application's Spark configuration as spark-submit resolved it (e.g.
    `dict(SparkConf().getAll())` before the session starts), `master` its master URL, `tasks_per_gpu`
    how many tasks share one GPU. Returns (settings, problems): settings to pass to
    `SparkSession.builder.config` that follow from the arguments alone
    (`spark.task.resource.gpu.amount` = 1 / tasks_per_gpu when unset; the GPU vendor on Kubernetes), and
    one message per problem, each naming the keys to set; a run with problems should stop (exit 2).
    A local master needs nothing: Spark schedules no resources there and every task uses cuda:0."""
    if not isinstance(tasks_per_gpu, int) or tasks_per_gpu < 1:
        return {}, [f"tasks_per_gpu must be a whole number >= 1, got {tasks_per_gpu!r}"]
    if is_local_master(master):
        return {}, []
    where = f"clip.device=cuda on master {master}"
    settings: dict[str, str] = {}
    problems: list[str] = []
    want = _task_amount(tasks_per_gpu)

    executor = _number(conf.get(EXECUTOR_AMOUNT), EXECUTOR_AMOUNT, problems)
    if conf.get(EXECUTOR_AMOUNT) is None:
        problems.append(f"{where} needs Spark to schedule GPUs: {EXECUTOR_AMOUNT} (GPUs per executor) is not "
                        f"set; e.g. --conf {EXECUTOR_AMOUNT}=1 --conf {TASK_AMOUNT}={want}")
    elif executor is not None and (executor < 1 or executor != int(executor)):
        problems.append(f"{EXECUTOR_AMOUNT}={conf[EXECUTOR_AMOUNT]}: GPUs per executor must be a whole number >= 1")

    task = _number(conf.get(TASK_AMOUNT), TASK_AMOUNT, problems)
    if conf.get(TASK_AMOUNT) is None:
        settings[TASK_AMOUNT] = want
    elif task is not None:
        if task <= 0 or (0.5 < task < 1) or (task > 1 and task != int(task)):
            problems.append(f"{TASK_AMOUNT}={conf[TASK_AMOUNT]}: Spark takes a whole number of GPUs per task or a "
                            "share of at most 0.5 (0.5 = two tasks per GPU)")
        elif task > 1:
            problems.append(f"{TASK_AMOUNT}={conf[TASK_AMOUNT]}: each task would hold {int(task)} GPUs but CLIP "
                            f"uses one; set {TASK_AMOUNT}={want}")
        elif math.floor(1 / task + 1e-9) != tasks_per_gpu:
            problems.append(f"{TASK_AMOUNT}={conf[TASK_AMOUNT]} runs {math.floor(1 / task + 1e-9)} task(s) per GPU "
                            f"but tasks_per_gpu is {tasks_per_gpu}: set {TASK_AMOUNT}={want} or change tasks_per_gpu")
        if executor is not None and task is not None and executor >= 1 and task > executor:
            problems.append(f"{TASK_AMOUNT}={conf[TASK_AMOUNT]} is more than {EXECUTOR_AMOUNT}={conf[EXECUTOR_AMOUNT]}: "
                            "no task could ever be scheduled")

    if not any(conf.get(k) for k in (EXECUTOR_DISCOVERY, WORKER_DISCOVERY, WORKER_RESOURCES_FILE, DISCOVERY_PLUGIN)):
        problems.append(f"{where}: Spark cannot find the GPUs' addresses: set {EXECUTOR_DISCOVERY} (bin/gpu-discovery, "
                        f"a path that exists on every executor host) or, on a standalone cluster, start the workers "
                        f"with {WORKER_DISCOVERY} or {WORKER_RESOURCES_FILE}")
    if master.strip().startswith("k8s://") and not conf.get(VENDOR):
        settings[VENDOR] = "nvidia.com"  # Kubernetes requests the GPUs from its device plugin by vendor
    return settings, problems


def _task_amount(tasks_per_gpu: int) -> str:
    return "1" if tasks_per_gpu == 1 else repr(1 / tasks_per_gpu)


def _number(value: str | None, key: str, problems: list[str]) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        problems.append(f"{key}={value!r} is not a number")
        return None


# --- the model on the device -----------------------------------------------------------------------

class GpuClip:
    """An open_clip model on one device in half precision, behind the numpy-in, numpy-out interface of
    filters.clip._TorchClip (`encode_image(pixels)`, `encode_text(tokens)`, embeddings as float32), plus
    the asynchronous pair the overlapped scorer uses: `host(array)` (in a CPU thread: into pinned memory)
    and `submit(pixel_pieces, tokens)` (upload on a copy stream, both towers on a compute stream, the
    embeddings back into pinned memory; `.result()` waits for them).

    `dtype`: "float16" (default on cuda), "bfloat16" or "float32" (default on cpu); the model's weights
    are converted once. `events`, when a list, receives a (start, end) pair of CUDA events around each
    sub-batch's compute (the benchmark's measure of the device's busy time)."""

    def __init__(self, model: Any, device: str = "cuda", dtype: Any = None):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if dtype is None:
            dtype = torch.float16 if self.cuda else torch.float32
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.events: list | None = None
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)

    def host(self, array: np.ndarray) -> Any:
        """`array` as a host tensor the device can read asynchronously: pinned on cuda (one copy, done in
        the calling thread, which is a pool thread when the scorer calls it)."""
        import torch

        if not self.cuda:
            return torch.from_numpy(np.ascontiguousarray(array))
        pinned = torch.empty(array.shape, dtype=_torch_dtype(array.dtype), pin_memory=True)
        np.copyto(pinned.numpy(), array)
        return pinned

    def submit(self, pieces: Sequence[Any], tokens: Any) -> _Pending:
        """Both towers on one sub-batch: `pieces` (host tensors or arrays, rows in order) are its pixels,
        `tokens` its caption tokens. Returns at once on cuda; `.result()` gives (image, text) embeddings."""
        import torch

        pieces = [self.host(p) if isinstance(p, np.ndarray) else p for p in pieces]
        tokens = self.host(tokens) if isinstance(tokens, np.ndarray) else tokens
        if not self.cuda:
            with torch.inference_mode():
                pixels = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                img = self.model.encode_image(pixels.to(self.dtype))
                txt = self.model.encode_text(tokens)
            return _Pending(torch.stack([img.float(), txt.float()]), None)
        n = sum(p.shape[0] for p in pieces)
        with torch.inference_mode(), torch.cuda.device(self.device):
            with torch.cuda.stream(self.copy_stream):
                pixels = torch.empty((n, *pieces[0].shape[1:]), dtype=pieces[0].dtype, device=self.device)
                at = 0
                for p in pieces:
                    pixels[at : at + p.shape[0]].copy_(p, non_blocking=True)
                    at += p.shape[0]
                tok = tokens.to(self.device, non_blocking=True)
            with torch.cuda.stream(self.compute_stream):
                self.compute_stream.wait_stream(self.copy_stream)
                pixels.record_stream(self.compute_stream)  # made on the copy stream, used and freed here
                tok.record_stream(self.compute_stream)
                start = torch.cuda.Event(enable_timing=True) if self.events is not None else None
                if start is not None:
                    start.record()
                img = self.model.encode_image(pixels.to(self.dtype))
                txt = self.model.encode_text(tok)
                out = torch.stack([img, txt]).float()
                back = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                back.copy_(out, non_blocking=True)
                done = torch.cuda.Event(enable_timing=start is not None)
                done.record()
                if start is not None:
                    self.events.append((start, done))
        return _Pending(back, done, keep=(pieces, tokens))

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        x = self.host(pixels)
        with torch.inference_mode():
            if not self.cuda:
                return self.model.encode_image(x.to(self.dtype)).float().numpy()
            x = x.to(self.device, non_blocking=True).to(self.dtype)
            return self.model.encode_image(x).float().cpu().numpy()

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        x = self.host(tokens)
        with torch.inference_mode():
            if not self.cuda:
                return self.model.encode_text(x).float().numpy()
            return self.model.encode_text(x.to(self.device, non_blocking=True)).float().cpu().numpy()


class _Pending:
    """A sub-batch's embeddings on their way back from the device."""

    def __init__(self, out: Any, event: Any, keep: Any = None):
        self.out, self.event, self.keep = out, event, keep  # keep: host inputs alive until the copy is done

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL: the decode threads run meanwhile
        out = self.out.numpy()
        return out[0].copy(), out[1].copy()


class _Done:
    """A synchronous encoder's (filters.clip._TorchClip, clip_onnx.OnnxClip) result, already computed."""

    def __init__(self, img: np.ndarray, txt: np.ndarray):
        self.value = (img, txt)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.value


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return torch.from_numpy(np.empty(0, dtype)).dtype


# --- the overlapped scorer -------------------------------------------------------------------------

class _Chunk:
    """One input batch: its scores, filled as its rows come back, and how many are still out."""

    __slots__ = ("left", "scores")

    def __init__(self, n: int):
        self.scores: list[float | None] = [None] * n
        self.left = 0


class _SubBatch:
    __slots__ = ("pieces", "rows", "tokens")

    def __init__(self, rows: list, pieces: list[Future], tokens: Future):
        self.rows, self.pieces, self.tokens = rows, pieces, tokens


class OverlappedScorer:
    """CLIP scores with decoding on CPU threads overlapped with the model on the device.

    `encoder`: a GpuClip (asynchronous: two sub-batches in flight on the device) or any numpy
    encoder with `encode_image` / `encode_text` (run synchronously; decoding still overlaps it).
    `pixels`: filters.clip.ClipPixels (its `from_bytes(list of bytes) -> (n, 3, H, W) float32` is used), or
    any callable doing the same; `tokenizer(list of str)`
    (open_clip's; called under a lock: Hugging Face tokenizers are not thread-safe). Valid rows (an
    image and a non-empty caption) are cut into sub-batches of `batch_size` in input order, as
    ClipScore.process cuts them; each sub-batch is decoded in pieces spread over `threads` threads, up to
    `ahead` sub-batches ahead of the device. Scores are ClipScore.process's: the cosine of the
    normalised embeddings, rounded to 6 decimals, None where the image is missing or the caption empty.
    """

    def __init__(self, encoder: Any, pixels: Any, tokenizer: Callable, batch_size: int, threads: int = 1,
                 piece: int = 0, ahead: int = 0):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.from_bytes: Callable[[list[bytes]], np.ndarray] = getattr(pixels, "from_bytes", pixels)
        self.batch_size = max(1, batch_size)
        self.threads = max(1, threads)
        # pieces small enough that every thread has work in each sub-batch, big enough to amortise a task
        self.piece = piece or max(1, min(64, -(-self.batch_size // self.threads)))
        pieces_per_batch = -(-self.batch_size // self.piece)
        self.ahead = ahead or max(2, -(-2 * self.threads // pieces_per_batch))
        self.depth = 2 if hasattr(encoder, "submit") else 1  # sub-batches on the device at once
        self.max_chunks = 4096  # input batches held waiting for rows (bounds memory on a run of empty rows)
        self._pool: ThreadPoolExecutor | None = None
        self._tokenizing = threading.Lock()

    def __call__(self, images: Sequence[bytes | None], captions: Sequence[str | None]) -> list[float | None]:
        """Scores of one batch's rows, in order."""
        (scores,) = self.stream([(images, captions)])
        return scores

    def stream(self, chunks: Iterable[tuple[Sequence[bytes | None], Sequence[str | None]]]
               ) -> Iterator[list[float | None]]:
        """Scores for each (images, captions) chunk, in order; sub-batches span chunk boundaries, and the
        next chunks are read while earlier sub-batches decode and run."""
        from filters.clip import normalise

        pool = self._executor()
        source = iter(chunks)
        exhausted = False
        held: deque[_Chunk] = deque()  # input chunks not yet given back, in order
        rows: deque = deque()  # (chunk, index, image, caption) not yet in a sub-batch
        prepared: deque[_SubBatch] = deque()  # decoding on the pool
        inflight: deque = deque()  # (sub-batch, pending result) on the device
        try:
            while True:
                while len(prepared) < self.ahead:
                    while not exhausted and len(rows) < self.batch_size and len(held) < self.max_chunks:
                        try:
                            images, captions = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        chunk = _Chunk(len(images))
                        held.append(chunk)
                        for i, (im, cap) in enumerate(zip(images, captions)):
                            if im is not None and cap:
                                rows.append((chunk, i, im, cap))
                                chunk.left += 1
                    if not rows:
                        break
                    prepared.append(self._prepare(pool, [rows.popleft() for _ in range(min(self.batch_size, len(rows)))]))
                if prepared and len(inflight) < self.depth:
                    sub = prepared.popleft()
                    pieces = [f.result() for f in sub.pieces]
                    tokens = sub.tokens.result()
                    if self.depth == 2:
                        inflight.append((sub, self.encoder.submit(pieces, tokens)))
                    else:
                        inflight.append((sub, _Done(self.encoder.encode_image(np.concatenate(pieces)),
                                                    self.encoder.encode_text(tokens))))
                    continue
                if inflight:
                    sub, pending = inflight.popleft()
                    img, txt = pending.result()
                    for (chunk, i, _, _), s in zip(sub.rows, (normalise(img) * normalise(txt)).sum(-1)):
                        chunk.scores[i] = float(np.round(s, 6))
                        chunk.left -= 1
                while held and held[0].left == 0:
                    yield held.popleft().scores
                if exhausted and not rows and not prepared and not inflight:
                    return
        finally:
            for sub in prepared:  # an error, or the consumer stopped: drop the work queued for nothing
                for f in [*sub.pieces, sub.tokens]:
                    f.cancel()

    def _prepare(self, pool: ThreadPoolExecutor, rows: list) -> _SubBatch:
        images = [r[2] for r in rows]
        pieces = [pool.submit(self._pixels, images[a : a + self.piece]) for a in range(0, len(images), self.piece)]
        return _SubBatch(rows, pieces, pool.submit(self._tokens, [r[3] for r in rows]))

    def _pixels(self, blobs: list[bytes]) -> Any:
        px = self.from_bytes(blobs)
        return self.encoder.host(px) if self.depth == 2 else px

    def _tokens(self, captions: list[str]) -> Any:
        with self._tokenizing:
            tokens = self.tokenizer(captions)
        tokens = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
        return self.encoder.host(tokens) if self.depth == 2 else tokens

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clip-decode")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --- the stage on Arrow batches ----------------------------------------------------------------------

def scored_batches(scorer: OverlappedScorer, batches: Iterable[pa.RecordBatch], image: str = "image",
                   caption: str = "caption", timing: list[float] | None = None
                   ) -> Iterator[tuple[pa.RecordBatch, list[float | None]]]:
    """(batch, its scores) for every non-empty batch, in order, with sub-batches spanning batches.
    `timing[0]` accumulates the seconds spent here, not in producing the input batches."""
    from filters.media import column_bytes

    held: deque[pa.RecordBatch] = deque()
    upstream = [0.0]

    def chunks() -> Iterator[tuple[list, list]]:
        source = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                return
            finally:
                upstream[0] += time.perf_counter() - t0
            if batch.num_rows:
                held.append(batch)
                yield column_bytes(batch, image), batch.column(caption).to_pylist()

    t0 = time.perf_counter()
    for scores in scorer.stream(chunks()):
        if timing is not None:
            timing[0] += time.perf_counter() - t0 - upstream[0]
            upstream[0] = 0.0
        yield held.popleft(), scores
        t0 = time.perf_counter()
    if timing is not None:
        timing[0] += time.perf_counter() - t0 - upstream[0]


def run_stage(stage: Any, batches: Iterable[pa.RecordBatch], threads: int = 1, timing: list[float] | None = None,
              image: str = "image", caption: str = "caption") -> Iterator[pa.RecordBatch]:
    """Stage.run for a CLIP stage on a cuda device (`ClipScore.run` calls it): the state
    is the one loaded for this task's GPU (`stage` with `device=task_device(stage.device)`, cached per
    Python worker like any stage's state), and each batch comes back with the stage's one column
    (`stage.adds()[0]`) added or replaced, as Stage.apply does."""
    import dataclasses

    t0 = time.perf_counter()
    state = dataclasses.replace(stage, device=task_device(stage.device)).state(threads)
    # the stage's state is (encoder, pixels, tokenizer), as other users of it (video_embed) expect; the
    # scorer and its thread pool are this task's
    scorer = state if isinstance(state, OverlappedScorer) else OverlappedScorer(*state, stage.batch_size, threads)
    if timing is not None:
        timing[0] += time.perf_counter() - t0
    (field,) = stage.adds()
    try:
        for batch, scores in scored_batches(scorer, batches, image, caption, timing):
            column = pa.array(scores, type=field.type)
            i = batch.schema.get_field_index(field.name)
            yield batch.set_column(i, field, column) if i >= 0 else batch.append_column(field, column)
    finally:
        if scorer is not state:
            scorer.close()
