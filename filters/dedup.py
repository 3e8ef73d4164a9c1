"""Image dedup across the whole run: exact (content hash) then near (two perceptual hashes).

Reads `sample_id`, `content_sha`, `phash`, `phash256`, `width`, `height` (and `source_bytes`) of the rows
still in play; returns one row per dropped item: (`sample_id`, `reason`, `duplicate_of`).
`find_duplicates_with_stats` returns the same rows and a `DedupStats` (`skipped`: items left undecided,
kept, never dropped; surface it in summary.json and gate on it being 0).

Near duplicates: a pair is an edge when its 64-bit pHash is within `hamming_radius` (tier 1) AND its
256-bit dHash (`phash256`, same grey image, gradients instead of DCT) is within `second_radius` (tier 2).

Why two tiers. Two unrelated 64-bit hashes fall within 10 bits with p = 1.0e-8: at 1e9 items that is
~5.0e9 chance pairs, all of which one tier alone would drop. A chance pair must also be within 64 of
256 dHash bits: p = 2.4e-16 for independent bits, so ~1.2e-6 chance edges at 1e9 items (README). On the
real-photo transforms (tests/filters/test_dedup.py) copies that pass tier 1 measured <= 43 dHash bits
(all copies <= 49), distinct photos >= 84; dHash separated copies from distinct photos with a wider
margin than phash(hash_size=16) (copies <= 74, distinct >= 106, relative to its spread) or whash.

Candidate generation, exact at any scale (no bucket cap). The floor: for exact recall at radius r=10
with key bits k, an item needs >= C(64,10)/C(64-k,10) keys (a covering bound; 60 at k=20, 1,150 at
k=30), and Spark rows cost ~1 us each here, so the keys must not be Spark rows. The brief's
multi-index hashing (4 substrings of 16 bits, probe radius 2) is exact but quadratic: a random pair
is a candidate with p = 4*137/2^16 = 8.4e-3, i.e. 8,400 candidates per item at 1M and 8.4e6 at 1B;
6 substrings/radius 1 (66 probes, 11-bit buckets) and 11 substrings/radius 0 are worse still. So:

1. Spark, pigeonhole shards: the 64 bits are cut into r+1 = 11 blocks (5-6 bits); a pair within r
   bits agrees exactly on at least one block. Each item is emitted once per block (11 slim rows: block,
   value, a 64-bit join key, the pHash, the 32-byte signature; not the ~60-byte rank key) and grouped
   by (block, value): about 700 shards of n/64 items. A pair is reported only by the first block it
   agrees on, so no pair is reported twice.
2. numpy, inside each shard (`pairs_within`): covering masks (Pagh, "LSH without false negatives",
   SODA 2016) over the 58-59 bits left once the shard's own block (equal in all its rows) is squeezed
   out. The bits are cut into p parts with thresholds t_i summing to r+1, so some part holds <= t_i-1
   of the differing bits. Map that part's bit positions to vectors of GF(2)^t_i; for every non-zero v
   keep the positions whose vector has odd inner product with v. Any <= t-1 differing positions span
   < t dimensions, so some v is orthogonal to all of them and that mask keeps none of them: the pair
   has equal masked keys. Exact, no false negatives. p=3 (t = 4, 4, 3: 37 masks) for shards under 40k
   items, p=2 (t = 6, 5: 94 masks of >= 14 bits) up to ~2M, p=1 (2,047 masks, >= 18 bits kept) above;
   tiny shards brute force. The vectors are chosen to spread the kept bits evenly (fewer chance
   candidates). Equal keys are found by sorting; every candidate is checked in tier 1, and the
   signatures of the few rows in a pair are read to check tier 2.
3. The pairs' join keys are joined back to the items (a broadcast semi-join for up to 2M pairs) for
   their rank keys, and re-checked in both tiers on the joined rows' own hashes, so two items sharing a
   join key never make a false pair.
Cost per item: 11 slim Spark rows + 11 x (45-126 sorted keys + chance candidates, which grow with the
shard size B = n/64): measured 0.088 s per 15.6k-item shard (n = 1M), so a bit above linear in n;
from B ~ 2M (n ~ 128M) 11 x 2,047 sorted keys per item with < 1 chance candidate per item up to
n ~ 1e9: ~2 ms of one core per item at 1e9, the order of decoding the image.

No chaining: keeper-centred greedy in rank order (`_keepers`). In rank order (keeper rule below), an
item that no better-ranked keeper is an edge away from becomes a keeper; the others are dropped with
`duplicate_of` = the best-ranked keeper they share an edge with, so every dropped item is within both
radii of its keeper (connected components chained overlapping crops: 594 dropped for 200 copies).
This is the lexicographically-first maximal independent set, done in Spark rounds on the edge list:
a round makes keepers of undecided items whose better neighbours are all dropped and drops undecided
items with a keeper among their better neighbours. Rounds = the longest path of edges along which
rank strictly improves, halved: 1-2 for copies of one image; a chain of k crops ranked along the
chain needs k/2. After `max_rounds` the still-undecided items are kept and counted in `skipped`.
Up to `local_edges` pairs (most runs: ~1 per 1,000 images) the same greedy is walked once on the driver
in a topological order of the pairs, instead of two small Spark jobs a round.

Keeper rule, for both kinds of group: the member with the most pixels; then the one with the most
input bytes (the least compressed copy); then the smallest sample_id.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from filters.base import arrow_only
from schemas import image_text as S
from schemas.common import SAMPLE_ID

log = logging.getLogger(__name__)


LOCAL_EDGES = 500_000  # near pairs up to this many: keepers chosen on the driver in one pass, no Spark rounds
# items up to this many: their hashes (~150 bytes each) are fetched in one job and deduplicated on the driver
# with the same pair search and greedy (~1 s at 100k); the Spark path costs ~25 small jobs whatever n
LOCAL_ITEMS = 100_000


@dataclasses.dataclass(frozen=True)
class Dedup:
    exact: bool = True
    near: bool = True
    hamming_radius: int = 10  # tier 1, of the 64 pHash bits: transformed copies measured 0-10, distinct photos >= 20
    second_tier: bool = True  # confirm tier-1 pairs with phash256 (256-bit dHash); false only for data without it
    second_radius: int = 64  # tier 2, of the 256 dHash bits: copies measured <= 49, distinct photos >= 84
    max_rounds: int = 50  # keeper-selection rounds; items still undecided after them are kept, counted as skipped
    local_edges: int = LOCAL_EDGES  # up to this many near pairs, keepers are chosen on the driver (0: always rounds)
    local_items: int = LOCAL_ITEMS  # up to this many items in play, all of dedup runs on the driver (0: never)
    max_skipped: int = 0  # the run's quality gate fails when more candidates than this were left undecided


@dataclasses.dataclass(frozen=True)
class DedupStats:
    skipped: int = 0  # near-duplicate candidates left undecided (kept, not dropped) when max_rounds ran out
    edges: int = 0  # pairs within both tiers
    rounds: int = 0  # keeper-selection rounds run


def _rank_key(F, columns):
    # Sorts ascending with the keeper first: most pixels, then most bytes (the least compressed copy),
    # then the smallest sample_id.
    pixels = F.col(S.WIDTH).cast("long") * F.col(S.HEIGHT).cast("long")
    size = F.col(S.SOURCE_BYTES).cast("long") if S.SOURCE_BYTES in columns else F.lit(0).cast("long")
    return F.concat(F.lpad((F.lit(1 << 40) - pixels).cast("string"), 13, "0"), F.lit(":"),
                    F.lpad((F.lit(1 << 40) - size).cast("string"), 13, "0"), F.lit(":"), F.col(SAMPLE_ID))


def find_duplicates(df, cfg: Dedup):
    """DataFrame of (sample_id, reason, duplicate_of) for every exact or near duplicate in `df`."""
    return find_duplicates_with_stats(df, cfg)[0]


def find_duplicates_with_stats(df, cfg: Dedup):
    """(drops, DedupStats). Runs the near-duplicate keeper rounds eagerly (Spark jobs) to count them."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if cfg.near and cfg.second_tier and S.PHASH256 not in df.columns:
        raise ValueError(f"dedup: column {S.PHASH256!r} (computed by filters.decode.Decode) is missing; "
                         "set image_text.dedup.second_tier=false only for data that cannot have it")
    spark = df.sparkSession
    sig = F.col(S.PHASH256) if cfg.second_tier else F.lit(None).cast("binary")
    items = df.select(SAMPLE_ID, S.CONTENT_SHA, S.PHASH, sig.alias(S.PHASH256),
                      _rank_key(F, df.columns).alias("rank_key"))
    if (cfg.exact or cfg.near) and cfg.local_items > 0:
        few = items.limit(cfg.local_items + 1).toArrow()  # one job; a large run reads a bounded head only
        if few.num_rows <= cfg.local_items:
            return _on_driver(spark, few, cfg)
    drops = drops_frame(spark)
    stats = DedupStats()
    if cfg.exact:
        w = Window.partitionBy(S.CONTENT_SHA).orderBy("rank_key")
        # a window puts every null content hash in one partition: an item without one is its own keeper
        keeper = F.when(F.col(S.CONTENT_SHA).isNull(), F.col(SAMPLE_ID)).otherwise(F.first(SAMPLE_ID).over(w))
        ranked = items.withColumn("keeper", keeper)
        drops = ranked.filter(F.col("keeper") != F.col(SAMPLE_ID)).select(
            SAMPLE_ID, F.lit("exact_duplicate").alias("reason"), F.col("keeper").alias("duplicate_of"))
        items = ranked.filter(F.col("keeper") == F.col(SAMPLE_ID)).drop("keeper")
    if cfg.near:
        near, stats = _near_duplicates(items, cfg)
        drops = drops.unionByName(near)
    return drops, stats


