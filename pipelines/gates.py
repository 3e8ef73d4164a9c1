"""Quality gates: great-expectations suites that a run must pass before its shards are published.

Per kind, three suites, each over a table built from the run (pandas, or for a large ledger the Spark
DataFrame), and each generated from what
the kind declares (`pipelines/kind.py`): its units, its reasons and its shard contract. Nothing here
names a kind.

- `<kind>.ledger`: every ledger row of the kind (up to `LEDGER_CAP` rows as pandas on the driver;
  above it the Spark DataFrame itself, validated by great-expectations' Spark engine): ids
  unique and well-formed, units declared by the kind, statuses and reasons declared for the kind
  with the status each reason has, kept rows with a shard and no reason, sub-items pointing at a
  parent, duplicates pointing at a ledger row.
- `<kind>.totals`: one row of exact counts (`pipelines.build.ledger_counts`: Spark, or Arrow on the
  driver's copy of a small ledger): input = kept + dropped +
  quarantined for every unit, distinct ids = input, kept = samples in the shards, no row with a
  reason the kind declares fatal, and the run-level assertions the kind's plan made.
- `<kind>.shards`: the samples read back from the shards just written (all of them up to
  `SHARD_SAMPLE_CAP` samples; above it every k-th shard, whole): the whole contract holds for each
  (`contract_ok`), and one expectation per declared field bound (present, not null, range, allowed
  values, pattern) so a failure names the field; ids unique; each sample in the shard the ledger names.

Every expectation is named `<kind>.<table>.<check>` (its `meta.name`) and is critical (fails the
run: no shards are published) or a warning (recorded only). Data Docs are built into
`OUT/reports/gx/` (`GX_DOCS` below, relative to OUT/reports); results go into summary.json.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from filters.base import arrow_only
from pipelines.io import shards as shard_io
from pipelines.io import storage
from pipelines.kind import Kind
from schemas import ledger as L
from schemas.common import SAMPLE_ID, SAMPLE_ID_REGEX
from schemas.contract import Contract

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # read when great_expectations is imported (lazily)

log = logging.getLogger(__name__)
logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it logs every registration at INFO

CRITICAL, WARNING = "critical", "warning"
LEDGER_CAP = 1_000_000  # a ledger of at most this many rows is held on the driver (build.materialise): counted,
# written and validated (pandas) there; a larger one in Spark
SHARD_SAMPLE_CAP = 5_000  # shard samples read back (contract and fields checked); above it, whole shards spread evenly
GX_DOCS = "gx/uncommitted/data_docs/local_site/index.html"  # relative to OUT/reports
SAMPLE_ID_PATTERN = f"^{SAMPLE_ID_REGEX}$"
READ_BACK = ("key", "shard_file", "contract_ok", "contract_problems")  # columns the read-back adds


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


# great_expectations imports scipy.stats and altair for one expectation no suite here has (KL
# divergence): 1.1 of the 3.7 CPU s its import takes, and 72 MiB of the driver. They load on first use.
UNUSED_BY_SUITES = ("scipy.stats", "altair")


def import_gx():
    """great_expectations (its expectations included), without loading UNUSED_BY_SUITES, its Data Docs
    templates compiled once per user (`_keep_compiled_templates`)."""
    from pipelines.deferred import defer

    defer(*UNUSED_BY_SUITES)
    import great_expectations.expectations  # noqa: F401

    _keep_compiled_templates()
    return sys.modules["great_expectations"]


def _keep_compiled_templates() -> None:
    """great-expectations makes a new Jinja environment for every Data Docs page it renders, so every
    page compiled its templates again: ~0.2 s of a suite's ~0.3 s of Data Docs, at the end of every run.
    Jinja's own bytecode cache (FileSystemBytecodeCache: a per-user folder under the temp dir, entries
    keyed by the template's source and Jinja's and Python's versions) keeps the compiled templates for
    every later page and run. Once per process."""
    from great_expectations.render.view import view

    if isinstance(view.Environment, functools.partial):
        return
    import jinja2

    try:
        cache = jinja2.FileSystemBytecodeCache()
    except (OSError, RuntimeError):  # no safe folder of this user's: templates compile per page, as before
        log.debug("no Jinja bytecode cache", exc_info=True)
        return
    view.Environment = functools.partial(jinja2.Environment, bytecode_cache=cache)


# --- the suites ---------------------------------------------------------------------------------


def _expect(cls_name: str, name: str, description: str, severity: str = CRITICAL, **kwargs):
    gxe = import_gx().expectations
    return getattr(gxe, cls_name)(meta={"name": name}, description=description, severity=severity, **kwargs)


def _when(column: str, op: str, value):
    import_gx()
    from great_expectations.expectations.row_conditions import Column

    c = Column(column)
    if op == "in":
        return c.is_in(value)
    return c == value if op == "==" else c != value


def ledger_checks(kind: Kind) -> list:
    """Row-level checks of the ledger rows of one kind, from what the kind declares."""
    p = f"{kind.name}.ledger"
    kept = _when(L.STATUS, "==", L.KEPT)
    codes = sorted(kind.reasons)
    dropped = sorted(c for c, r in kind.reasons.items() if r.status == L.DROPPED)
    quarantined = kind.quarantine_codes()
    return [
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.sample_id_present", "every row has a sample_id", column=SAMPLE_ID),
        _expect("ExpectColumnValuesToBeUnique", f"{p}.sample_id_unique", "one row per input item", column=SAMPLE_ID),
        _expect("ExpectColumnValuesToMatchRegex", f"{p}.sample_id_format", f"sample_id matches {SAMPLE_ID_REGEX}",
                column=SAMPLE_ID, regex=SAMPLE_ID_PATTERN),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.kind", f"every row is of kind {kind.name}", column="kind",
                value_set=[kind.name]),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.unit_declared", f"unit is one of {list(kind.units)}",
                column=L.UNIT, value_set=list(kind.units)),
        _expect("ExpectColumnValuesToBeNull", f"{p}.items_have_no_parent", f"{kind.units[0]} rows are input items",
                column=L.PARENT_ID, row_condition=_when(L.UNIT, "==", kind.units[0])),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.sub_items_have_a_parent",
                "every sub-item names the item it sits in", column=L.PARENT_ID,
                row_condition=_when(L.UNIT, "in", list(kind.units[1:]) or ["-"])),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.parent_exists",
                "parent_id names a ledger row of the kind (parent_status: none = no parent, missing = no such row)",
                column="parent_status", value_set=["none", L.KEPT, L.DROPPED, L.QUARANTINED]),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.status_present", "every row has a status", column=L.STATUS),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.status_known", "status is kept, dropped or quarantined",
                column=L.STATUS, value_set=[L.KEPT, L.DROPPED, L.QUARANTINED]),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.reason_known", f"reason is a code declared for {kind.name}",
                column=L.REASON, value_set=codes),
        _expect("ExpectColumnValuesToBeNull", f"{p}.kept_without_reason", "kept rows carry no reason",
                column=L.REASON, row_condition=kept),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.not_kept_with_reason", "dropped and quarantined rows carry a reason",
                column=L.REASON, row_condition=_when(L.STATUS, "!=", L.KEPT)),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.dropped_reason", "dropped rows carry a drop reason",
                column=L.REASON, value_set=dropped or ["-"], row_condition=_when(L.STATUS, "==", L.DROPPED)),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.quarantined_reason", "quarantined rows carry a quarantine reason",
                column=L.REASON, value_set=quarantined or ["-"], row_condition=_when(L.STATUS, "==", L.QUARANTINED)),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.kept_in_a_shard", "kept rows name their shard",
                column=L.SHARD, row_condition=kept),
        _expect("ExpectColumnValuesToBeNull", f"{p}.only_kept_in_shards", "rows that are not kept name no shard",
                column=L.SHARD, row_condition=_when(L.STATUS, "!=", L.KEPT)),
        _expect("ExpectColumnValuesToMatchRegex", f"{p}.shard_name",
                f"shard names are {' or '.join(kind.all_shard_sets)}-NNNNNN.tar",
                column=L.SHARD, regex=rf"^(?:{'|'.join(kind.all_shard_sets)})-\d{{6}}\.tar$"),
        _expect("ExpectColumnValuesToNotBeNull", f"{p}.duplicate_names_keeper", "duplicates name the item they duplicate",
                column=L.DUPLICATE_OF, row_condition=_when(L.REASON, "in", list(L.DUPLICATE_REASONS))),
        _expect("ExpectColumnValuesToBeInSet", f"{p}.duplicate_keeper_exists",
                "duplicate_of names a row of the ledger (keeper_status: none = not a duplicate, missing = no such row);"
                " a keeper may be dropped or quarantined by a later stage",
                column="keeper_status", value_set=["none", L.KEPT, L.DROPPED, L.QUARANTINED]),
    ]


def totals_checks(kind: Kind, assertions: list[dict]) -> list:
    """Exact counts (one row) that must agree; reasons that must not occur; the plan's assertions."""
    p = f"{kind.name}.totals"
    pair = "ExpectColumnPairValuesToBeEqual"
    out = [
        _expect(pair, f"{p}.counts_add_up", "input = kept + dropped + quarantined",
                column_A="input", column_B="accounted"),
        _expect(pair, f"{p}.ids_unique", "distinct sample ids = ledger rows (every unit)", column_A="input_all_units",
                column_B="distinct_ids"),
        _expect(pair, f"{p}.kept_equals_shard_samples", f"kept {kind.samples_unit} rows = samples written to shards",
                column_A="kept" if kind.samples_unit == kind.units[0] else f"{kind.samples_unit}_kept",
                column_B="shard_samples"),
        _expect(pair, f"{p}.kept_rows_name_shards", "kept rows = ledger rows naming a shard",
                column_A="kept_all_units", column_B="rows_with_shard"),
    ]
    out += [_expect(pair, f"{p}.{unit}_counts_add_up", f"{unit}: input = kept + dropped + quarantined",
                    column_A=f"{unit}_input", column_B=f"{unit}_accounted") for unit in kind.units[1:]]
    out += [_expect("ExpectColumnValuesToBeBetween", f"{p}.no_{code}", f"no row is {code}: {kind.reasons[code].text}",
                    column=f"fatal_{code}", max_value=0) for code in kind.fatal_codes()]
    out += [
        _expect("ExpectColumnValuesToBeBetween", f"{p}.kept_fraction", "at least 1% of the input is kept",
                severity=WARNING, column="kept_fraction", min_value=0.01),
        _expect("ExpectColumnValuesToBeBetween", f"{p}.quarantined_fraction", "at most half the input is quarantined",
                severity=WARNING, column="quarantined_fraction", max_value=0.5),
    ]
    out += [_expect("ExpectColumnValuesToBeInSet", f"{p}.{a['name']}", a["description"],
                    severity=a.get("severity", CRITICAL), column=f"assert_{a['name']}", value_set=[True])
            for a in assertions]
    return out


