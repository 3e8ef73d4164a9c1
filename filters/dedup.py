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
   bits agrees exactly on at least one block. Each item is emitted once per block (11 rows) and
   grouped by (block, value): about 700 shards of n/64 items. A pair is reported only by the first
   block it agrees on, so no pair is reported twice.
2. numpy, inside each shard (`pairs_within`): covering masks (Pagh, "LSH without false negatives",
   SODA 2016). The 64 bits are cut into p parts; some part holds <= r//p of the differing bits. Map
   that part's bit positions to vectors of GF(2)^t, t = r//p + 1; for every non-zero v keep the
   positions whose vector has odd inner product with v. Any <= t-1 differing positions span < t
   dimensions, so some v is orthogonal to all of them and that mask keeps none of them: the pair has
   equal masked keys. Exact, no false negatives. p=2 (63 masks per half, 16 bits kept) for shards up
   to ~2M items, p=1 (2,047 masks, >= 20 of 64 bits kept) above; tiny shards brute force. Equal keys
   are found by sorting (numpy), every candidate is checked for both tiers.
Cost per item: 11 Spark rows + 11 x (126 sorted keys + ~B/520 chance candidates) of numpy work at
shard size B = n/64 (measured 0.09 s per 15.6k-item shard, 0.8 s per 62.5k: n log n plus the
candidate term, so a bit above linear); from B ~ 2M (n ~ 128M) 11 x 2,047 sorted keys per item with
< 1 chance candidate per item up to n ~ 1e9: ~2 ms of one core per item at 1e9, the order of
decoding the image, and shards of ~15M items (~1.4 GB each in one Python worker).

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

from schemas import image_text as S
from schemas.common import SAMPLE_ID

log = logging.getLogger(__name__)


LOCAL_EDGES = 500_000  # near pairs up to this many: keepers chosen on the driver in one pass, no Spark rounds


@dataclasses.dataclass(frozen=True)
class Dedup:
    exact: bool = True
    near: bool = True
    hamming_radius: int = 10  # tier 1, of the 64 pHash bits: transformed copies measured 0-10, distinct photos >= 20
    second_tier: bool = True  # confirm tier-1 pairs with phash256 (256-bit dHash); false only for data without it
    second_radius: int = 64  # tier 2, of the 256 dHash bits: copies measured <= 49, distinct photos >= 84
    max_rounds: int = 50  # keeper-selection rounds; items still undecided after them are kept, counted as skipped
    local_edges: int = LOCAL_EDGES  # up to this many near pairs, keepers are chosen on the driver (0: always rounds)
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
    drops = spark.createDataFrame([], "sample_id string, reason string, duplicate_of string")
    stats = DedupStats()
    if cfg.exact:
        w = Window.partitionBy(S.CONTENT_SHA).orderBy("rank_key")
        ranked = items.withColumn("keeper", F.first(SAMPLE_ID).over(w))
        drops = ranked.filter(F.col("keeper") != F.col(SAMPLE_ID)).select(
            SAMPLE_ID, F.lit("exact_duplicate").alias("reason"), F.col("keeper").alias("duplicate_of"))
        items = ranked.filter(F.col("keeper") == F.col(SAMPLE_ID)).drop("keeper")
    if cfg.near:
        near, stats = _near_duplicates(items, cfg)
        drops = drops.unionByName(near)
    return drops, stats


# --- candidate generation ------------------------------------------------------------------------

def blocks(radius: int) -> list[tuple[int, int]]:
    """(shift, width) of radius+1 blocks covering the 64 bits: a pair within `radius` bits agrees on one."""
    m = radius + 1
    if m > 64:
        raise ValueError(f"dedup.hamming_radius {radius} must be < 64")
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def _mask(shift: int, width: int) -> int:
    return ((1 << width) - 1) << shift


@functools.cache
def covering_masks(radius: int, parts: int) -> np.ndarray:
    """uint64 masks such that any two hashes within `radius` bits are equal under at least one mask.

    The bits are cut into `parts` contiguous parts; some part holds <= radius//parts differing bits
    (pigeonhole). Within a part, bit positions get vectors of GF(2)^t, t = radius//parts + 1, taken as
    the columns of a t x width matrix; the mask of a non-zero v keeps the positions whose vector has an
    odd inner product with v. Any <= t-1 positions span < t dimensions, so some v is orthogonal to all
    of them and its mask drops them all (Pagh 2016). The matrix is the best of a few seeded random ones
    (largest minimum number of kept bits), so that no mask keeps only a few bits."""
    t = radius // parts + 1
    out = []
    for shift, width in blocks(parts - 1):
        if t == 1:
            out.append(_mask(shift, width))
            continue
        rng = np.random.default_rng(12345 + width * 131 + t)
        vs = np.arange(1, 1 << t, dtype=np.int64)
        best, best_kept = None, -1
        for _ in range(64):
            cols = rng.integers(1, 1 << t, size=width)  # non-zero vector per bit position
            parity = np.bitwise_count(vs[:, None] & cols[None, :]) & 1  # (masks, width)
            kept = parity.sum(axis=1).min()
            if kept > best_kept:
                best, best_kept = parity, kept
        weights = np.left_shift(np.uint64(1), np.arange(shift, shift + width, dtype=np.uint64))
        out.extend(int((row.astype(np.uint64) * weights).sum()) for row in best)
    return np.array(out, dtype=np.uint64)


