"""OCR, GLM-4.1V's three branches on one kind: read -> (render | PDF page) -> decode -> PP-OCR -> boxes
drawn -> spool | rules + no text -> image dedup -> text dedup -> legibility (CER) -> shards + ledger.

Inputs (`--input ocr=URI`, repeatable). A URI may name its branch, `synthetic:URI`, `scene:URI` or
`academic:URI`; otherwise `ocr.branch` does, and `auto` (the default) goes by what is there, file by file:

- `academic`: PDFs (`*.pdf`): one item per page (filters/pdf_pages.py);
- `synthetic`: text corpora: `.txt`/`.md` files without an image of the same name (cut into chunks of
  paragraphs, `synthetic.chunk_chars`) and JSONL whose rows have a text field but no image: one item
  per chunk or row, rendered (filters/render.py);
- `scene`: everything the image_text readers read (folders of images, webdataset tars, Parquet/JSONL
  tables with image bytes or paths), through those readers and filters/decode.py unchanged; PP-OCR
  reads each image (filters/ocr.py).

Every item gets its own sample_id in this kind (the image readers' ids are re-keyed with the kind's
name), and the readers' per-unit counts are reconciled with the ledger as for every kind.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import posixpath
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pyarrow as pa

from filters.augment import Augment
from filters.base import Stage, apply_stages
from filters.decode import Decode, phash_hex
from filters.dedup import Dedup, find_duplicates_with_stats
from filters.media import Spool, read_ref, ref_column, size_column
from filters.ocr import Boxed, Legibility, PpOcr, check_models
from filters.pdf_pages import Academic, latex_markup, pdf_pages, split_at_pages
from filters.render import RenderText, Synthetic
from filters.rules import first_reason, image_checks
from pipelines.checkpoint import fingerprint, own
from pipelines.io import readers, storage
from pipelines.kind import Context, Kind, Plan, Step
from schemas import image_text as IT
from schemas import ocr as S
from schemas.common import (
    ERROR,
    ERROR_DETAIL,
    READ_UNIT,
    SAMPLE_ID,
    SOURCE,
    SOURCE_KEY,
    make_sample_id,
)
from schemas.common import KIND as KIND_COLUMN

TEXT_EXTS = (".txt", ".md")
JSONL_EXTS = (".jsonl", ".ndjson")
TEXT_FIELDS = ("text", "content", "caption", "txt", "TEXT")
PREFIXES = {f"{b}:": b for b in S.BRANCHES}


@dataclasses.dataclass(frozen=True)
class OcrRules:
    min_side: int = 32  # a single rendered line is short: the image rule is loose here
    max_aspect_ratio: float = 25.0
    min_pixel_std: float = 2.0


@dataclasses.dataclass(frozen=True)
class TextDedup:
    enabled: bool = True
    min_chars: int = 20  # shorter texts (a scene's "STOP") repeat across distinct images: never dropped for it


@dataclasses.dataclass(frozen=True)
class Ocr:
    """The recipe section `ocr`."""

    branch: str = "auto"  # inputs without a branch prefix: auto | synthetic | scene | academic
    chunk_chars: int = 600  # a .txt corpus is cut into items of whole paragraphs up to this many characters
    decode: Decode = Decode()
    ppocr: PpOcr = PpOcr()
    synthetic: Synthetic = Synthetic()
    academic: Academic = Academic()
    augment: Augment = Augment()
    augment_branches: tuple[str, ...] = ("synthetic", "academic")
    rules: OcrRules = OcrRules()
    dedup: Dedup = Dedup()
    near_dedup_branches: tuple[str, ...] = ("scene",)  # rendered pages look alike at 32x32: exact dedup only
    text_dedup: TextDedup = TextDedup()
    legibility: Legibility = Legibility()

    def __post_init__(self) -> None:
        if self.branch not in ("auto", *S.BRANCHES):
            raise ValueError(f"ocr.branch must be auto or one of {S.BRANCHES}, got {self.branch!r}")


# --- planning: which branch each input file feeds ------------------------------------------------------

def split_branch(uri: str, default: str) -> tuple[str, str]:
    """('synthetic:/x' -> ('synthetic', '/x')); no prefix: (default, uri)."""
    for prefix, branch in PREFIXES.items():
        if uri.startswith(prefix):
            return branch, uri[len(prefix):]
    return default, uri


def _jsonl_has_images(uri: str) -> bool:
    with storage.open_read(uri) as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except ValueError:
                    return False
                cols = readers.IMAGE_COLUMNS + readers.PATH_COLUMNS + readers.URL_COLUMNS
                return isinstance(row, dict) and any(row.get(c) for c in cols)
    return False


def classify(uri: str, branch: str) -> dict[str, list[str]]:
    """Files (or the whole URI, for scene) per branch: {"scene": [uris], "synthetic": [files], "academic": [files]}."""
    out: dict[str, list[str]] = {b: [] for b in S.BRANCHES}
    files = storage.list_files(uri)
    if branch == "scene":
        out["scene"].append(uri)
        return out
    if branch == "academic":
        out["academic"] = [f for f in files if f.lower().endswith(".pdf")]
        return out
    if branch == "synthetic":
        out["synthetic"] = [f for f in files if f.lower().endswith(TEXT_EXTS + JSONL_EXTS)]
        return out
    stems = {os.path.splitext(f)[0] for f in files if f.rsplit(".", 1)[-1].lower() in readers.IMAGE_EXTS}
    scene = []
    for f in files:
        low = f.lower()
        if low.endswith(".pdf"):
            out["academic"].append(f)
        elif ((low.endswith(TEXT_EXTS) and os.path.splitext(f)[0] not in stems)
              or (low.endswith(JSONL_EXTS) and not _jsonl_has_images(f))):
            out["synthetic"].append(f)
        elif (low.endswith((".tar", ".parquet", *JSONL_EXTS)) or os.path.splitext(low)[1][1:] in readers.IMAGE_EXTS
              or os.path.splitext(f)[0] in stems):  # what the image readers read, and the images' side-cars
            scene.append(f)
    if scene:
        out["scene"] = [uri] if len(scene) == len(files) else scene
    return out


# --- reading text corpora and PDFs --------------------------------------------------------------------

UNIT = pa.schema([pa.field("format", pa.string()), pa.field("uri", pa.string()), pa.field("root", pa.string())])


def chunks(text: str, limit: int) -> list[str]:
    """Whole paragraphs (blank-line separated) gathered up to `limit` characters; a longer paragraph alone."""
    out, cur = [], ""
    for para in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not para:
            continue
        if cur and len(cur) + 2 + len(para) > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def _raw(uri: str, root: str, dataset: str, key: str, branch: str, **values) -> dict:
    rel = uri[len(root):].lstrip("/") if root and uri.startswith(root.rstrip("/") + "/") else uri
    name = dataset or posixpath.basename(root.rstrip("/"))
    row = {f.name: None for f in S.RAW}
    row.update({SAMPLE_ID: make_sample_id(S.KIND, f"{name}/{rel}", key), KIND_COLUMN: S.KIND, SOURCE: uri,
                SOURCE_KEY: key, S.BRANCH: branch, **values})
    return row


def read_ocr_unit(unit: dict, max_bytes: int, cfg: Ocr, dataset: str) -> Iterator[dict]:
    """RAW rows of one text file, JSONL file or PDF; a file that cannot be read is one quarantined row."""
    uri, root, fmt = unit["uri"], unit.get("root") or "", unit["format"]
    base = {"uri": uri, "root": root, "dataset": dataset}
    try:
        data = storage.read_bytes(uri, max_bytes)
    except Exception as e:
        if readers.is_transient(e):
            raise
        yield _raw(**base, key="@error", branch="academic" if fmt == "pdf" else "synthetic",
                   error="read_error", error_detail=f"{type(e).__name__}: {e}"[:500])
        return
    if fmt == "pdf":
        stream = pdf_pages(data, cfg.academic)
        try:
            first = next(stream, None)  # the document is opened here
        except Exception as e:  # noqa: BLE001 - pypdfium2 raises PdfiumError on anything it cannot open
            yield _raw(**base, key="@error", branch="academic", error="pdf_unreadable",
                       error_detail=f"{type(e).__name__}: {e}"[:500])
            return
        pages = itertools.chain([] if first is None else [first], stream)
        latex, latex_error = None, None
        if storage.exists(uri[: -len(".pdf")] + ".tex"):  # only then are all pages held at once
            pages = list(pages)
            latex, latex_error = _latex_beside(uri, [p.get("text") for p in pages], max_bytes)
        for p, tex in zip(pages, latex or itertools.repeat(None)):
            text_layer = p.get("text_source") == "text_layer"
            source = None if not text_layer else "latex" if tex else "text_layer"
            yield _raw(**base, key=f"page{p['page']:05d}", branch="academic", image=p.get("image"),
                       text=p.get("text"), lines=None if p.get("lines") is None else S.lines_json(p["lines"]),
                       markup=(tex or p.get("markup")) if text_layer else None, markup_source=source,
                       text_source=p.get("text_source") or "ocr", page=p["page"],
                       error=p.get("error"), error_detail=p.get("detail") or latex_error)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield _raw(**base, key="@error", branch="synthetic", error="read_error", error_detail=f"not UTF-8: {e}"[:500])
        return
    if fmt == "text":
        for i, chunk in enumerate(chunks(text, cfg.chunk_chars)):
            yield _raw(**base, key=f"chunk{i:06d}", branch="synthetic", text=chunk, text_source="render")
        return
    keys = readers._UniqueKeys()
    for n, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004 - reported as the line's read_error
        except (ValueError, RecursionError) as e:
            yield _raw(**base, key=f"line{n}", branch="synthetic", error="read_error",
                       error_detail=f"line {n}: {type(e).__name__}: {e}"[:500])
            continue
        raw_key = readers._first(row, readers.KEY_COLUMNS)
        key, again = keys.claim(str(raw_key) if raw_key is not None else f"line{n}")
        body = readers._first(row, TEXT_FIELDS)
        yield _raw(**base, key=key, branch="synthetic", text=None if body is None else str(body), text_source="render",
                   error="duplicate_member" if again else None,
                   error_detail="the key appeared earlier in this file" if again else None)


def _latex_beside(uri: str, page_texts: list[str | None], max_bytes: int) -> tuple[list[str] | None, str | None]:
    """The LaTeX source `<name>.tex` beside `<name>.pdf`, as markup split at the PDF's pages (Nougat);
    (None, None) without one, (None, why) when pandoc cannot convert it (the text layer's markup is kept)."""
    tex_uri = uri[: -len(".pdf")] + ".tex"
    if not uri.lower().endswith(".pdf") or not storage.exists(tex_uri):
        return None, None
    try:
        markup_text = latex_markup(storage.read_bytes(tex_uri, max_bytes))
    except Exception as e:
        if readers.is_transient(e):
            raise
        return None, f"LaTeX source not used: {type(e).__name__}: {e}"[:300]
    return split_at_pages(markup_text, page_texts), None


@dataclasses.dataclass(frozen=True)
class ReadOcrUnits(readers.UnitReader):
    """Read-unit rows (format, uri, root) in, RAW rows out; items counted per unit (`counter`)."""

    name: ClassVar[str] = "read_ocr"
    raw: ClassVar[pa.Schema] = S.RAW
    rows: ClassVar[int] = 16
    image: ClassVar[str | None] = S.IMAGE
    cfg: Ocr = Ocr()
    max_member_bytes: int = 1 << 30

    def items(self, unit: dict) -> Iterator[list[dict]]:
        return ([row] for row in read_ocr_unit(unit, self.max_member_bytes, self.cfg, self.dataset))

    def unit_of(self, unit: dict) -> str:
        return f"{unit['format']}:{unit['uri']}"


@dataclasses.dataclass(frozen=True)
class SceneRows(Stage):
    """The image readers' RAW rows (schemas/image_text.py) -> this kind's RAW rows: the kind's own
    sample_id (the reader's id re-keyed with the kind's name, so it keeps the reader's stability under
    moves), branch `scene`, text to be read by OCR. Captions and side-cars are not used."""

    name: ClassVar[str] = "scene_rows"

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return S.RAW

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            t0 = time.perf_counter()
            rows = []
            for r in batch.to_pylist():
                row = {f.name: None for f in S.RAW}
                row.update({SAMPLE_ID: make_sample_id(S.KIND, "scene", r[SAMPLE_ID]), KIND_COLUMN: S.KIND,
                            SOURCE: r[SOURCE], SOURCE_KEY: r[SOURCE_KEY], S.BRANCH: "scene", S.IMAGE: r[IT.IMAGE],
                            S.TEXT_SOURCE: "ocr", READ_UNIT: r[READ_UNIT], ERROR: r[ERROR],
                            ERROR_DETAIL: r[ERROR_DETAIL]})
                if row[ERROR] is None and r.get(IT.URL) and r[IT.IMAGE] is None:
                    row[ERROR], row[ERROR_DETAIL] = "image_missing", "URLs are not downloaded for OCR inputs"
                rows.append(row)
            if timing is not None:
                timing[0] += time.perf_counter() - t0
            if rows:
                yield pa.RecordBatch.from_pylist(rows, schema=S.RAW)


# --- the plan -------------------------------------------------------------------------------------

def to_sample(row: dict) -> dict:
    """Row of the final table -> {sample_id}.jpg/.txt/.json, per the shard contract."""
    def parsed(v):
        return None if v is None else json.loads(v)

    cer = row.get(S.CER)
    doc = {
        "sample_id": row[SAMPLE_ID], "source": row[SOURCE], "source_key": row[SOURCE_KEY],
        "branch": row[S.BRANCH], "text_source": row[S.TEXT_SOURCE], "width": row[IT.WIDTH], "height": row[IT.HEIGHT],
        "text": row[S.TEXT], "lines": parsed(row[S.LINES]) or [], "markup": row[S.MARKUP],
        "markup_source": row[S.MARKUP_SOURCE], "page": row[S.PAGE],
        "render": parsed(row[S.RENDER]), "augmentation": parsed(row[S.AUGMENTATION]),
        "ocr_text": row.get(S.OCR_TEXT), "cer": None if cer is None else round(float(cer), 4),
        "phash": phash_hex(row[IT.PHASH]),
    }
    return {"__key__": row[SAMPLE_ID], "jpg": read_ref(row[ref_column(S.IMAGE)]), "txt": row[S.TEXT].encode("utf-8"),
            "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")}


