"""The shard loader: kinds mixed by weight, formatted, packed into fixed-shape batches, resumable exactly.

Per rank and per DataLoader worker, the reference webdataset chain, made deterministic:

    shard list (index.json / sizes.json)
      -> shard order: resampled with replacement (default: any number of epochs, any number of ranks),
         or shuffled once per pass and split by node and by worker (--no-resample)
      -> `interleave` shards read at once, the next sample drawn from a random one of them (the shuffle;
         samples inside a shard are already in hash order)
      -> formatter (decode, resize, tokenize); a bad sample is logged and skipped
      -> kinds mixed by weight -> next-fit packing -> batch
      -> with_epoch: every rank yields exactly `epoch_batches` batches per epoch

Every random choice comes from a generator seeded by (seed, kind, rank, worker, counter) rather than from
a running RNG, so the position of a stream is a handful of counters: for each kind, the next shard number
and, for each open shard, how many samples were taken from it. That is the data position saved in a
checkpoint; on resume each worker re-opens its open shards and skips the samples already taken (reading,
not decoding them), and the run continues with the very batches it would have seen.

Batches come out of the DataLoader's workers in round-robin order; batch g of the run is made by
"logical worker" g % workers, and a fresh DataLoader is rotated so that its first worker plays the
logical worker whose turn it is. The worker count must therefore stay the same across a resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from trainer import formatters
from trainer.formatters import FormatContext, Formatted
from trainer.images import ImageConfig
from trainer.packing import Packer
from trainer.shards import Shard, find_kinds, iter_shard, log_and_continue
from trainer.tokenizer import TextTokenizer

log = logging.getLogger("trainer.data")


def make_seed(*parts) -> int:
    # not hash(): string hashes are salted per process, and every worker and rerun must agree
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


@dataclass
class DataConfig:
    shards: str
    mix: dict[str, float] = field(default_factory=dict)  # kind -> weight; empty: by sample count
    seq_len: int = 512
    rows: int = 4  # rows per micro-batch
    pack: bool = True
    resample: bool = True
    interleave: int = 4
    seed: int = 0
    workers: int = 2
    image: ImageConfig = field(default_factory=ImageConfig)


def parse_mix(spec: str | None) -> dict[str, float]:
    """Kind weights from "image_text=1,ocr=0.5" or from a YAML/JSON file holding {kind: weight}
    (or under a `mix:` or `trainer: mix:` key)."""
    if not spec:
        return {}
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            if spec.endswith((".yaml", ".yml")):
                import yaml

                doc = yaml.safe_load(f)
            else:
                doc = json.load(f)
        doc = (doc.get("trainer") or doc) if isinstance(doc, dict) else doc
        doc = doc.get("mix", doc) if isinstance(doc, dict) else doc
        if not isinstance(doc, dict):
            raise ValueError(f"{spec}: expected a mapping of kind to weight")
        mix = {str(k): float(v) for k, v in doc.items()}
    else:
        mix = {}
        for part in spec.split(","):
            kind, sep, weight = part.partition("=")
            mix[kind.strip()] = float(weight) if sep else 1.0
    for kind, w in mix.items():
        formatters.get(kind)  # unknown kinds fail here, at start
        if not w > 0:
            raise ValueError(f"mix weight for {kind} must be > 0, got {w}")
    return mix


def resolve_mix(mix: dict[str, float], found: dict[str, list[Shard]]) -> dict[str, float]:
    """Normalised weights; none given: every kind found that has a formatter, weighted by sample count."""
    if not mix:
        mix = {k: float(sum(s.nsamples for s in v)) for k, v in found.items() if k in formatters.REGISTRY}
    total = sum(mix.values())
    return {k: w / total for k, w in sorted(mix.items())}


# --- one kind ------------------------------------------------------------------------------------------

class _Slot:
    def __init__(self, seq: int, offset: int, it: Iterator[dict]):
        self.seq, self.offset, self.it = seq, offset, it


class KindStream:
    """The formatted samples of one kind for one (rank, logical worker), endless and positioned."""

    def __init__(self, kind: str, shards: list[Shard], cfg: DataConfig, ctx: FormatContext,
                 rank: int, world: int, worker: int, workers: int, state: dict | None = None):
        self.kind, self.cfg, self.ctx = kind, cfg, ctx
        self.formatter = formatters.get(kind)
        self.urls = [s.url for s in shards]
        self.rank, self.world, self.worker, self.workers = rank, world, worker, workers
        self._pass: tuple[int, list[str]] | None = None
        # every (rank, worker) needs a shard of its own in every pass; checked the same way on all of them
        if not cfg.resample and len(self.urls) < world * workers:
            raise ValueError(f"{kind}: {len(self.urls)} shards cannot be split over {world} ranks x "
                             f"{workers} workers without resampling; use fewer workers or --resample")
        r = cfg.interleave
        state = state or {"next": r, "slots": [[i, 0] for i in range(r)], "draws": 0}
        self.next_seq, self.draws = state["next"], state["draws"]
        self.slots = [_Slot(seq, off, self._open(seq, off)) for seq, off in state["slots"]]
        self.bad = 0

    def state(self) -> dict:
        return {"next": self.next_seq, "slots": [[s.seq, s.offset] for s in self.slots], "draws": self.draws}

    def _mine(self, p: int) -> list[str]:
        """Pass p's shards for this rank and worker: one shuffle per pass, split by node, then by worker."""
        if self._pass is None or self._pass[0] != p:
            order = list(self.urls)
            random.Random(make_seed(self.cfg.seed, self.kind, "pass", p)).shuffle(order)
            self._pass = (p, order[self.rank::self.world][self.worker::self.workers])
        return self._pass[1]

    def _url(self, seq: int) -> str:
        if self.cfg.resample:
            rng = random.Random(make_seed(self.cfg.seed, self.kind, self.rank, self.worker, "shard", seq))
            return self.urls[rng.randrange(len(self.urls))]
        per_pass = len(self._mine(0))  # the same for every pass: only the order changes
        return self._mine(seq // per_pass)[seq % per_pass]

    def _open(self, seq: int, skip: int) -> Iterator[dict]:
        url = self._url(seq)
        for i, sample in enumerate(iter_shard(url, log_and_continue)):
            if i >= skip:  # resuming: samples already taken are read past, not decoded
                yield sample

    def next(self) -> Formatted:
        empty_in_a_row = 0
        while True:
            seed = make_seed(self.cfg.seed, self.kind, self.rank, self.worker, "draw", self.draws)
            k = random.Random(seed).randrange(len(self.slots))
            self.draws += 1
            slot = self.slots[k]
            raw = next(slot.it, None)
            if raw is None:  # shard done (or unreadable): the next shard in the order takes its place
                empty_in_a_row += 1
                if empty_in_a_row > 4 * len(self.urls) + 4 * len(self.slots):
                    raise RuntimeError(f"{self.kind}: no readable sample in any shard")
                self.slots[k] = _Slot(self.next_seq, 0, self._open(self.next_seq, 0))
                self.next_seq += 1
                continue
            empty_in_a_row = 0
            slot.offset += 1
            try:
                return self.formatter.format(raw, self.ctx)
            except Exception as exn:  # noqa: BLE001 - one bad sample must not stop a run
                self.bad += 1
                if self.bad <= 20 or self.bad % 100 == 0:
                    log.warning("skipping bad %s sample %s in %s (%d so far): %r", self.kind,
                                raw.get("__key__"), raw.get("__url__"), self.bad, exn)


class MixedStream:
    """Samples drawn from the kinds by weight; draw i uses its own seeded generator (position = a count)."""

    def __init__(self, streams: dict[str, KindStream], weights: dict[str, float], seed: int, rank: int,
                 worker: int, count: int = 0):
        self.streams, self.seed, self.rank, self.worker, self.count = streams, seed, rank, worker, count
        self.kinds = list(weights)
        self.cum = []
        acc = 0.0
        for k in self.kinds:
            acc += weights[k]
            self.cum.append(acc)

    def next(self) -> Formatted:
        seed = make_seed(self.seed, "mix", self.rank, self.worker, self.count)
        u = random.Random(seed).random() * self.cum[-1]
        self.count += 1
        kind = next((k for k, c in zip(self.kinds, self.cum) if u < c), self.kinds[-1])
        return self.streams[kind].next()

    def state(self) -> dict:
        return {"count": self.count, "kinds": {k: s.state() for k, s in self.streams.items()}}


def batch_stream(cfg: DataConfig, found: dict[str, list[Shard]], weights: dict[str, float],
                 tok: TextTokenizer, rank: int, world: int, worker: int, workers: int,
                 state: dict | None) -> Packer:
    """The packed batches of one (rank, logical worker), starting at `state` (None: the beginning)."""
    ctx = FormatContext(tok, cfg.image, cfg.seq_len)
    state = state or {"count": 0, "kinds": {}}
    streams = {k: KindStream(k, found[k], cfg, ctx, rank, world, worker, workers, state["kinds"].get(k))
               for k in weights}
    mixed = MixedStream(streams, weights, cfg.seed, rank, worker, state["count"])
    return Packer(mixed.next, mixed.state, cfg.rows, cfg.seq_len, tok, cfg.pack, cfg.image.merge_size)


class _EpochDataset(torch.utils.data.IterableDataset):
    """Batches start .. start+count-1 of one rank, split over the DataLoader's workers round-robin."""

    def __init__(self, cfg, found, weights, tok, rank, world, start, count, cursors):
        super().__init__()
        self.cfg, self.found, self.weights, self.tok = cfg, found, weights, tok
        self.rank, self.world, self.start, self.count, self.cursors = rank, world, start, count, cursors

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (w + self.start) % n  # rotate: the first worker to be asked plays batch `start`'s maker
        first = self.start + (logical - self.start) % n
        packer = batch_stream(self.cfg, self.found, self.weights, self.tok, self.rank, self.world, logical, n,
                              self.cursors.get(logical))
        for g in range(first, self.start + self.count, n):
            batch = packer.next_batch()
            batch["index"], batch["worker"], batch["cursor"] = g, logical, packer.cursor()
            yield batch


class ShardLoader:
    """Endless iterator of this rank's batches, in epochs of `epoch_batches`; state_dict() is its position."""

    def __init__(self, cfg: DataConfig, tok: TextTokenizer, rank: int = 0, world: int = 1,
                 epoch_batches: int | None = None, pin_memory: bool = False):
        self.cfg, self.tok, self.rank, self.world, self.pin_memory = cfg, tok, rank, world, pin_memory
        self.found = find_kinds(cfg.shards, list(cfg.mix) or None)
        self.weights = resolve_mix(cfg.mix, self.found)
        self.samples = sum(s.nsamples for k in self.weights for s in self.found[k])
        # with_epoch: a nominal epoch is one batch row per sample, the same count on every rank, so no rank
        # waits in an all-reduce for a batch that never comes
        self.epoch_batches = epoch_batches or max(1, -(-self.samples // (world * cfg.rows)))
        self.batches = 0
        self.cursors: dict[int, dict] = {}

    @property
    def logical_workers(self) -> int:
        return max(1, self.cfg.workers)

    def describe(self) -> dict:
        kinds = {k: {"weight": round(w, 4), "shards": len(self.found[k]),
                     "samples": sum(s.nsamples for s in self.found[k])} for k, w in self.weights.items()}
        return {"kinds": kinds, "epoch_batches": self.epoch_batches}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "workers": self.logical_workers, "epoch_batches": self.epoch_batches,
                "cursors": {str(k): v for k, v in self.cursors.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["workers"] != self.logical_workers:
            raise ValueError(f"checkpoint was written with {state['workers']} data workers; resume with "
                             f"--workers {state['workers']} (the data position is per worker)")
        self.batches, self.epoch_batches = state["batches"], state["epoch_batches"]
        self.cursors = {int(k): v for k, v in state["cursors"].items()}

    def __iter__(self) -> Iterator[dict]:
        while True:
            start = self.batches
            count = self.epoch_batches - start % self.epoch_batches
            ds = _EpochDataset(self.cfg, self.found, self.weights, self.tok, self.rank, self.world, start,
                               count, dict(self.cursors))
            if self.cfg.workers > 0:
                it = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.workers,
                                                 pin_memory=self.pin_memory, prefetch_factor=4)
            else:
                it = ds
            for batch in it:
                if batch["index"] != self.batches:
                    raise RuntimeError(f"batch {batch['index']} arrived when {self.batches} was due")
                self.cursors[batch.pop("worker")] = batch.pop("cursor")
                self.batches += 1
                yield batch
