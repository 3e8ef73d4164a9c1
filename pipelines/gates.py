"""Quality gates: great-expectations suites that a run must pass before its shards are published.

Per kind, three suites, each over a pandas table built from the run:

- `<kind>.ledger`: the ledger rows of the kind (every row up to `LEDGER_CAP`; above it a sample
  chosen by a hash of sample_id, so both copies of a duplicated id are in or out together): ids
  unique and well-formed, statuses and reasons from the known set (`schemas.ledger`), kept rows
  with a shard and no reason, duplicates pointing at a ledger row that was not quarantined.
- `<kind>.totals`: one row of exact counts computed with Spark: input = kept + dropped +
  quarantined, distinct ids = input, kept = samples in the shards.
- `<kind>.shards`: the `.json` members read back from the shards just written (all of them up to
  `SHARD_SAMPLE_CAP` samples; above it every k-th shard, whole): required fields present, ids unique,
  values in range (sizes, aspect ratio, caption length, language, scores), kept CLIP scores at or
  above the threshold when real weights were used, each sample in the shard the ledger names.

Every expectation is named `<kind>.<table>.<check>` (its `meta.name`) and is critical (fails the
run: no shards are published) or a warning (recorded only). Data Docs are built into
`OUT/reports/gx/` (`GX_DOCS` below, relative to OUT/reports); results go into summary.json.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
from typing import Any

from pipelines.io import shards as shard_io
from pipelines.io import storage
from schemas import ledger as L
from schemas.common import SAMPLE_ID

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # read when great_expectations is imported (lazily)

log = logging.getLogger(__name__)
logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it logs every registration at INFO

CRITICAL, WARNING = "critical", "warning"
LEDGER_CAP = 1_000_000  # ledger rows validated one by one; above it, a hash sample of about this many
SHARD_SAMPLE_CAP = 20_000  # shard samples read back on the driver; above it, whole shards spread evenly
GX_DOCS = "gx/uncommitted/data_docs/local_site/index.html"  # relative to OUT/reports
SAMPLE_ID_REGEX = r"^[0-9a-f]{16}$"
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")
# the sample json of the output contract (README): every field must be present in every sample
SHARD_FIELDS = ("sample_id", "source", "source_key", "url", "width", "height", "language", "language_score",
                "clip_score", "phash", "concepts", "caption", "caption_original", "recaption", "text_source", "meta")
DERIVED = ("key", "shard_file", "jpg_is_jpeg", "txt_matches", "short_side", "aspect_ratio", "caption_chars")
SHARD_NOT_NULL = ("sample_id", "source", "source_key", "width", "height", "language", "phash", "caption",
                  "caption_original", "text_source")


class GateFailed(RuntimeError):
    """A critical expectation failed: the run's shards must not be published."""

    def __init__(self, failed: list[str], details: list[str] | None = None):
        self.failed = list(failed)
        self.details = list(details or failed)
        super().__init__("quality gate failed: " + "; ".join(self.details))