def shard_checks(contract: Contract, expected_rows: int) -> list:
    """Checks of the samples read back from the shards, generated from the kind's contract."""
    p = f"{contract.kind}.shards"
    out = [_expect("ExpectTableColumnsToMatchSet", f"{p}.required_fields",
                   "every field of the sample json contract is present", column_set=[f.name for f in contract.stored],
                   exact_match=False),
           _expect("ExpectColumnValuesToBeInSet", f"{p}.contract", "every sample holds its whole shard contract "
                   "(members and their media types, json fields, types, bounds, checks)", column="contract_ok",
                   value_set=[True])]
    out += [
        _expect("ExpectTableRowCountToEqual", f"{p}.samples_match_ledger",
                "the shards read hold exactly the samples the ledger puts in them", value=expected_rows),
        _expect("ExpectColumnValuesToBeUnique", f"{p}.sample_id_unique", "a sample appears once", column="key"),
        _expect("ExpectColumnPairValuesToBeEqual", f"{p}.in_ledger_shard", "each sample sits in the shard the ledger names",
                column_A="shard_file", column_B="ledger_shard"),
    ]
    for f in contract.fields:
        what = f"'{f.name}'" + (" (derived)" if f.derive else "")
        if not f.nullable:
            out.append(_expect("ExpectColumnValuesToNotBeNull", f"{p}.{f.name}_present", f"{what} is set in every sample",
                               column=f.name))
        if f.min is not None or f.max is not None:
            rng = f"{'' if f.min is None else f'{f.min} <= '}{f.name}{'' if f.max is None else f' <= {f.max}'}"
            out.append(_expect("ExpectColumnValuesToBeBetween", f"{p}.{f.name}_range", f"{rng}{f.description and ': '}"
                               f"{f.description}", column=f.name, min_value=f.min, max_value=f.max))
        if f.values is not None:
            out.append(_expect("ExpectColumnValuesToBeInSet", f"{p}.{f.name}_values", f"{what} in {list(f.values)}",
                               column=f.name, value_set=list(f.values)))
        if f.regex:
            out.append(_expect("ExpectColumnValuesToMatchRegex", f"{p}.{f.name}_format", f"{what} matches {f.regex}",
                               column=f.name, regex=f"^{f.regex}$"))
    return out


