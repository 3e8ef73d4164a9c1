"""GUI renders per second per core: the RenderPage stage against bare Playwright on the same pages.

    python -m benchmarks.gui_render [--pages 12] [--pool 1 4] [--viewport desktop:1280x800@1]

Pages: debian-handbook's en-US HTML (local files). Each measurement runs in a fresh process, so the
CPU time counted is that process's and its children's (the Playwright driver and every Chromium
process, reaped when the browser closes):

- bare: launch Chromium, then per page a new context at the viewport, `goto(load)`, a viewport
  screenshot, close; `--pool` pages at once;
- ours: `filters.gui_render.RenderPage` on an Arrow batch of the same renders (launch, the origin rule,
  load + settle, screenshot, the element walk with the visibility checks, boxes 0-999, QA pairs, the
  image features dedup reads).

Renders per CPU-second (all cores the browser used, counted once) is the per-core figure; wall-clock
renders per second is shown beside it. Writes benchmarks/results/gui_render.json and .md.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import resource
import time

from benchmarks.provenance import header, provenance

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HANDBOOK = "/usr/share/doc/debian-handbook/html/en-US"


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _bare(pages: list[str], viewport: tuple, pool: int, q) -> None:
    import asyncio

    from playwright.async_api import async_playwright

    from filters.gui_render import CHROMIUM, CHROMIUM_ARGS

    async def main():
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
            sem = asyncio.Semaphore(pool)

            async def one(path):
                async with sem:
                    ctx = await browser.new_context(viewport={"width": viewport[1], "height": viewport[2]},
                                                    device_scale_factor=viewport[3])
                    page = await ctx.new_page()
                    await page.goto("file://" + path, wait_until="load")
                    await page.screenshot()
                    await ctx.close()

            await asyncio.gather(*(one(p) for p in pages))
            await browser.close()

    c0, t0 = _cpu_seconds(), time.perf_counter()
    asyncio.run(main())
    q.put((time.perf_counter() - t0, _cpu_seconds() - c0))


def _ours(pages: list[str], viewport: tuple, pool: int, q) -> None:
    import pyarrow as pa

    from filters.gui_render import RenderPage
    from schemas import gui as S

    rows = []
    for i, path in enumerate(pages):
        row = {f.name: None for f in S.RAW}
        row.update({"sample_id": f"{i:032x}", "kind": "gui", "source": path, "source_key": "page", "unit": "render",
                    "source_type": "html", "path": path, "device": viewport[0], "viewport_width": viewport[1],
                    "viewport_height": viewport[2], "device_scale": viewport[3]})
        rows.append(row)
    batch = pa.RecordBatch.from_pylist(rows, schema=S.RAW)
    stage = RenderPage(pages=pool, settle_s=0.5)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    state = stage.setup(1)
    out = stage.apply(batch, state)
    errors = sum(e is not None for e in out.column("error").to_pylist())
    state["loop"].run_until_complete(state["browser"].close())
    state["loop"].run_until_complete(state["pw"].stop())
    q.put((time.perf_counter() - t0, _cpu_seconds() - c0, errors))


def measure(fn, pages, viewport, pool) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(pages, viewport, pool, q))
    p.start()
    got = q.get(timeout=900)
    p.join()
    wall, cpu = got[0], got[1]
    out = {"renders": len(pages), "pool": pool, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
           "renders_per_s": round(len(pages) / wall, 2), "renders_per_cpu_s": round(len(pages) / cpu, 2)}
    if len(got) > 2:
        out["errors"] = got[2]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=12, help="handbook pages rendered per measurement")
    ap.add_argument("--pool", type=int, nargs="+", default=[1, 4], help="pages rendering at once")
    ap.add_argument("--viewport", default="desktop:1280x800@1", help="DEVICE:WxH@SCALE")
    args = ap.parse_args(argv)
    from pipelines.gui.read import parse_viewport

    viewport = parse_viewport(args.viewport)
    pages = sorted(glob.glob(os.path.join(HANDBOOK, "*.html")))[: args.pages]
    results = {"provenance": provenance("benchmarks.gui_render", argv), "viewport": args.viewport,
               "load_average": os.getloadavg(), "cores": os.cpu_count(), "runs": []}
    for pool in args.pool:
        for name, fn in (("bare_playwright", _bare), ("render_stage", _ours)):
            r = {"what": name, **measure(fn, pages, viewport, pool)}
            results["runs"].append(r)
            print(json.dumps(r))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "gui_render.json"), "w") as f:
        json.dump(results, f, indent=1)
    title = (f"# GUI renders ({args.viewport}, {len(pages)} debian-handbook pages; load average "
             f"{results['load_average'][0]:.1f} on {results['cores']} cores)")
    lines = [title, "", header(results), "",
             "| what | pool | renders/s (wall) | renders per CPU-second | CPU s |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['pool']} | {r['renders_per_s']} | {r['renders_per_cpu_s']} | {r['cpu_s']} |"
              for r in results["runs"]]
    with open(os.path.join(RESULTS, "gui_render.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
