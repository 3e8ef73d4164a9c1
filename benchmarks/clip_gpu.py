"""CLIP on a GPU: the overlapped stage (filters/clip_gpu.py) against its ceilings, with the GPU's busy share.

In one process, on JPEG photos (crops of scikit-image's photos in varied sizes, as benchmarks/corpus.py
makes them) and captions, with random weights (speed does not depend on their values):
- stage: OverlappedScorer.stream over Arrow-sized chunks (`--arrow-batch` rows, as Spark hands them) with
  sub-batches of `--batch`: decode and preprocess on `--threads` CPU threads overlapped with both towers
  in half precision on the device; images/s from first chunk in to last score out. `--processes N`
  runs the stage as N processes sharing the device, as N Spark tasks per GPU do
  (`spark.task.resource.gpu.amount` = 1/N): each its own model, `--threads` decode threads and every
  N-th chunk, started together; images/s over all of them (one process's decode threads share its GIL);
- GPU busy share through the stage: NVML's utilisation (the share of time a kernel was running),
  sampled every 0.1 s (torch.cuda.utilization where pynvml is installed, else `nvidia-smi -lms 100`),
  and the share of the stage's wall time covered by its own kernels (CUDA events around each sub-batch;
  with one process only: processes time-slice the device, and one's events would span the others' kernels);
- ceilings: the bare model on ready tensors already on the device (both towers, batch `--batch`), and
  the decode pool alone (the same threads, pieces and ClipPixels.from_bytes, no model);
- agreement on the first `--check` pairs: the stage's scores against the device's own sequential loop
  (equal to their rounding: the overlap changes the schedule only), and against the model in fp32 on
  the CPU: the largest difference of the scores and the lowest cosine between the device's and fp32's
  image and text embeddings (the targets issue 16 set for the ONNX backends: within 0.01, at least 0.99).
The stage runs at the lower ceiling at best; the targets (issue 16: >= 85 % busy, >= 3,000 images/s for
ViT-B-32 on an H100-class GPU, and the agreement above) are reported as met or not.

    python -m benchmarks.clip_gpu --model ViT-B-32 --images 4096 --batch 512
writes benchmarks/results/clip_gpu.json. Without CUDA it exits 2, unless `--device cpu` (the same code on
the CPU: a smoke test, not a measurement). On a lent GPU machine, `benchmarks/gpu_device.sh` runs it in
the configurations worth one lease (see there).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.provenance import provenance

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "clip_gpu.json")
TARGET_BUSY, TARGET_RATE = 0.85, 3000.0
TARGET_SCORE_DIFF, TARGET_EMBEDDING_COSINE = 0.01, 0.99
SEQUENTIAL_DIFF = 2e-6  # scores are rounded to 6 decimals: one unit, either side of a rounding boundary


def _jpegs(n: int, distinct: int = 256) -> tuple[list[bytes], list[str]]:
    """n JPEGs and captions; `distinct` different crops and sizes, repeated (a decode costs the same)."""
    from benchmarks.corpus import _variant
    from jobs.make_sample import PHOTOS, jpeg, load_photo

    rng = np.random.default_rng(0)
    photos = [(load_photo(name).convert("RGB"), caption) for name, caption in PHOTOS.items()]
    made = []
    for k in range(min(n, distinct)):
        photo, caption = photos[k % len(photos)]
        made.append((jpeg(_variant(rng, photo), quality=int(rng.integers(70, 95))), f"a photo: {caption}"))
    return [made[i % len(made)][0] for i in range(n)], [made[i % len(made)][1] for i in range(n)]


class BusySampler:
    """The GPU's utilisation (NVML: share of time a kernel ran), sampled every `every` seconds in a thread."""

    def __init__(self, index: int, every: float = 0.1):
        self.index, self.every = index, every
        self.samples: list[float] = []
        self.source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> BusySampler:
        import torch

        try:
            torch.cuda.utilization(self.index)  # needs pynvml
            self.source = "nvml (torch.cuda.utilization)"
            self._thread = threading.Thread(target=self._nvml, daemon=True)
        except Exception:  # noqa: BLE001 - no pynvml: nvidia-smi's own loop
            self.source = "nvidia-smi -lms 100"
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(int(self.every * 1000))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._smi, daemon=True)
        self._thread.start()
        return self

    def _nvml(self) -> None:
        import torch

        while not self._stop.wait(self.every):
            self.samples.append(float(torch.cuda.utilization(self.index)))

    def _smi(self) -> None:
        for line in self._proc.stdout:
            if self._stop.is_set():
                return
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def stop(self) -> float | None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._thread.join(timeout=10)
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


