"""The data quality report: material collected with Spark during a run (`material`), rendered to a
self-contained OUT/reports/index.html without Spark (`page`, `plots`).

    collect_material(kind, result, ledger, out)   # during the run, before the work dir is removed
    draw(out, kind)                               # during the run, beside the gates: a kind's charts
    write_report(out, in_run=True, drawn=...)     # during the run, after the gates
    python -m jobs.report OUT                     # later: the same page from what the run left
"""
from pipelines.report.material import collect_material, material_dir
from pipelines.report.page import draw, render, write_report

__all__ = ["collect_material", "draw", "material_dir", "render", "write_report"]
