"""OUT/reports/index.html from what a run left behind: summary.json, reports/material/<kind>/ and
the shards' index.json. No Spark; the same inputs give the same bytes (no render time, sorted
iteration, deterministic charts), so `python -m jobs.report OUT` reproduces the run's page.

The page is self-contained: CSS inline, charts and thumbnails as data URIs, no script, no network.
Its only links are relative: the great-expectations Data Docs under OUT/reports/gx/.
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np

from pipelines.io import shards as shard_io
from pipelines.io import storage
from pipelines.report import plots
from pipelines.report.material import material_dir
from schemas import ledger as L

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2327;background:#f6f7f9}
header{background:#264653;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:22px}
header .meta{opacity:.85;font-size:13px}
nav{background:#fff;border-bottom:1px solid #dde1e6;padding:8px 28px;position:sticky;top:0;z-index:2}
nav a{margin-right:16px;color:#264653;text-decoration:none;font-weight:600}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{margin:4px 0 10px;font-size:19px} h3{margin:18px 0 8px;font-size:16px} h4{margin:12px 0 6px;font-size:14px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e6e8eb;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f1f3f5} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 9px;border-radius:10px;font-weight:700;font-size:12px}
.ok{background:#d8f3dc;color:#1b4332} .bad{background:#ffccd5;color:#800f2f} .warn{background:#fff3bf;color:#6b4f00}
.banner{padding:10px 14px;border-radius:6px;margin:10px 0;font-weight:600}
.bar{height:14px;background:#2a9d8f;border-radius:2px;min-width:1px}
.dropbar{height:14px;background:#e76f51;border-radius:2px;min-width:1px;display:inline-block}
.reasons{font-size:12px;color:#444}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:14px}
.plots figure{margin:0} .plots img{max-width:100%;height:auto}
figcaption{font-size:12px;color:#555}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(176px,1fr));gap:10px}
.card{border:1px solid #dde1e6;border-radius:6px;padding:6px;background:#fcfcfd;font-size:12px;overflow-wrap:anywhere}
.card img{display:block;margin:0 auto 4px;max-width:160px;max-height:160px}
.noimg{width:160px;height:90px;margin:0 auto 4px;display:flex;align-items:center;justify-content:center;
 background:repeating-linear-gradient(45deg,#eee,#eee 6px,#f8f8f8 6px,#f8f8f8 12px);color:#777}
.card .cap{color:#222;margin:2px 0} .card .why{color:#9d0208;font-weight:600} .card .id{color:#888;font-size:11px}
.card.keeper{border:2px solid #2a9d8f} .card.keptcard .why{color:#1b4332}
.group{display:flex;gap:10px;align-items:stretch;overflow-x:auto;padding:6px 0;border-bottom:1px dashed #ccc}
.group .card{flex:0 0 176px}
.docs{display:flex;flex-direction:column;gap:12px}
.doc{border:1px solid #dde1e6;border-left:5px solid #e76f51;border-radius:6px;padding:8px 14px;background:#fcfcfd;
 max-width:980px}
.doc.keptdoc{border-left-color:#2a9d8f} .doc .head{font-size:13px;margin-bottom:6px}
.doc .head .why{color:#9d0208;font-weight:600} .doc.keptdoc .head .why{color:#1b4332}
.doctext .seg{white-space:pre-wrap;margin:4px 0;font-size:13px;color:#222}
.docimg{display:inline-block;vertical-align:top;margin:4px 10px 4px 0;padding:4px;border:2px solid #e76f51;
 border-radius:5px;background:#fff;max-width:170px;font-size:11px;overflow-wrap:anywhere}
.docimg.kept{border-color:#2a9d8f} .docimg.quarantined{border-color:#e9c46a}
.docimg img{display:block;max-width:160px;max-height:160px} .docimg .noimg{width:140px;height:60px}
.docimg .fate{font-weight:700;color:#9d0208} .docimg.kept .fate{color:#1b4332}
.doc .more{color:#666;font-size:12px;font-style:italic;margin:6px 0}
.doc .offtext{border-top:1px dashed #ccc;margin-top:6px;padding-top:4px}
pre{background:#f1f3f5;padding:10px;border-radius:6px;overflow:auto;font-size:12px;max-height:420px}
.muted{color:#666;font-size:12px}
"""


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def fmt_int(n: Any) -> str:
    return "—" if n is None else f"{int(n):,}"


def fmt_bytes(n: Any) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


# --- inputs -------------------------------------------------------------------------------------------


def _read_json(uri: str) -> Any:
    return json.loads(storage.read_bytes(uri).decode("utf-8"))