def bare_model_rate(encoder, tokens, batch: int, size: tuple[int, int], seconds: float) -> float:
    """Both towers on ready tensors already on the device: the model's own ceiling."""
    import torch

    pixels = torch.randn((batch, 3, *size), device=encoder.device).to(encoder.dtype)
    tok = torch.from_numpy(tokens).to(encoder.device)

    def step():
        with torch.inference_mode():
            encoder.model.encode_image(pixels)
            encoder.model.encode_text(tok)
        if encoder.cuda:
            torch.cuda.synchronize(encoder.device)

    step()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        done += batch
    return done / (time.perf_counter() - t0)


def decode_rate(pixels, images: list[bytes], threads: int, piece: int) -> float:
    """The decode pool alone: the stage's CPU ceiling."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(pixels.from_bytes, [images[:piece]] * threads))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(pixels.from_bytes, [images[a : a + piece] for a in range(0, len(images), piece)]))
        return len(images) / (time.perf_counter() - t0)


def agreement(encoder, reference, pixels, tokenizer, images: list[bytes], captions: list[str],
              scores: list[float | None], batch: int, threads: int, pairs: int) -> dict:
    """The stage's first `pairs` scores (1) against the device's own sequential loop on the same
    sub-batches (ClipScore.process's order: decode a sub-batch, then both towers): overlapping changes the
    schedule, not the arithmetic, so they agree to the scores' rounding, and a row scored against another
    row's pixels or caption would show here; (2) against `reference` (the same weights in fp32 on the CPU,
    through the same scorer); and the device's image and text embeddings against the reference's."""
    from filters.clip import normalise
    from filters.clip_gpu import OverlappedScorer

    def cosines(a, b):
        return (normalise(a) * normalise(b)).sum(-1)

    sequential = []
    for a in range(0, min(len(images), -(-pairs // batch) * batch), batch):
        x, tokens = pixels.from_bytes(images[a : a + batch]), tokenizer(captions[a : a + batch]).numpy()
        sequential.extend(np.round(cosines(encoder.encode_image(x), encoder.encode_text(tokens)), 6).tolist())
    images, captions, scores = images[:pairs], captions[:pairs], scores[:pairs]
    ref_scorer = OverlappedScorer(reference, pixels, tokenizer, batch, threads)
    try:
        ref_scores = ref_scorer(images, captions)
    finally:
        ref_scorer.close()
    x, tokens = pixels.from_bytes(images), tokenizer(captions).numpy()
    image_cos = cosines(encoder.encode_image(x), reference.encode_image(x))
    text_cos = cosines(encoder.encode_text(tokens), reference.encode_text(tokens))

    def largest_difference(other):
        return round(float(max(abs(a - b) for a, b in zip(scores, other[: len(scores)], strict=True))), 6)

    return {"pairs": len(images), "sequential_max_abs_diff": largest_difference(sequential),
            "score_max_abs_diff": largest_difference(ref_scores),
            "reference_score_range": [round(min(ref_scores), 6), round(max(ref_scores), 6)],
            "image_embedding_cosine_min": round(float(image_cos.min()), 6),
            "text_embedding_cosine_min": round(float(text_cos.min()), 6)}


def spark_stage_agreement(model_name: str, reference, device: str, batch: int, threads: int, arrow_batch: int,
                          images: list[bytes], captions: list[str], scores: list[float | None], rows: int) -> dict:
    """What a Spark task runs, minus Spark: the weights saved as a checkpoint file, loaded by ClipScore's
    own setup on `device` (its default dtype), and `filters.clip_gpu.run_stage` over Arrow batches of
    `arrow_batch` rows; its clip_score column against the stage's scores for the same rows (equal to
    their rounding, for the benchmark's default dtype: the same weights and sub-batches)."""
    import tempfile

    import pyarrow as pa
    import torch

    from filters.clip import ClipScore
    from filters.clip_gpu import run_stage
    from schemas import image_text as S

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "clip.pt")
        torch.save(reference.model.state_dict(), checkpoint)
        stage = ClipScore(model=model_name, pretrained=checkpoint, device=device, batch_size=batch)
        batches = [pa.record_batch({"image": pa.array(images[s : s + arrow_batch], pa.binary()),
                                    "caption": pa.array(captions[s : s + arrow_batch], pa.string())})
                   for s in range(0, rows, arrow_batch)]
        t0 = time.perf_counter()
        got = [v for b in run_stage(stage, batches, threads) for v in b.column(S.CLIP_SCORE).to_pylist()]
        seconds = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(got, scores[: len(got)], strict=True))
    return {"rows": len(got), "max_abs_diff": round(float(diff), 6), "seconds_with_model_load": round(seconds, 3)}


