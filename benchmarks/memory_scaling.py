"""Peak memory of the image_text pipeline as the input grows: it should stay flat from 1x to 4x.

    python -m benchmarks.memory_scaling [--n 1000] [--scales 1,4] [--clip-model ViT-B-32]
    python -m benchmarks.memory_scaling --n 100000 --scales 1     # the 100k completion run

Each scale runs `benchmarks.pipeline_throughput.pipeline()` (in-process SparkSession local[N], balancing
off, CLIP off unless --clip-model names an open_clip architecture, which then runs with random weights)
in a fresh Python process, because a SparkSession's JVM outlives `spark.stop()` and would carry one
run's heap into the next. While it runs, the resident set of the process tree is sampled every 0.1 s,
split into the JVM (driver + executor in local mode), the Python workers (pyspark.daemon and the
workers it forks; one per running task) and the driver's own Python process.

Corpora: up to 20,000 pairs come from `benchmarks.corpus.generate` (crops of scikit-image photos, 10 %
planted near duplicates, ~40 KB JPEGs); the 1x corpus is the first tars of the 4x one (same seed).
Above 20,000 pairs `generate` would take ~10 ms a pair on one core, so `fast_corpus` is used instead:
random crops and flips of the same photos at <= 448 px (~17 KB JPEGs), every pair encoded once (no byte
reuse), about 1 ms a pair. Writes benchmarks/results/memory_scaling.{json,md} (or memory_scaling_<n>.*
for a run with a single scale).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import psutil

from benchmarks import processes
from benchmarks.pipeline_throughput import RESULTS, pipeline
from benchmarks.provenance import header, provenance

FAST_CORPUS_ABOVE = 20_000
PER_TAR = 250


class TreeMemory:
    """Peak RSS of this process tree, in total and per role, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = {"tree": 0, "jvm": 0, "python_workers": 0, "python_workers_pss": 0, "python_worker_max": 0,
                     "driver_python": 0}
        self.max_workers = 0
        self.samples = 0

    @staticmethod
    def _pss(pid: int) -> int:
        """Proportional set size: shared pages (the forked daemon's, shared libraries such as libtorch)
        split between the processes that map them, so a sum over workers does not count them twice."""
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _role(p: psutil.Process) -> str:
        return {processes.JVM: "jvm", processes.WORKERS: "python_worker"}.get(processes.role(p), "other")

    def _run(self) -> None:
        me = psutil.Process()
        roles: dict[int, str] = {}
        while not self._stop.is_set():
            now = dict.fromkeys(self.peak, 0)
            workers = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                role = "driver_python" if p.pid == me.pid else roles.get(p.pid) or self._role(p)
                if role != "other":  # a launcher script becomes java under the same pid: look again later
                    roles[p.pid] = role
                now["tree"] += rss
                if role == "python_worker":
                    now["python_workers"] += rss
                    now["python_workers_pss"] += self._pss(p.pid)
                    now["python_worker_max"] = max(now["python_worker_max"], rss)
                    workers += 1
                elif role in now:
                    now[role] += rss
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
            self.max_workers = max(self.max_workers, workers)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def mib(self) -> dict:
        out = {f"{k}_mib": round(v / 2**20, 1) for k, v in self.peak.items()}
        out["max_python_processes"] = self.max_workers
        return out


def fast_corpus(out_dir: str, n: int, per_tar: int = 2000, seed: int = 0) -> list[str]:
    """n pairs: random crops (55-95 % per side) and flips of scikit-image photos at <= 448 px, each
    encoded once at JPEG quality 70-91, with template captions. About 1 ms and 17 KB a pair."""
    import numpy as np
    from PIL import Image

    from benchmarks.corpus import PLACES, SUBJECTS
    from jobs.make_sample import PHOTOS, load_photo

    rng = np.random.default_rng(seed)
    photos = []
    for name, caption in PHOTOS.items():
        img = load_photo(name).convert("RGB")
        img.thumbnail((448, 448))
        photos.append((img, caption))
    flips = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]
    os.makedirs(out_dir, exist_ok=True)
    paths, tf = [], None
    for i in range(n):
        if i % per_tar == 0:
            if tf is not None:
                tf.close()
            paths.append(os.path.join(out_dir, f"fast-{i // per_tar:06d}.tar"))
            tf = tarfile.open(paths[-1], "w")  # noqa: SIM115 - one tar open at a time, closed below
        photo, base = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.55, 0.95)), int(h * rng.uniform(0.55, 0.95))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch))
        if min(img.size) < 224:
            img = img.resize((max(224, img.width), max(224, img.height)))
        flip = flips[int(rng.integers(len(flips)))]
        if flip is not None:
            img = img.transpose(flip)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 92)))
        caption = f"{SUBJECTS[int(rng.integers(0, 6))].capitalize()} {PLACES[int(rng.integers(0, 6))]}: {base}"
        for ext, payload in (("jpg", buf.getvalue()), ("txt", caption.encode())):
            ti = tarfile.TarInfo(f"{i:08d}.{ext}")
            ti.size, ti.mtime = len(payload), 0
            tf.addfile(ti, io.BytesIO(payload))
    tf.close()
    return paths