# --- the tables ---------------------------------------------------------------------------------


LEDGER_COLUMNS = [SAMPLE_ID, "kind", L.UNIT, L.PARENT_ID, L.STATUS, L.REASON, L.DUPLICATE_OF, L.SHARD]


def frame(table):
    """An Arrow table as pandas for great-expectations' pandas engine, its columns kept in Arrow
    (pd.ArrowDtype): no Python object per cell. At 1M ledger rows the table's statuses and its suite
    took 15.9 s instead of 18.4 s, the driver's peak 1,062 MiB instead of 1,190 (benchmarks/ledger_scale.py)."""
    import pandas as pd

    return table.to_pandas(types_mapper=pd.ArrowDtype)


def ledger_table(ledger, kind: str, cap: int = LEDGER_CAP, n: int | None = None, whole=None):
    """(the ledger rows of `kind` with keeper_status and parent_status, info). keeper_status: the
    status of the row named by duplicate_of ('none' when the row is no duplicate, 'missing' when no
    such row exists); parent_status likewise for parent_id, among the rows of the same kind. Up to
    `cap` rows the table is pandas (great-expectations' pandas engine is faster than a dozen Spark jobs
    on a small table): made from `whole` (the ledger on the driver, Arrow) where given, else fetched
    with the statuses joined in Spark; above it, it is the Spark DataFrame, validated where it lies.
    Every row is checked at any size. `n`: the kind's ledger rows when already counted (else counted in
    `whole`, or in Spark)."""
    if whole is not None:
        import pyarrow.compute as pc

        n = int(pc.sum(pc.equal(whole["kind"], kind)).as_py() or 0) if n is None else n
        if n <= cap:
            return _with_statuses(whole, kind), {"rows": n, "engine": "pandas"}
    from pyspark.sql import functions as F

    rows = ledger.filter(F.col("kind") == kind)
    n = rows.count() if n is None else n
    engine = "spark" if n > cap else "pandas"
    # one status per id, so a duplicated id (which sample_id_unique reports) does not repeat the rows naming it
    keepers = ledger.select(F.col(SAMPLE_ID).alias("_keeper"), F.col(L.STATUS).alias("_keeper_status"))
    keepers = keepers.dropDuplicates(["_keeper"])
    parents = ledger.filter(F.col("kind") == kind).select(F.col(SAMPLE_ID).alias("_parent"),
                                                          F.col(L.STATUS).alias("_parent_status"))
    parents = parents.dropDuplicates(["_parent"])
    rows = rows.join(keepers, rows[L.DUPLICATE_OF] == keepers["_keeper"], "left")
    rows = rows.join(parents, rows[L.PARENT_ID] == parents["_parent"], "left")
    rows = rows.withColumn("keeper_status", F.when(F.col(L.DUPLICATE_OF).isNull(), "none")
                           .otherwise(F.coalesce(F.col("_keeper_status"), F.lit("missing"))))
    rows = rows.withColumn("parent_status", F.when(F.col(L.PARENT_ID).isNull(), "none")
                           .otherwise(F.coalesce(F.col("_parent_status"), F.lit("missing"))))
    rows = rows.select(*LEDGER_COLUMNS, "keeper_status", "parent_status")
    return (rows if engine == "spark" else frame(rows.toArrow())), {"rows": n, "engine": engine}