def _no_text(F):
    return (F.col(S.LINES).isNull() | (F.coalesce(F.json_array_length(S.LINES), F.lit(0)) == 0)
            | F.col(S.TEXT).isNull() | (F.length(F.trim(S.TEXT)) == 0))


def text_duplicates(alive, min_chars: int):
    """Items whose whitespace-free text (already NFKC-normalised) equals a smaller sample_id's; for a
    synthetic item its source text (`text_key`), as two renders of one text may cut it differently."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    compact = F.regexp_replace(F.col(S.TEXT), r"\s+", "")
    rows = (alive.select(SAMPLE_ID, F.coalesce(S.TEXT_KEY, F.sha1(compact)).alias("_k"), compact.alias("_t"))
            .filter(F.length("_t") >= min_chars))
    w = Window.partitionBy("_k").orderBy(SAMPLE_ID)
    ranked = rows.withColumn("_keeper", F.first(SAMPLE_ID).over(w))
    return ranked.filter(F.col("_keeper") != F.col(SAMPLE_ID)).select(
        SAMPLE_ID, F.lit("duplicate_text").alias("reason"), F.col("_keeper").alias("duplicate_of"))


def plan(ctx: Context) -> Plan:
    cfg: Ocr = ctx.cfg
    recipe = ctx.recipe
    check_models()  # driver-side: rapidocr's bundled models load and read (fails before any Spark work)
    groups: dict[str, list[str]] = {b: [] for b in S.BRANCHES}
    branches = {}
    for raw_uri in ctx.uris:
        branch, uri = split_branch(raw_uri, cfg.branch)
        uri = storage.normalize(uri)
        found = classify(uri, branch)
        for b, items in found.items():
            groups[b] += [(uri, f) for f in items] if b != "scene" else items
        branches[raw_uri] = sorted(b for b, items in found.items() if items)
    scene_uris = groups["scene"]
    units = ([{"format": "pdf", "uri": f, "root": readers.input_root(u)} for u, f in groups["academic"]]
             + [{"format": "jsonl" if f.lower().endswith(JSONL_EXTS) else "text", "uri": f,
                 "root": readers.input_root(u)} for u, f in groups["synthetic"]])
    key = fingerprint("ocr-v1", sorted(ctx.uris), recipe.read, recipe.seed, cfg.branch, cfg.chunk_chars, cfg.decode,
                      cfg.ppocr, cfg.synthetic, cfg.academic, cfg.augment, cfg.augment_branches)
    spool = Spool(directory=own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-{key}"), columns=(S.IMAGE, S.BOXED))
    counter = ctx.spark.sparkContext.accumulator({}, readers.ReadCounts())
    no_aug = Augment(probability=0.0)
    render = RenderText(cfg.synthetic, cfg.augment if "synthetic" in cfg.augment_branches else no_aug, recipe.seed)
    academic_aug = AugmentPages(cfg.augment if "academic" in cfg.augment_branches else no_aug, recipe.seed)
    after = [cfg.decode, cfg.ppocr, Boxed(), spool]

    def features():
        parts = []
        if scene_uris:
            plan_df = readers.read_plan(ctx.spark, scene_uris, recipe.read.files_per_task)
            parts.append(apply_stages(plan_df, [readers.ReadUnits(recipe.read.dataset, counter,
                                                                  recipe.read.max_member_bytes), SceneRows(), *after],
                                      ctx.timer))
        if units:
            # as Arrow, not a Python list: no Python worker (of a pool of its own) to unpickle it
            df = ctx.spark.createDataFrame(pa.Table.from_pylist([{k: u[k] for k in UNIT.names} for u in units], UNIT))
            df = df.repartition(min(len(units), max(1, ctx.spark.sparkContext.defaultParallelism * 4)))
            reader = ReadOcrUnits(recipe.read.dataset, counter, cfg, recipe.read.max_member_bytes)
            parts.append(apply_stages(df, [reader, render, academic_aug, *after], ctx.timer))
        if not parts:
            raise FileNotFoundError(f"ocr: no input files under {ctx.uris}")
        out = parts[0]
        for p in parts[1:]:
            out = out.unionByName(p)
        return out

    def rules(F):
        r = cfg.rules
        return first_reason([*image_checks(r.min_side, r.max_aspect_ratio, r.min_pixel_std),
                             (_no_text(F), F.lit("no_text_detected"))])

    dedup_facts = {"skipped": 0, "edges": 0, "rounds": 0, "max_skipped": cfg.dedup.max_skipped}
    dedup_check = {"name": "dedup_skipped", "severity": "critical", "ok": True,
                   "description": f"near-duplicate candidates left undecided <= dedup.max_skipped ({cfg.dedup.max_skipped})"}

    def dedup(alive):
        from pyspark.sql import functions as F

        near = alive.filter(F.col(S.BRANCH).isin(list(cfg.near_dedup_branches)))
        exact = alive.filter(~F.col(S.BRANCH).isin(list(cfg.near_dedup_branches)))
        drops, stats = find_duplicates_with_stats(near, cfg.dedup)
        more, _ = find_duplicates_with_stats(exact, dataclasses.replace(cfg.dedup, near=False))
        dedup_facts.update(skipped=stats.skipped, edges=stats.edges, rounds=stats.rounds)
        dedup_check["ok"] = stats.skipped <= cfg.dedup.max_skipped
        return drops.unionByName(more)

    steps = [Step("rules", reason=rules, depends=cfg.rules), Step("dedup", decide=dedup, depends=cfg.dedup)]
    if cfg.text_dedup.enabled:
        steps.append(Step("text_dedup", decide=lambda alive: text_duplicates(alive, cfg.text_dedup.min_chars),
                          depends=cfg.text_dedup))
    if cfg.legibility.enabled:
        def illegible(alive):
            from pyspark.sql import functions as F

            return alive.filter(F.col(S.CER) > cfg.legibility.max_cer).select(
                SAMPLE_ID, F.lit("illegible_render").alias("reason"))

        steps.append(Step("legibility", stage=cfg.legibility, reads=(ref_column(S.IMAGE), S.TEXT, S.TEXT_SOURCE, S.BRANCH),
                          store="checkpoint", decide=illegible, depends=cfg.legibility.max_cer))

    def samples(alive):
        from pyspark.sql import functions as F

        for col, typ in ((S.OCR_TEXT, "string"), (S.CER, "float")):
            if col not in alive.columns:
                alive = alive.withColumn(col, F.lit(None).cast(typ))
        return alive

    def sample_size(F):
        return F.col(size_column(S.IMAGE)) + F.length(S.TEXT) * 2 + F.coalesce(F.length(S.LINES), F.lit(0)) + 800

    report = {
        "branch": lambda F: F.col(S.BRANCH), "text_source": lambda F: F.col(S.TEXT_SOURCE),
        "markup_source": lambda F: F.col(S.MARKUP_SOURCE),
        "line_count": lambda F: F.json_array_length(S.LINES), "text_chars": lambda F: F.length(S.TEXT),
        "cer": (lambda F: F.col(S.CER)) if cfg.legibility.enabled else (lambda F: F.lit(None).cast("float")),
        "width": lambda F: F.col(IT.WIDTH), "height": lambda F: F.col(IT.HEIGHT),
        "short_side": lambda F: F.least(IT.WIDTH, IT.HEIGHT),
        "aspect_ratio": lambda F: F.greatest(IT.WIDTH, IT.HEIGHT) / F.least(IT.WIDTH, IT.HEIGHT),
        "pixel_std": lambda F: F.col(IT.PIXEL_STD), "phash": lambda F: F.col(IT.PHASH),
    }
    from importlib.metadata import version

    rapidocr_version = version("rapidocr")
    facts = {"ocr": {"inputs": branches, "rapidocr": rapidocr_version, "max_cer": cfg.legibility.max_cer,
                     "legibility": cfg.legibility.enabled}, "dedup": dedup_facts}
    return Plan(
        features=features, key=key, steps=steps, to_sample=to_sample, sample_size=sample_size, samples=samples,
        report=report, thumbnail=S.BOXED, text=S.TEXT, facts=facts, assertions=[dedup_check],
        read_counts=lambda: readers.per_unit(counter.value),
    )


@dataclasses.dataclass(frozen=True)
class AugmentPages(Stage):
    """Reads `sample_id`, `branch`, `image`, `lines`; on academic pages with an image applies the Nougat
    augmentations (filters/augment.py), boxes moved with a rotation; writes `image`, `lines`, `augmentation`."""

    name: ClassVar[str] = "augment_pages"
    augment: Augment = Augment()
    seed: int = 0

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.IMAGE, pa.binary()), pa.field(S.LINES, pa.string()), pa.field(S.AUGMENTATION, pa.string())]

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        import io

        from PIL import Image

        from filters.augment import augment
        from filters.ocr import norm_box, pixel_box
        from filters.render import render_seed

        out = {f.name: batch.column(f.name).to_pylist() for f in self.adds()}
        ids, branches = batch.column(SAMPLE_ID).to_pylist(), batch.column(S.BRANCH).to_pylist()
        for i, (sid, branch) in enumerate(zip(ids, branches)):
            if branch != "academic" or not out[S.IMAGE][i] or self.augment.probability <= 0:
                continue
            img = Image.open(io.BytesIO(out[S.IMAGE][i])).convert("RGB")
            w, h = img.size
            lines = json.loads(out[S.LINES][i]) if out[S.LINES][i] else []
            boxes = [pixel_box(ln["box"], w, h) for ln in lines]
            seed = render_seed(self.seed, sid)
            img, boxes, record = augment(img, [tuple(map(float, b)) for b in boxes], seed, self.augment)
            if record is None:
                continue
            for ln, b in zip(lines, boxes):
                ln["box"] = norm_box(*b, w, h)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out[S.IMAGE][i] = buf.getvalue()
            out[S.LINES][i] = S.lines_json(lines) if out[S.LINES][i] else out[S.LINES][i]
            out[S.AUGMENTATION][i] = json.dumps(record, sort_keys=True)
        return out


def explain(row: dict, section: dict, facts: dict) -> str:
    reason = row.get("reason")
    if row.get("status") == "kept":
        cer = row.get("cer")
        return f"{row.get('branch')}, {row.get('line_count')} lines" + (f", CER {cer:.2f}" if cer is not None else "")
    if reason == "no_text_detected":
        return f"{row.get('line_count') or 0} valid lines (PP-OCR score >= {section.get('ppocr', {}).get('min_score')})"
    if reason == "illegible_render" and row.get("cer") is not None:
        return f"CER {row['cer']:.2f} > {section.get('legibility', {}).get('max_cer')}"
    if reason in ("duplicate_text", "exact_duplicate", "near_duplicate"):
        return f"copy of {row.get('duplicate_of')}"
    if reason == "image_too_small" and row.get("width"):
        return f"{row['width']}x{row['height']}"
    return row.get("detail") or reason or ""


KIND = Kind(
    name=S.KIND, config=Ocr, units=S.UNITS, reasons=S.REASONS, contract=S.contract, plan=plan,
    layouts=("synthetic: .txt/.md text corpora, JSONL with a text field",
             ("scene: the image readers' layouts (folders of images, webdataset tars, Parquet/JSONL tables)"),
             "academic: PDFs"),
    explain=explain,
)