def agrees(check: dict) -> bool:
    stage = check.get("spark_stage")
    return (check["sequential_max_abs_diff"] <= SEQUENTIAL_DIFF and check["score_max_abs_diff"] <= TARGET_SCORE_DIFF
            and (stage is None or stage["max_abs_diff"] <= SEQUENTIAL_DIFF)
            and min(check["image_embedding_cosine_min"], check["text_embedding_cosine_min"]) >= TARGET_EMBEDDING_COSINE)


def _model(name: str, threads: int):
    """The benchmark's model (random weights, seed 0: the same in every process), its pixels and tokenizer."""
    import open_clip
    import torch

    from filters.clip import ClipPixels

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.eval()
    return model, ClipPixels(open_clip.get_model_preprocess_cfg(model), preprocess), open_clip.get_tokenizer(name)


def _chunks(images: list[bytes], captions: list[str], arrow_batch: int) -> list[tuple[list, list]]:
    return [(images[s : s + arrow_batch], captions[s : s + arrow_batch]) for s in range(0, len(images), arrow_batch)]


def _warm_up(scorer, chunks: list, a: argparse.Namespace) -> None:
    """A sub-batch's worth of chunks through the scorer: threads, pinned memory, kernels."""
    list(scorer.stream(chunks[: max(1, a.batch // a.arrow_batch)]))


def _stage_process(a: argparse.Namespace, index: int, start, results) -> None:
    """One of `--processes` stage processes: the same model, corpus and chunks as the parent's, it scores
    chunks index, index + N, ... after a warm-up, starting at the barrier `start`; puts (index, monotonic
    start and end, its chunks' scores) on `results`, or (index, the error)."""
    try:
        from filters.clip_gpu import GpuClip, OverlappedScorer

        model, pixels, tokenizer = _model(a.model, a.threads)
        scorer = OverlappedScorer(GpuClip(model, a.device, a.dtype or None), pixels, tokenizer, a.batch, a.threads)
        mine = _chunks(*_jpegs(a.images), a.arrow_batch)[index :: a.processes]
        _warm_up(scorer, mine, a)
        start.wait()
        t0 = time.monotonic()
        scores = list(scorer.stream(iter(mine)))
        results.put((index, t0, time.monotonic(), scores))
        scorer.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails with it
        start.abort()
        results.put((index, None, None, f"{type(e).__name__}: {e}"))


def stage_in_processes(a: argparse.Namespace, device_index: int | None) -> tuple[list, float, float | None, Any]:
    """The stage as `a.processes` processes sharing the device (spawned: CUDA does not survive a fork):
    the scores in chunk order, the wall time from the first start to the last end, the GPU's busy share
    over that time and its sampler (None on the CPU)."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(a.processes + 1), ctx.Queue()
    procs = [ctx.Process(target=_stage_process, args=(a, i, start, results), daemon=True)
             for i in range(a.processes)]
    for proc in procs:
        proc.start()
    got: list = []
    sampler = busy = None
    try:
        start.wait(timeout=600)  # every process set up and warmed up
        sampler = BusySampler(device_index).start() if device_index is not None else None
    except threading.BrokenBarrierError:
        pass  # a process failed before the start: its error is on the queue
    try:
        while len(got) < a.processes and not any(isinstance(r[3], str) for r in got):
            try:
                got.append(results.get(timeout=5))
            except queue.Empty:
                dead = {i: p.exitcode for i, p in enumerate(procs) if p.exitcode not in (None, 0)}
                if dead:
                    raise RuntimeError(f"stage processes exited without a result (index: exit code): {dead}") from None
    finally:
        if sampler is not None:
            busy = sampler.stop()
        for proc in procs:
            proc.join(timeout=30)
    errors = [f"process {i}: {r}" for i, _, _, r in got if isinstance(r, str)]
    if errors:
        raise RuntimeError("a stage process failed: " + "; ".join(errors))
    by_chunk: list = [None] * sum(len(scores) for *_, scores in got)
    for i, _, _, scores in got:
        by_chunk[i :: a.processes] = scores
    wall = max(end for _, _, end, _ in got) - min(begin for _, begin, _, _ in got)
    return [s for chunk in by_chunk for s in chunk], wall, busy, sampler


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--images", type=int, default=4096, help="image-caption pairs through the stage")
    p.add_argument("--batch", type=int, default=512, help="sub-batch on the device (clip.batch_size)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decode threads (spark.task.cpus)")
    p.add_argument("--arrow-batch", type=int, default=128, help="rows per Arrow batch fed to the stage "
                   "(spark.sql.execution.arrow.maxRecordsPerBatch in spark-defaults.conf)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke test of the same code")
    p.add_argument("--dtype", default="", help="float16 (default on cuda), bfloat16, float32 (default on cpu)")
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds for the bare model")
    p.add_argument("--check", type=int, default=256, help="pairs scored again in fp32 on the CPU (0: none)")
    p.add_argument("--stage-check", type=int, default=2048, help="rows scored again by ClipScore from a saved "
                   "checkpoint through run_stage, as a Spark task scores them (0: none; needs --check)")
    p.add_argument("--processes", type=int, default=1, help="stage processes sharing the device, as Spark tasks "
                   "per GPU (1 / spark.task.resource.gpu.amount); --threads is each one's")
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"benchmarks.clip_gpu: --device {a.device} but CUDA is not available here (torch {torch.__version__}, "
              f"{'no CUDA build' if torch.version.cuda is None else 'no GPU visible'}): run it on a GPU machine, "
              "or give --device cpu for a smoke test of the same code on the CPU", file=sys.stderr)
        raise SystemExit(2)
    from filters.clip_gpu import GpuClip, OverlappedScorer

    model, pixels, tokenizer = _model(a.model, a.threads)
    reference = GpuClip(copy.deepcopy(model), "cpu", "float32") if a.check else None
    encoder = GpuClip(model, a.device, a.dtype or None)
    images, captions = _jpegs(a.images)
    scorer = OverlappedScorer(encoder, pixels, tokenizer, a.batch, a.threads)
    results = {
        "provenance": provenance("benchmarks.clip_gpu", argv),
        "model": a.model, "device": str(encoder.device), "dtype": str(encoder.dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(encoder.device) if encoder.cuda else None,
        "images": a.images, "batch": a.batch, "threads": a.threads, "processes": a.processes,
        "arrow_batch": a.arrow_batch, "piece": scorer.piece, "ahead": scorer.ahead, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "load_avg_start": round(os.getloadavg()[0], 1),
    }
    results["decode_images_per_s"] = round(decode_rate(pixels, images, a.threads, scorer.piece), 1)
    size = tuple(pixels.size)
    results["bare_model_images_per_s"] = round(
        bare_model_rate(encoder, tokenizer(captions[: a.batch]).numpy(), a.batch, size, a.seconds), 1)

    chunks = _chunks(images, captions, a.arrow_batch)
    device_index = (encoder.device.index or 0) if encoder.cuda else None
    if a.processes > 1:
        scorer.close()  # the processes have their own; this one's model stays for the checks
        scores, wall, busy, sampler = stage_in_processes(a, device_index)
    else:
        _warm_up(scorer, chunks, a)
        sampler = BusySampler(device_index).start() if device_index is not None else None
        encoder.events = [] if encoder.cuda else None
        t0 = time.perf_counter()
        scores = [s for chunk in scorer.stream(iter(chunks)) for s in chunk]
        wall = time.perf_counter() - t0
        busy = sampler.stop() if sampler is not None else None
        scorer.close()
    assert len(scores) == len(images) and None not in scores
    encoder.events = None
    check = (agreement(encoder, reference, pixels, tokenizer, images, captions, scores, a.batch, a.threads,
                       a.check) if reference is not None else None)
    if check is not None and a.stage_check and not a.dtype:
        rows = min(a.stage_check, len(images))
        check["spark_stage"] = spark_stage_agreement(a.model, reference, a.device, a.batch, a.threads,
                                                     a.arrow_batch, images, captions, scores, rows)
    if check is not None:
        check["agrees"] = agrees(check)
    kernel_s = sum(s.elapsed_time(e) for s, e in encoder.events) / 1000 if encoder.events else None
    rate = len(images) / wall
    results.update({
        "stage_seconds": round(wall, 3),
        "stage_images_per_s": round(rate, 1),
        "stage_share_of_bare_model": round(rate / results["bare_model_images_per_s"], 3),
        # N processes: N pools like the one measured, the cores permitting
        "stage_share_of_decode": round(rate / (a.processes * results["decode_images_per_s"]), 3),
        "gpu_busy_share": busy,
        "gpu_busy_source": sampler.source if sampler is not None else None,
        "gpu_busy_samples": len(sampler.samples) if sampler is not None else 0,
        "gpu_kernel_share": round(kernel_s / wall, 3) if kernel_s is not None else None,
        "agreement_with_fp32_cpu": check,
        "targets": {"gpu_busy_share": TARGET_BUSY, "stage_images_per_s": TARGET_RATE,
                    "score_max_abs_diff": TARGET_SCORE_DIFF, "embedding_cosine_min": TARGET_EMBEDDING_COSINE,
                    "note": "issue 16: ViT-B-32 on an H100-class GPU"},
        "meets_targets": (None if busy is None else busy >= TARGET_BUSY and rate >= TARGET_RATE
                          and (check is None or check["agrees"])),
    })
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{a.model} {results['dtype']} on {results['gpu'] or results['device']}, batch {a.batch}, "
          f"{a.threads} decode threads{f' in each of {a.processes} processes' if a.processes > 1 else ''}, "
          f"{a.images} images in Arrow batches of {a.arrow_batch}:")
    print(f"  stage {rate:,.0f} images/s ({wall:.2f} s); ceilings: bare model {results['bare_model_images_per_s']:,.0f}, "
          f"decode pool {results['decode_images_per_s']:,.0f} images/s")
    if check is not None:
        print(f"  the first {check['pairs']} pairs: scores within {check['sequential_max_abs_diff']} of the sequential "
              f"loop's; against fp32 on the CPU (scores {check['reference_score_range']}): within "
              f"{check['score_max_abs_diff']}, "
              f"embedding cosines >= {check['image_embedding_cosine_min']} (images), "
              f"{check['text_embedding_cosine_min']} (captions)"
              + (f"; ClipScore from a checkpoint through run_stage ({check['spark_stage']['rows']} rows): within "
                 f"{check['spark_stage']['max_abs_diff']}" if "spark_stage" in check else "")
              + f"; agrees: {check['agrees']}")
    if encoder.cuda:
        print(f"  GPU busy {busy} ({results['gpu_busy_source']}, {results['gpu_busy_samples']} samples); "
              f"own kernels {results['gpu_kernel_share']} of the stage's time; "
              f"targets (busy >= {TARGET_BUSY}, >= {TARGET_RATE:,.0f} images/s) met: {results['meets_targets']}")
    print(f"wrote {a.out}")
    return results


def table(paths: list[str]) -> str:
    """One line per result file: what a lease's log ends with (benchmarks/gpu_device.sh)."""
    head = ("result", "model", "dtype", "batch", "procs", "threads", "stage/s", "bare/s", "decode/s", "busy",
            "kernels", "agrees", "targets")
    rows = [head]
    for path in paths:
        name = os.path.basename(path).removesuffix(".json")
        if not os.path.exists(path):
            rows.append((name, "(no result)") + ("",) * (len(head) - 2))
            continue
        with open(path) as f:
            r = json.load(f)
        check = r["agreement_with_fp32_cpu"]
        rows.append((name, r["model"], r["dtype"], r["batch"], r["processes"], r["threads"],
                     f"{r['stage_images_per_s']:,.0f}", f"{r['bare_model_images_per_s']:,.0f}",
                     f"{r['decode_images_per_s']:,.0f}", r["gpu_busy_share"], r["gpu_kernel_share"],
                     None if check is None else check["agrees"], r["meets_targets"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths, strict=True))) for row in rows)


if __name__ == "__main__":
    main()