def _with_statuses(whole, kind: str):
    """ledger_table's pandas table from the whole ledger on the driver (Arrow): the same statuses, looked
    up by id (the first row of an id gives its status, one per id as in Spark)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def status_of(rows, ids):
        found = pc.take(rows[L.STATUS], pc.index_in(ids, value_set=rows[SAMPLE_ID]))
        return pc.if_else(pc.is_null(ids), pa.scalar("none"), pc.coalesce(found, pa.scalar("missing")))

    mine = whole.select(LEDGER_COLUMNS).filter(pc.equal(whole["kind"], kind))
    mine = mine.append_column("keeper_status", status_of(whole, mine[L.DUPLICATE_OF]))
    return frame(mine.append_column("parent_status", status_of(mine, mine[L.PARENT_ID])))


def totals_table(kind: Kind, summary_kind: dict, assertions: list[dict], counted: dict):
    """One row of exact counts: `counted`, the kind's ledger rows, distinct ids, kept rows and rows naming
    a shard (aggregates over the whole ledger: `pipelines.build.ledger_counts`), beside the
    summary's counts per unit and reason and the shard writer's stats."""
    import pandas as pd

    agg = {"n": 0, "ids": 0, "kept": 0, "with_shard": 0} | counted
    k = summary_kind
    units = k.get("units", {})
    n_all = int(agg["n"])
    row: dict[str, Any] = {"distinct_ids": int(agg["ids"]), "input_all_units": n_all,
                           "kept_all_units": int(agg["kept"]), "rows_with_shard": int(agg["with_shard"]),
                           "shard_samples": int(k["shards"]["samples"])}
    for i, unit in enumerate(kind.units):
        u = units.get(unit) or {"input": 0, "kept": 0, "dropped": {}, "quarantined": {}}
        accounted = u["kept"] + sum(u["dropped"].values()) + sum(u["quarantined"].values())
        prefix = "" if i == 0 else f"{unit}_"
        row.update({f"{prefix}input": u["input"], f"{prefix}accounted": accounted})
        if i > 0 and unit == kind.samples_unit:  # samples are sub-items (a video's clips)
            row[f"{unit}_kept"] = u["kept"]
        if i == 0:
            n = u["input"]
            row.update(kept=u["kept"], dropped=sum(u["dropped"].values()), quarantined=sum(u["quarantined"].values()),
                       kept_fraction=u["kept"] / n if n else 0.0,
                       quarantined_fraction=sum(u["quarantined"].values()) / n if n else 0.0)
    # ids are unique across all units: compare with every row of the kind
    for code in kind.fatal_codes():
        row[f"fatal_{code}"] = sum(u[kind.reasons[code].status].get(code, 0) for u in units.values())
    for a in assertions:
        row[f"assert_{a['name']}"] = bool(a["ok"])
    return pd.DataFrame([row])


def pick_shards(stats: list[dict], cap: int = SHARD_SAMPLE_CAP) -> list[dict]:
    """All shards when they hold at most `cap` samples, else every k-th shard (whole) up to about cap."""
    stats = sorted(stats, key=lambda s: s["shard"])
    total = sum(s["nsamples"] for s in stats)
    if total <= cap:
        return stats
    step = math.ceil(total / cap)
    return stats[::step]


def _cell(v: Any) -> Any:
    """Lists and dicts as JSON text: hashable cells for pandas and great-expectations."""
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def tar_files(f) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream. The gates read our own shards back with
    tarfile, not with a reader of ours: they check the writer (which builds its headers itself), so they
    must not share its code."""
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if m.isfile():
                yield m.name, tar.extractfile(m).read()