def _choose_parts(n: int, radius: int) -> int:
    """Parts for the covering masks of n hashes. Measured at radius 10 (local, numpy 2.4): 2 parts (126
    masks of >= 12 bits, ~16 on average) cost 0.09 s at 15.6k hashes and 0.8 s at 62.5k, 3 or 4 parts
    (45/28 masks of 9-11 bits) more, from their chance candidates. 1 part (2,047 masks of >= 21 bits)
    wins once the 2-part candidates (n^2/2 * 126/2^16) outgrow 2,047 sorts: near 2M hashes."""
    return 2 if n < 2_000_000 or radius < 2 else 1


_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: multiply-shift hashing


def pairs_within(h: np.ndarray, radius: int, parts: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of every two hashes in `h` (uint64) within `radius` bits; exact."""
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
    for mask in covering_masks(radius, parts if parts else _choose_parts(n, radius)):
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


def _signatures(column, n: int) -> np.ndarray | None:
    """(n, 4) uint64 words of the 32-byte signatures (zeros where null or malformed: the caller masks
    those rows out); None when the column is entirely null."""
    values = column.to_pylist()
    if all(v is None for v in values):
        return None
    raw = b"".join(v if v is not None and len(v) == 32 else b"\0" * 32 for v in values)
    return np.frombuffer(raw, dtype=np.uint64).reshape(n, 4)


def _shard_edges(radius: int, second_radius: int | None, table):
    """One pigeonhole shard (rows agreeing on one block): its pairs within both tiers, each oriented
    (better rank_key, worse rank_key). Pairs that also agree on an earlier block are left to that
    block's shard."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    h = table.column(S.PHASH).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    block = table.column("block")[0].as_py() if n else 0
    a, b = pairs_within(h, radius)
    x = h[a] ^ h[b]
    first = np.ones(len(a), dtype=bool)
    for shift, width in blocks(radius)[:block]:
        first &= (x & np.uint64(_mask(shift, width))) != 0
    a, b, x = a[first], b[first], x[first]
    d1 = np.bitwise_count(x).astype(np.int32)
    d2 = np.zeros(len(a), dtype=np.int32)
    if second_radius is not None and len(a):
        sig_col = table.column(S.PHASH256)
        sig = _signatures(sig_col, n)
        valid = pc.fill_null(pc.equal(pc.binary_length(sig_col), 32), False).to_numpy(zero_copy_only=False)
        if sig is None:
            keep = np.zeros(len(a), dtype=bool)
        else:
            d2 = np.bitwise_count(sig[a] ^ sig[b]).sum(axis=1).astype(np.int32)
            keep = (d2 <= second_radius) & valid[a] & valid[b]  # no signature: the pair is not confirmed
        a, b, d1, d2 = a[keep], b[keep], d1[keep], d2[keep]
    keys = table.column("rank_key")
    ka, kb = keys.take(pa.array(a)), keys.take(pa.array(b))
    a_first = pc.less(ka, kb)
    return pa.table({"src": pc.if_else(a_first, ka, kb), "dst": pc.if_else(a_first, kb, ka),
                     "d1": pa.array(d1, pa.int32()), "d2": pa.array(d2, pa.int32())})


def near_edges(items, cfg: Dedup):
    """(src, dst, d1, d2): every pair of `items` (rank_key, phash, phash256) within both tiers, src the
    better-ranked. Exact: no pair within the radii is missed, whatever the bucket sizes."""
    from pyspark.sql import functions as F

    radius = cfg.hamming_radius
    second = cfg.second_radius if cfg.second_tier else None
    keyed = items.filter(F.col(S.PHASH).isNotNull()).select(
        "rank_key", S.PHASH, S.PHASH256,
        F.explode(F.array(*[
            F.struct(F.lit(i).alias("block"),
                     F.shiftrightunsigned(F.col(S.PHASH), shift).bitwiseAND((1 << width) - 1).alias("value"))
            for i, (shift, width) in enumerate(blocks(radius))])).alias("b"),
    ).select("rank_key", S.PHASH, S.PHASH256, "b.block", "b.value")

    def shard(table):
        return _shard_edges(radius, second, table)

    return keyed.groupBy("block", "value").applyInArrow(shard, "src string, dst string, d1 int, d2 int")


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
    import collections

    import pyarrow as pa

    table = edges.select("src", "dst").toArrow()
    src, dst = table.column("src").to_pylist(), table.column("dst").to_pylist()
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
    spark = edges.sparkSession
    out = pa.table({"node": pa.array(nodes, pa.string()), "state": pa.array([state[n] for n in nodes], pa.int32())})
    frame = spark.createDataFrame(out.to_pandas(), "node string, state int") if nodes else \
        spark.createDataFrame([], "node string, state int")
    return frame, 1, sum(v == UNDECIDED for v in state.values())


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
