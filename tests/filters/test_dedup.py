"""Dedup: recall and precision on transformed copies of real photos; exact candidate generation at
bucket sizes the old LSH dropped; the second tier; keeper-centred groups that do not chain."""
from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import ImageDraw, ImageEnhance
from pyspark.sql import Row

from filters.decode import Decode
from filters.dedup import (
    Dedup,
    _partition_edges,
    _shard_edges,
    blocks,
    covering_masks,
    find_duplicates,
    find_duplicates_with_stats,
    pairs_within,
)
from jobs.make_sample import PHOTOS, load_photo


def _jpeg(img, q=90):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def _watermark(img):
    img = img.convert("RGB").copy()
    w, h = img.size
    ImageDraw.Draw(img).text((w * 0.55, h * 0.88), "(c) photo-agency.example 2026", fill=(255, 255, 255))
    return img


def _crop(img, f):
    w, h = img.size
    return img.crop((int(w * f), int(h * f), w - int(w * f), h - int(h * f)))


def _png(img):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


TRANSFORMS = {
    "reencoded": lambda im: _jpeg(im, 35),
    "resized": lambda im: _jpeg(im.resize((im.width // 2, im.height // 2))),
    "cropped": lambda im: _jpeg(_crop(im, 0.02)),
    "brighter": lambda im: _jpeg(ImageEnhance.Brightness(im.convert("RGB")).enhance(1.25)),
    "watermarked": lambda im: _jpeg(_watermark(im)),
    "png": _png,
}


@pytest.fixture(scope="module")
def corpus(spark):
    rows, family = [], {}
    for name in PHOTOS:
        img = load_photo(name)
        items = {f"{name}": _jpeg(img), f"{name}~exact": _jpeg(img)}
        items.update({f"{name}~{t}": fn(img) for t, fn in TRANSFORMS.items()})
        for key, data in items.items():
            rows.append({"sample_id": key, "image": data, "error": None, "error_detail": None})
            family[key] = name
    feats = Decode().apply(pa.RecordBatch.from_pylist(rows)).to_pylist()
    df = spark.createDataFrame(
        [(r["sample_id"], r["content_sha"], r["phash"], r["phash256"], r["width"], r["height"]) for r in feats],
        "sample_id string, content_sha string, phash long, phash256 binary, width int, height int")
    return df, family


def test_near_duplicate_recall_and_precision(corpus):
    df, family = corpus
    drops = [Row(sample_id=i, reason=r, duplicate_of=d) for i, r, d in _both_paths(df, Dedup())]
    dropped = {r.sample_id: r for r in drops}
    assert len(dropped) == len(drops), "an item was dropped twice"
    wrong = [(r.sample_id, r.duplicate_of) for r in drops if family[r.sample_id] != family[r.duplicate_of]]
    precision = 1 - len(wrong) / max(1, len(drops))
    should_drop = len(family) - len(PHOTOS)  # one survivor per family
    recall = sum(1 for r in drops if family[r.sample_id] == family[r.duplicate_of]) / should_drop
    print(f"dedup precision={precision:.3f} recall={recall:.3f} on {len(family)} images")
    assert precision == 1.0, wrong
    assert recall >= 0.98
    # survivors: exactly one per family, and the keeper is never itself dropped
    assert all(r.duplicate_of not in dropped for r in drops)
    assert {family[k] for k in family if k not in dropped} == set(PHOTOS)


def test_exact_duplicates_are_reported_as_exact(corpus):
    df, _ = corpus
    drops = {i: Row(sample_id=i, reason=r, duplicate_of=d) for i, r, d in _both_paths(df, Dedup(near=False))}
    assert set(drops) == {f"{n}~exact" for n in PHOTOS}
    assert all(r.reason == "exact_duplicate" for r in drops.values())


def test_keeper_is_the_largest_image(corpus):
    df, _ = corpus
    drops = {r.sample_id: r for r in find_duplicates(df, Dedup()).collect()}
    assert drops["astronaut~resized"].duplicate_of != "astronaut~resized"
    assert "~resized" not in drops["astronaut~resized"].duplicate_of


# --- synthetic hashes ----------------------------------------------------------------------------

def _signed(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _flip(value: int, positions) -> int:
    for p in positions:
        value ^= 1 << p
    return value


def _frame(spark, rows):
    """rows: (sample_id, phash as unsigned int, 32-byte signature, pixels)"""
    return spark.createDataFrame(
        [(sid, f"sha-{sid}", _signed(h), sig, px, 1, 1000) for sid, h, sig, px in rows],
        "sample_id string, content_sha string, phash long, phash256 binary, width int, height int, source_bytes long")


def _both_paths(df, cfg: Dedup) -> list:
    """The drops of the driver path (few items) and of the Spark path (local_items=0), which must agree."""
    import dataclasses

    def rows(c):
        drops, stats = find_duplicates_with_stats(df, c)
        return sorted(tuple(r) for r in drops.collect()), (stats.skipped, stats.edges)

    on_driver, spark_path = rows(cfg), rows(dataclasses.replace(cfg, local_items=0))
    assert on_driver == spark_path
    return on_driver[0]


def _drops(spark, rows, cfg=None):
    return {sid: dup for sid, _, dup in _both_paths(_frame(spark, rows), cfg or Dedup())}


@pytest.mark.parametrize("parts,bits", [(1, 64), (2, 64), (2, 58), (3, 58), (4, 59)])
def test_covering_masks_leave_every_radius_set_out_of_some_mask(parts, bits):
    import random

    rng = random.Random(3)
    masks = [int(m) for m in covering_masks(10, parts, bits)]
    assert all(m >> bits == 0 for m in masks)
    for k in (10, 10, 9, 7):
        for _ in range(1500):
            diff = sum(1 << p for p in rng.sample(range(bits), k))
            assert any(m & diff == 0 for m in masks)


@pytest.mark.parametrize("parts,bits", [(0, 64), (1, 64), (2, 64), (3, 64), (2, 58), (3, 58), (4, 59)])
def test_pairs_within_matches_brute_force(parts, bits):
    import numpy as np

    rng = np.random.default_rng(parts)
    h = rng.integers(0, 1 << (bits - 2), 3000, dtype=np.int64).view(np.uint64) << np.uint64(rng.integers(0, 3))
    for i in range(0, 600, 2):  # planted pairs at distances 0..12
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(p) for p in rng.choice(bits, i % 13, replace=False)))
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    want = set(zip(*np.nonzero(np.triu(d <= 10, 1))))
    assert set(zip(*pairs_within(h, 10, parts, bits))) == want


def test_items_without_a_content_hash_are_never_exact_duplicates(spark):
    """Both paths: a null content hash equals no other (a window would put all nulls in one group)."""
    rows = [(f"n{i}", None, i << 20, bytes(32), 100, 100, 1000) for i in range(4)]
    rows += [("s0", "sha-a", 1 << 40, bytes(32), 100, 100, 1000), ("s1", "sha-a", 1 << 41, bytes(32), 50, 50, 900)]
    df = spark.createDataFrame(rows, "sample_id string, content_sha string, phash long, phash256 binary, "
                                     "width int, height int, source_bytes long")
    assert _both_paths(df, Dedup(near=False)) == [("s1", "exact_duplicate", "s0")]


def test_shards_split_across_batches_give_the_same_pairs_as_whole_shards():
    """A partition holds many (block, value) shards in sorted runs that batches cut anywhere: each run is
    gathered whole, so the pairs equal those of every shard handed over on its own."""
    import numpy as np

    rng = np.random.default_rng(5)
    radius, rows = 4, []
    for block, value, size in ((0, 3, 1), (0, 5, 300), (1, 5, 2), (2, 0, 257), (2, 1, 40)):
        base = rng.integers(0, 1 << 62, size, dtype=np.int64)
        base[1::2] = base[0::2][: len(base[1::2])] ^ 0b1011  # planted pairs at distance 3
        rows += [(block, value, int(k), int(h), rng.bytes(32)) for k, h in zip(rng.integers(0, 1 << 62, size), base)]
    table = pa.table({name: col for name, col in zip(("block", "value", "key", "phash", "phash256"), zip(*rows))})
    want = set()
    for (block, value) in {(r[0], r[1]) for r in rows}:
        shard = table.filter(pa.compute.and_(pa.compute.equal(table["block"], block),
                                             pa.compute.equal(table["value"], value)))
        out = _shard_edges(radius, None, shard)
        want |= set(zip(out["a"].to_pylist(), out["b"].to_pylist()))
    assert len(want) > 100
    for size in (1, 7, 128, 1000):
        got = set()
        for b in _partition_edges(radius, None, iter(table.to_batches(max_chunksize=size))):
            got |= set(zip(b.column("a").to_pylist(), b.column("b").to_pylist()))
        assert got == want


def test_a_bucket_larger_than_the_old_cap_still_finds_its_pairs(spark):
    """6,000 hashes share their low 16 bits (the old 8-bit bands 0 and 1 held 6,000 > max_bucket 5,000
    and were dropped); each planted pair differs in every other byte, so it shared no band at all."""
    import random

    rng = random.Random(11)
    rows, pairs = [], {}
    for i in range(6000):
        h = rng.getrandbits(48) << 16
        rows.append((f"b{i:05d}", h, rng.randbytes(32), 100))
    for i in range(0, 40, 2):
        sid, h, sig, _ = rows[i]
        copy = _flip(h, [16, 24, 32, 40, 48, 56, 17, 25])  # distance 8, one flip in each of bytes 2..7
        rows.append((f"{sid}~copy", copy, sig, 50))
        pairs[f"{sid}~copy"] = sid
    drops = _drops(spark, rows)
    assert {k: drops.get(k) for k in pairs} == pairs


def test_a_pair_at_exactly_the_radius_is_always_found(spark):
    import random

    rng = random.Random(5)
    rows, pairs = [], {}
    for i in range(300):
        rows.append((f"r{i:04d}", rng.getrandbits(64), rng.randbytes(32), 100))
    for i in range(100):
        sid, h, sig, _ = rows[i]
        # the first one touches every byte (the old 8 bands all differ); the rest are random
        flips = [0, 8, 16, 24, 32, 40, 48, 56, 1, 9] if i == 0 else rng.sample(range(64), 10)
        rows.append((f"{sid}~d10", _flip(h, flips), sig, 50))
        pairs[f"{sid}~d10"] = sid
    drops = _drops(spark, rows)
    assert {k: drops.get(k) for k in pairs} == pairs
    assert set(drops) == set(pairs)


def test_items_sharing_a_join_key_make_no_false_pairs(spark, monkeypatch):
    """The shuffle carries a 64-bit hash of each item instead of its rank key; with that hash forced
    into 3 values (every item shares it with a third of the others) the pairs are the same."""
    import random

    from filters import dedup

    rng = random.Random(21)
    rows = [(f"k{i:03d}", rng.getrandbits(64), rng.randbytes(32), 100) for i in range(200)]
    for i in range(30):
        sid, h, sig, _ = rows[i]
        far_sig = bytes(b ^ 0xFF for b in sig) if i % 3 == 0 else sig  # every third: near in pHash only
        rows.append((f"{sid}~c", _flip(h, rng.sample(range(64), i % 11)), far_sig, 50))
    want = _drops(spark, rows)
    assert len(want) == 20
    monkeypatch.setattr(dedup, "_join_key", lambda F: F.xxhash64("rank_key") % 3)
    assert _drops(spark, rows) == want


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_small_radii(spark, radius):
    import random

    rng = random.Random(radius)
    rows = [(f"s{i:03d}", rng.getrandbits(64), b"\x11" * 32, 100) for i in range(50)]
    rows += [("s000~0", rows[0][1], b"\x11" * 32, 50), ("s001~1", _flip(rows[1][1], [7]), b"\x11" * 32, 50),
             ("s002~3", _flip(rows[2][1], [1, 30, 63]), b"\x11" * 32, 50)]
    want = {"s000~0": "s000", "s001~1": "s001", "s002~3": "s002"}
    got = _drops(spark, rows, Dedup(hamming_radius=radius))
    assert got == {k: v for k, v in want.items() if int(k[-1]) <= radius}


def test_unrelated_items_near_in_phash_but_far_in_the_second_tier_are_kept(spark):
    import random

    rng = random.Random(9)
    h = rng.getrandbits(64)
    rows = [("u1", h, b"\x00" * 32, 100), ("u2", _flip(h, [3, 30, 60]), b"\xff" * 32, 50),
            ("c1", h ^ 0xFFFF, b"\x0f" * 32, 100), ("c2", h ^ 0xFFFE, b"\x0f" * 31 + b"\x0e", 50)]
    assert _drops(spark, rows) == {"c2": "c1"}  # c1/c2: near in both tiers; u1/u2: pHash only
    assert _drops(spark, rows, Dedup(second_tier=False)) == {"c2": "c1", "u2": "u1"}


def _chain(length=7, step=6):
    """Items a0..a6, each `step` pHash bits from the next (so 2*step = 12 > 10 from the one after
    that), ranked along the chain (a0 has the most pixels); all share one signature."""
    rows = []
    for i in range(length):
        rows.append((f"a{i}", _flip(0x0123456789ABCDEF, range(step * i)), b"\x5a" * 32, 1000 - i))
    return rows


def test_a_chain_of_overlapping_items_drops_only_items_within_radius_of_their_keeper(spark):
    rows = _chain()
    drops = _drops(spark, rows)
    # greedy in rank order: a0 kept, a1 dropped for it; a2 (its only better neighbour dropped) kept ...
    assert drops == {"a1": "a0", "a3": "a2", "a5": "a4"}
    hashes = {sid: h for sid, h, _, _ in rows}
    assert all((hashes[d] ^ hashes[k]).bit_count() <= 10 for d, k in drops.items())


def test_keeper_rounds_that_run_out_are_counted_not_dropped(spark):
    drops, stats = find_duplicates_with_stats(_frame(spark, _chain()), Dedup(max_rounds=1, local_edges=0, local_items=0))
    got = {r.sample_id: r.duplicate_of for r in drops.collect()}
    assert got == {"a1": "a0"}  # round 1 decides a0 (kept) and a1 (dropped); a2..a6 are left undecided
    assert stats.skipped == 5 and stats.rounds == 1
    full = find_duplicates_with_stats(_frame(spark, _chain()), Dedup())[1]
    assert full.skipped == 0 and full.edges == 6


def test_keepers_on_the_driver_equal_the_spark_rounds(spark):
    """The one-pass greedy on the driver and the Spark rounds give the same states, on a chain and on
    random graphs oriented by a random rank (many overlapping groups)."""
    import random

    from filters.dedup import _keepers

    rng = random.Random(7)
    graphs = [[(f"a{i}", f"a{i + 1}") for i in range(9)]]
    for _ in range(3):
        rank = rng.sample(range(60), 60)
        pairs = {tuple(sorted(rng.sample(range(60), 2))) for _ in range(90)}
        graphs.append([(f"n{a}", f"n{b}") if rank[a] < rank[b] else (f"n{b}", f"n{a}") for a, b in pairs])
    for edges in graphs:
        frame = spark.createDataFrame(edges, "src string, dst string")
        local, rounds_local, left_local = _keepers(frame, max_rounds=50)
        spark_state, rounds, left = _keepers(frame, max_rounds=50, local_edges=0)
        assert {r.node: r.state for r in local.collect()} == {r.node: r.state for r in spark_state.collect()}
        assert left_local == left == 0 and rounds_local == 1 and rounds >= 1


def test_blocks_cover_64_bits_with_radius_plus_one_blocks():
    bs = blocks(10)
    assert len(bs) == 11 and sum(w for _, w in bs) == 64 and bs[-1][0] + bs[-1][1] == 64