def tool_versions() -> dict[str, str | None]:
    """Versions of the packages the gates and the report use (for summary.json)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("great-expectations", "matplotlib", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --- the suites ---------------------------------------------------------------------------------


def _expect(cls_name: str, name: str, description: str, severity: str = CRITICAL, **kwargs):
    import great_expectations.expectations as gxe

    return getattr(gxe, cls_name)(meta={"name": name}, description=description, severity=severity, **kwargs)


def _when(column: str, op: str, value):
    from great_expectations.expectations.row_conditions import Column

    c = Column(column)
    if op == "in":
        return c.is_in(value)
    return c == value if op == "==" else c != value


def ledger_checks(kind: str) -> list:
    """Row-level checks of the ledger rows of one kind."""
    p = f"{kind}.ledger"
    kept = _when(L.STATUS, "==", L.KEPT)
    return [
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.sample_id_present", "every row has a sample_id", column=SAMPLE_ID),
        _expect("ExpectColumnValuesToBeUnique", f"{p}.sample_id_unique", "one row per input item", column=SAMPLE_ID),
        _expect("ExpectColumnValuesToMatchRegex", f"{p}.sample_id_format", "sample_id is 16 hex digits",
                column=SAMPLE_ID, regex=SAMPLE_ID_REGEX),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.kind", f"every row is of kind {kind}", column="kind",
                value_set=[kind]),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.status_present", "every row has a status", column=L.STATUS),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.status_known", "status is kept, dropped or quarantined",
                column=L.STATUS, value_set=[L.KEPT, L.DROPPED, L.QUARANTINED]),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.reason_known", "reason is a code of schemas/ledger.py",
                column=L.REASON, value_set=sorted(L.REASONS)),
        _expect("ExpectColumnValuesToBeNull", f"{p}.kept_without_reason", "kept rows carry no reason",
                column=L.REASON, row_condition=kept),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.not_kept_with_reason", "dropped and quarantined rows carry a reason",
                column=L.REASON, row_condition=_when(L.STATUS, "!=", L.KEPT)),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.dropped_reason", "dropped rows carry a drop reason",
                column=L.REASON, value_set=sorted(L.DROP_REASONS), row_condition=_when(L.STATUS, "==", L.DROPPED)),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.quarantined_reason", "quarantined rows carry a quarantine reason",
                column=L.REASON, value_set=sorted(L.QUARANTINE_REASONS),
                row_condition=_when(L.STATUS, "==", L.QUARANTINED)),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.kept_in_a_shard", "kept rows name their shard",
                column=L.SHARD, row_condition=kept),
        _expect("ExpectColumnValuesToBeNull", f"{p}.only_kept_in_shards", "rows that are not kept name no shard",
                column=L.SHARD, row_condition=_when(L.STATUS, "!=", L.KEPT)),
        _expect("ExpectColumnValuesToMatchRegex", f"{p}.shard_name", f"shard names are {kind}-NNNNNN.tar",
                column=L.SHARD, regex=rf"^{kind}-\d{{6}}\.tar$"),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.duplicate_names_keeper", "duplicates name the item they duplicate",
                column=L.DUPLICATE_OF, row_condition=_when(L.REASON, "in", list(DUPLICATE_REASONS))),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.duplicate_keeper_exists",
                "duplicate_of names a row of the ledger (keeper_status: none = not a duplicate, missing = no such row);"
                " a keeper may be dropped or quarantined by a later stage",
                column="keeper_status", value_set=["none", L.KEPT, L.DROPPED, L.QUARANTINED]),
    ]


def totals_checks(kind: str) -> list:
    """Exact counts (one row) that must agree; plus warnings a person should look at."""
    p = f"{kind}.totals"
    pair = "ExpectColumnPairValuesToBeEqual"
    return [
        _expect(pair, f"{p}.counts_add_up", "input = kept + dropped + quarantined",
                column_A="input", column_B="accounted"),
        _expect(pair, f"{p}.ids_unique", "distinct sample ids = input rows", column_A="input", column_B="distinct_ids"),
        _expect(pair, f"{p}.kept_equals_shard_samples", "kept rows = samples written to shards",
                column_A="kept", column_B="shard_samples"),
        _expect(pair, f"{p}.kept_rows_name_shards", "kept rows = ledger rows naming a shard",
                column_A="kept", column_B="rows_with_shard"),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.clip_scores_finite",
                "CLIP gave a finite score in [-1, 1] to every row it scored (else its weights are broken)",
                column="clip_invalid", max_value=0),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.kept_fraction", "at least 1% of the input is kept",
                severity=WARNING, column="kept_fraction", min_value=0.01),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.quarantined_fraction", "at most half the input is quarantined",
                severity=WARNING, column="quarantined_fraction", max_value=0.5),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.clip_real_weights",
                "CLIP scored with real weights (random weights: scores are noise and no threshold was applied)",
                severity=WARNING, column="clip_real_weights", value_set=[True]),
    ]


def shard_checks(kind: str, recipe, clip: dict, expected_rows: int) -> list:
    """Checks of the sample json read back from the shards (image_text's output contract)."""
    p = f"{kind}.shards"
    rules = recipe.image_text.rules
    out = [_expect("ExpectTableColumnsToMatchSet", f"{p}.required_fields",
                   "every field of the sample json contract is present", column_set=list(SHARD_FIELDS),
                   exact_match=False)]
    out += [_expect("ExpectColumnValuesToNotBeNull", f"{p}.{f}_present", f"'{f}' is set in every sample", column=f)
            for f in SHARD_NOT_NULL]
    out += [
        _expect("ExpectTableRowCountToEqual", f"{p}.samples_match_ledger",
                "the shards read hold exactly the samples the ledger puts in them", value=expected_rows),
        _expect("ExpectColumnValuesToBeUnique", f"{p}.sample_id_unique", "a sample appears once", column="sample_id"),
        _expect("ExpectColumnValuesToMatchRegex", f"{p}.sample_id_format", "sample_id is 16 hex digits",
                column="sample_id", regex=SAMPLE_ID_REGEX),
        _expect("ExpectColumnPairValuesToBeEqual", f"{p}.in_ledger_shard", "each sample sits in the shard the ledger names",
                column_A="shard_file", column_B="ledger_shard"),
        _expect("ExpectColumnPairValuesToBeEqual", f"{p}.key_is_sample_id", "the tar key is the sample_id",
                column_A="key", column_B="sample_id"),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.has_image", "every sample has a JPEG .jpg member",
                column="jpg_is_jpeg", value_set=[True]),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.txt_is_training_text",
                "the .txt member is the caption or recaption named by text_source", column="txt_matches", value_set=[True]),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.text_source", "text_source is caption or recaption",
                column="text_source", value_set=["caption", "recaption"]),
        _expect("ExpectColumnValuesToMatchRegex", f"{p}.phash_format", "phash is 16 hex digits", column="phash",
                regex=SAMPLE_ID_REGEX),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.width_range", "1 <= width <= 65535 (JPEG limit)",
                column="width", min_value=1, max_value=65535),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.height_range", "1 <= height <= 65535 (JPEG limit)",
                column="height", min_value=1, max_value=65535),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.short_side", f"shorter side >= rules.min_side ({rules.min_side})",
                column="short_side", min_value=rules.min_side),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.aspect_ratio",
                f"long/short side <= rules.max_aspect_ratio ({rules.max_aspect_ratio})",
                column="aspect_ratio", min_value=1.0, max_value=rules.max_aspect_ratio * (1 + 1e-9)),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.caption_length",
                f"caption has {rules.min_caption_chars}..{rules.max_caption_chars} characters",
                column="caption_chars", min_value=rules.min_caption_chars, max_value=rules.max_caption_chars),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.language_score_range", "0 <= language_score <= 1",
                column="language_score", min_value=0.0, max_value=1.0),
    ]
    if rules.languages:
        out.append(_expect("ExpectColumnValuesToBeInSet", f"{p}.language", f"language in rules.languages {list(rules.languages)}",
                           column="language", value_set=list(rules.languages)))
    if clip.get("enabled", True):
        out += [
            # NaN (a broken checkpoint) compares false with the threshold in Spark and slips through it
            _expect("ExpectColumnValuesToNotBeNull", f"{p}.clip_score_present", "every kept sample has a finite CLIP score",
                    column="clip_score"),
            _expect("ExpectColumnValuesToBeBetween", f"{p}.clip_score_range", "-1 <= clip_score <= 1 (a cosine)",
                    column="clip_score", min_value=-1.0, max_value=1.0),
        ]
    if clip.get("threshold_applied"):
        t = float(clip["threshold"])
        # the json rounds scores to 4 decimals: allow that much below the threshold
        out.append(_expect("ExpectColumnValuesToBeBetween", f"{p}.clip_score_above_threshold",
                           f"kept CLIP scores >= clip.threshold ({t}) with real weights",
                           column="clip_score", min_value=t - 5e-5, max_value=1.0))
    return out


