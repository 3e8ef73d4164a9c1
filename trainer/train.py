"""The training loop: AdamW, warm-up then cosine decay, gradient accumulation and clipping, DDP, checkpoints.

Read top to bottom: set up the process group, the tokenizer, the model and the loader; restore a checkpoint
when resuming; then steps. A step takes `grad_accum` micro-batches from the loader, weights every target
token the same across micro-batches and ranks (the loss is summed and divided by the global target count),
clips and steps. A checkpoint holds the model, optimizer, scheduler, every rank's RNG and data position, and
the tokenizer; resuming from it gives the same losses as not stopping.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist

from trainer.data import DataConfig, ShardLoader, parse_mix
from trainer.images import ImageConfig
from trainer.model import ModelConfig, VisionLanguageModel
from trainer.packing import MODEL_INPUTS
from trainer.tokenizer import TextTokenizer, load_or_train

log = logging.getLogger("trainer")
CHECKPOINTS = "checkpoints"


# --- process group -------------------------------------------------------------------------------------

def setup_distributed(device_flag: str) -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun: NCCL on GPUs, gloo on CPU; alone: no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world, device


def all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# --- pieces --------------------------------------------------------------------------------------------

def model_config(args: argparse.Namespace, tok: TextTokenizer) -> ModelConfig:
    over = {}
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as f:
            over = json.load(f)
        unknown = set(over) - {f.name for f in fields(ModelConfig)}
        if unknown:
            raise ValueError(f"{args.model_config}: unknown ModelConfig fields {sorted(unknown)}")
    base = {
        "vocab_size": -(-tok.vocab_size // 64) * 64,  # a multiple of 64 keeps the matmuls aligned
        "hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
        "num_kv_heads": args.kv_heads, "intermediate_size": args.intermediate,
        "vision_hidden_size": args.vision_hidden, "vision_layers": args.vision_layers,
        "vision_heads": args.vision_heads, "vision_intermediate_size": args.vision_intermediate,
        "image_token_id": tok.image_id,
    }
    base.update(over)
    if base["vocab_size"] < tok.vocab_size:
        raise ValueError(f"vocab_size {base['vocab_size']} < tokenizer's {tok.vocab_size}")
    return ModelConfig(**base)


def data_config(args: argparse.Namespace) -> DataConfig:
    px = 28 * 28
    return DataConfig(
        shards=args.shards, mix=parse_mix(args.mix), seq_len=args.seq_len, rows=args.batch_rows,
        pack=not args.no_packing, resample=not args.no_resample, interleave=args.interleave, seed=args.seed,
        workers=args.workers,
        image=ImageConfig(min_pixels=args.min_image_tokens * px, max_pixels=args.max_image_tokens * px),
    )


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, fused: bool) -> torch.optim.Optimizer:
    # weight decay on matrices only: not on norms, biases, embeddings or the position table
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else keep).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-8, fused=fused)


def lr_lambda(steps: int, warmup: int, min_ratio: float):
    warmup = min(warmup, steps // 2)

    def factor(step: int) -> float:  # step: optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def rng_state(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- checkpoints ---------------------------------------------------------------------------------------

def checkpoint_path(out: str, step: int) -> str:
    return os.path.join(out, CHECKPOINTS, f"step_{step:07d}.pt")


def latest_checkpoint(out: str) -> str | None:
    d = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(d):
        return None
    found = sorted(f for f in os.listdir(d) if f.startswith("step_") and f.endswith(".pt"))
    return os.path.join(d, found[-1]) if found else None


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, loader: ShardLoader, tok: TextTokenizer,
                    cfg: ModelConfig, args: argparse.Namespace, rank: int, world: int, device: torch.device,
                    totals: dict) -> str | None:
    """Every rank contributes its RNG and data position; rank 0 writes one file (atomically: tmp + rename)."""
    per_rank = gather({"rng": rng_state(device), "data": loader.state_dict()}, world)
    path = checkpoint_path(out, step)
    if rank == 0:
        state = {
            "step": step, "world": world, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": [r["rng"] for r in per_rank],
            "data": [r["data"] for r in per_rank], "model_config": cfg.to_dict(), "tokenizer": tok.to_json(),
            "args": vars(args), "totals": totals,
        }
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
        folder = os.path.dirname(path)
        old = sorted(f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".pt"))
        for f in old[:-args.keep_checkpoints] if args.keep_checkpoints > 0 else []:
            os.remove(os.path.join(folder, f))
        log.info("checkpoint: %s", path)
    barrier(world)
    return path if rank == 0 else None


# flags that decide which batches come next: a resume with other values could not continue the same stream
DATA_FLAGS = ("mix", "seq_len", "batch_rows", "grad_accum", "no_packing", "no_resample", "interleave", "seed",
              "workers", "epoch_batches", "min_image_tokens", "max_image_tokens")


def check_resumable(ckpt: dict, args: argparse.Namespace, world: int) -> None:
    if ckpt["world"] != world:
        raise ValueError(f"checkpoint was written by {ckpt['world']} ranks, this run has {world}")
    old = ckpt["args"]
    changed = [f"{k}: {old.get(k)!r} -> {getattr(args, k)!r}"
               for k in DATA_FLAGS if old.get(k) != getattr(args, k)]
    if changed:
        raise ValueError("cannot resume exactly with other data flags: " + "; ".join(changed))


def load_checkpoint(spec: str | None, out: str) -> dict | None:
    if not spec:
        return None
    path = latest_checkpoint(out) if spec == "auto" else spec
    if path is None:
        log.info("--resume auto: no checkpoint in %s, starting fresh", out)
        return None
    # our own file, with RNG states and numpy arrays in it: not a weights-only load
    state = torch.load(path, map_location="cpu", weights_only=False)
    log.info("resuming from %s (step %d)", path, state["step"])
    return state


# --- the run -------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    rank, world, device = setup_distributed(args.device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader forks; Rust threads must not
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    ckpt = load_checkpoint(args.resume, args.out)
    if ckpt is not None:
        check_resumable(ckpt, args, world)
    elif rank == 0 and latest_checkpoint(args.out):
        log.warning("starting a fresh run in %s, which holds checkpoints of an earlier one (pass --resume "
                    "auto to continue it); checkpoints with the same step numbers get overwritten", args.out)

    # tokenizer: the checkpoint's, a given file, or trained on the shards by rank 0 and read by the others
    tok_path = os.path.join(args.out, "tokenizer.json")
    if ckpt is not None:
        tok = TextTokenizer(ckpt["tokenizer"])
    elif args.tokenizer:
        tok = TextTokenizer.from_file(args.tokenizer)
    else:
        if rank == 0:
            t0 = time.time()
            mix = list(parse_mix(args.mix)) or None
            tok = load_or_train(None, args.shards, mix, args.vocab_size, args.tokenizer_samples)
            tok.save(tok_path)
            log.info("trained a %d-token byte-level BPE on shard text in %.1fs", tok.vocab_size,
                     time.time() - t0)
        barrier(world)  # the other ranks read the file rank 0 just wrote
        if rank != 0:
            tok = TextTokenizer.from_file(tok_path)
    if rank == 0:
        tok.save(tok_path)  # the run folder always holds the tokenizer its checkpoints were trained with

    cfg = ModelConfig(**ckpt["model_config"]) if ckpt is not None else model_config(args, tok)
    seed_everything(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = VisionLanguageModel(cfg).to(device)
    optimizer = make_optimizer(model, args, fused=device.type == "cuda")
    schedule = lr_lambda(args.steps, args.warmup, args.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loader = ShardLoader(data_config(args), tok, rank, world, args.epoch_batches or None,
                         pin_memory=device.type == "cuda")
    step, totals = 0, {"samples": 0, "tokens": 0, "batches": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        loader.load_state_dict(ckpt["data"][rank])
        set_rng_state(ckpt["rng"][rank], device)
        step, totals = ckpt["step"], dict(ckpt["totals"])
        del ckpt
    if rank == 0:
        log.info("model: %s", {k: f"{v / 1e6:.2f}M" for k, v in model.num_params().items()})
        log.info("data: %s", loader.describe())
    if args.compile:
        # the decoder layers see one fixed shape (rows x seq_len): compile them; the vision tower's shapes
        # change with every batch's images, so only its MLPs are compiled, with dynamic shapes
        for layer in model.layers:
            layer.compile()
        for block in model.vision.blocks:
            block.mlp.compile(dynamic=True)
    net = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    metrics = open_metrics(os.path.join(args.out, "metrics.jsonl"), step) if rank == 0 else None
    data = iter(loader)
    window = {"tokens": 0.0, "pad": 0.0, "slots": 0.0, "wait": 0.0, "t0": time.time(), "steps": 0}
    run_start, start_step, last_loss = time.time(), step, float("nan")
    while step < args.steps:
        t_wait = time.time()
        micro = [next(data) for _ in range(args.grad_accum)]
        window["wait"] += time.time() - t_wait
        local = [sum(b["stats"][k] for b in micro) for k in ("targets", "tokens", "pad", "samples")]
        targets = all_sum([local[0]], device, world)[0]
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            inputs = {k: b[k].to(device, non_blocking=True) if torch.is_tensor(b[k]) else b[k]
                      for k in MODEL_INPUTS}
            labels = b["labels"].to(device, non_blocking=True)
            sync = world == 1 or i == len(micro) - 1
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast:
                part, _ = net(**inputs, labels=labels)
            # DDP averages gradients over ranks: scale by world so the result is the global token mean
            (part * world / max(1.0, targets)).backward()
            loss_sum += part.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        slots = len(micro) * args.batch_rows * args.seq_len
        glob = all_sum([loss_sum.item(), local[1], local[2], local[3], slots], device, world)
        last_loss = glob[0] / max(1.0, targets)
        totals["samples"] += int(glob[3])
        totals["tokens"] += int(glob[1])
        totals["batches"] += len(micro)
        window["tokens"] += glob[1]
        window["pad"] += glob[2]
        window["slots"] += glob[4]
        window["steps"] += 1
        if metrics is not None:
            metrics.write(json.dumps({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                                      "grad_norm": float(grad_norm), "samples": totals["samples"]}) + "\n")
            metrics.flush()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            dt = time.time() - window["t0"]
            eta = (time.time() - run_start) / max(1, step - start_step) * (args.steps - step)
            log.info("step %d/%d (%d%%) | loss %.4f | lr %.2e | grad %.2f | tok/s %s | pad %.1f%% "
                     "| data wait %d%% | epoch %d | eta %s", step, args.steps, 100 * step // args.steps,
                     last_loss, scheduler.get_last_lr()[0], float(grad_norm),
                     _si(window["tokens"] / max(dt, 1e-9)), 100 * window["pad"] / max(1.0, window["slots"]),
                     min(99, int(100 * window["wait"] / max(dt, 1e-9))),
                     loader.batches // loader.epoch_batches, _hms(eta))
            window = {"tokens": 0.0, "pad": 0.0, "slots": 0.0, "wait": 0.0, "t0": time.time(), "steps": 0}
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
            save_checkpoint(args.out, step, model, optimizer, scheduler, loader, tok, cfg, args, rank, world,
                            device, totals)
    if step > start_step:
        save_checkpoint(args.out, step, model, optimizer, scheduler, loader, tok, cfg, args, rank, world,
                        device, totals)
    if metrics is not None:
        metrics.close()

    batches = gather(loader.batches, world)
    summary = {"rank": rank, "world": world, "steps": step, "batches": loader.batches, "loss": last_loss,
               "samples": totals["samples"], "seconds": round(time.time() - run_start, 2)}
    print(f"[rank {rank}] finished: {json.dumps(summary)}", flush=True)
    if len(set(batches)) != 1:
        raise RuntimeError(f"ranks saw different batch counts: {batches}")
    if world > 1:
        dist.destroy_process_group()
    return summary


def open_metrics(path: str, step: int):
    """metrics.jsonl for appending, without the lines of steps after `step` (a run that died past its last
    checkpoint logged steps that the resumed run is about to redo)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    return open(path, "a", encoding="utf-8")


def _si(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