def shard_rows(shard_dir: str, name: str, contract: Contract) -> list[dict]:
    """One row per sample of one tar: the contract's fields (json and derived), the tar key and file,
    and whether the whole contract holds (`contract_ok`, `contract_problems`). Runs in the executors."""
    uri = storage.join(shard_dir, name)
    with storage.open_read(uri) as f:
        members = list(tar_files(f))
    samples: list[tuple[str, dict]] = []  # grouped like webdataset: consecutive members of one key
    for member, data in members:
        key, _, ext = member.partition(".")
        if not samples or samples[-1][0] != key or ext in samples[-1][1]:
            samples.append((key, {}))  # a repeated key becomes a second sample: the unique check sees it
        samples[-1][1][ext] = data
    derived = {f.name for f in contract.derived}
    rows = []
    for key, parts in samples:
        try:
            doc = json.loads(parts.get("json", b"null")) or {}
        except ValueError:
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        values = contract.values(doc)
        row = {k: _cell(v) for k, v in values.items() if k in doc or k in derived}
        problems = contract.violations({"__key__": key, **parts})
        row.update(key=key, shard_file=name, contract_ok=not problems, contract_problems="; ".join(problems[:5]))
        rows.append(row)
    return rows


def shard_frame(rows: list[dict], contract: Contract):
    """The pandas table of the read-back rows (see shard_rows); every field a column even with no samples."""
    import pandas as pd

    table = pd.DataFrame(rows)
    for col in (*(f.name for f in contract.fields), *READ_BACK):  # no samples: the empty table has every column
        if not len(table) and col not in table:
            table[col] = pd.Series(dtype=object)
    for f in contract.fields:  # NaN counts as missing; a number stored as text fails the range check
        if f.type in ("int", "float") and f.name in table:
            table[f.name] = pd.to_numeric(table[f.name], errors="coerce")
    return table