# --- the tables ---------------------------------------------------------------------------------


def _hash_fraction(F, col: str):
    """Uniform in [0, 1) from a 64-bit hash of a column: deterministic sampling."""
    return F.xxhash64(F.lit("vlcurate-gates"), F.col(col)).bitwiseAND((1 << 53) - 1) / float(1 << 53)


def ledger_table(ledger, kind: str, cap: int = LEDGER_CAP):
    """(pandas ledger rows of `kind` with keeper_status, info). keeper_status: the status of the row
    named by duplicate_of ('none' when the row is no duplicate, 'missing' when no such row exists)."""
    from pyspark.sql import functions as F

    rows = ledger.filter(F.col("kind") == kind)
    n = rows.count()
    keepers = ledger.select(F.col(SAMPLE_ID).alias("_keeper"), F.col(L.STATUS).alias("_keeper_status"))
    rows = rows.join(keepers, rows[L.DUPLICATE_OF] == keepers["_keeper"], "left")
    rows = rows.withColumn("keeper_status", F.when(F.col(L.DUPLICATE_OF).isNull(), "none")
                           .otherwise(F.coalesce(F.col("_keeper_status"), F.lit("missing"))))
    sampled = n > cap
    if sampled:
        rows = rows.filter(_hash_fraction(F, SAMPLE_ID) < cap / n)
    cols = [SAMPLE_ID, "kind", L.STATUS, L.REASON, L.DUPLICATE_OF, L.SHARD, "keeper_status"]
    table = rows.select(cols).toArrow().to_pandas()
    return table, {"rows": n, "validated": len(table), "sampled": sampled}


