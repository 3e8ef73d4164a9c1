"""Trainer benchmark: can the shard loader feed the training step, and what does packing save?

    .venv/bin/python -m benchmarks.trainer_bench [--shards out/shards] [--workers 0 1 2] [--steps 20]

Measures, on the same shards and model as `python -m trainer` (its defaults unless flags say otherwise):
  1. loader throughput: packed batches/s, samples/s and tokens/s with 0, 1, 2 ... DataLoader workers;
  2. the training step's consumption: batches/s of forward + backward + AdamW on batches held in memory;
  3. end to end: tokens/s of loader + step together, and the share of time spent waiting for data;
  4. padding share of the rows with and without packing.
With no --shards, synthetic shards are written to a temp folder per the pipeline's contract: real photos
from scikit-image (when installed) or noise images, 200-900 px, captions of 8-60 words.
Writes benchmarks/results/trainer_bench.json and .md (git-ignored).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.provenance import header, provenance  # after the path insert: runs as a script too

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORDS = [
    "a", "the", "red", "green", "blue", "small", "large", "old", "new", "wooden", "metal", "stone",
    "cat", "dog", "bird", "car", "boat", "house", "tree", "river", "mountain", "street", "table",
    "chair", "window", "sky", "cloud", "sun", "snow", "field", "flower", "person", "child", "woman",
    "man", "group", "standing", "sitting", "walking", "near", "under", "over", "beside", "in", "on",
    "with", "and", "of", "photo", "view", "close-up",
]


def synthetic_shards(root: str, n: int = 96, per_shard: int = 32, seed: int = 0) -> str:
    """image_text shards by the contract, with real JPEG decode costs."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = []
    try:
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
            photos.append(Image.fromarray(getattr(skdata, name)()).convert("RGB"))
    except Exception:  # noqa: BLE001 - scikit-image is a dev extra; noise images still cost a real decode
        photos = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))]
    folder = os.path.join(root, "image_text")
    os.makedirs(folder, exist_ok=True)
    sizes = {}
    for s in range(0, n, per_shard):
        name = f"image_text-{s // per_shard:06d}.tar"
        with wds.TarWriter(os.path.join(folder, name), encoder=False) as w:
            for i in range(s, min(n, s + per_shard)):
                img = photos[i % len(photos)]
                side = int(rng.integers(200, 900))
                aspect = float(rng.uniform(0.5, 2.0))
                im = img.resize((side, max(28, int(side / aspect))))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 60))))
                meta = {"sample_id": f"{i:016x}", "source": "bench", "width": im.width, "height": im.height}
                w.write({"__key__": f"{i:016x}", "jpg": buf.getvalue(), "txt": caption.encode(),
                         "json": json.dumps(meta).encode()})
        sizes[name] = min(n, s + per_shard) - s
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return root


def loader_rate(cfg, tok, batches: int, warmup: int = 2) -> dict:
    from trainer.data import ShardLoader

    it = iter(ShardLoader(cfg, tok))
    for _ in range(warmup):  # worker start-up and first shard opens are not the steady state
        next(it)
    t0 = time.perf_counter()
    samples = tokens = pad = 0
    for _ in range(batches):
        st = next(it)["stats"]
        samples += st["samples"]
        tokens += st["tokens"]
        pad += st["pad"]
    dt = time.perf_counter() - t0
    return {"batches_per_s": batches / dt, "samples_per_s": samples / dt, "tokens_per_s": tokens / dt,
            "pad_share": pad / (pad + tokens)}


def make_model(args, tok):
    import torch

    from trainer.__main__ import build_parser
    from trainer.model import VisionLanguageModel
    from trainer.train import make_optimizer, model_config

    targs = build_parser().parse_args(["--shards", "x", "--lr", "1e-3"])
    torch.manual_seed(0)
    model = VisionLanguageModel(model_config(targs, tok))
    return model, make_optimizer(model, targs, fused=False)