# --- candidate generation ------------------------------------------------------------------------

def blocks(radius: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, width) of radius+1 blocks covering `bits` bits: a pair within `radius` bits agrees on one."""
    m = radius + 1
    if m > bits:
        raise ValueError(f"dedup.hamming_radius {radius} must be < {bits}")
    widths = [bits // m + (1 if i < bits % m else 0) for i in range(m)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def _mask(shift: int, width: int) -> int:
    return ((1 << width) - 1) << shift


def _parity(t: int, cols: np.ndarray) -> np.ndarray:
    """(2^t - 1, len(cols)) 0/1: row v-1 has a 1 where column c has an odd inner product with v."""
    vs = np.arange(1, 1 << t, dtype=np.int64)
    return (np.bitwise_count(vs[:, None] & np.asarray(cols, np.int64)[None, :]) & 1).astype(np.int64)


def _random_columns(width: int, t: int) -> np.ndarray:
    """Parity rows of the best of 64 seeded random column choices (largest minimum kept bits)."""
    rng = np.random.default_rng(12345 + width * 131 + t)
    best, best_kept = None, -1
    for _ in range(64):
        parity = _parity(t, rng.integers(1, 1 << t, size=width))
        kept = parity.sum(axis=1).min()
        if kept > best_kept:
            best, best_kept = parity, kept
    return best


def _balanced_columns(width: int, t: int, starts: int = 8, sweeps: int = 30) -> np.ndarray:
    """Parity rows of columns chosen by local search: change one column at a time to the vector that
    most lowers sum_v 2^-kept(v), until no change helps; the best of `starts` seeded starts."""
    table = _parity(t, np.arange(1, 1 << t))  # table[v-1, c-1]
    count = (1 << t) - 1
    best, best_cost = None, np.inf
    for start in range(starts):
        rng = np.random.default_rng(12345 + width * 131 + t * 7 + start)
        cols = rng.permutation(count)[:width] if width <= count else rng.integers(0, count, width)
        kept = table[:, cols].sum(axis=1)
        cost = np.exp2(-kept.astype(float)).sum()
        for _ in range(sweeps):
            improved = False
            for j in range(width):
                trial = kept[:, None] - table[:, [cols[j]]] + table  # kept per mask, column j -> each vector
                costs = np.exp2(-trial.astype(float)).sum(axis=0)
                b = int(costs.argmin())
                if costs[b] < cost - 1e-12:
                    cols[j], kept, cost, improved = b, trial[:, b], costs[b], True
            if not improved:
                break
        if cost < best_cost:
            best, best_cost = table[:, cols], cost
    return best


def _part_plan(radius: int, parts: int, bits: int) -> list[tuple[int, int, int]]:
    """(shift, width, t) per part: a pair within `radius` bits has at most t-1 differing bits in some
    part, since the t's sum to radius + 1 (if every part i held >= t_i differing bits there would be
    > radius). Widths are moved a bit at a time while that lowers the expected chance candidates,
    sum_i (2^t_i - 1) * 2^-kept_i, with kept_i ~ width_i * 2^(t_i-1) / (2^t_i - 1) bits a mask keeps."""
    if not 1 <= parts <= radius + 1:
        raise ValueError(f"dedup: {parts} parts for radius {radius}")
    extra = radius + 1 - parts  # t_i = 1 + a share of what is left over
    ts = [1 + extra // parts + (1 if i < extra % parts else 0) for i in range(parts)]
    widths = [w for _, w in blocks(parts - 1, bits)]

    def cost(ws):
        return sum(((1 << t) - 1) * 2.0 ** (-w * (1 << (t - 1)) / ((1 << t) - 1)) for t, w in zip(ts, ws))

    moved = True
    while moved:
        moved = False
        for a in range(parts):
            for b in range(parts):
                if a != b and widths[a] > 1:
                    trial = list(widths)
                    trial[a] -= 1
                    trial[b] += 1
                    if cost(trial) < cost(widths) - 1e-15:
                        widths, moved = trial, True
    shifts = [sum(widths[:i]) for i in range(parts)]
    return list(zip(shifts, widths, ts))


@functools.cache
def covering_masks(radius: int, parts: int, bits: int = 64) -> np.ndarray:
    """uint64 masks such that any two hashes of `bits` bits within `radius` bits are equal under at
    least one mask.

    The bits are cut into `parts` contiguous parts with thresholds t_i summing to radius + 1, so some
    part i holds <= t_i - 1 of the differing bits (pigeonhole; `_part_plan`: 2 parts take t = 6 and 5,
    94 masks, where t = 6 in both took 126). Within a part, bit positions get
    vectors of GF(2)^t, taken as the columns of a t x width matrix; the mask of a non-zero v keeps the
    positions whose vector has an odd inner product with v. Any <= t-1 positions span < t dimensions,
    so some v is orthogonal to all of them and its mask drops them all (Pagh 2016). Exact for any
    choice of non-zero columns; the choice sets how many bits each mask keeps, and so the chance
    candidates (~n * sum of 2^-kept). For t <= 8 the columns are chosen by a seeded local search
    minimising that sum; for larger t the best of a few random ones (largest minimum kept bits)."""
    out = []
    for shift, width, t in _part_plan(radius, parts, bits):
        if t == 1:
            out.append(_mask(shift, width))
            continue
        best = _balanced_columns(width, t) if t <= 8 else _random_columns(width, t)
        weights = np.left_shift(np.uint64(1), np.arange(shift, shift + width, dtype=np.uint64))
        out.extend(int((row.astype(np.uint64) * weights).sum()) for row in best)
    return np.array(out, dtype=np.uint64)


def _choose_parts(n: int, radius: int) -> int:
    """Parts for the covering masks of n hashes. Measured at radius 10 on 58 bits (a shard's hashes,
    numpy 2.4, one core), microseconds per hash for 2 / 3 / 4 parts (94 / 37 / 24 masks): 15.6k hashes
    4.0 / 3.4 / 4.2, 31k 5.3 / 4.9 / 7.8, 62k 6.5 / 7.2 / 13.5, 125k 8.5 / 12.3 / 24.2: fewer masks win
    while their chance candidates (~n * sum of 2^-kept) are few. 1 part (2,047 masks of >= 18 bits)
    wins once the 2-part candidates (n^2/2 * 0.0037) outgrow 2,047 sorts: near 2M hashes."""
    if radius < 2:
        return radius + 1  # 0: the whole hash, 1: its two halves (plain pigeonhole)
    return 3 if n < 40_000 else 2 if n < 2_000_000 else 1


_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: multiply-shift hashing


def pairs_within(h: np.ndarray, radius: int, parts: int = 0, bits: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of every two hashes in `h` (uint64, values below 2**bits) within `radius`
    bits; exact."""
    n = len(h)
    empty = np.empty(0, np.int64)
    if n < 2:
        return empty, empty
    if n <= 2048 and not parts:  # brute force, in row chunks
        ii, jj = [], []
        for start in range(0, n - 1, 256):
            rows = np.arange(start, min(start + 256, n - 1))
            d = np.bitwise_count(h[rows, None] ^ h[None, :])
            i, j = np.nonzero((d <= radius) & (np.arange(n)[None, :] > rows[:, None]))
            ii.append(rows[i])
            jj.append(j)
        return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)
    # each mask's keys are sorted as one uint64 array: a multiply-shift hash of the masked key in the
    # high bits, the row index in the low bits (a chance equal hash only adds a candidate, checked below)
    idx_bits = max(1, int(n - 1).bit_length())
    index = np.arange(n, dtype=np.uint64)
    low = np.uint64((1 << idx_bits) - 1)
    codes = []
    for mask in covering_masks(radius, parts if parts else _choose_parts(n, radius), bits):
        sorted_codes = np.sort((((h & mask) * _MULT) >> np.uint64(idx_bits) << np.uint64(idx_bits)) | index)
        ks, order = sorted_codes >> np.uint64(idx_bits), (sorted_codes & low).astype(np.int64)
        d = 1
        while d < n:  # equal keys are contiguous: compare each with the one d places further on
            eq = ks[:-d] == ks[d:]
            if not eq.any():
                break
            a, b = order[:-d][eq], order[d:][eq]
            near = np.bitwise_count(h[a] ^ h[b]) <= radius
            a, b = a[near], b[near]
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))
            d += 1
    if not codes:
        return empty, empty
    code = np.unique(np.concatenate(codes))
    return code // n, code % n