def totals_table(ledger, kind: str, summary_kind: dict, clip: dict):
    """One row of exact counts (Spark aggregates over the whole ledger, and the shard writer's stats)."""
    import pandas as pd
    from pyspark.sql import functions as F

    agg = ledger.filter(F.col("kind") == kind).agg(
        F.count("*").alias("n"), F.countDistinct(SAMPLE_ID).alias("ids"),
        F.sum(F.col(L.SHARD).isNotNull().cast("int")).alias("with_shard")).first()
    k = summary_kind
    dropped, quarantined = sum(k["dropped"].values()), sum(k["quarantined"].values())
    n = int(agg["n"])
    return pd.DataFrame([{
        "input": n, "kept": k["kept"], "dropped": dropped, "quarantined": quarantined,
        "accounted": k["kept"] + dropped + quarantined, "distinct_ids": int(agg["ids"]),
        "rows_with_shard": int(agg["with_shard"] or 0), "shard_samples": int(k["shards"]["samples"]),
        "kept_fraction": k["kept"] / n if n else 0.0, "quarantined_fraction": quarantined / n if n else 0.0,
        "clip_real_weights": bool(clip.get("real_weights")),
        "clip_invalid": int(k["quarantined"].get("clip_score_invalid", 0)),
    }])


def pick_shards(stats: list[dict], cap: int = SHARD_SAMPLE_CAP) -> list[dict]:
    """All shards when they hold at most `cap` samples, else every k-th shard (whole) up to about cap."""
    stats = sorted(stats, key=lambda s: s["shard"])
    total = sum(s["nsamples"] for s in stats)
    if total <= cap:
        return stats
    step = math.ceil(total / cap)
    return stats[::step]


