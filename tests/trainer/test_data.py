"""The loader: shard lists, determinism, exact positions, epochs, rank split, mixing, bad samples, S3."""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter

import pytest
import torch

from trainer.data import DataConfig, KindStream, ShardLoader, parse_mix, resolve_mix
from trainer.formatters import FormatContext
from trainer.images import ImageConfig
from trainer.shards import find_kinds, shard_list

IMG = ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784)


def cfg(root, **kw) -> DataConfig:
    base = {"shards": root, "mix": {"image_text": 1.0}, "seq_len": 96, "rows": 2, "workers": 0, "image": IMG,
            "interleave": 2}
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batch(a, b) -> bool:
    keys = ("input_ids", "labels", "position_ids", "segment_ids", "pixel_values")
    return all(torch.equal(a[k], b[k]) for k in keys) and a["image_sizes"] == b["image_sizes"]


def test_shard_list_from_index_json_or_sizes_json(shards_root, tmp_path):
    folder = os.path.join(shards_root, "image_text")
    from_index = shard_list(folder)
    assert [os.path.basename(s.url) for s in from_index] == [f"image_text-00000{i}.tar" for i in range(3)]
    assert sum(s.nsamples for s in from_index) == 24
    copy = tmp_path / "image_text"
    shutil.copytree(folder, copy)
    os.remove(copy / "index.json")
    from_sizes = shard_list(str(copy))
    assert [(os.path.basename(s.url), s.nsamples) for s in from_sizes] == \
           [(os.path.basename(s.url), s.nsamples) for s in from_index]
    # pointing at one kind's folder works too
    assert list(find_kinds(str(copy))) == ["image_text"]
    assert sorted(find_kinds(shards_root)) == ["grounding", "image_text"]
    with pytest.raises(FileNotFoundError, match="video"):
        find_kinds(shards_root, ["video"])


def test_mix_from_flag_or_file(tmp_path):
    assert parse_mix("image_text=3,grounding=1") == {"image_text": 3.0, "grounding": 1.0}
    (tmp_path / "mix.yaml").write_text("trainer:\n  mix:\n    image_text: 2\n    ocr: 1\n")
    assert parse_mix(str(tmp_path / "mix.yaml")) == {"image_text": 2.0, "ocr": 1.0}
    with pytest.raises(KeyError):
        parse_mix("audio=1")
    with pytest.raises(ValueError):
        parse_mix("image_text=0")


def test_default_mix_weights_kinds_by_sample_count(shards_root):
    w = resolve_mix({}, find_kinds(shards_root))
    assert w == pytest.approx({"grounding": 8 / 32, "image_text": 24 / 32})


