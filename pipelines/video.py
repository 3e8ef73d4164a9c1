"""Video: read -> probe (ffprobe integrity) -> scenes (full decode + cuts) -> clips -> frames (GLM-4.1V
sampling, JPEG, spooled) | clip rules -> dedup (frame pHash + caption) -> videos without clips -> shards.

A video file is the input item (unit `video`); each of its clips is a sub-item (unit `clip`,
`parent_id` = the video) and a sample is one clip (`Kind.sample_unit`). Heavy per-item work is spread
over tasks by its cost (`balance_by_cost`: duration x pixels), so one long video among short ones does
not make one task the straggler.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from fractions import Fraction

import pyarrow as pa

from filters.base import apply_stages
from filters.clip import ClipScore, resolve_weights
from filters.dedup import DROPPED as DEDUP_DROPPED
from filters.dedup import KEEPER, _keepers
from filters.media import Spool, read_ref, ref_column, size_column
from filters.video_download import VIDEO_SUFFIXES, DownloadVideo, is_url
from filters.video_embed import TEXT_EMBEDDING, VIDEO_EMBEDDING, ClipEmbed
from filters.video_frames import CutClip, SampleFrames
from filters.video_probe import ProbeVideo
from filters.video_scenes import DetectScenes
from pipelines.checkpoint import cached, fingerprint, own
from pipelines.io import storage
from pipelines.io.readers import input_root
from pipelines.kind import Context, Kind, Plan, Step
from schemas import ledger as L
from schemas import video as S
from schemas.common import ERROR, ERROR_DETAIL, READ_UNIT, SAMPLE_ID, SOURCE, SOURCE_KEY, make_sample_id
from schemas.common import KIND as KIND_COLUMN

log = logging.getLogger(__name__)
VIDEO_EXTS = VIDEO_SUFFIXES  # one list: filters.video_download names downloads with it too
TABLE_EXTS = (".parquet", ".jsonl", ".csv")
PATH_COLUMNS = ("path", "video", "video_path", "file", "filepath", "videoid", "key", "url", "video_url", "contentUrl")
CAPTION_COLUMNS = ("caption", "name", "text", "title", "description")
SPAN_COLUMNS = ("timestamp", "timestamps", "clips", "spans")


@dataclasses.dataclass(frozen=True)
class VideoDedup:
    """The recipe section `video.dedup`: a clip is dropped only when its frames AND its caption are
    near-duplicates of a better clip's (the paper's rule; the frame pHashes are the cheap video tier)."""

    enabled: bool = True
    hamming_radius: int = 8  # tier 1: mean Hamming distance of aligned frame pHashes (of 64 bits)
    # tier 2, with real CLIP weights: cosine of the video embeddings (mean frame embedding) and of the
    # caption embeddings; pretrained "" (random weights): no embeddings, the normalised captions must be equal
    clip: ClipScore = ClipScore(threshold=0.0)
    video_threshold: float = 0.95
    text_threshold: float = 0.95
    embed_frames: int = 8  # frames embedded per clip, evenly spaced
    max_rounds: int = 50  # keeper-selection rounds; clips still undecided after them are kept (counted)
    max_skipped: int = 0  # the run's quality gate fails when more clips than this were left undecided


@dataclasses.dataclass(frozen=True)
class Video:
    """The recipe section `video`."""

    download: DownloadVideo = DownloadVideo()  # table rows that name their video by http(s) URL
    probe: ProbeVideo = ProbeVideo()
    scenes: DetectScenes = DetectScenes()
    frames: SampleFrames = SampleFrames()
    dedup: VideoDedup = VideoDedup()
    write_clip: bool = False  # also write each clip as {sample_id}.mp4 (re-encoded, frame-exact)
    cut: CutClip = CutClip()
    tasks_per_core: int = 2  # heavy stages run over this many tasks per core, balanced by cost


# --- reading ---------------------------------------------------------------------------------------

def _seconds(v) -> float | None:
    """A span bound: seconds as a number, or a "H:MM:SS.fff" / "MM:SS" string (Panda-70M)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str) and re.fullmatch(r"[\d:.]+", v.strip()):
        total = 0.0
        for part in v.strip().split(":"):
            total = total * 60 + float(part)
        return total
    return None