def read_shard_metadata(shard_dir: str, names: list[str]):
    """pandas table: one row per sample of the named tars, with the json fields and derived columns
    (key, shard_file, jpg_is_jpeg, txt_matches, short_side, aspect_ratio, caption_chars)."""
    import pandas as pd

    rows = []
    for name in names:
        samples: list[tuple[str, dict]] = []  # grouped like webdataset: consecutive members of one key
        with storage.open_read(storage.join(shard_dir, name)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if not samples or samples[-1][0] != key or ext in samples[-1][1]:
                    samples.append((key, {}))  # a repeated key becomes a second sample: the unique check sees it
                samples[-1][1][ext] = tar.extractfile(m).read()
        for key, parts in samples:
            try:
                doc = json.loads(parts.get("json", b"null")) or {}
            except ValueError:
                doc = {}
            row = dict(doc)
            for f in ("concepts", "meta"):  # lists and dicts as text: hashable cells
                if f in doc:
                    row[f] = json.dumps(doc[f], sort_keys=True)
            txt = parts.get("txt", b"").decode("utf-8", "replace")
            want = doc.get("recaption") if doc.get("text_source") == "recaption" else doc.get("caption")
            w, h = doc.get("width"), doc.get("height")
            numeric = isinstance(w, int) and isinstance(h, int) and min(w, h) > 0
            row.update(key=key, shard_file=name, jpg_is_jpeg=parts.get("jpg", b"")[:3] == b"\xff\xd8\xff",
                       txt_matches=txt == want, short_side=min(w, h) if numeric else None,
                       aspect_ratio=max(w, h) / min(w, h) if numeric else None,
                       caption_chars=len(doc["caption"]) if isinstance(doc.get("caption"), str) else None)
            rows.append(row)
    table = pd.DataFrame(rows)
    for col in (*SHARD_FIELDS, *DERIVED):  # no samples (nothing kept): the empty table still has every column
        if not len(table) and col not in table:
            table[col] = pd.Series(dtype=object)
    if "clip_score" in table:
        table["clip_score"] = pd.to_numeric(table["clip_score"], errors="coerce")  # NaN counts as missing
    return table


def shard_table(ledger, kind: str, out: str, stats: list[dict], cap: int = SHARD_SAMPLE_CAP):
    """(pandas sample json of the shards read, with the ledger's shard for each sample; the number of
    samples the ledger puts in those shards; info)."""
    from pyspark.sql import functions as F

    picked = pick_shards(stats, cap)
    names = [s["shard"] for s in picked]
    table = read_shard_metadata(shard_io.staging_dir(out, kind), names)
    in_ledger = (ledger.filter((F.col("kind") == kind) & F.col(L.SHARD).isin(names))
                 .select(SAMPLE_ID, F.col(L.SHARD).alias("ledger_shard")).toArrow().to_pandas())
    if SAMPLE_ID in table:
        table = table.merge(in_ledger, on=SAMPLE_ID, how="left")
    info = {"shards": len(stats), "shards_read": len(names), "samples_read": len(table),
            "samples": sum(s["nsamples"] for s in stats), "sampled": len(picked) < len(stats)}
    return table, len(in_ledger), info


# --- validation -----------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """JSON-safe copy of a GE result value (numpy scalars, NaN, nested lists)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _context(root: str):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    shutil.rmtree(os.path.join(root, "gx"), ignore_errors=True)  # the docs describe this run only
    os.makedirs(root, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=root)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.variables.save()
    return ctx


def validate(tables: dict, suites: dict, root: str) -> dict:
    """Run each suite (name '<kind>.<table>') on its pandas table in a file context under
    root/gx, build Data Docs there, and return plain results per suite."""
    import great_expectations as gx

    ctx = _context(root)
    source = ctx.data_sources.add_pandas("vlcurate")
    out: dict = {}
    for name, expectations in suites.items():
        table = tables[name]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("run")
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=list(expectations)))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = vd.run(batch_parameters={"dataframe": table}, result_format="SUMMARY")
        checks = []
        for r in result.results:
            cfg = r.expectation_config
            res = r.result or {}
            severity = getattr(cfg.severity, "value", cfg.severity) or CRITICAL
            exc = (r.exception_info or {}).get("exception_message") if r.exception_info else None
            if exc is None and isinstance(r.exception_info, dict):  # keyed by metric when several raised
                msgs = [v.get("exception_message") for v in r.exception_info.values() if isinstance(v, dict)]
                exc = "; ".join(m for m in msgs if m) or None
            checks.append({
                "name": (cfg.meta or {}).get("name", cfg.type), "type": cfg.type,
                "column": cfg.kwargs.get("column") or ",".join(
                    str(cfg.kwargs[c]) for c in ("column_A", "column_B") if c in cfg.kwargs) or None,
                "description": cfg.description, "severity": str(severity), "success": bool(r.success),
                "observed": _plain(res.get("observed_value")),
                "unexpected_count": _plain(res.get("unexpected_count")),
                "unexpected_sample": _plain(list(res.get("partial_unexpected_list") or [])[:5]),
                "details": _plain(res.get("details")) if not r.success else None,
                "exception": exc,
            })
        checks.sort(key=lambda c: c["name"])
        out[name] = {"rows": len(table), "success": all(c["success"] for c in checks if c["severity"] == CRITICAL),
                     "expectations": checks}
    ctx.build_data_docs()
    # each suite's validation page: static HTML that reads offline too (the site's index needs its CDN scripts)
    site = os.path.join(root, os.path.dirname(GX_DOCS))
    for name, suite in out.items():
        pages = sorted(glob.glob(os.path.join(site, "validations", *name.split("."), "**", "*.html"), recursive=True))
        suite["data_docs"] = os.path.relpath(pages[0], root).replace(os.sep, "/") if pages else None
    return out