def _watch_storage(found: dict) -> None:
    """Wrap pipelines.build.run_build so that, when the run ends (before pipeline() stops the session),
    `found` gets what the block manager still holds: cached / localCheckpointed RDDs by memory and disk."""
    from pipelines import build

    original = build.run_build

    def run_build(spark, *args, **kwargs):
        summary = original(spark, *args, **kwargs)
        rdds = []
        for info in spark.sparkContext._jsc.sc().getRDDStorageInfo():
            rdds.append({"id": info.id(), "name": info.name(), "partitions": info.numCachedPartitions(),
                         "memory_mib": round(info.memSize() / 2**20, 1), "disk_mib": round(info.diskSize() / 2**20, 1)})
        runtime = spark.sparkContext._jvm.java.lang.Runtime.getRuntime()
        found.update(cached_rdds=rdds, cached_memory_mib=round(sum(r["memory_mib"] for r in rdds), 1),
                     cached_disk_mib=round(sum(r["disk_mib"] for r in rdds), 1),
                     jvm_heap_used_at_end_mib=round((runtime.totalMemory() - runtime.freeMemory()) / 2**20, 1),
                     jvm_heap_max_mib=round(runtime.maxMemory() / 2**20, 1))
        return summary

    build.run_build = run_build


def run_one(tars: list[str], cores: int, clip_model: str | None, work: str) -> dict:
    """One pipeline run in this process, with the memory of the process tree sampled throughout."""
    storage: dict = {}
    _watch_storage(storage)
    with TreeMemory() as mem:
        result = pipeline(tars, cores, clip_model, work)
    result.update(mem.mib())
    result.update(storage)
    result["input_mib"] = round(sum(os.path.getsize(t) for t in tars) / 2**20, 1)
    return result


def run_isolated(tars: list[str], cores: int, clip_model: str | None, work: str, log_path: str) -> dict:
    """run_one in a fresh Python process (a fresh JVM)."""
    spec = os.path.join(work, "run.json")
    with open(spec, "w") as f:
        json.dump({"tars": tars, "cores": cores, "clip_model": clip_model, "work": work}, f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p))
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_scaling", "--run-one", spec],
                              check=False, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"pipeline run failed ({proc.returncode}); log {log_path}:\n{tail}")
    with open(os.path.join(work, "result.json")) as f:
        return json.load(f)