def parse_spans(value, captions=None) -> list[dict] | None:
    """Clip spans from a side-car or row: [[start, end], ...], [start, end], or [{"start", "end"}];
    `captions` (a list, Panda-70M style) gives each span its own caption. None when there are none."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, (list, tuple)) and len(value) == 2 and not isinstance(value[0], (list, tuple, dict)):
        value = [value]
    out = []
    for i, s in enumerate(value if isinstance(value, (list, tuple)) else []):
        a, b = (s.get("start"), s.get("end")) if isinstance(s, dict) else (s if len(s) == 2 else (None, None))
        a, b = _seconds(a), _seconds(b)
        if a is None or b is None or b <= a:
            continue
        cap = captions[i] if isinstance(captions, (list, tuple)) and i < len(captions) else None
        out.append({"start": a, "end": b, "caption": cap if isinstance(cap, str) else None})
    return out or None


def _row(kind_source: str, path: str, key: str, caption, meta, spans, unit_id: str, error=None, detail=None,
         source: str = "") -> dict:
    return {SAMPLE_ID: make_sample_id(S.KIND, kind_source, key), KIND_COLUMN: S.KIND, SOURCE: source or path,
            SOURCE_KEY: key,
            L.UNIT: S.VIDEO_UNIT, L.PARENT_ID: None, S.PATH: path, S.ID_SOURCE: kind_source,
            S.CAPTION: caption.strip() if isinstance(caption, str) and caption.strip() else None,
            S.META: meta, S.SPANS: spans, READ_UNIT: unit_id, ERROR: error, ERROR_DETAIL: detail}


def _sidecars(path: str) -> tuple[str | None, str | None, list | None, str | None]:
    """(caption, meta json, spans, error) from `{stem}.txt` / `{stem}.json` beside a video."""
    stem = os.path.splitext(path)[0]
    caption = meta = spans = None
    if os.path.exists(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
            caption = f.read()
    if os.path.exists(stem + ".json"):
        try:
            with open(stem + ".json", encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            return caption, None, None, f"{type(e).__name__}: {e}"[:300]
        if isinstance(doc, dict):
            meta = json.dumps(doc, sort_keys=True, ensure_ascii=False)
            caption = caption or next((doc[c] for c in CAPTION_COLUMNS if isinstance(doc.get(c), str)), None)
            spans = parse_spans(next((doc[c] for c in SPAN_COLUMNS if doc.get(c) is not None), None),
                                doc.get("captions"))
    return caption, meta, spans, None


def _table_rows(uri: str) -> list[dict]:
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(uri).to_pylist()
    if uri.endswith(".csv"):
        import pyarrow.csv as pcsv

        return pcsv.read_csv(uri).to_pylist()
    with open(uri, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tar_rows(tar: str, id_source: str, extract_to: str) -> list[dict]:
    """Rows for a webdataset tar of videos (`{key}.mp4` + optional `{key}.txt` / `{key}.json`): each
    video member is extracted once under `extract_to` (the work dir: video decoders need a seekable
    file). Links, devices and absolute or '..' names are `unsafe_member`; a tar that cannot be read or
    breaks off is one `read_error` row."""
    import tarfile

    from pipelines.io.readers import split_key

    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    rows: list[dict] = []
    try:
        with tarfile.open(tar) as tf:
            for m in tf:
                name = m.name
                if (not m.isfile()) or name.startswith("/") or ".." in name.split("/"):
                    if not m.isdir():
                        rows.append(_row(id_source, tar, name, None, None, None, tar, "unsafe_member",
                                         f"not a regular file or an unsafe path: {name!r}"))
                    continue
                key, ext = split_key(name)
                groups.setdefault(key, {})[ext.lower()] = m
            for key, parts in sorted(groups.items()):
                video = next((e for e in parts if "." + e.rsplit(".", 1)[-1] in VIDEO_EXTS), None)
                if video is None:
                    continue  # side-cars of no video: not an item
                path = os.path.join(extract_to, key.replace("/", "__") + "." + video.rsplit(".", 1)[-1])
                os.makedirs(extract_to, exist_ok=True)
                with tf.extractfile(parts[video]) as src, open(path + ".tmp", "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(path + ".tmp", path)
                caption = meta = spans = None
                if "txt" in parts:
                    caption = tf.extractfile(parts["txt"]).read().decode("utf-8", "replace")
                if "json" in parts:
                    try:
                        doc = json.loads(tf.extractfile(parts["json"]).read())
                    except ValueError as e:
                        rows.append(_row(id_source, path, key, caption, None, None, tar, "meta_invalid",
                                         str(e)[:300], source=tar))
                        continue
                    if isinstance(doc, dict):
                        meta = json.dumps(doc, sort_keys=True, ensure_ascii=False)
                        caption = caption or next((doc[c] for c in CAPTION_COLUMNS if isinstance(doc.get(c), str)), None)
                        spans = parse_spans(next((doc[c] for c in SPAN_COLUMNS if doc.get(c) is not None), None),
                                            doc.get("captions"))
                rows.append(_row(id_source, path, key, caption, meta, spans, tar, source=tar))
    except (OSError, tarfile.TarError, EOFError) as e:
        rows.append(_row(id_source, tar, "@error", None, None, None, tar, "read_error", f"{type(e).__name__}: {e}"[:300]))
    return rows


def list_videos(uris: list[str], dataset: str = "", extract_to: str = "") -> tuple[list[dict], dict[str, int]]:
    """RAW rows, one per video, and the items counted per read unit (a folder's loose files, a table).

    Layouts: folders (or globs, or files) of videos with optional `{stem}.txt` / `{stem}.json` side-cars,
    which covers video2dataset's folder output (`{key}.mp4` + `.txt` + `.json` with `clips`); webdataset
    tars of the same (video2dataset's tar output; videos extracted under `extract_to`); tables
    (.parquet / .jsonl / .csv) with a path column (relative to the table) and a caption, and optional
    clip spans (`timestamp`, WebVid / Panda-70M style, with per-span captions in a list `caption`); a
    path column may hold http(s) URLs instead (the row's `path` stays the URL until it is downloaded)."""
    rows: list[dict] = []
    counts: dict[str, int] = {}
    for uri in uris:
        uri = storage.normalize(uri)
        if storage.is_s3(uri):
            raise ValueError(f"video inputs must be local or shared POSIX paths (got {uri})")
        root = input_root(uri)
        name = dataset or os.path.basename(root.rstrip("/"))
        files = storage.list_files(uri)
        tables = [f for f in files if f.lower().endswith(TABLE_EXTS)]
        referenced: set[str] = set()
        for tar in (f for f in files if f.lower().endswith(".tar")):
            found = _tar_rows(tar, f"{name}/{os.path.relpath(tar, root)}",
                              os.path.join(extract_to or tempfile.gettempdir(), "tars", fingerprint(tar)))
            rows += found
            counts[tar] = len(found)
        for table in tables:
            unit = table
            counts.setdefault(unit, 0)
            try:
                records = _table_rows(table)
            except Exception as e:  # noqa: BLE001 - a table that cannot be read is one quarantined row
                rel = os.path.relpath(table, root)
                rows.append(_row(f"{name}/{rel}", table, "@error", None, None, None, unit, "read_error",
                                 f"{type(e).__name__}: {e}"[:300]))
                counts[unit] += 1
                continue
            for i, rec in enumerate(records):
                p = next((rec[c] for c in PATH_COLUMNS if isinstance(rec.get(c), str) and rec[c]), None)
                key = f"row{i:07d}"
                caption = next((rec[c] for c in CAPTION_COLUMNS if rec.get(c) is not None), None)
                spans = parse_spans(next((rec[c] for c in SPAN_COLUMNS if rec.get(c) is not None), None),
                                    caption if isinstance(caption, list) else None)
                if isinstance(caption, list):
                    caption = None
                meta = json.dumps({k: v for k, v in rec.items() if isinstance(v, (str, int, float, bool))},
                                  sort_keys=True, default=str)
                rel = os.path.relpath(table, root)
                if p is None:
                    rows.append(_row(f"{name}/{rel}", table, key, caption, meta, spans, unit, "read_error",
                                     "row names no video path"))
                elif is_url(p):  # fetched on the executors by filters.video_download, before the probe
                    rows.append(_row(f"{name}/{rel}", p.strip(), key, caption, meta, spans, unit))
                else:
                    full = p if os.path.isabs(p) else os.path.normpath(os.path.join(os.path.dirname(table), p))
                    if not full.lower().endswith(VIDEO_EXTS) and os.path.exists(full + ".mp4"):
                        full += ".mp4"  # WebVid-style video ids
                    referenced.add(full)
                    error = None if os.path.isfile(full) else "read_error"
                    rows.append(_row(f"{name}/{rel}", full, key, caption, meta, spans, unit, error,
                                     None if error is None else f"no such file {full}"))
                counts[unit] += 1
        for f in files:
            if not f.lower().endswith(VIDEO_EXTS) or f in referenced:
                continue
            unit = "files:" + os.path.dirname(f)
            counts[unit] = counts.get(unit, 0) + 1
            caption, meta, spans, bad = _sidecars(f)
            rel = os.path.relpath(f, root)
            key = os.path.splitext(os.path.basename(f))[0]
            rows.append(_row(f"{name}/{rel}", f, key, caption, meta, spans, unit,
                             "meta_invalid" if bad else None, bad))
    return rows, counts


# --- cost-aware partitioning -------------------------------------------------------------------------

def snake_partition(rank: int, partitions: int) -> int:
    """Items ranked by cost (0 = the most costly) dealt to partitions 0..P-1, P-1..0, 0..P-1, ...: each
    task gets one of the costliest items and its sum stays close to the mean."""
    r = rank % (2 * partitions)
    return r if r < partitions else 2 * partitions - 1 - r


def balance_by_cost(df, cost, partitions: int):
    """`df` spread over `partitions` tasks by `cost` (a Column): a distributed sort by cost, ranks
    from zipWithIndex (no single-partition window), snake dealing, then an identity partitioner."""
    spark = df.sparkSession
    schema = df.schema
    ranked = df.withColumn("_cost", cost.cast("double")).orderBy("_cost", SAMPLE_ID, ascending=[False, True])
    keep = [f.name for f in schema]
    pairs = ranked.select(*keep).rdd.zipWithIndex().map(lambda t: (snake_partition(t[1], partitions), t[0]))
    spread = pairs.partitionBy(partitions, lambda k: k).values()
    return spark.createDataFrame(spread, schema)


# --- the plan ----------------------------------------------------------------------------------------

def to_sample(row: dict) -> dict:
    blob = read_ref(row[ref_column(S.FRAMES)])
    fps = Fraction(row[S.FPS_NUM], row[S.FPS_DEN])
    doc = {
        "sample_id": row[SAMPLE_ID], "video_id": row[L.PARENT_ID], "source": row[SOURCE],
        "source_key": row[SOURCE_KEY], "clip_index": row[S.CLIP_INDEX],
        "clip_start_frame": row[S.CLIP_START], "clip_end_frame": row[S.CLIP_END],
        "clip_start": round(float(row[S.CLIP_START] / fps), 3), "clip_end": round(float(row[S.CLIP_END] / fps), 3),
        "source_fps": round(float(fps), 4), "source_fps_fraction": f"{fps.numerator}/{fps.denominator}",
        "source_width": row[S.WIDTH], "source_height": row[S.HEIGHT],
        "frame_width": row[S.FRAME_WIDTH], "frame_height": row[S.FRAME_HEIGHT],
        "frame_indices": list(row[S.FRAME_INDICES]), "timestamps": list(row[S.TIMESTAMPS]),
        "caption": row[S.CAPTION], "meta": json.loads(row[S.META]) if row.get(S.META) else None,
    }
    sample = {"__key__": row[SAMPLE_ID], "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()}
    pos = 0
    for ext, size in zip(S.frame_exts(len(row[S.FRAME_SIZES])), row[S.FRAME_SIZES]):
        sample[ext] = blob[pos:pos + size]
        pos += size
    if row[S.CAPTION]:
        sample["txt"] = row[S.CAPTION].encode()
    if row.get(ref_column(S.CLIP_MP4)):
        sample["mp4"] = read_ref(row[ref_column(S.CLIP_MP4)])
    return sample


def _explode_clips(F, scened):
    """One row per clip of every video that passed the integrity checks."""
    zipped = F.arrays_zip(F.col(S.CLIP_STARTS).alias("s"), F.col(S.CLIP_ENDS).alias("e"),
                          F.col(S.CLIP_SPANS).alias("k"))
    clips = (scened.filter(F.col(ERROR).isNull())
             .select("*", F.posexplode(zipped).alias(S.CLIP_INDEX, "_c")))
    key = F.concat(F.col(SOURCE_KEY), F.lit("#clip"), F.lpad(F.col(S.CLIP_INDEX).cast("string"), 4, "0"))
    clip_id = F.substring(F.sha1(F.concat_ws("\x00", F.lit(S.KIND), F.col(S.ID_SOURCE), key)), 1, 32)
    span_caption = F.when(F.col("_c.k").isNotNull(), F.element_at(F.col(S.SPANS), F.col("_c.k") + 1)["caption"])
    return clips.select(
        clip_id.alias(SAMPLE_ID), KIND_COLUMN, SOURCE, key.alias(SOURCE_KEY), F.lit(S.CLIP_UNIT).alias(L.UNIT),
        F.col(SAMPLE_ID).alias(L.PARENT_ID), S.PATH, S.ID_SOURCE,
        F.coalesce(span_caption, F.col(S.CAPTION)).alias(S.CAPTION), S.META, READ_UNIT, ERROR, ERROR_DETAIL,
        S.DURATION, S.FPS_NUM, S.FPS_DEN, S.WIDTH, S.HEIGHT, S.NUM_FRAMES, S.CODEC, S.HAS_AUDIO, S.FILE_BYTES,
        S.CLIP_INDEX, F.col("_c.s").alias(S.CLIP_START), F.col("_c.e").alias(S.CLIP_END))


def plan(ctx: Context) -> Plan:
    from pyspark.sql import functions as F

    cfg: Video = ctx.cfg
    recipe = ctx.recipe
    embed = None
    if cfg.dedup.enabled:  # driver first: weights that cannot load fail here, naming the key
        clip, real, msg = resolve_weights(cfg.dedup.clip, "video.dedup.clip", spark=ctx.spark)
        embed = ClipEmbed(clip=clip, max_frames=cfg.dedup.embed_frames) if real else None
        dedup_facts = {"embeddings": real, "message": msg, "video_threshold": cfg.dedup.video_threshold,
                       "text_threshold": cfg.dedup.text_threshold, "hamming_radius": cfg.dedup.hamming_radius}
    else:
        dedup_facts = {"enabled": False}
    dedup_check = {"name": "dedup_skipped", "severity": "critical", "ok": True,
                   "description": f"near-duplicate clips left undecided <= video.dedup.max_skipped "
                                  f"({cfg.dedup.max_skipped}); raise video.dedup.max_rounds"}
    extract_to = own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-tars")
    rows, counts = list_videos(ctx.uris, recipe.read.dataset, extract_to)  # driver: fails fast on a missing input
    key = fingerprint(S.KIND, sorted(storage.normalize(u) for u in ctx.uris), recipe.read.dataset, cfg.probe,
                      cfg.scenes, cfg.frames, cfg.write_clip and cfg.cut, len(rows), cfg.download)
    media = (S.FRAMES, S.STRIP, S.CLIP_MP4) if cfg.write_clip else (S.FRAMES, S.STRIP)
    spool = Spool(directory=own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-{key}"), columns=media)
    tasks = max(1, ctx.spark.sparkContext.defaultParallelism * cfg.tasks_per_core)
    urls = sum(1 for r in rows if r[ERROR] is None and is_url(r[S.PATH]))
    facts: dict = {"videos_listed": len(rows), "urls": urls, "tasks": tasks}
    read_stages = [cfg.probe]
    if urls:  # downloaded once each into the run's work dir (removed with it), then probed as local files
        read_stages.insert(0, dataclasses.replace(
            cfg.download, directory=own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-downloads-{key}")))

    def features():
        from schemas.common import spark_type

        raw = ctx.spark.createDataFrame(pa.Table.from_pylist(rows, schema=S.RAW).to_pylist(), spark_type(S.RAW))
        parts = max(1, min(len(rows), tasks))
        # rows naming the same URL go to one task, where the download stage fetches it once
        raw = raw.repartition(parts, S.PATH) if urls else raw.repartition(parts)
        probed = cached(apply_stages(raw, read_stages, ctx.timer))
        pixels = F.col(S.WIDTH).cast("double") * F.col(S.HEIGHT).cast("double")
        probed = balance_by_cost(probed, F.coalesce(F.col(S.DURATION) * pixels, F.lit(0.0)),
                                 max(1, min(len(rows), tasks)))
        scened = cached(apply_stages(probed, [cfg.scenes], ctx.timer))
        videos = scened.drop(S.CLIP_STARTS, S.CLIP_ENDS, S.CLIP_SPANS)
        clips = _explode_clips(F, scened)
        n_clips = clips.count()
        facts["clips_cut"] = n_clips
        clip_seconds = (F.col(S.CLIP_END) - F.col(S.CLIP_START)) * F.col(S.FPS_DEN) / F.col(S.FPS_NUM)
        clips = balance_by_cost(clips, clip_seconds * pixels, max(1, min(n_clips, tasks)))
        framed = apply_stages(clips, [cfg.frames, *([cfg.cut] if cfg.write_clip else []), spool], ctx.timer)
        return videos.unionByName(framed, allowMissingColumns=True)

    def rules(F):
        seconds = (F.col(S.CLIP_END) - F.col(S.CLIP_START)) * F.col(S.FPS_DEN) / F.col(S.FPS_NUM)
        return F.when((F.col(L.UNIT) == S.CLIP_UNIT) & (seconds < cfg.scenes.min_seconds), F.lit("clip_too_short"))

    def dedup(alive):
        drops = clip_duplicates(alive.filter(F.col(L.UNIT) == S.CLIP_UNIT), cfg.dedup, embed is not None,
                                dedup_facts)
        dedup_check["ok"] = dedup_facts.get("skipped", 0) <= cfg.dedup.max_skipped
        return drops

    def videos_without_clips(alive):
        live = alive.filter(F.col(L.UNIT) == S.CLIP_UNIT).select(F.col(L.PARENT_ID).alias("_v")).distinct()
        return (alive.filter(F.col(L.UNIT) == S.VIDEO_UNIT).join(live, F.col(SAMPLE_ID) == F.col("_v"), "left_anti")
                .select(SAMPLE_ID, F.lit("no_clip_kept").alias("reason")))

    steps = [Step("rules", reason=rules, depends=cfg.scenes.min_seconds)]
    if embed is not None:
        steps.append(Step("embed", stage=embed, reads=(ref_column(S.FRAMES), S.FRAME_SIZES, S.CAPTION),
                          store="checkpoint"))
    if cfg.dedup.enabled:
        steps.append(Step("dedup", decide=dedup, depends=cfg.dedup))
    steps.append(Step("videos", decide=videos_without_clips))

    def samples(alive):
        return alive.filter(F.col(L.UNIT) == S.CLIP_UNIT)

    report = {
        "duration": lambda F: F.col(S.DURATION),
        "width": lambda F: F.col(S.WIDTH),
        "fps": lambda F: F.col(S.FPS_NUM) / F.col(S.FPS_DEN),
        "clip_seconds": lambda F: (F.col(S.CLIP_END) - F.col(S.CLIP_START)) * F.col(S.FPS_DEN) / F.col(S.FPS_NUM),
        "frames_sampled": lambda F: F.size(S.FRAME_INDICES),
    }
    return Plan(
        features=features, key=key, steps=steps, to_sample=to_sample, samples=samples,
        sample_size=lambda F: (F.col(size_column(S.FRAMES)) + F.coalesce(F.length(S.CAPTION), F.lit(0)) + 800
                               + (F.coalesce(F.col(size_column(S.CLIP_MP4)), F.lit(0)) if cfg.write_clip else 0)),
        report=report, thumbnail=S.STRIP, text=S.CAPTION, facts={"video": facts, "dedup": dedup_facts},
        assertions=[dedup_check],
        read_counts=lambda: dict(counts),
    )


# --- dedup ---------------------------------------------------------------------------------------------

def _mean_hamming(a: list[int] | None, b: list[int] | None) -> float | None:
    """Mean Hamming distance of two frame-hash sequences, aligned by relative position."""
    if not a or not b:
        return None
    if len(a) < len(b):
        a, b = b, a
    n, m = len(a), len(b)
    total = 0
    for i in range(n):
        j = round(i * (m - 1) / (n - 1)) if n > 1 else 0
        total += ((a[i] ^ b[j]) & ((1 << 64) - 1)).bit_count()
    return total / n


def normalise_caption(text: str | None) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", (text or "").lower()).split())


def _cosine(a, b) -> float | None:
    if a is None or b is None:
        return None
    return float(sum(x * y for x, y in zip(a, b)))


def clip_duplicates(clips, cfg: VideoDedup, embeddings: bool = False, stats: dict | None = None):
    """(sample_id, reason, duplicate_of) for clips that are near-duplicates of a better clip in both
    video and text. Candidates: the middle frames' pHashes agree on one of four 16-bit bands. Tier 1:
    aligned frame pHashes within `hamming_radius` (mean). Tier 2, with `embeddings`: video embeddings'
    cosine >= video_threshold and captions' >= text_threshold (two clips without a caption count as
    the same text); without: the normalised captions are equal. Better: more frames sampled, then
    more pixels, then the smaller id. `stats` gets the keeper rounds and the candidates left undecided."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    stats = {} if stats is None else stats
    mid = F.element_at(S.FRAME_PHASH, (F.size(S.FRAME_PHASH) / 2).cast("int") + 1)
    extra = [VIDEO_EMBEDDING, TEXT_EMBEDDING] if embeddings else []
    text = F.udf(normalise_caption, T.StringType(), useArrow=False)
    items = clips.filter(F.size(S.FRAME_PHASH) > 0).select(
        SAMPLE_ID, S.FRAME_PHASH, *extra, text(S.CAPTION).alias("_text"),
        F.size(S.FRAME_INDICES).alias("_n"), (F.col(S.WIDTH) * F.col(S.HEIGHT)).alias("_px"), mid.alias("_mid"))
    bands = items.select(SAMPLE_ID, F.explode(F.array(*[
        F.struct(F.lit(b).alias("b"), F.shiftrightunsigned("_mid", 16 * b).bitwiseAND(0xFFFF).alias("v"))
        for b in range(4)])).alias("_band")).select(SAMPLE_ID, "_band.b", "_band.v")
    a, b = bands.alias("a"), bands.alias("b")
    pairs = (a.join(b, (F.col("a.b") == F.col("b.b")) & (F.col("a.v") == F.col("b.v"))
                    & (F.col(f"a.{SAMPLE_ID}") < F.col(f"b.{SAMPLE_ID}")))
             .select(F.col(f"a.{SAMPLE_ID}").alias("x"), F.col(f"b.{SAMPLE_ID}").alias("y")).distinct())
    ia = items.select(*[F.col(c).alias(f"x{c}") for c in items.columns])
    ib = items.select(*[F.col(c).alias(f"y{c}") for c in items.columns])
    dist = F.udf(_mean_hamming, T.DoubleType(), useArrow=False)
    edges = (pairs.join(ia, F.col("x") == F.col(f"x{SAMPLE_ID}")).join(ib, F.col("y") == F.col(f"y{SAMPLE_ID}"))
             .filter(dist(F.col(f"x{S.FRAME_PHASH}"), F.col(f"y{S.FRAME_PHASH}")) <= cfg.hamming_radius))
    if embeddings:
        cos = F.udf(_cosine, T.DoubleType(), useArrow=False)
        no_text = (F.col("x_text") == "") & (F.col("y_text") == "")
        edges = edges.filter((cos(f"x{VIDEO_EMBEDDING}", f"y{VIDEO_EMBEDDING}") >= cfg.video_threshold)
                             & (no_text | (cos(f"x{TEXT_EMBEDDING}", f"y{TEXT_EMBEDDING}") >= cfg.text_threshold)))
    else:
        edges = edges.filter(F.col("x_text") == F.col("y_text"))
    # keeper rule: more frames sampled (a longer clip), then more pixels, then the smaller id
    rank = {side: F.concat(F.lpad((F.lit(1 << 40) - F.col(f"{side}_n")).cast("string"), 13, "0"), F.lit(":"),
                           F.lpad((F.lit(1 << 40) - F.col(f"{side}_px")).cast("string"), 13, "0"), F.lit(":"),
                           F.col(side)) for side in ("x", "y")}
    oriented = edges.select(F.least(rank["x"], rank["y"]).alias("src"), F.greatest(rank["x"], rank["y"]).alias("dst"))
    # keeper-centred greedy in rank order (filters.dedup's rounds, as image dedup): no chaining, every
    # dropped clip is an edge away from the keeper it names
    oriented = oriented.localCheckpoint()
    state, rounds, undecided = _keepers(oriented, cfg.max_rounds)
    stats["rounds"], stats["skipped"] = rounds, undecided
    kept = state.filter(F.col("state") == KEEPER).select(F.col("node").alias("src"))
    dropped = state.filter(F.col("state") == DEDUP_DROPPED).select(F.col("node").alias("dst"))
    assign = oriented.join(kept, "src").join(dropped, "dst").groupBy("dst").agg(F.min("src").alias("src"))
    return assign.select(F.substring_index("dst", ":", -1).alias(SAMPLE_ID), F.lit("near_duplicate").alias("reason"),
                         F.substring_index("src", ":", -1).alias("duplicate_of"))


def explain(row: dict, section: dict, facts: dict) -> str:
    """The value that decided a row's fate, in words (the report's cards)."""
    def num(name):
        v = row.get(name)
        return v if isinstance(v, (int, float)) and not math.isnan(v) else None

    reason, seconds, duration = row.get("reason"), num("clip_seconds"), num("duration")
    if row.get("status") == "kept":
        if seconds is not None and num("frames_sampled") is not None:
            return f"{row['frames_sampled']} frames over {seconds:.1f} s"
        return f"{duration:.1f} s" if duration is not None else ""
    if reason == "clip_too_short" and seconds is not None:
        return f"{seconds:.2f} s < {section.get('scenes', {}).get('min_seconds')} s"
    if reason == "video_too_long" and duration is not None:
        return f"{duration:.0f} s > {section.get('probe', {}).get('max_seconds')} s"
    if reason == "near_duplicate":
        return f"frames and caption near {row.get('duplicate_of')}"
    return row.get("detail") or reason or ""


KIND = Kind(
    name=S.KIND, config=Video, units=S.UNITS, reasons=S.REASONS, contract=S.contract, plan=plan,
    layouts=("folders of videos with {stem}.txt/.json side-cars", "video2dataset folder or tar output (clips spans)",
             "webdataset tars of videos",
             "Parquet/JSONL/CSV tables of paths with captions and timestamp spans (WebVid, Panda-70M)"),
    explain=explain, sample_unit=S.CLIP_UNIT,
)
