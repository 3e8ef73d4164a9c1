"""CLIP throughput per backend on CPU: the stage against its own bare backend, and against bare PyTorch.

For each backend (torch, onnx, onnx_int8), in one process with `--threads` threads:
- bare: both towers on ready-made inputs (pixel tensors and caption tokens, batch `--batch`), the
  model's own work per image-text pair (each tower's rate is reported too); captions are of mixed
  length, as web alt-texts are, and the text tower runs up to a batch's longest one (all backends);
- stage: `filters.clip.ClipScore.apply` on JPEG bytes and captions (draft decode, preprocessing,
  tokenising, both towers, cosine, Arrow in and out): what the pipeline's CLIP step costs per image;
- where the stage's time goes, ms per image: pixels (decode and preprocessing), tokens, each tower,
  and the rest (Arrow, cosine, Python).
Each figure is the best of `--rounds` timed windows of at least `--seconds` (the machine may be shared:
the best window is the least disturbed one), with the 1-minute load average when it was taken.
Reports images/s per core, each stage's share of its bare backend, and each backend against bare torch.
Weights are random (no real ones can be had offline): speed does not depend on their values.

    python -m benchmarks.clip_backends --model ViT-B-32 --threads 2 --images 128
writes benchmarks/results/clip_backends.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.provenance import provenance

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "clip_backends.json")


def _jpegs(n: int) -> list[bytes]:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).resize((640, 480))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# alt-text lengths as web captions run: mostly short, a long tail (the last is cut at 77 tokens)
_TEXT = ("a photo of the old stone bridge over the river at sunset with people walking their dogs and "
         "boats moored below while the city lights come on behind the trees in early autumn ")


def _captions(n: int) -> list[str]:
    words = (_TEXT * 3).split()
    lengths = (5, 8, 12, 6, 16, 10, 25, 4, 9, 14, 40, 7, 20, 11, 70, 8)
    return [" ".join(words[i % 7 : i % 7 + lengths[i % len(lengths)]]) for i in range(n)]


def _rate(fn, n: int, min_seconds: float, rounds: int) -> tuple[float, float]:
    """Items per second of the best of `rounds` windows (each calls fn, n items a call, for at least
    min_seconds), and the load average after it."""
    fn()  # warm-up (first-call allocations, lazy init)
    best = 0.0
    for _ in range(rounds):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds:
            fn()
            done += n
        best = max(best, done / (time.perf_counter() - t0))
    return best, round(os.getloadavg()[0], 1)


def _breakdown(stage, state, batch) -> dict[str, float]:
    """Milliseconds per image of each part of the stage, timed on its own (best of two passes)."""
    from filters.clip import normalise

    encoder, pixels, tokenizer = state
    images, captions = batch.column("image").to_pylist(), batch.column("caption").to_pylist()
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # as the stage batches them
    images, captions = [images[i] for i in order], [captions[i] for i in order]
    best: dict[str, float] = {}
    for _ in range(2):
        t = dict.fromkeys(("pixels", "tokens", "image_tower", "text_tower"), 0.0)
        for start in range(0, len(images), stage.batch_size):
            t0 = time.perf_counter()
            px = pixels.from_bytes(images[start : start + stage.batch_size])
            t1 = time.perf_counter()
            tok = tokenizer(captions[start : start + stage.batch_size]).numpy()
            t2 = time.perf_counter()
            normalise(encoder.encode_image(px))
            t3 = time.perf_counter()
            normalise(encoder.encode_text(tok))
            t4 = time.perf_counter()
            for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                t[k] += dt
        best = {k: min(best.get(k, v), v) for k, v in t.items()}
    return {k: round(1000 * v / len(images), 2) for k, v in best.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=128, help="images per stage call")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per timed window")
    p.add_argument("--rounds", type=int, default=2, help="timed windows per figure (the best is reported)")
    p.add_argument("--backends", default="torch,onnx,onnx_int8", help="comma-separated")
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    import open_clip
    import pyarrow as pa
    import torch

    from filters.clip import ClipScore

    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="clip-bench-")
    torch.manual_seed(0)
    model = open_clip.create_model(a.model, pretrained=None)
    ckpt = os.path.join(tmp, "clip.pt")
    torch.save(model.state_dict(), ckpt)
    jpegs = _jpegs(a.images)
    captions = _captions(a.images)
    batch = pa.RecordBatch.from_pydict({"image": jpegs, "caption": captions})
    results = {"provenance": provenance("benchmarks.clip_backends", argv), "model": a.model, "threads": a.threads, "batch": a.batch, "images": a.images,
               "seconds": a.seconds, "rounds": a.rounds,
               "load_avg_start": round(os.getloadavg()[0], 1), "backends": {}}
    for backend in a.backends.split(","):
        stage = ClipScore(model=a.model, pretrained=ckpt, backend=backend, onnx_cache=os.path.join(tmp, "cache"),
                          batch_size=a.batch)
        t0 = time.perf_counter()
        state = stage.setup(a.threads)
        setup_s = time.perf_counter() - t0
        encoder = state[0]
        size = state[1].size
        pixels = np.random.default_rng(0).standard_normal((a.batch, 3, *size)).astype(np.float32)
        tokens = state[2](captions[: a.batch]).numpy()  # a mixed batch, its longest caption included
        image, image_load = _rate(lambda enc=encoder, x=pixels: enc.encode_image(x), a.batch, a.seconds, a.rounds)
        text, text_load = _rate(lambda enc=encoder, x=tokens: enc.encode_text(x), a.batch, a.seconds, a.rounds)
        bare = 1 / (1 / image + 1 / text)  # image-text pairs through both towers
        staged, stage_load = _rate(lambda s=stage, st=state: s.process(batch, st), a.images, a.seconds, a.rounds)
        parts = _breakdown(stage, state, batch)
        parts["rest"] = round(1000 / staged - sum(parts.values()), 2)
        results["backends"][backend] = {
            "setup_seconds": round(setup_s, 1),  # export + quantisation on first need included
            "bare_image_tower_per_s_per_core": round(image / a.threads, 2),
            "bare_text_tower_per_s_per_core": round(text / a.threads, 2),
            "bare_images_per_s_per_core": round(bare / a.threads, 2),
            "stage_images_per_s_per_core": round(staged / a.threads, 2),
            "stage_share_of_bare": round(staged / bare, 3),
            "stage_ms_per_image": parts,  # wall ms with all threads; pixels and tokens run on one
            "load_avg": {"image": image_load, "text": text_load, "stage": stage_load},
        }
        print(backend, json.dumps(results["backends"][backend]), flush=True)
    torch_bare = results["backends"].get("torch", {}).get("bare_images_per_s_per_core")
    for r in results["backends"].values() if torch_bare else ():
        r["bare_vs_torch"] = round(r["bare_images_per_s_per_core"] / torch_bare, 2)
        r["stage_vs_bare_torch"] = round(r["stage_images_per_s_per_core"] / torch_bare, 2)
    shutil.rmtree(tmp, ignore_errors=True)  # the checkpoint and the exports: over a GB for ViT-B-32
    results["load_avg_end"] = round(os.getloadavg()[0], 1)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