def read_shard_metadata(shard_dir: str, names: list[str], contract: Contract):
    """pandas table: one row per sample of the named tars, read here (see shard_rows)."""
    return shard_frame([r for name in names for r in shard_rows(shard_dir, name, contract)], contract)


def shard_table(ledger, kind: str, out: str, stats: list[dict], contract: Contract, cap: int = SHARD_SAMPLE_CAP,
                unit: str = "", rows=None):
    """(pandas samples of the shards read, with the ledger's shard for each sample; the number of
    samples the ledger puts in those shards; info). `unit`: the kind's sample unit (default: its items).
    The shards are read and checked against the contract in the executors, a few shards per task; only
    their rows (at most about `cap`) come back. `rows`: every ledger row of the kind as pandas (the
    ledger table when it was fetched), read instead of the ledger."""
    from pyspark.sql import functions as F

    picked = pick_shards(stats, cap)
    names = [s["shard"] for s in picked]
    sets: dict[str, list[str]] = {kind: []}
    for name in names:
        sets.setdefault(shard_io.set_of(name), []).append(name)
    tasks = [(shard_io.staging_dir(out, s), n) for s, ns in sorted(sets.items()) for n in ns]
    read: list[dict] = []
    if tasks:
        # twice as many tasks as cores, each reading a run of the shards (a Python task costs 0.1-0.2 s
        # to start); each sends back its rows pickled (their cells keep their Python types). Task i reads
        # group i, named by the one id in partition i of a range (the groups, a few names each, travel
        # in the function): one stage, where a table of the names made two (its rows placed by a shuffle)
        n = min(len(tasks), 2 * ledger.sparkSession.sparkContext.defaultParallelism)
        groups = [tasks[len(tasks) * i // n:len(tasks) * (i + 1) // n] for i in range(n)]

        def read_back(batches):
            arrow_only()
            for b in batches:
                rows = [pickle.dumps(shard_rows(d, name, contract)) for i in b.column(0).to_pylist()
                        for d, name in groups[i]]
                yield pa.record_batch([pa.array(rows, pa.binary())], names=["rows"])

        got = ledger.sparkSession.range(0, n, 1, n).mapInArrow(read_back, "rows binary")
        read = [r for b in got.toArrow().column("rows").to_pylist() for r in pickle.loads(b)]
    table = shard_frame(read, contract)
    if rows is not None:
        mine = rows[L.SHARD].isin(names) & ((rows[L.UNIT] == unit) if unit else rows[L.PARENT_ID].isna())
        in_ledger = rows.loc[mine, [SAMPLE_ID, L.SHARD]].reset_index(drop=True)
        # plain objects, None for null, as the shards' rows are: a comparison with an Arrow null is null, not False
        in_ledger = in_ledger.astype(object).where(in_ledger.notna(), None)
        in_ledger = in_ledger.rename(columns={SAMPLE_ID: "key", L.SHARD: "ledger_shard"})
    else:
        is_sample = (F.col(L.UNIT) == unit) if unit else F.col(L.PARENT_ID).isNull()
        in_ledger = (ledger.filter((F.col("kind") == kind) & F.col(L.SHARD).isin(names) & is_sample)
                     .select(F.col(SAMPLE_ID).alias("key"), F.col(L.SHARD).alias("ledger_shard")).toArrow()
                     .to_pandas())
    table = table.merge(in_ledger, on="key", how="left")
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
    gx = import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    shutil.rmtree(os.path.join(root, "gx"), ignore_errors=True)  # the docs describe this run only
    os.makedirs(root, exist_ok=True)
    # an in-memory context whose only files are the Data Docs: a file context writes and re-reads its
    # YAML configuration at every suite, definition and result it stores (~0.5 s of a 2,000-item run)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.update_data_docs_site("local_site", {
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": os.path.join(root, os.path.dirname(GX_DOCS))}})
    return ctx


class Validation:
    """Suites validated one by one (each on its table, pandas or Spark: great-expectations' Spark engine
    validates in Spark jobs) in one in-memory context whose Data Docs go under root/gx; `finish` builds
    the docs and returns the plain results per suite. Suites are named '<kind>.<table>'."""

    def __init__(self, root: str):
        self.root = root
        self.ctx = _context(root)
        self.sources: dict = {}
        self.out: dict = {}

    def run(self, name: str, table, expectations: list, rows: int | None = None) -> None:
        """Validate one suite. `rows`: a Spark table's row count where already known (else it is counted)."""
        import pandas as pd

        gx = import_gx()
        local = isinstance(table, pd.DataFrame)
        if local not in self.sources:
            self.sources[local] = (self.ctx.data_sources.add_pandas("vlcurate") if local
                                   else self.ctx.data_sources.add_spark("vlcurate-spark"))
        batch = self.sources[local].add_dataframe_asset(name).add_batch_definition_whole_dataframe("run")
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=name, expectations=list(expectations)))
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = vd.run(batch_parameters={"dataframe": table}, result_format="BASIC")
        checks = sorted((_check(r) for r in result.results), key=lambda c: c["name"])
        n = len(table) if local else rows
        self.out[name] = {"rows": table.count() if n is None else n,
                          "success": all(c["success"] for c in checks if c["severity"] == CRITICAL),
                          "expectations": checks}

    def finish(self, order: list[str] | None = None) -> dict:
        """Build the Data Docs; the results per suite (in `order` where given, else as validated)."""
        self.ctx.build_data_docs()
        # each suite's validation page: static HTML that reads offline too (the site's index needs its CDN scripts)
        site = os.path.join(self.root, os.path.dirname(GX_DOCS))
        out = {name: self.out[name] for name in (order or self.out)}
        for name, suite in out.items():
            pages = sorted(glob.glob(os.path.join(site, "validations", *name.split("."), "**", "*.html"),
                                     recursive=True))
            suite["data_docs"] = os.path.relpath(pages[0], self.root).replace(os.sep, "/") if pages else None
        return out