def _read_parquet(uri: str):
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        return None
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def load_material(out: str, kind: str) -> dict:
    mdir = material_dir(out, kind)
    meta_uri = storage.join(mdir, "material.json")
    if not storage.exists(meta_uri):
        return {}
    return {
        "meta": _read_json(meta_uri),
        "rows": _read_parquet(storage.join(mdir, "rows.parquet")),
        "bars": {name: _read_parquet(storage.join(mdir, f"bars-{name}.parquet"))
                 for name in _read_json(meta_uri).get("bars", {})},
        "gallery": _read_parquet(storage.join(mdir, "gallery.parquet")),
        "documents": _read_parquet(storage.join(mdir, "documents.parquet")),
        "document_images": _read_parquet(storage.join(mdir, "document-images.parquet")),
    }


def publish_state(out: str, kind: str, summary: dict, in_run: bool) -> tuple[str, str, str]:
    """(badge class, label, explanation) for the kind's shards. During the run the report is written
    just before publishing, so a run whose gates passed is reported as published; a rebuild checks
    that index.json is there and lists the same shards as summary.json."""
    gates = summary.get("gates") or {}
    shown = shard_io.final_dir(summary.get("output") or out, kind)  # where readers look (OUT), the same in a rebuild
    if gates and not gates.get("passed", True):
        why = (f"a critical quality gate failed: the shards stay in {shard_io.staging_dir(out, kind)}/ and no "
               "index.json or sizes.json was written, so no reader sees them")
        return ("bad", "not published", why)
    ok = ("ok", "published", f"{shown}/ with index.json and sizes.json, written after the gates passed")
    if in_run:
        return ok
    for name, files in shard_io.by_set(kind, summary["kinds"][kind]["shards"]["files"]).items():  # each shard set
        index_uri = storage.join(shard_io.final_dir(out, name), "index.json")
        if not storage.exists(index_uri):
            return ("bad", "index.json missing", f"{index_uri} is missing: the run did not finish publishing")
        expect = sorted((s["shard"], int(s["nsamples"]), int(s["bytes"])) for s in files)
        listed = _read_json(index_uri).get("shardlist", [])
        found = sorted((s["url"], int(s["nsamples"]), int(s["filesize"])) for s in listed)
        if found != expect:
            where = shard_io.final_dir(summary.get("output") or out, name)
            return ("warn", "index.json differs",
                    f"{where}/index.json lists other shards than this run's summary.json: a later run replaced them")
    return ok


# --- sections -------------------------------------------------------------------------------------------


def _reasons(k: dict) -> dict[str, dict]:
    """The kind's declared reasons (code -> status, stage, text), in funnel order, from summary.json."""
    return k.get("reasons") or {}


def funnel(k: dict, unit: str | None = None) -> str:
    """Input, then what each stage removed (by reason, in the order the kind declares), then kept."""
    u = k if unit is None else k["units"][unit]
    declared = _reasons(k)
    reasons = {**u.get("quarantined", {}), **u.get("dropped", {})}
    n_in = int(u["input"])
    remaining = n_in
    rows = [f"<tr><td><b>input</b></td><td class=num>{fmt_int(n_in)}</td>"
            + "<td><div class=bar style='width:300px'></div></td><td></td></tr>"]
    stages: dict[str, list[str]] = {}
    for code, r in declared.items():
        stages.setdefault(r["stage"], []).append(code)
    stages["other"] = sorted(r for r in reasons if r not in declared)  # a code the kind does not declare
    ran = set(k.get("stages_run") or ())
    for stage, codes in stages.items():
        here = {r: reasons[r] for r in codes if r in reasons}
        lost = sum(here.values())
        if not here and stage not in ran:
            continue
        remaining -= lost
        width = 300 * remaining / n_in if n_in else 0
        detail = ", ".join(
            f"<span title='{esc(declared.get(r, {}).get('text', 'reason code not declared for this kind'))}'>"
            f"{esc(r)} {fmt_int(c)}</span>" for r, c in sorted(here.items(), key=lambda rc: (-rc[1], rc[0])))
        rows.append(f"<tr><td>after <b>{esc(stage)}</b></td><td class=num>{fmt_int(remaining)}</td>"
                    f"<td><div class=bar style='width:{width:.1f}px'></div></td>"
                    f"<td class=reasons>−{fmt_int(lost)}{': ' + detail if detail else ''}</td></tr>")
    rows.append(f"<tr><td><b>kept</b></td><td class=num><b>{fmt_int(u['kept'])}</b></td>"
                f"<td><div class=bar style='width:{300 * u['kept'] / n_in if n_in else 0:.1f}px'></div></td>"
                f"<td class=reasons>{100 * u['kept'] / n_in if n_in else 0:.1f}% of the input</td></tr>")
    note = ""
    if remaining != u["kept"]:
        note = (f"<div class='banner bad'>The stages account for {fmt_int(remaining)} remaining items but "
                f"{fmt_int(u['kept'])} were kept.</div>")
    return ("<table class=funnel><tr><th>stage</th><th class=num>items left</th><th></th><th>removed, by reason</th>"
            "</tr>" + "".join(rows) + "</table>" + note)