def train_step(model, opt, batch):
    import torch

    from trainer.packing import MODEL_INPUTS

    loss_sum, n = model(**{k: batch[k] for k in MODEL_INPUTS}, labels=batch["labels"])
    (loss_sum / n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_rate(model, opt, batches: list) -> dict:
    train_step(model, opt, batches[0])  # warm-up: allocator, first-call overheads
    t0 = time.perf_counter()
    tokens = 0
    for b in batches[1:]:
        train_step(model, opt, b)
        tokens += b["stats"]["tokens"]
    dt = time.perf_counter() - t0
    return {"batches_per_s": (len(batches) - 1) / dt, "tokens_per_s": tokens / dt}


def end_to_end(model, opt, cfg, tok, steps: int) -> dict:
    from trainer.data import ShardLoader

    it = iter(ShardLoader(cfg, tok))
    train_step(model, opt, next(it))
    wait = 0.0
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - tw
        train_step(model, opt, b)
        tokens += b["stats"]["tokens"]
    dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "data_wait_share": wait / dt, "steps_per_s": steps / dt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None,
                   help="OUT/shards to read (default: synthetic shards in a temp folder)")
    p.add_argument("--mix", default="image_text=1", help="kinds to read, as for python -m trainer")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="DataLoader worker counts to measure")
    p.add_argument("--batches", type=int, default=20, help="batches per loader measurement")
    p.add_argument("--steps", type=int, default=10, help="training steps per step measurement")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--batch-rows", type=int, default=4, help="rows per batch")
    p.add_argument("--max-image-tokens", type=int, default=64, help="largest image in LLM tokens")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the training process")
    p.add_argument("--out", default=RESULTS, help="folder for trainer_bench.json and trainer_bench.md")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainer.data import DataConfig, parse_mix
    from trainer.images import ImageConfig
    from trainer.tokenizer import shard_texts, train_bpe

    tmp = None
    shards = args.shards
    if shards is None:
        tmp = tempfile.TemporaryDirectory(prefix="trainer-bench-")
        shards = synthetic_shards(os.path.join(tmp.name, "shards"))
    mix = parse_mix(args.mix)
    tok = train_bpe(shard_texts(shards, list(mix)), vocab_size=8192)

    def cfg(workers: int, pack: bool = True) -> DataConfig:
        return DataConfig(shards=shards, mix=mix, seq_len=args.seq_len, rows=args.batch_rows, pack=pack,
                          workers=workers, image=ImageConfig(max_pixels=args.max_image_tokens * 784))

    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": args.threads, "cuda": torch.cuda.is_available(), "load_avg_1m": os.getloadavg()[0]}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["shards"] = shards if args.shards else "synthetic (96 photos)"
    result = {"provenance": provenance("benchmarks.trainer_bench", argv), "machine": machine, "settings": settings}
    result["loader"] = {str(w): loader_rate(cfg(w), tok, args.batches) for w in args.workers}
    from trainer.data import ShardLoader

    it = iter(ShardLoader(cfg(0), tok))
    held = [next(it) for _ in range(args.steps + 1)]
    model, opt = make_model(args, tok)
    result["model_params"] = model.num_params()
    result["train_step"] = step_rate(model, opt, held)
    best = max(args.workers)
    result["end_to_end"] = end_to_end(model, opt, cfg(best), tok, args.steps) | {"workers": best}
    result["padding"] = {"packed": loader_rate(cfg(0, True), tok, args.batches, 0)["pad_share"],
                         "unpacked": loader_rate(cfg(0, False), tok, args.batches, 0)["pad_share"]}
    need = result["train_step"]["batches_per_s"]
    for r in result["loader"].values():
        r["feeds_step_x"] = r["batches_per_s"] / need
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trainer_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = render(result)
    with open(os.path.join(args.out, "trainer_bench.md"), "w") as f:
        f.write(md)
    print(md)
    if tmp is not None:
        tmp.cleanup()
    return 0


def render(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    lines = [
        "# Trainer benchmark", "", header(r), "",
        (f"{m['cpus']} CPUs (1-minute load {m['load_avg_1m']:.1f} at start), torch {m['torch']}, "
         f"{m['threads']} training threads, CUDA: {m['cuda']}. Shards: {s['shards']}. "
         f"Rows {s['batch_rows']} x {s['seq_len']} tokens, images up to {s['max_image_tokens']} tokens; "
         f"model {r['model_params']['total'] / 1e6:.2f}M parameters (`python -m trainer` defaults)."), "",
        "| loader workers | batches/s | samples/s | tokens/s | loader / step consumption |",
        "|---:|---:|---:|---:|---:|",
    ]
    for w, x in r["loader"].items():
        lines.append(f"| {w} | {x['batches_per_s']:.2f} | {x['samples_per_s']:.1f} | "
                     f"{x['tokens_per_s']:.0f} | {x['feeds_step_x']:.2f}x |")
    t, e, pad = r["train_step"], r["end_to_end"], r["padding"]
    lines += [
        "",
        "| measure | value |", "|---|---:|",
        (f"| training step alone (batches held in memory) | {t['batches_per_s']:.2f} batches/s, "
         f"{t['tokens_per_s']:.0f} tokens/s |"),
        (f"| end to end, {e['workers']} workers | {e['tokens_per_s']:.0f} tokens/s, "
         f"data wait {100 * e['data_wait_share']:.0f}% |"),
        f"| padding share, packed | {100 * pad['packed']:.1f}% |",
        f"| padding share, one sample per row | {100 * pad['unpacked']:.1f}% |",
        "",
        ("Tokens count text and image tokens, not padding. \"loader / step consumption\" above 1 means the "
         "loader makes batches faster than the step uses them."), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