def _signatures(column, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(len(rows), 4) uint64 words of the 32-byte signatures at `rows`, and whether each is valid (a null
    or malformed signature never confirms a pair). Only candidate rows are read: a handful a shard."""
    import pyarrow as pa

    values = column.take(pa.array(rows, pa.int64())).to_pylist()
    valid = np.array([v is not None and len(v) == 32 for v in values], dtype=bool)
    raw = b"".join(v if ok else b"\0" * 32 for v, ok in zip(values, valid))
    return np.frombuffer(raw, dtype=np.uint64).reshape(len(rows), 4), valid


def _shard_edges(radius: int, second_radius: int | None, table):
    """One pigeonhole shard (rows agreeing on one block): the join keys of its pairs within both tiers.
    Pairs that also agree on an earlier block are left to that block's shard."""
    import pyarrow as pa

    n = table.num_rows
    h = table.column(S.PHASH).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    block = table.column("block")[0].as_py() if n else 0
    # the shard's block bits are equal in all its rows: squeeze them out, so that every bit a covering
    # mask keeps tells rows apart (masks keeping equal bits made runs of equal keys ~2^3 times longer)
    shift, width = blocks(radius)[block]
    if width < 64:  # (radius 0: one block, the whole hash)
        low = np.uint64((1 << shift) - 1)
        top = (h >> np.uint64(shift + width)) << np.uint64(shift) if shift + width < 64 else np.uint64(0)
        a, b = pairs_within(top | (h & low), radius, bits=64 - width)
    else:
        a, b = pairs_within(h, radius)
    x = h[a] ^ h[b]
    first = np.ones(len(a), dtype=bool)
    for shift, width in blocks(radius)[:block]:
        first &= (x & np.uint64(_mask(shift, width))) != 0
    a, b = a[first], b[first]
    if second_radius is not None and len(a):
        rows, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
        sig, valid = _signatures(table.column(S.PHASH256), rows)
        ia, ib = inverse[:len(a)], inverse[len(a):]
        d2 = np.bitwise_count(sig[ia] ^ sig[ib]).sum(axis=1)
        keep = (d2 <= second_radius) & valid[ia] & valid[ib]
        a, b = a[keep], b[keep]
    keys = table.column("key").to_numpy(zero_copy_only=False)
    return pa.table({"a": pa.array(keys[a], pa.int64()), "b": pa.array(keys[b], pa.int64())})


def _partition_edges(radius: int, second_radius: int | None, batches):
    """The pairs of every shard of a partition sorted by (block, value): each run of equal keys, which
    may span batches, is gathered whole and handed to `_shard_edges`."""
    import pyarrow as pa

    run: list = []  # slices of the current shard
    current = None

    def flush():
        table = pa.Table.from_batches(run)
        return _shard_edges(radius, second_radius, table).to_batches()

    for batch in batches:
        if batch.num_rows == 0:
            continue
        blk = batch.column("block").to_numpy(zero_copy_only=False)
        val = batch.column("value").to_numpy(zero_copy_only=False)
        cuts = np.flatnonzero((blk[1:] != blk[:-1]) | (val[1:] != val[:-1])) + 1
        for start, end in zip([0, *cuts.tolist()], [*cuts.tolist(), batch.num_rows]):
            key = (int(blk[start]), int(val[start]))
            if key != current and run:
                yield from flush()
                run = []
            current = key
            run.append(batch.slice(start, end - start))
    if run:
        yield from flush()


BROADCAST_PAIRS = 2_000_000  # up to this many pairs, their items are found by one broadcast semi-join


def _join_key(F):
    """A 64-bit join key per item (a hash of its rank_key) that travels through the shuffle instead of
    the ~60-byte rank_key and is joined back after. Two items may share it (p ~ n^2/2^65): pairs are
    re-checked on the joined items' own hashes, so a shared key never makes a false pair."""
    return F.xxhash64("rank_key")


def _words(F, column):
    """The 4 signed 64-bit words of a 32-byte binary column (SQL; for the few joined pairs)."""
    return [F.when(F.length(column) == 32, F.conv(F.hex(F.substring(column, 8 * i + 1, 8)), 16, -10).cast("long"))
            for i in range(4)]


def near_edges(items, cfg: Dedup):
    """(src, dst, d1, d2): every pair of `items` (rank_key, phash, phash256) within both tiers, src the
    better-ranked. Exact: no pair within the radii is missed, whatever the bucket sizes.

    The shuffle carries 11 slim rows per item (block, value, a 64-bit join key, the pHash, the 32-byte
    signature); the shards give the join keys of their pairs, which are joined back to the items'
    rank keys (a broadcast semi-join when there are few) and re-checked in both tiers."""
    from pyspark.sql import functions as F

    radius = cfg.hamming_radius
    second = cfg.second_radius if cfg.second_tier else None
    keyed = items.filter(F.col(S.PHASH).isNotNull()).select(
        _join_key(F).alias("key"), "rank_key", S.PHASH, S.PHASH256)
    slim = keyed.select(
        "key", S.PHASH, (F.col(S.PHASH256) if second is not None else F.lit(None).cast("binary")).alias(S.PHASH256),
        F.explode(F.array(*[
            F.struct(F.lit(i).alias("block"),
                     F.shiftrightunsigned(F.col(S.PHASH), shift).bitwiseAND((1 << width) - 1 if width < 64 else -1).alias("value"))
            for i, (shift, width) in enumerate(blocks(radius))])).alias("b"),
    ).select("key", S.PHASH, S.PHASH256, "b.block", "b.value")

    def shards(batches):
        arrow_only()
        return _partition_edges(radius, second, batches)

    # rows of one (block, value) shard together and in a run: the shards of a partition are handed to
    # numpy one after the other in one Python call (a grouped applyInArrow made one call per shard,
    # ~700 of them whatever n, which cost more than the work itself below a few million items)
    grouped = slim.repartition("block", "value").sortWithinPartitions("block", "value")
    pairs = grouped.mapInArrow(shards, "a long, b long").localCheckpoint()
    ends = pairs.select(F.col("a").alias("key")).union(pairs.select(F.col("b").alias("key"))).distinct()
    if pairs.count() <= BROADCAST_PAIRS:
        ends = F.broadcast(ends)
    found = keyed.join(ends, "key", "left_semi")

    def side(tag):
        return found.select(F.col("key").alias(tag), F.col("rank_key").alias(f"r{tag}"),
                            F.col(S.PHASH).alias(f"h{tag}"), *[w.alias(f"w{tag}{i}") for i, w in
                                                               enumerate(_words(F, F.col(S.PHASH256)))])

    joined = pairs.join(side("a"), "a").join(side("b"), "b").filter(F.col("ra") != F.col("rb"))
    d1 = F.bit_count(F.col("ha").bitwiseXOR(F.col("hb")))
    d2 = sum(F.bit_count(F.col(f"wa{i}").bitwiseXOR(F.col(f"wb{i}"))) for i in range(4)) \
        if second is not None else F.lit(0)
    within = (d1 <= radius) & ((d2 <= second) & F.col("wa0").isNotNull() & F.col("wb0").isNotNull()
                               if second is not None else F.lit(True))
    return joined.filter(within).select(
        F.least("ra", "rb").alias("src"), F.greatest("ra", "rb").alias("dst"),
        d1.cast("int").alias("d1"), d2.cast("int").alias("d2")).dropDuplicates(["src", "dst"])


# --- keeper-centred grouping ---------------------------------------------------------------------

UNDECIDED, KEEPER, DROPPED = 0, 1, 2


def _near_duplicates(items, cfg: Dedup):
    from pyspark.sql import functions as F

    edges = near_edges(items, cfg).select("src", "dst").localCheckpoint()
    keepers, rounds, undecided = _keepers(edges, cfg.max_rounds, cfg.local_edges)
    n_edges = edges.count()
    stats = DedupStats(skipped=undecided, edges=n_edges, rounds=rounds)
    log.info("dedup: %d near pairs within both tiers, keepers chosen in %d rounds, %d undecided",
             n_edges, rounds, undecided)
    if undecided:
        log.warning("dedup: %d near-duplicate candidates still undecided after max_rounds=%d: kept, not "
                    "dropped (DedupStats.skipped)", undecided, cfg.max_rounds)
    # every dropped item goes to the best-ranked keeper it shares an edge with
    kept = keepers.filter(F.col("state") == KEEPER).select(F.col("node").alias("src"))
    dropped = keepers.filter(F.col("state") == DROPPED).select(F.col("node").alias("dst"))
    assign = edges.join(kept, "src").join(dropped, "dst").groupBy("dst").agg(F.min("src").alias("src"))
    return assign.select(
        F.split("dst", ":").getItem(2).alias(SAMPLE_ID),
        F.lit("near_duplicate").alias("reason"),
        F.split("src", ":").getItem(2).alias("duplicate_of"),
    ), stats


def _keepers_on_driver(edges):
    """`_keepers` for an edge list that fits on the driver: the same greedy, walked once in a topological
    order of the edges (every better neighbour before a node), instead of two Spark jobs a round.
    Returns (state, 1, undecided): nodes on a cycle (never produced by a rank order) stay undecided."""
    import pyarrow as pa

    table = edges.select("src", "dst").toArrow()
    nodes, state = _greedy(table.column("src").to_pylist(), table.column("dst").to_pylist())
    spark = edges.sparkSession
    out = pa.table({"node": pa.array(nodes, pa.string()), "state": pa.array([state[n] for n in nodes], pa.int32())})
    return spark.createDataFrame(out), 1, sum(v == UNDECIDED for v in state.values())


def _greedy(src: list, dst: list) -> tuple[list, dict]:
    """The keeper greedy over edges src -> dst (src better ranked), walked in a topological order:
    (nodes, node -> KEEPER | DROPPED | UNDECIDED, the last only for nodes on a cycle)."""
    import collections

    better, worse = collections.defaultdict(list), collections.defaultdict(list)
    for a, b in zip(src, dst):
        better[b].append(a)
        worse[a].append(b)
    nodes = sorted(set(src) | set(dst))
    waiting = {n: len(better[n]) for n in nodes}
    ready = collections.deque(n for n in nodes if not waiting[n])
    state = dict.fromkeys(nodes, UNDECIDED)
    while ready:
        node = ready.popleft()
        state[node] = DROPPED if any(state[b] == KEEPER for b in better[node]) else KEEPER
        for w in worse[node]:
            waiting[w] -= 1
            if not waiting[w]:
                ready.append(w)
    return nodes, state


def drops_frame(spark, rows: list[tuple[str, str, str | None]] = ()):
    """The (sample_id, reason, duplicate_of) decision table of `rows`, sent to Spark as Arrow: a
    DataFrame of a Python list would start a Python worker (in a pool of its own) only to unpickle it."""
    import pyarrow as pa

    return spark.createDataFrame(pa.table({SAMPLE_ID: pa.array([r[0] for r in rows], pa.string()),
                                           "reason": pa.array([r[1] for r in rows], pa.string()),
                                           "duplicate_of": pa.array([r[2] for r in rows], pa.string())}))


def _on_driver(spark, items, cfg: Dedup):
    """Exact and near dedup of a few items (an Arrow table of sample_id, content_sha, phash, phash256,
    rank_key) on the driver: the same decisions as the Spark path (tests compare them), in one job.
    Exact: per content hash, the best rank_key keeps. Near: `pairs_within` over all the hashes at once,
    both tiers checked, then the same keeper greedy; a dropped item points at its best-ranked keeper."""
    import pyarrow.compute as pc

    items = items.sort_by([("rank_key", "ascending")])
    ids = items.column(SAMPLE_ID).to_pylist()
    out: list[tuple[str, str, str]] = []
    alive = np.ones(items.num_rows, dtype=bool)
    if cfg.exact:
        keeper: dict = {}
        for i, sha in enumerate(items.column(S.CONTENT_SHA).to_pylist()):  # rank order: the first keeps
            if sha is None:
                continue  # a null content hash equals nothing: the item is its own keeper (as on the Spark path)
            if sha in keeper:
                out.append((ids[i], "exact_duplicate", ids[keeper[sha]]))
                alive[i] = False
            else:
                keeper[sha] = i
    stats = DedupStats(rounds=0)
    if cfg.near:
        phash = items.column(S.PHASH)
        rows = np.flatnonzero(alive & pc.is_valid(phash).to_numpy(zero_copy_only=False))
        h = pc.fill_null(phash, 0).to_numpy(zero_copy_only=False).astype(np.int64)[rows].view(np.uint64)
        a, b = pairs_within(h, cfg.hamming_radius)
        if cfg.second_tier and len(a):  # the signatures of the rows in a pair only
            ends, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
            sig, valid = _signatures(items.column(S.PHASH256).combine_chunks(), rows[ends])
            ia, ib = inverse[:len(a)], inverse[len(a):]
            d2 = np.bitwise_count(sig[ia] ^ sig[ib]).sum(axis=1)
            keep = (d2 <= cfg.second_radius) & valid[ia] & valid[ib]
            a, b = a[keep], b[keep]
        src, dst = rows[np.minimum(a, b)], rows[np.maximum(a, b)]  # rows are in rank order: the smaller is better
        state = _greedy(src.tolist(), dst.tolist())[1]
        best: dict = {}
        for i, j in zip(src.tolist(), dst.tolist()):
            if state[i] == KEEPER and state[j] == DROPPED and i < best.get(j, len(ids)):
                best[j] = i
        out += [(ids[j], "near_duplicate", ids[i]) for j, i in sorted(best.items())]
        stats = DedupStats(skipped=sum(v == UNDECIDED for v in state.values()), edges=len(src), rounds=1)
    log.info("dedup on the driver: %d items, %d dropped, %d near pairs", items.num_rows, len(out), stats.edges)
    return drops_frame(spark, out), stats


def _keepers(edges, max_rounds: int, local_edges: int = LOCAL_EDGES):
    """Greedy keeper selection in rank order over oriented edges (src better than dst), in rounds:
    (node, state) for every node of an edge, and the rounds run and the nodes left undecided. Up to
    `local_edges` edges, the same greedy runs on the driver in one pass (`_keepers_on_driver`).

    Each round: an undecided node whose better neighbours are all dropped becomes a keeper; then an
    undecided node with a keeper among its better neighbours is dropped. The result is what the
    sequential greedy (walk in rank order, keep an item unless a kept item is an edge away) gives."""
    from pyspark.sql import functions as F

    if local_edges and edges.limit(local_edges + 1).count() <= local_edges:
        return _keepers_on_driver(edges)
    nodes = edges.select(F.col("src").alias("node")).union(edges.select(F.col("dst").alias("node"))).distinct()
    state = nodes.select("node", F.lit(UNDECIDED).alias("state")).localCheckpoint()
    rounds, undecided = 0, state.count()
    while undecided and rounds < max_rounds:
        rounds += 1
        better = edges.join(state.select(F.col("node").alias("src"), F.col("state").alias("s")), "src")
        blocked = better.filter(F.col("s") != DROPPED).select(F.col("dst").alias("node")).distinct()
        new_keepers = (state.filter(F.col("state") == UNDECIDED).join(blocked, "node", "left_anti")
                       .select("node", F.lit(True).alias("new_keeper")))
        state = (state.join(new_keepers, "node", "left")
                 .select("node", F.when(F.col("new_keeper"), F.lit(KEEPER)).otherwise(F.col("state")).alias("state")))
        keeper_src = state.filter(F.col("state") == KEEPER).select(F.col("node").alias("src"))
        claimed = edges.join(keeper_src, "src").select(F.col("dst").alias("node"), F.lit(True).alias("claimed")).distinct()
        state = (state.join(claimed, "node", "left")
                 .select("node", F.when((F.col("state") == UNDECIDED) & F.col("claimed"), F.lit(DROPPED))
                         .otherwise(F.col("state")).alias("state"))
                 .localCheckpoint())
        undecided = state.filter(F.col("state") == UNDECIDED).count()
    return state, rounds, undecided