def units_section(k: dict) -> str:
    """Accounting per unit: every item and sub-item is kept, dropped or quarantined exactly once."""
    units = k.get("units") or {}
    rows = []
    for name, u in units.items():
        d, q = sum(u["dropped"].values()), sum(u["quarantined"].values())
        ok = "ok" if u["input"] == u["kept"] + d + q else "bad"
        rows.append(f"<tr><td>{esc(name)}</td><td class=num>{fmt_int(u['input'])}</td><td class=num>{fmt_int(u['kept'])}"
                    f"</td><td class=num>{fmt_int(d)}</td><td class=num>{fmt_int(q)}</td>"
                    f"<td><span class='badge {ok}'>{'adds up' if ok == 'ok' else 'DOES NOT ADD UP'}</span></td></tr>")
    table = ("<table><tr><th>unit</th><th class=num>input</th><th class=num>kept</th><th class=num>dropped</th>"
             f"<th class=num>quarantined</th><th></th></tr>{''.join(rows)}</table>")
    subs = "".join(f"<h4>{esc(name)}</h4>{funnel(k, name)}" for name in list(units)[1:])
    return table + subs


def _column(table, name: str) -> np.ndarray:
    if table is None or name not in table.column_names:
        return np.array([], dtype=float)
    return np.array([np.nan if v is None else v for v in table.column(name).to_pylist()], dtype=float)


def _by_status(table, values: np.ndarray) -> dict[str, np.ndarray]:
    status = np.array(table.column(L.STATUS).to_pylist(), dtype=object) if table is not None else np.array([])
    return {s: values[status == s] for s in plots.STATUSES if values.size}


def distributions(m: dict) -> str:
    """One chart per field the kind's contract plots: histograms over the (sampled) rows, stacked by
    status, with the recipe's thresholds; bars from exact counts."""
    rows = m.get("rows")
    meta = m.get("meta", {})
    if rows is None:
        return "<p class=muted>No material recorded for distributions.</p>"
    if rows is not None and L.UNIT in rows.column_names and meta.get("unit"):
        rows = rows.filter(np.array([u == meta["unit"] for u in rows.column(L.UNIT).to_pylist()], dtype=bool))
    figs = []
    for spec in meta.get("plots", []):
        name, kind = spec["name"], spec["plot"]
        lines = [(v, label) for v, label in spec.get("marks", [])]
        label = spec.get("description") or name.replace("_", " ")
        if kind in ("hist", "loghist"):
            figs.append((name, plots.histogram(label[:1].upper() + label[1:], name + (" (log scale)" if kind == "loghist"
                                               else ""), _by_status(rows, _column(rows, name)),
                                               log=kind == "loghist", lines=lines)))
        elif kind == "bars":
            table = m.get("bars", {}).get(name)
            info = meta.get("bars", {}).get(name, {})
            totals: dict[str, dict[str, int]] = {}
            for r in (table.to_pylist() if table is not None else []):
                totals.setdefault(r["value"] if r["value"] is not None else "(none)", {})[r["status"]] = int(r["n"])
            top = sorted(totals, key=lambda x: (-sum(totals[x].values()), x))[:20]
            counts = {st: [totals[x].get(st, 0) for x in top] for st in plots.STATUSES}
            what = "values" if not info.get("list") else f"values in {fmt_int(info.get('with_values'))} items"
            figs.append((name, plots.stacked_bars(f"{label[:1].upper() + label[1:]} (top {len(top)} of "
                                                  f"{fmt_int(info.get('distinct'))} {what}, exact)", top, counts)))
    basis = (f"drawn from a uniform sample (hash of sample_id) of {fmt_int(meta.get('rows_in_material'))} of "
             f"{fmt_int(meta.get('rows'))} rows" if meta.get("sampled")
             else f"drawn from all {fmt_int(meta.get('rows'))} rows")
    cells = "".join(f"<figure id='plot-{esc(k)}'><img alt='{esc(k)} distribution' src='{uri}'></figure>"
                    for k, uri in figs)
    return (f"<p class=muted>Histograms {basis} of unit {esc(meta.get('unit'))}, stacked by status (dashed lines: "
            f"the recipe's thresholds); bar charts are exact counts.</p><div class=plots>{cells}</div>")


