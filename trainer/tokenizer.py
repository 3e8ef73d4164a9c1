"""The text tokenizer: byte-level BPE (the `tokenizers` library) with the vision special tokens.

Either trained offline on shard text (`python -m trainer.tokenizer`, or by `python -m trainer` on its
first run) or loaded from an existing `tokenizer.json`; the special tokens are added when missing. The
tokenizer is saved beside the checkpoints, so a resumed or evaluated model always reads the same ids.

Text from the shards is encoded with special-token parsing switched off: a caption that happens to contain
"<|image|>" must not become an image placeholder and break the image/feature alignment.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
BEGIN_IMAGE = "<|begin_of_image|>"
IMAGE = "<|image|>"
END_IMAGE = "<|end_of_image|>"
BEGIN_VIDEO = "<|begin_of_video|>"
END_VIDEO = "<|end_of_video|>"
BEGIN_BOX = "<|begin_of_box|>"
END_BOX = "<|end_of_box|>"
SPECIAL_TOKENS = [EOS, PAD, BEGIN_IMAGE, IMAGE, END_IMAGE, BEGIN_VIDEO, END_VIDEO, BEGIN_BOX, END_BOX]


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens. Picklable (for DataLoader workers)."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        tok.encode_special_tokens = True  # shard text never produces special ids (see module docstring)
        self._tok = tok
        self._json = tok.to_str()
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.eos_id, self.pad_id = ids[EOS], ids[PAD]
        self.begin_image_id, self.image_id, self.end_image_id = ids[BEGIN_IMAGE], ids[IMAGE], ids[END_IMAGE]
        self.begin_video_id, self.end_video_id = ids[BEGIN_VIDEO], ids[END_VIDEO]
        self.begin_box_id, self.end_box_id = ids[BEGIN_BOX], ids[END_BOX]

    @classmethod
    def from_file(cls, path: str) -> TextTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls(f.read())

    def __getstate__(self):
        return {"json": self._json}

    def __setstate__(self, state):
        self.__init__(state["json"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def structural_ids(self) -> frozenset[int]:
        """Ids that frame images and videos: never a loss target (their place is fixed by the data)."""
        return frozenset({self.pad_id, self.begin_image_id, self.image_id, self.end_image_id,
                          self.begin_video_id, self.end_video_id})

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._json

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._json)
        os.replace(tmp, path)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE on `texts`; special tokens take ids 0..8. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        # every byte is a token: no text is ever unknown
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok.to_str())


def shard_texts(shards_root: str, kinds: list[str] | None = None, limit: int = 100_000) -> Iterable[str]:
    """Up to `limit` training texts from the shards, in shard order (deterministic), kinds round-robin."""
    from trainer import formatters, shards

    lists = shards.find_kinds(shards_root, kinds)
    iters = {k: shards.iter_raw_samples([s.url for s in found]) for k, found in lists.items()}
    n = 0
    while iters and n < limit:
        for kind in list(iters):
            try:
                sample = next(iters[kind])
            except StopIteration:
                del iters[kind]
                continue
            try:
                texts = formatters.get(kind).texts(sample)
            except Exception:  # noqa: BLE001, S112 - a malformed sample has no text; the loader logs it later
                continue
            for text in texts:
                if text:
                    yield text
                    n += 1


def load_or_train(path: str | None, shards_root: str, kinds: list[str] | None, vocab_size: int,
                  samples: int) -> TextTokenizer:
    if path:
        return TextTokenizer.from_file(path)
    return train_bpe(shard_texts(shards_root, kinds, samples), vocab_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.tokenizer",
                                description="Train the byte-level BPE tokenizer on shard text, offline.")
    p.add_argument("--shards", required=True,
                   help="OUT/shards (kind folders inside) or one kind's folder; s3:// works")
    p.add_argument("--kinds", default=None, help="comma-separated kinds to read (default: every kind found)")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary, special tokens included")
    p.add_argument("--samples", type=int, default=100_000, help="read at most this many texts")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",") if args.kinds else None
    tok = train_bpe(shard_texts(args.shards, kinds, args.samples), args.vocab_size)
    tok.save(args.out)
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