def _check(r) -> dict:
    """One expectation's plain result."""
    cfg = r.expectation_config
    res = r.result or {}
    severity = getattr(cfg.severity, "value", cfg.severity) or CRITICAL
    exc = (r.exception_info or {}).get("exception_message") if r.exception_info else None
    if exc is None and isinstance(r.exception_info, dict):  # keyed by metric when several raised
        msgs = [v.get("exception_message") for v in r.exception_info.values() if isinstance(v, dict)]
        exc = "; ".join(m for m in msgs if m) or None
    return {
        "name": (cfg.meta or {}).get("name", cfg.type), "type": cfg.type,
        "column": cfg.kwargs.get("column") or ",".join(
            str(cfg.kwargs[c]) for c in ("column_A", "column_B") if c in cfg.kwargs) or None,
        "description": cfg.description, "severity": str(severity), "success": bool(r.success),
        "observed": _plain(res.get("observed_value")),
        "unexpected_count": _plain(res.get("unexpected_count")),
        "unexpected_sample": _plain(list(res.get("partial_unexpected_list") or [])[:5]),
        "details": _plain(res.get("details")) if not r.success else None,
        "exception": exc,
    }


def validate(tables: dict, suites: dict, root: str, rows: dict[str, int] | None = None) -> dict:
    """Every suite on its table (see Validation); `rows`: Spark tables' row counts where known."""
    v = Validation(root)
    for name, expectations in suites.items():
        v.run(name, tables[name], expectations, (rows or {}).get(name))
    return v.finish()


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