def decided_by(r: dict, k: dict, section: dict) -> str:
    """The value that decided a row's fate, in words: the kind's own wording when it is registered,
    else the reason's deciding columns."""
    from pipelines import kinds

    kind = kinds.REGISTRY.get(k.get("_kind", ""))
    if kind is not None and kind.explain is not None:
        return kind.explain(r, section, k.get("facts") or {})
    declared = _reasons(k).get(r.get(L.REASON) or "", {})
    shows = [f"{c} {_fmt(r.get(c))}" for c in declared.get("shows", ()) if r.get(c) is not None]
    if r.get(L.DUPLICATE_OF):
        shows.insert(0, f"copy of {r[L.DUPLICATE_OF]}")
    return ", ".join(shows) or r.get(L.DETAIL) or r.get(L.REASON) or ""


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def card(r: dict, k: dict, section: dict, extra_class: str = "", label: str = "") -> str:
    thumb = r.get("thumb")
    if thumb:
        img = (f"<img loading=eager alt='{esc(r.get('source_key'))}' "
               f"src='data:image/jpeg;base64,{base64.b64encode(thumb).decode('ascii')}'>")
    else:
        img = "<div class=noimg>no image</div>"
    text = r.get("text") or ""
    text = text if len(text) <= 160 else text[:157] + "…"
    cls = "card " + extra_class + (" keptcard" if r.get(L.STATUS) == L.KEPT else "")
    head = f"<div><b>{esc(label)}</b></div>" if label else ""
    unit = r.get(L.UNIT) if r.get(L.UNIT) != k.get("unit") else None
    return (f"<div class='{cls.strip()}' data-sample='{esc(r.get('sample_id'))}'>{head}{img}"
            f"<div class=why>{esc(decided_by(r, k, section))}</div>"
            f"<div class=cap>{esc(text)}</div>"
            f"<div class=id>{' · '.join(esc(x) for x in (r.get('source_key'), unit) if x)}<br>"
            f"{esc(r.get('sample_id'))}</div></div>")


def _sort_key(r: dict, k: dict, kept_by: str | None):
    """Within a gallery, order by the value that decided, so the threshold's neighbourhood is visible;
    kept items by the value the last deciding stage looked at, highest first."""
    reason = r.get(L.REASON)
    col = kept_by if reason is None else next(iter(_reasons(k).get(reason, {}).get("shows", ()) or ()), None)
    v = _num(r.get(col)) if col else None
    return (v is None, -(v or 0) if reason is None else (v or 0), r["sample_id"])


def _kept_by(k: dict) -> str | None:
    shown = [r["shows"][0] for r in _reasons(k).values() if r.get("shows")]
    return shown[-1] if shown else None


def galleries(m: dict, k: dict, section: dict) -> str:
    g = m.get("gallery")
    if g is None:
        return "<p class=muted>No gallery material recorded.</p>"
    meta = m.get("meta", {}).get("gallery", {})
    by_section: dict[str, list[dict]] = {}
    for r in g.to_pylist():
        by_section.setdefault(r["section"], []).append(r)
    parts = []
    kept_by = _kept_by(k)
    kept = sorted(by_section.get("kept", []), key=lambda r: _sort_key(r, k, kept_by))
    order = f", highest {kept_by} first" if kept_by else ""
    parts.append(f"<h3 id='gallery-{esc(k['_kind'])}-kept'>Kept <span class=muted>({len(kept)} shown of "
                 f"{fmt_int(k['kept'])}{esc(order)})</span></h3>"
                 f"<div class='gallery kept'>{''.join(card(r, k, section) for r in kept)}</div>")
    declared = _reasons(k)
    position = {code: i for i, code in enumerate(declared)}
    reasons: dict[str, int] = {}
    for u in (k.get("units") or {"": k}).values():
        for st in ("quarantined", "dropped"):
            for code, n in u.get(st, {}).items():
                reasons[code] = reasons.get(code, 0) + n
    for reason in sorted(reasons, key=lambda x: (position.get(x, 999), x)):
        rows = sorted(by_section.get(reason, []), key=lambda r: _sort_key(r, k, kept_by))
        d = declared.get(reason, {})
        parts.append(
            f"<h4 id='gallery-{esc(k['_kind'])}-{esc(reason)}'>{esc(reason)} <span class=muted>({esc(d.get('status'))}, "
            f"{len(rows)} shown of {fmt_int(reasons[reason])}; stage {esc(d.get('stage', 'unknown'))}: "
            f"{esc(d.get('text', 'reason code not declared for this kind'))})</span></h4>"
            f"<div class=gallery>{''.join(card(r, k, section) for r in rows)}</div>")
    return (f"<p class=muted>Thumbnails ({meta.get('thumb_px', 160)} px) of a fixed random sample: up to "
            f"{meta.get('kept')} kept items and {meta.get('per_reason')} per reason. Red: the value that decided, "
            f"next to the recipe's threshold.</p>" + "".join(parts))