def failed(gates: dict, severity: str = CRITICAL) -> list[dict]:
    return [c for suite in gates.get("suites", {}).values() for c in suite["expectations"]
            if not c["success"] and c["severity"] == severity]


def describe(check: dict) -> str:
    what = f"{check['name']} ({check['type']}"
    what += f" on {check['column']}" if check.get("column") else ""
    if check.get("unexpected_count"):
        what += f": {check['unexpected_count']} unexpected, e.g. {check['unexpected_sample'][:3]}"
    elif (check.get("details") or {}).get("mismatched"):
        what += f": {check['details']['mismatched']}"
    elif check.get("exception"):
        what += f": error {check['exception'][:200]}"
    elif check.get("observed") is not None:
        what += f": observed {check['observed']}"
    return what + ")"


def enforce(gates: dict) -> None:
    """Raise GateFailed naming every failed critical expectation."""
    bad = failed(gates, CRITICAL)
    if bad:
        raise GateFailed([c["name"] for c in bad], [describe(c) for c in bad])


def run_gates(results: dict, ledger, summary: dict, recipe, out: str) -> dict:
    """Build every kind's tables, validate them, build Data Docs under OUT/reports/gx; the plain
    results (for summary.json). Call before publishing; then `enforce`."""
    tables: dict = {}
    suites: dict = {}
    sampling: dict = {}
    for kind, res in results.items():
        k = summary["kinds"][kind]
        tables[f"{kind}.ledger"], led_info = ledger_table(ledger, kind)
        suites[f"{kind}.ledger"] = ledger_checks(kind)
        tables[f"{kind}.totals"] = totals_table(ledger, kind, k, res.clip)
        suites[f"{kind}.totals"] = totals_checks(kind)
        tables[f"{kind}.shards"], expected, shard_info = shard_table(ledger, kind, out, res.shards)
        suites[f"{kind}.shards"] = shard_checks(kind, recipe, res.clip, expected)
        sampling[kind] = {"ledger": led_info, "shards": shard_info}
    reports = storage.join(out, "reports")
    root = reports if not storage.is_s3(out) else tempfile.mkdtemp(prefix="vlcurate-gx-")
    suite_results = validate(tables, suites, root)
    if storage.is_s3(out):
        _upload_tree(os.path.join(root, "gx"), storage.join(reports, "gx"))
        shutil.rmtree(root, ignore_errors=True)
    gates = {"suites": suite_results, "sampling": sampling, "data_docs": GX_DOCS,
             "limits": {"ledger_rows": LEDGER_CAP, "shard_samples": SHARD_SAMPLE_CAP}}
    gates["failed_critical"] = [c["name"] for c in failed(gates, CRITICAL)]
    gates["failed_warnings"] = [c["name"] for c in failed(gates, WARNING)]
    gates["passed"] = not gates["failed_critical"]
    return gates


def _upload_tree(local: str, uri: str) -> None:
    storage.remove_tree(uri)
    for dirpath, _, files in os.walk(local):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(uri, os.path.relpath(path, local).replace(os.sep, "/")), fh.read())

