"""spark-submit entry point: curate raw corpora into WebDataset shards, a ledger and a report.

    spark-submit --properties-file spark-defaults.conf jobs/build_pretrain.py \
        [--recipe FILE.yaml] [--input KIND=URI ...] [--output URI] [--set dotted.key=value ...]

With no --input, the bundled sample corpus (made from scikit-image's photos) is used. The job never
sets master, memory or cores: spark-submit and spark-defaults.conf own them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

# spark-submit runs this file as a script: make the project's packages importable from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.pyspark_daemon import prefer_installed

prefer_installed()  # pyspark from the installed package's compiled files, not spark-submit's pyspark.zip
from pipelines.recipe import RecipeError, load

log = logging.getLogger("build_pretrain")
SAMPLE_DIR = os.path.join("data", "sample")
ALLOW_RANDOM = "image_text.clip.allow_random_weights"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe (default: recipes/default.yaml)")
    p.add_argument("--input", action="append", default=[], metavar="KIND=URI",
                   help="an input: KIND is a registered corpus kind (image_text, ...); URI a folder, glob, file or s3:// prefix. "
                        "Repeatable. Replaces the recipe's inputs.")
    p.add_argument("--output", help="output folder or s3:// prefix (default: the recipe's, ./out)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set image_text.clip.threshold=0.28 (value parsed as YAML)")
    return p.parse_args(argv)


def stop(spark) -> None:
    """spark.stop(), without then waiting for pyspark's accumulator server thread to notice it should
    end: that wait is up to its 0.5 s poll interval, and this process exits right after (the thread
    is a daemon). The JVM's SparkContext stops as usual."""
    sc = spark.sparkContext
    if getattr(sc, "_accumulatorServer", None) is not None:
        sc._accumulatorServer.server_shutdown = True  # its handlers stop reading updates
        sc._accumulatorServer = None
    spark.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "botocore", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    started = time.time()
    # The driver's main thread plans queries in hundreds of short py4j round trips while other threads
    # run Python (the background imports, the gates beside the report): each round trip waits for the
    # GIL up to the switch interval, 5 ms by default. `python -m benchmarks.driver_threads`: 300
    # planning rounds 2.2-2.8 s alone; beside a busy thread 86-90 s at 5 ms, 12.5-13.5 at 0.5, 5.6-6.1 at 0.1.
    sys.setswitchinterval(0.0001)
    try:
        recipe = load(args.recipe, args.set, args.input, args.output)
    except (RecipeError, OSError) as e:
        print(f"build_pretrain: recipe error: {e}", file=sys.stderr)
        return 2
    inputs = dict(recipe.inputs)
    if not inputs:
        from jobs.make_sample import make_sample

        if not os.path.isdir(SAMPLE_DIR):
            make_sample(SAMPLE_DIR)
        inputs = {"image_text": [SAMPLE_DIR]}
        log.info("no --input given: using the bundled sample corpus in %s", SAMPLE_DIR)
        # the demo must run offline, where no CLIP weights can be had; a --set on the command line still wins
        recipe = load(args.recipe, [f"{ALLOW_RANDOM}=true", *args.set], args.input, args.output)
        if recipe.section("image_text").clip.allow_random_weights:
            log.warning("bundled sample: %s=true: if the CLIP weights cannot be loaded, CLIP scores with RANDOM "
                        "weights and its threshold is NOT applied (a run with --input fails instead)", ALLOW_RANDOM)

    from filters.base import arrow_pool
    from filters.clip import ClipConfigError
    from pipelines.build import run_build
    from pipelines.gates import GateFailed
    from pipelines.io import storage

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # spark.pyspark.python, when set, wins
    arrow_pool()  # the driver's Arrow hand-offs too (toArrow, createDataFrame)
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()
    out = storage.normalize(recipe.output)
    try:
        summary = run_build(spark, recipe, inputs, out, started)
    except GateFailed as e:
        print(f"build_pretrain: quality gate failed; shards NOT published. Failed critical expectation(s): "
              f"{', '.join(e.failed)}", file=sys.stderr)
        for line in e.details:
            print(f"  {line}", file=sys.stderr)
        print(f"report: {storage.join(out, 'reports', 'index.html')}", file=sys.stderr)
        return 3
    except ClipConfigError as e:  # raised on the driver before any Spark work
        print(f"build_pretrain: recipe error: {e}", file=sys.stderr)
        return 2
    finally:
        stop(spark)
    for kind, k in summary["kinds"].items():
        print(f"{kind}: {k['input']} in, {k['kept']} kept, dropped {k['dropped']}, quarantined {k['quarantined']}")
    print(f"shards:  {storage.join(out, 'shards')}")
    print(f"ledger:  {storage.join(out, 'ledger')}")
    print(f"summary: {storage.join(out, 'reports', 'summary.json')}")
    print(f"report:  {storage.join(out, 'reports', 'index.html')}")
    for k in summary["kinds"].values():
        for a in k.get("assertions", []):
            if not a.get("ok"):
                print(f"WARNING: {a.get('message') or a.get('description')}")
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and Spark is stopped: the interpreter's own teardown (torch, pandas,
    # great_expectations, matplotlib: ~0.9 s of finalising modules and objects) would only delay the
    # exit code. Flush what is buffered and leave. (An exception out of main() exits the usual way.)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