def _doc_image(r: dict, k: dict, section: dict) -> str:
    """An image of a document: its thumbnail, its fate (kept, or its reason) and what decided it."""
    status = r.get(L.STATUS) or ""
    fate = "kept" if status == L.KEPT else (r.get(L.REASON) or status)
    why = decided_by(r, k, section) if status != L.KEPT else ""
    src = (r.get("source_key") or "").rsplit("::", 1)[-1]  # the src as the page wrote it (a data: URI cut)
    src = src if len(src) <= 60 else src[:57] + "…"
    thumb = r.get("thumb")
    img = (f"<img alt='{esc(src)}' src='data:image/jpeg;base64,{base64.b64encode(thumb).decode('ascii')}'>"
           if thumb else "<div class=noimg>no image</div>")
    title = _reasons(k).get(r.get(L.REASON) or "", {}).get("text", "")
    return (f"<figure class='docimg {esc(status)}' data-sample='{esc(r.get('sample_id'))}' "
            f"data-position='{esc(r.get('position'))}' data-fate='{esc(fate)}' title='{esc(title)}'>{img}"
            f"<figcaption><span class=fate>{esc(fate)}</span>{(' · ' + esc(why)) if why and why != fate else ''}"
            f"<div class=id>{esc(src)}</div></figcaption></figure>")


def _doc_anchor(k: dict, d: dict) -> str:
    return f"doc-{esc(k.get('_kind', ''))}-{esc(d.get('sample_id'))}"


def document(d: dict, images: list[dict], k: dict, section: dict) -> str:
    """A document as the head of its text with each image's thumbnail in place, its fate beside it."""
    by_position = {r.get("position"): r for r in images if r.get("in_text")}
    kept = d.get(L.STATUS) == L.KEPT
    fate = "kept" if kept else (d.get(L.REASON) or d.get(L.STATUS) or "")
    why = decided_by(d, k, section) if not kept else ""
    body = []
    try:
        head = json.loads(d.get("layout_excerpt") or "null")
    except ValueError:
        head = None
    if head is None:
        body.append("<div class=muted>no layout recorded for this document</div>")
    for seg in head or []:
        if "text" in seg:
            body.append(f"<div class=seg>{esc(seg['text'])}</div>")
        elif seg.get("image") in by_position:
            body.append(_doc_image(by_position[seg["image"]], k, section))
        else:  # placed by the layout, without a row of its own
            body.append(f"<figure class='docimg' data-position='{esc(seg.get('image'))}'><div class=noimg>"
                        f"image {esc(seg.get('image'))}</div><figcaption>no ledger row</figcaption></figure>")
    shown_chars = sum(len(s.get("text", "")) for s in head or [])
    shown_images = sum(1 for s in head or [] if "image" in s)
    more_chars = max(0, int(d.get("layout_chars") or 0) - shown_chars)
    more_images = max(0, int(d.get("layout_images") or 0) - shown_images)
    more = ""
    if head is not None and (more_chars > 50 or more_images):  # an ellipsis at the cut is not "more text"
        rest = [f"about {fmt_int(more_chars)} more characters" if more_chars > 50 else "",
                f"{fmt_int(more_images)} more image(s)" if more_images else ""]
        more = f"<div class=more>… and {' and '.join(x for x in rest if x)}, not shown</div>"
    off = [r for r in images if not r.get("in_text")]
    offtext = ""
    if off:
        offtext = ("<div class=offtext><div class=muted>Images of the page that the text does not place "
                   "(removed with the boilerplate around the main content, or unreadable):</div>"
                   + "".join(_doc_image(r, k, section) for r in off) + "</div>")
    title = d.get("text") or ""
    cls = "doc keptdoc" if kept else "doc"
    return (f"<article class='{cls}' id='{_doc_anchor(k, d)}' data-sample='{esc(d.get('sample_id'))}' "
            f"data-fate='{esc(fate)}'>"
            f"<div class=head><b>{esc(title or '(untitled)')}</b> · <code>{esc(d.get('source_key'))}</code> · "
            f"<span class=why>{esc(fate)}{(': ' + esc(why)) if why and why != fate else ''}</span></div>"
            f"<div class=doctext>{''.join(body)}</div>{more}{offtext}</article>")


