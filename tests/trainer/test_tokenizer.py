"""The tokenizer: byte-level BPE trained on shard text; the vision special tokens are single tokens."""
from __future__ import annotations

import json

from trainer.tokenizer import SPECIAL_TOKENS, TextTokenizer, main


def test_special_tokens_are_single_tokens(tok):
    ids = [tok._tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(SPECIAL_TOKENS)
    for t, i in zip(SPECIAL_TOKENS, ids):
        assert tok.decode([i]) == t


def test_byte_level_never_meets_an_unknown_character(tok):
    text = "Zürich 東京 🚀 naïve"
    assert tok.decode(tok.encode(text)) == text


def test_an_existing_tokenizer_gets_the_missing_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False)
    other.train_from_iterator(["just some text", "more text here"], trainer)
    assert other.token_to_id("<|image|>") is None
    loaded = TextTokenizer(other.to_str())
    for t in SPECIAL_TOKENS:
        assert len({loaded._tok.token_to_id(t)} - {None}) == 1
    assert loaded.decode([loaded.image_id]) == "<|image|>"
    assert loaded.decode([loaded.begin_box_id]) == "<|begin_of_box|>"
    assert loaded.image_id >= other.get_vocab_size()  # appended after the existing vocabulary


def test_cli_trains_on_the_shards(shards_root, tmp_path, capsys):
    out = tmp_path / "tok.json"
    assert main(["--shards", shards_root, "--out", str(out), "--vocab-size", "300"]) == 0
    t = TextTokenizer.from_file(str(out))
    assert json.loads(capsys.readouterr().out)["vocab_size"] == t.vocab_size
    # the captions' words became merges: a common word is one token
    assert len(t.encode(" background")) == 1