def markdown(r: dict) -> str:
    lines = [f"# Memory scaling ({r['n']} pairs at 1x, local[{r['cores']}], CLIP {r['clip']})", "",
             f"{header(r)}  ", f"Corpus: {r['corpus']}  ",
             f"Machine: {r['cpu_count']} cores, {r['memory_gib']} GiB RAM (shared with other work while measuring)", "",
             ("| scale | pairs | input MiB | kept | seconds | pairs/s | tree peak RSS MiB | JVM peak RSS MiB | "
             "Python workers peak, RSS sum / PSS sum MiB | largest Python worker RSS MiB | Python processes | "
             "driver Python MiB | cached blocks at end, memory / disk MiB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["runs"]:
        lines.append(f"| {s['scale']}x | {s['samples']} | {s['input_mib']} | {s['kept']} | {s['seconds']} | "
                     f"{s['samples_per_s']} | {s['tree_mib']} | {s['jvm_mib']} | {s['python_workers_mib']} / "
                     f"{s['python_workers_pss_mib']} | {s['python_worker_max_mib']} | {s['max_python_processes']} | "
                     f"{s['driver_python_mib']} | {s.get('cached_memory_mib')} / {s.get('cached_disk_mib')} |")
    if len(r["runs"]) > 1:
        a, b = r["runs"][0], r["runs"][-1]
        lines += ["", f"Growth from {a['scale']}x to {b['scale']}x: " + ", ".join(
            f"{k.removesuffix('_mib')} {b[k] / a[k]:.2f}x" for k in (
                "tree_mib", "jvm_mib", "python_workers_mib", "python_workers_pss_mib", "python_worker_max_mib",
                "driver_python_mib")
            if a.get(k))]
    if r.get("notes"):
        lines += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="pairs at scale 1x")
    p.add_argument("--scales", default="1,4", help="comma-separated multiples of --n to run")
    p.add_argument("--cores", type=int, default=2, help="local[N]")
    p.add_argument("--clip-model", default=None,
                   help="open_clip architecture to score with (random weights); default: CLIP off")
    p.add_argument("--corpus", choices=["auto", "photos", "fast"], default="auto",
                   help=f"photos: benchmarks.corpus.generate; fast: fast_corpus; auto: fast above {FAST_CORPUS_ABOVE} pairs")
    p.add_argument("--note", action="append", default=[], help="a line recorded with the results (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpus and outputs (printed)")
    p.add_argument("--run-one", metavar="SPEC", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run_one:
        with open(a.run_one) as f:
            spec = json.load(f)
        result = run_one(spec["tars"], spec["cores"], spec["clip_model"], spec["work"])
        with open(os.path.join(spec["work"], "result.json"), "w") as f:
            json.dump(result, f)
        return 0

    scales = [int(s) for s in a.scales.split(",")]
    total = a.n * max(scales)
    work = tempfile.mkdtemp(prefix="vlcurate-mem-")
    try:
        t0 = time.perf_counter()
        if a.corpus == "fast" or (a.corpus == "auto" and total > FAST_CORPUS_ABOVE):
            per_tar = 2000
            tars = fast_corpus(os.path.join(work, "corpus"), total, per_tar)
            corpus = (f"benchmarks.memory_scaling.fast_corpus: {total} distinct ~17 KB JPEGs (crops and flips of "
                      f"scikit-image photos at <= 448 px), {per_tar} pairs per tar")
        else:
            from benchmarks.corpus import generate

            per_tar = PER_TAR if a.n % PER_TAR == 0 else a.n
            tars = generate(os.path.join(work, "corpus"), total, per_shard=per_tar)
            corpus = (f"benchmarks.corpus.generate (crops of scikit-image photos, 10 % near duplicates), "
                      f"{per_tar} pairs per tar; the 1x corpus is the first tars of the {max(scales)}x one")
        gen_s = round(time.perf_counter() - t0, 1)
        print(f"generated {total} pairs in {gen_s}s", flush=True)
        runs = []
        for scale in scales:
            n = a.n * scale
            subset = tars[: -(-n // per_tar)]
            run_dir = os.path.join(work, f"run-{scale}x")
            os.makedirs(run_dir)
            t1 = time.perf_counter()
            res = run_isolated(subset, a.cores, a.clip_model, run_dir, os.path.join(work, f"run-{scale}x.log"))
            res["scale"] = scale
            res["wall_s_with_session"] = round(time.perf_counter() - t1, 1)
            runs.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "stages"}), flush=True)
            if not a.keep:
                shutil.rmtree(os.path.join(run_dir), ignore_errors=True)
    finally:
        if a.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    r = {"n": a.n, "scales": scales, "cores": a.cores, "cpu_count": os.cpu_count(),
         "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
         "clip": f"on ({a.clip_model}, random weights)" if a.clip_model else "off",
         "provenance": provenance("benchmarks.memory_scaling", argv),
         "corpus": corpus, "generate_s": gen_s, "runs": runs, "notes": a.note}
    os.makedirs(RESULTS, exist_ok=True)
    name = "memory_scaling" if len(scales) > 1 else f"memory_scaling_{total}"
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(r, f, indent=1)
    md = markdown(r)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