def documents_section(m: dict, k: dict, section: dict) -> str:
    """Sampled documents of a kind that declares a layout, grouped: kept, dropped per reason, and kept
    documents that lost an image, per the image's reason."""
    docs = m.get("documents")
    meta = (m.get("meta") or {}).get("documents") or {}
    if docs is None:
        return ""
    images: dict[str, list[dict]] = {}
    for r in (m.get("document_images").to_pylist() if m.get("document_images") is not None else []):
        images.setdefault(r[L.PARENT_ID], []).append(r)
    groups: dict[str, list[dict]] = {}
    for d in docs.to_pylist():
        for s in d.get("sections") or []:
            groups.setdefault(s, []).append(d)
    declared = _reasons(k)
    position = {code: i for i, code in enumerate(declared)}

    def order(name: str):
        image = name.startswith("image:")
        code = name.removeprefix("image:")
        return (name != "kept", image, position.get(code, 999), code)

    kind = k.get("_kind", "")
    parts = []
    shown: set[str] = set()
    for name in sorted(groups, key=order):
        code = name.removeprefix("image:")
        d = declared.get(code, {})
        if name == "kept":
            head = "Kept documents"
        elif name.startswith("image:"):
            head = f"Kept documents with an image removed for {esc(code)}"
        else:
            head = f"{esc(code)} <span class=muted>({esc(d.get('status'))}; stage {esc(d.get('stage', 'unknown'))})</span>"
        note = f"<span class=muted> · {esc(d.get('text'))}</span>" if d.get("text") else ""
        members = sorted(groups[name], key=lambda x: x["sample_id"])
        new = [x for x in members if x["sample_id"] not in shown]  # a document is drawn once, in its first group
        cards = "".join(document(x, sorted(images.get(x["sample_id"], []), key=lambda r: (
            r.get("position") is None, r.get("position") or 0, r["sample_id"])), k, section) for x in new)
        shown.update(x["sample_id"] for x in new)
        above = [x for x in members if x not in new]
        links = ("<p class=muted>shown above: " + ", ".join(
            f"<a href='#{_doc_anchor(k, x)}'>{esc(x.get('source_key'))}</a>" for x in above) + "</p>") if above else ""
        parts.append(f"<h4 id='documents-{esc(kind)}-{esc(name.replace(':', '-'))}'>{head}{note} "
                     f"<span class=muted>({len(members)} shown)</span></h4>{links}<div class=docs>{cards}</div>")
    return (f"<p class=muted>A fixed random sample of documents (up to {meta.get('kept')} kept, {meta.get('per_reason')} "
            f"per reason a document was removed for, and {meta.get('per_image_reason')} kept documents per reason one "
            f"of their images was removed for), each shown as its extracted text (the first "
            f"{fmt_int(meta.get('chars'))} characters and {meta.get('images_in_text')} images) with every image's "
            f"thumbnail in place and what became of it: green kept, red dropped, yellow quarantined.</p>"
            + "".join(parts))


def duplicate_groups(m: dict, k: dict, section: dict) -> str:
    g = m.get("gallery")
    dmeta = m.get("meta", {}).get("duplicates", {})
    if g is None:
        return ""
    groups: dict[str, list[dict]] = {}
    for r in g.to_pylist():
        if r["section"].startswith("dup:"):
            groups.setdefault(r["section"][4:], []).append(r)
    sizes = ", ".join(f"{fmt_int(n)} of size {s}" for s, n in sorted(dmeta.get("sizes", {}).items(), key=lambda x: int(x[0])))
    head = (f"<p class=muted>{fmt_int(dmeta.get('groups', 0))} duplicate groups, {fmt_int(dmeta.get('dropped', 0))} "
            f"items dropped as copies{' (' + sizes + ')' if sizes else ''}. Each row: the member kept by dedup "
            f"beside the members dropped for it. Showing {len(groups)} group(s).</p>")
    rows = []
    for keeper in sorted(groups):
        members = groups[keeper]
        head_rows = [r for r in members if r["sample_id"] == keeper]
        others = sorted((r for r in members if r["sample_id"] != keeper), key=lambda r: r["sample_id"])
        cards = []
        if head_rows:
            h = head_rows[0]
            label = "kept by dedup" + ("" if h.get(L.STATUS) == L.KEPT else f", later {h.get(L.REASON)}")
            cards.append(card(h, k, section, "keeper", label))
        cards += [card(r, k, section, "", r.get(L.REASON) or "") for r in others]
        rows.append(f"<div class=group data-keeper='{esc(keeper)}'>{''.join(cards)}</div>")
    return head + "".join(rows)


def shards_section(out: str, kind: str, k: dict, summary: dict, in_run: bool) -> str:
    s = k.get("shards", {})
    cls, label, why = publish_state(out, kind, summary, in_run)
    files = sorted(s.get("files", []), key=lambda f: f["shard"])
    shown = files[:200]
    rows = "".join(f"<tr><td>{esc(f['shard'])}</td><td class=num>{fmt_int(f['nsamples'])}</td>"
                   f"<td class=num>{fmt_bytes(f['bytes'])}</td></tr>" for f in shown)
    more = f"<p class=muted>… and {len(files) - len(shown)} more shards.</p>" if len(files) > len(shown) else ""
    return (f"<p><span class='badge {cls}'>{esc(label)}</span> {esc(why)}</p>"
            f"<table><tr><th>shards</th><th class=num>samples</th><th class=num>bytes</th></tr>"
            f"<tr><td><b>{fmt_int(s.get('count'))}</b></td><td class=num><b>{fmt_int(s.get('samples'))}</b></td>"
            f"<td class=num><b>{fmt_bytes(s.get('bytes'))}</b></td></tr>{rows}</table>{more}")


