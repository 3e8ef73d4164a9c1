"""Rebuild OUT/reports/index.html from an existing output, without re-running the pipeline.

    python -m jobs.report OUT

Reads only what the run left: OUT/reports/summary.json (counts, shards, gate results, recipe,
versions, timings), OUT/reports/material/<kind>/ (distribution rows, exact language and concept
counts, thumbnails) and the shards' index.json. No Spark. The same output gives the same page, byte
for byte, as the one the run wrote (the shards' state is re-checked: a run that never finished
publishing says so).
"""
from __future__ import annotations

import argparse
import os
import sys

# runnable as a script from a checkout, like jobs/build_pretrain.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="the output folder or s3:// prefix of a finished run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.io import runs, storage
    from pipelines.report import write_report

    args = parse_args(argv)
    out = runs.root_for_reading(storage.normalize(args.out))  # s3://: the published run's prefix (OUT/_LATEST)
    summary = storage.join(out, "reports", "summary.json")
    if not storage.exists(summary):
        print(f"jobs.report: {summary} not found: is {out} the output of a run?", file=sys.stderr)
        return 2
    print(write_report(out, in_run=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
