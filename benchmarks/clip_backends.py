"""CLIP throughput per backend on CPU: the stage against its own bare backend, and against bare PyTorch.

For each backend (torch, onnx, onnx_int8), in one process with `--threads` threads:
- bare: both towers on ready-made inputs (pixel tensors and caption tokens, batch `--batch`), the
  model's own work per image-text pair;
- stage: `filters.clip.ClipScore.apply` on JPEG bytes and captions (decode with draft mode, preprocess,
  both towers, cosine): what the pipeline's CLIP step costs per image.
Reports images/s per core, each stage's share of its bare backend, and each backend against bare torch.
Weights are random (no real ones can be had offline): speed does not depend on their values.

    python -m benchmarks.clip_backends --model ViT-B-32 --threads 2 --images 256
writes benchmarks/results/clip_backends.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np

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


def _rate(fn, n: int, min_seconds: float = 3.0) -> float:
    fn()  # warm-up (first-call allocations, lazy init)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        done += n
    return done / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=128, help="images per stage call")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per figure")
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
    batch = pa.RecordBatch.from_pydict({"image": jpegs, "caption": ["a photo of something"] * len(jpegs)})
    results = {"model": a.model, "threads": a.threads, "batch": a.batch, "images": a.images,
               "load_avg_start": round(os.getloadavg()[0], 1), "backends": {}}
    for backend in ("torch", "onnx", "onnx_int8"):
        stage = ClipScore(model=a.model, pretrained=ckpt, backend=backend, onnx_cache=os.path.join(tmp, "cache"),
                          batch_size=a.batch)
        t0 = time.perf_counter()
        state = stage.setup(a.threads)
        setup_s = time.perf_counter() - t0
        encoder = state[0]
        pixels = np.random.default_rng(0).standard_normal((a.batch, 3, 224, 224)).astype(np.float32)
        tokens = state[2](["a photo of something"] * a.batch).numpy()
        bare = _rate(lambda enc=encoder: (enc.encode_image(pixels), enc.encode_text(tokens)), a.batch, a.seconds)
        staged = _rate(lambda s=stage, st=state: s.process(batch, st), a.images, a.seconds)
        results["backends"][backend] = {
            "setup_seconds": round(setup_s, 1),  # export + quantisation on first need included
            "bare_images_per_s_per_core": round(bare / a.threads, 2),
            "stage_images_per_s_per_core": round(staged / a.threads, 2),
            "stage_share_of_bare": round(staged / bare, 3),
        }
        print(backend, json.dumps(results["backends"][backend]), flush=True)
    torch_bare = results["backends"]["torch"]["bare_images_per_s_per_core"]
    for r in results["backends"].values():
        r["bare_vs_torch"] = round(r["bare_images_per_s_per_core"] / torch_bare, 2)
        r["stage_vs_bare_torch"] = round(r["stage_images_per_s_per_core"] / torch_bare, 2)
    results["load_avg_end"] = round(os.getloadavg()[0], 1)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