def gates_section(summary: dict, kind: str | None = None) -> str:
    gates = summary.get("gates")
    if not gates:
        return "<p class=muted>No quality gates were recorded for this run.</p>"
    parts = []
    for name in sorted(gates.get("suites", {})):
        if kind is not None and not name.startswith(kind + "."):
            continue
        suite = gates["suites"][name]
        info = gates.get("sampling", {}).get(name.split(".")[0], {}).get(name.split(".", 1)[1], {})
        scope = ""
        if info.get("sampled"):
            scope = " (a sample: " + ", ".join(f"{k} {v}" for k, v in sorted(info.items())) + ")"
        rows = {True: [], False: []}
        for c in sorted(suite["expectations"], key=lambda c: (c["severity"] != "critical", c["name"])):
            badge = "ok" if c["success"] else ("bad" if c["severity"] == "critical" else "warn")
            obs = []
            if c.get("unexpected_count"):
                obs.append(f"{c['unexpected_count']} unexpected, e.g. {c.get('unexpected_sample')}")
            elif (c.get("details") or {}).get("mismatched"):
                obs.append(str(c["details"]["mismatched"]))
            elif c.get("observed") is not None and not isinstance(c.get("observed"), list):
                obs.append(f"observed {c['observed']}")
            if c.get("exception"):
                obs.append(f"error: {c['exception'][:200]}")
            rows[c["success"]].append(
                f"<tr><td><span class='badge {badge}'>{'passed' if c['success'] else 'FAILED'}</span></td>"
                f"<td>{esc(c['severity'])}</td>"
                f"<td><code>{esc(c['name'])}</code><div class=muted>{esc(c.get('description'))}</div></td>"
                f"<td class=muted>{esc(c['type'])}{' · ' + esc(c['column']) if c.get('column') else ''}</td>"
                f"<td class=muted>{esc('; '.join(obs))}</td></tr>")
        head = ("<tr><th>result</th><th>severity</th><th>expectation</th><th>type · column</th>"
                "<th>observed</th></tr>")
        ok = "ok" if suite["success"] else "bad"
        failed = f"<table>{head}{''.join(rows[False])}</table>" if rows[False] else ""
        passed = (f"<details><summary>{len(rows[True])} expectations passed</summary>"
                  f"<table>{head}{''.join(rows[True])}</table></details>") if rows[True] else ""
        docs = f" · <a class=gx-page href='{esc(suite['data_docs'])}'>Data Docs page</a>" if suite.get("data_docs") else ""
        parts.append(f"<h4>{esc(name)} <span class='badge {ok}'>{'passed' if suite['success'] else 'FAILED'}</span> "
                     f"<span class=muted>{fmt_int(suite['rows'])} rows validated{esc(scope)}{docs}</span></h4>"
                     f"{failed}{passed}")
    return "".join(parts)


def gates_banner(summary: dict, ids: bool = True) -> str:
    gates = summary.get("gates")
    if not gates:
        return "<div class='banner warn'>No quality gates recorded.</div>"
    docs = gates.get("data_docs")
    link = f" <a {'id=gx-docs ' if ids else ''}href='{esc(docs)}'>great-expectations Data Docs</a>" if docs else ""
    verdict = "id=gates-verdict" if ids else ""
    warn = ""
    if gates.get("failed_warnings"):
        warn = f"<div class='banner warn'>Warnings (recorded only): {esc(', '.join(gates['failed_warnings']))}</div>"
    if gates.get("passed"):
        n = sum(len(s["expectations"]) for s in gates.get("suites", {}).values())
        return f"<div class='banner ok' {verdict}>Quality gates passed: {n} expectations.{link}</div>{warn}"
    return (f"<div class='banner bad' {verdict}>Quality gates FAILED; the shards were not published. "
            f"Failed critical expectations: {esc(', '.join(gates.get('failed_critical', [])))}.{link}</div>{warn}")