def run_gates(results: dict, ledger, summary: dict | Callable[[], dict], recipe, out: str, counted: dict,
              whole=None) -> dict:
    """Build every kind's tables, validate them, build Data Docs under OUT/reports/gx; the plain
    results (for summary.json). `counted`: per kind, its ledger's rows, distinct ids, kept rows and rows
    naming a shard (`pipelines.build.ledger_counts`). `summary`: summary.json's content, or a callable
    that waits for it: only the totals need it, so the ledger and shard suites are built and validated
    first (a run starts the gates beside its ledger write and summary). `whole`: the ledger on the
    driver as Arrow (`pipelines.build.materialise`: every ledger of at most LEDGER_CAP rows), else None.
    Call before publishing; then `enforce`."""
    from pipelines import kinds

    t0 = time.perf_counter()
    with _docs_root(out) as root:
        v = Validation(root)
        sampling: dict = {}
        for name, res in results.items():
            kind = kinds.get(name)
            contract = kind.contract(recipe.section(name), res.facts)
            n = int(counted.get(name, {}).get("n", 0))
            table, led_info = ledger_table(ledger, name, n=n, whole=whole)
            v.run(f"{name}.ledger", table, ledger_checks(kind), n)
            mine = table if led_info["engine"] == "pandas" else None  # no second look-up
            table, expected, shard_info = shard_table(ledger, name, out, res.shards, contract,
                                                      unit=kind.samples_unit, rows=mine)
            v.run(f"{name}.shards", table, shard_checks(contract, expected))
            sampling[name] = {"ledger": led_info, "shards": shard_info}
        t1 = time.perf_counter()
        summary = summary() if callable(summary) else summary
        t2 = time.perf_counter()
        for name, res in results.items():
            kind = kinds.get(name)
            totals = totals_table(kind, summary["kinds"][name], res.assertions, counted.get(name, {}))
            v.run(f"{name}.totals", totals, totals_checks(kind, res.assertions))
        suite_results = v.finish([f"{k}.{t}" for k in results for t in ("ledger", "totals", "shards")])
    gates = {"suites": suite_results, "sampling": sampling, "data_docs": GX_DOCS,
             "limits": {"ledger_rows_on_driver": LEDGER_CAP, "shard_samples": SHARD_SAMPLE_CAP},
             # ledger and shard suites; waiting for the summary; totals suites and Data Docs
             "seconds": {"ledger_and_shards": round(t1 - t0, 3), "waiting": round(t2 - t1, 3),
                         "totals_and_docs": round(time.perf_counter() - t2, 3)}}
    gates["failed_critical"] = [c["name"] for c in failed(gates, CRITICAL)]
    gates["failed_warnings"] = [c["name"] for c in failed(gates, WARNING)]
    gates["passed"] = not gates["failed_critical"]
    return gates


@contextlib.contextmanager
def _docs_root(out: str) -> Iterator[str]:
    """Where great-expectations writes the Data Docs: OUT/reports, or for s3:// output a local temp dir
    whose gx/ is uploaded to OUT/reports/gx once they are built, and which is removed whether or not
    they were (a run whose summary fails stops its gates' thread half-way)."""
    reports = storage.join(out, "reports")
    if not storage.is_s3(out):
        yield reports
        return
    root = tempfile.mkdtemp(prefix="vlcurate-gx-")
    try:
        yield root
        _upload_tree(os.path.join(root, "gx"), storage.join(reports, "gx"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _upload_tree(local: str, uri: str) -> None:
    storage.remove_tree(uri)
    for dirpath, _, files in os.walk(local):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(uri, os.path.relpath(path, local).replace(os.sep, "/")), fh.read())

