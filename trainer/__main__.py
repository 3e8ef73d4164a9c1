"""Pretrain a small GLM-4.1V-shaped vision-language model on the pipeline's WebDataset shards.

  python -m trainer --shards out/shards --out out/train --steps 200
  torchrun --nproc_per_node 8 -m trainer --shards s3://bucket/run1/shards --out /ckpt/run1 --resume auto ...

Reads OUT/shards/<kind>/ (index.json or sizes.json beside the tars; local folders or s3:// through boto3,
endpoint from AWS_ENDPOINT_URL), mixes the kinds by --mix, packs samples into rows of --seq-len tokens and
trains. The run folder (--out) receives tokenizer.json, metrics.jsonl and checkpoints/step_NNNNNNN.pt;
--resume auto continues from the newest checkpoint with the same losses as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--shards", required=True,
                   help="the pipeline's OUT/shards folder (one sub-folder per kind) or one kind's folder; "
                        "a local path or s3://bucket/prefix")
    d.add_argument("--mix", default=None,
                   help="kind weights, e.g. 'image_text=3,interleaved=1', or a YAML/JSON file with "
                        "{kind: weight} (or a 'mix:' key). Default: every kind found, weighted by its "
                        "sample count")
    d.add_argument("--seq-len", type=int, default=512,
                   help="tokens per packed row, image tokens included (GLM-4.1V pretrains at 8192)")
    d.add_argument("--batch-rows", type=int, default=4, help="rows per micro-batch per rank")
    d.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step; "
                        "global batch = ranks x grad-accum x batch-rows rows")
    d.add_argument("--no-packing", action="store_true",
                   help="one sample per row, padded (the baseline packing is measured against)")
    d.add_argument("--no-resample", action="store_true",
                   help="read shards in shuffled passes split by rank and worker instead of sampling them "
                        "with replacement; needs at least ranks x workers shards per kind")
    d.add_argument("--interleave", type=int, default=4,
                   help="shards read at once per kind and worker; samples are drawn at random among them "
                        "(the shuffle)")
    d.add_argument("--workers", type=int, default=2,
                   help="DataLoader worker processes per rank (0: load in the training process). Keep it "
                        "the same when resuming: the data position is recorded per worker")
    d.add_argument("--epoch-batches", type=int, default=0,
                   help="batches per rank per epoch (with_epoch); 0: shard samples / (ranks x batch-rows)")
    d.add_argument("--min-image-tokens", type=int, default=16,
                   help="smallest image, in LLM tokens of 28x28 pixels (GLM-4.1V: 16, i.e. 112x112)")
    d.add_argument("--max-image-tokens", type=int, default=64,
                   help="largest image in LLM tokens; larger images are scaled down (GLM-4.1V: 6144)")

    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer", default=None,
                   help="an existing tokenizer.json (special tokens are added if missing). Default: train a "
                        "byte-level BPE on the shards' text (saved to OUT/tokenizer.json and in checkpoints)")
    t.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size when training one")
    t.add_argument("--tokenizer-samples", type=int, default=50_000, help="texts read to train the BPE")

    m = p.add_argument_group("model (every size; the defaults are a CPU-sized toy)")
    m.add_argument("--hidden", type=int, default=256, help="LM width")
    m.add_argument("--layers", type=int, default=4, help="LM decoder layers")
    m.add_argument("--heads", type=int, default=4, help="LM attention heads")
    m.add_argument("--kv-heads", type=int, default=2, help="LM key/value heads (grouped-query attention)")
    m.add_argument("--intermediate", type=int, default=688, help="LM and projector SwiGLU width")
    m.add_argument("--vision-hidden", type=int, default=128, help="ViT width")
    m.add_argument("--vision-layers", type=int, default=2, help="ViT blocks")
    m.add_argument("--vision-heads", type=int, default=4, help="ViT heads (head size a multiple of 4)")
    m.add_argument("--vision-intermediate", type=int, default=344, help="ViT SwiGLU width")
    m.add_argument("--model-config", default=None,
                   help="JSON file of trainer.model.ModelConfig fields; overrides the size flags above")

    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps in the whole run")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final learning rate / peak (cosine decay)")
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (at most half of --steps)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices")
    o.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")

    r = p.add_argument_group("run")
    r.add_argument("--out", default="out/train", help="run folder: tokenizer, metrics.jsonl, checkpoints")
    r.add_argument("--checkpoint-every", type=int, default=0,
                   help="save a checkpoint every N steps (0: only at the end; "
                        "one is always saved at the end)")
    r.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest N checkpoints (0: all)")
    r.add_argument("--resume", default=None,
                   help="'auto' (newest checkpoint in --out, if any) or a checkpoint path; same flags needed")
    r.add_argument("--log-every", type=int, default=10, help="log loss, tokens/s and padding every N steps")
    r.add_argument("--seed", type=int, default=0, help="seeds weights, shard order, shuffling and mixing")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available")
    r.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast precision; auto: bf16 on GPU, fp32 on CPU")
    r.add_argument("--compile", action="store_true", help="torch.compile the decoder layers and ViT MLPs")
    r.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0: torch's default)")
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail on flag mistakes now, before shards are read or processes wait on each other."""
    for name in ("seq_len", "batch_rows", "grad_accum", "interleave", "steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.min_image_tokens <= args.max_image_tokens:
        p.error("need 1 <= --min-image-tokens <= --max-image-tokens")
    if args.max_image_tokens + 8 > args.seq_len:
        p.error("--seq-len must hold the largest image (--max-image-tokens) plus a few text tokens")
    if args.workers < 0:
        p.error("--workers must be 0 or more")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    from trainer.train import run  # after parsing: --help stays fast

    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