def run_section(summary: dict) -> str:
    stages = summary.get("stages", {})
    st = "".join(f"<tr><td>{esc(n)}</td><td class=num>{_secs(v.get('task_seconds'))}</td>"
                 f"<td class=num>{_secs(v.get('wall_seconds'))}</td></tr>" for n, v in sorted(stages.items()))
    vers = "".join(f"<tr><td>{esc(n)}</td><td>{esc(v)}</td></tr>" for n, v in sorted(summary.get("versions", {}).items()))
    facts = []
    for kind, k in sorted(summary.get("kinds", {}).items()):
        for name, fact in sorted((k.get("facts") or {}).items()):
            cells = fact.items() if isinstance(fact, dict) else [("value", fact)]
            facts.append(f"<tr><td>{esc(kind)}</td><td>{esc(name)}</td><td>"
                         + "; ".join(f"{esc(a)}: <b>{esc(b)}</b>" for a, b in cells) + "</td></tr>")
    recipe = json.dumps(summary.get("recipe", {}), indent=1, sort_keys=True, ensure_ascii=False)
    return (f"<p>Started {esc(summary.get('started_at'))}, {esc(summary.get('elapsed_seconds'))} s; output "
            f"<code>{esc(summary.get('output'))}</code>.</p>"
            "<h3>Facts per kind</h3><p class=muted>what each kind's plan decided on the driver (models, weights, "
            f"thresholds applied)</p><table><tr><th>kind</th><th>fact</th><th></th></tr>{''.join(facts)}</table>"
            "<h3>Time per stage</h3><p class=muted>task seconds: summed over executors (row-wise stages); "
            "wall seconds: on the driver (checkpoints, ledger, report, gates).</p>"
            f"<table><tr><th>stage</th><th class=num>task s</th><th class=num>wall s</th></tr>{st}</table>"
            f"<h3>Package versions</h3><table>{vers}</table>"
            f"<h3>Recipe</h3><details><summary>the full recipe of this run</summary><pre>{esc(recipe)}</pre></details>")


def _secs(v: Any) -> str:
    return "—" if v is None else f"{float(v):.2f}"


def draw(out: str, kind: str) -> str:
    """The charts of `kind` (its Distributions section), drawn from its material: what `render` draws
    for it, or takes from `drawn`."""
    return distributions(load_material(out, kind))


def render(out: str, in_run: bool = False, drawn: dict[str, str] | None = None) -> str:
    """The report page for the output at `out`, as a string. `drawn`: kinds' charts already drawn
    (`draw`), e.g. by the run while its gates were validated."""
    summary = _read_json(storage.join(out, "reports", "summary.json"))
    recipe = summary.get("recipe", {})
    kinds = sorted(summary.get("kinds", {}))
    nav = "".join(f"<a href='#kind-{esc(k)}'>{esc(k)}</a>" for k in kinds)
    nav += "<a href='#gates'>quality gates</a><a href='#run'>run</a>"
    body = []
    for kind in kinds:
        k = dict(summary["kinds"][kind], _kind=kind)
        section = recipe.get(kind, {})
        m = load_material(out, kind)
        docs = documents_section(m, k, section)
        docs = f"<h3 id='documents-{esc(kind)}'>Documents</h3>{docs}" if docs else ""
        warn = "".join(f"<div class='banner warn'>{esc(a.get('message') or a.get('description'))}</div>"
                       for a in k.get("assertions", []) if not a.get("ok"))
        body.append(
            f"<section id='kind-{esc(kind)}'><h2>{esc(kind)}: {fmt_int(k['input'])} in, {fmt_int(k['kept'])} kept</h2>"
            f"{warn}<h3 id='funnel-{esc(kind)}'>Funnel</h3>{funnel(k)}"
            f"<h3 id='units-{esc(kind)}'>Units</h3>{units_section(k)}"
            f"<h3 id='distributions-{esc(kind)}'>Distributions</h3>{(drawn or {}).get(kind) or distributions(m)}"
            f"{docs}<h3 id='galleries-{esc(kind)}'>Galleries</h3>{galleries(m, k, section)}"
            f"<h3 id='duplicates-{esc(kind)}'>Duplicate groups</h3>{duplicate_groups(m, k, section)}"
            f"<h3 id='shards-{esc(kind)}'>Shards</h3>{shards_section(out, kind, k, summary, in_run)}"
            "</section>")
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>vlcurate report: {esc(summary.get('output'))}</title><style>{CSS}</style></head><body>"
        f"<header><h1>vlcurate data quality report</h1><div class=meta>{esc(summary.get('output'))} · started "
        f"{esc(summary.get('started_at'))} · "
        + " · ".join(f"{esc(k)}: {fmt_int(summary['kinds'][k]['input'])} in, {fmt_int(summary['kinds'][k]['kept'])} kept"
                     for k in kinds)
        + f"</div></header><nav>{nav}</nav><main>{gates_banner(summary)}"
        + "".join(body)
        + f"<section id=gates><h2>Quality gates</h2>{gates_banner(summary, ids=False)}"
        + "<p class=muted>great-expectations suites per kind: critical expectations stop the run before its "
          "shards are published; warnings are recorded only.</p>"
        + f"{gates_section(summary)}</section>"
        + f"<section id=run><h2>Run</h2>{run_section(summary)}</section>"
        "</main></body></html>\n")
    return page


def write_report(out: str, in_run: bool = False, drawn: dict[str, str] | None = None) -> str:
    """Render and write OUT/reports/index.html; returns its URI."""
    uri = storage.join(out, "reports", "index.html")
    storage.write_bytes(uri, render(out, in_run, drawn).encode("utf-8"))
    return uri