def test_same_seed_same_batches_other_seed_other_batches(shards_root, tok):
    a = take(ShardLoader(cfg(shards_root), tok), 3)
    b = take(ShardLoader(cfg(shards_root), tok), 3)
    c = take(ShardLoader(cfg(shards_root, seed=1), tok), 3)
    assert all(same_batch(x, y) for x, y in zip(a, b))
    assert not all(same_batch(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_gives_the_same_next_batches(shards_root, tok, workers):
    c = cfg(shards_root, workers=workers, mix={"image_text": 3.0, "grounding": 1.0})
    straight = take(ShardLoader(c, tok, epoch_batches=3), 8)
    first = ShardLoader(c, tok, epoch_batches=3)
    take(first, 5)  # stop mid-epoch, on an odd batch: the next one is logical worker 1's turn
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint as plain data
    second = ShardLoader(c, tok, epoch_batches=3)
    second.load_state_dict(state)
    rest = take(second, 3)
    assert all(same_batch(x, y) for x, y in zip(straight[5:], rest))


def test_resume_refuses_another_worker_count(shards_root, tok):
    first = ShardLoader(cfg(shards_root, workers=2), tok)
    with pytest.raises(ValueError, match="workers"):
        ShardLoader(cfg(shards_root, workers=3), tok).load_state_dict(first.state_dict())


def test_with_epoch_every_rank_gets_the_same_number_of_batches(shards_root, tok):
    # rank 0 and rank 1 of 2 see different samples but exactly epoch_batches batches per epoch
    loaders = [ShardLoader(cfg(shards_root), tok, rank=r, world=2) for r in range(2)]
    assert loaders[0].epoch_batches == loaders[1].epoch_batches == 24 // (2 * 2)
    firsts = [take(ld, 2)[0] for ld in loaders]
    assert not same_batch(*firsts)
    for ld in loaders:
        ld.batches = 0
        ld.cursors = {}
    counts = []
    for ld in loaders:
        it = iter(ld)
        n = 0
        while ld.batches < ld.epoch_batches:
            next(it)
            n += 1
        counts.append(n)
    assert counts == [6, 6]


def test_without_resampling_ranks_and_workers_split_the_shards(shards_root, tok):
    found = find_kinds(shards_root, ["image_text"])["image_text"]
    ctx = FormatContext(tok, IMG, 96)
    c = cfg(shards_root, resample=False)
    mine = [KindStream("image_text", found, c, ctx, rank=r, world=3, worker=0, workers=1)._mine(0)
            for r in range(3)]
    assert sorted(u for m in mine for u in m) == sorted(s.url for s in found)  # disjoint and complete
    nxt = KindStream("image_text", found, c, ctx, rank=0, world=3, worker=0, workers=1)._mine(1)
    assert len(nxt) == 1  # the next pass: a fresh shuffle, the same share
    with pytest.raises(ValueError, match="resample"):
        KindStream("image_text", found, c, ctx, rank=0, world=2, worker=0, workers=2)


def test_a_bad_sample_is_logged_and_skipped(shards_root, tok, caplog):
    caplog.set_level(logging.WARNING, logger="trainer.data")
    batches = take(ShardLoader(cfg(shards_root, interleave=1, rows=8, seq_len=256), tok), 2)
    assert any("skipping bad image_text sample 0000000000000005" in r.getMessage() for r in caplog.records)
    assert sum(b["stats"]["samples"] for b in batches) > 20


def test_kinds_are_mixed_by_weight(shards_root, tok):
    c = cfg(shards_root, mix={"image_text": 3.0, "grounding": 1.0}, rows=4, seq_len=256)
    kinds = Counter()
    for b in take(ShardLoader(c, tok), 8):
        kinds.update(b["stats"]["kinds"])
    share = kinds["grounding"] / sum(kinds.values())
    assert 0.1 < share < 0.45, kinds


def test_packing_cuts_padding(shards_root, tok):
    packed = take(ShardLoader(cfg(shards_root, rows=4, seq_len=256), tok), 3)
    single = take(ShardLoader(cfg(shards_root, rows=4, seq_len=256, pack=False), tok), 3)
    pad = [sum(b["stats"]["pad"] for b in bs) / (3 * 4 * 256) for bs in (packed, single)]
    assert all(b["stats"]["samples"] == 4 for b in single)
    assert pad[0] < 0.25 < pad[1]
    assert all(b["input_ids"].shape == (4, 256) for b in packed + single)  # fixed shape either way


def test_reads_shards_from_s3(shards_root, tok, monkeypatch):
    import moto  # a dev dependency (pyproject [dev]): an in-process S3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    from trainer import shards

    with moto.mock_aws():
        shards._s3_client.cache_clear()
        client = shards.s3_client()
        client.create_bucket(Bucket="bkt")
        for kind in ("image_text", "grounding"):
            for name in os.listdir(os.path.join(shards_root, kind)):
                client.upload_file(os.path.join(shards_root, kind, name), "bkt", f"run/shards/{kind}/{name}")
        assert sorted(find_kinds("s3://bkt/run/shards")) == ["grounding", "image_text"]
        from_s3 = take(ShardLoader(cfg("s3://bkt/run/shards"), tok), 2)
    shards._s3_client.cache_clear()
    local = take(ShardLoader(cfg(shards_root), tok), 2)
    assert all(same_batch(x, y) for x, y in zip(from_s3, local))
