"""OCR: scene images, rendered documents and PDF pages per second per core, against bare rapidocr on the
same images.

    python -m benchmarks.ocr_throughput [--scenes 8] [--renders 8] [--pages 8] [--threads 1]

One process, onnxruntime limited to --threads (default one core), the models loaded before timing:

- scene: photos from scikit-image (with and without text, one with a painted sign), as PNG/JPEG bytes:
  bare = `RapidOCR()(ndarray)` on the decoded image with the same engine settings; ours = the PpOcr stage
  on an Arrow batch (decode of the bytes, PP-OCR, valid-line filter, boxes 0-999, JSON); and rapidocr
  with its shipped settings (detector input: shorter side scaled up to 736 px; ours: longer side <= 960);
- synthetic: the RenderText stage alone (fonts, layout, augmentation, PNG), then the legibility read
  (PP-OCR + CER) on its output, against bare rapidocr on the same rendered images;
- academic: a Debian documentation PDF (shared-mime-info's specification; skipped when absent): page
  render + text layer + markup per page, then the legibility read, against bare rapidocr on the pages.

Rates are items per CPU-second of one core (process CPU time / --threads). Writes
benchmarks/results/ocr_throughput.json and .md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np

from benchmarks.provenance import header, provenance

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PDF = "/usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf"


def _cpu(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def scene_images(n: int) -> list[bytes]:
    import skimage
    from PIL import Image, ImageDraw, ImageFont

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    names = ["motorcycle_left.png", "chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "page.png"]
    out = []
    for i in range(n):
        name = names[i % len(names)]
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        if name == "coffee.png":
            img = Image.open(io.BytesIO(data)).convert("RGB")
            ImageDraw.Draw(img).text((40, 40), f"OPEN DAILY {i}", fill=(20, 20, 20),
                                     font=ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 40))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
        out.append(data)
    return out


def _rows(images, branch, texts=None, source="ocr"):
    import pyarrow as pa

    from schemas import ocr as S

    rows = []
    for i, data in enumerate(images):
        row = {f.name: None for f in S.RAW}
        row.update({"sample_id": f"{i:032x}", "kind": "ocr", "source": "b", "source_key": str(i), "branch": branch,
                    "image": data, "text": None if texts is None else texts[i], "text_source": source})
        rows.append(row)
    return pa.RecordBatch.from_pylist(rows, schema=S.RAW)


def bare(images: list[bytes], threads: int) -> float:
    from PIL import Image

    from filters.ocr import engine

    eng = engine(threads, 0.5)

    def run():
        for data in images:
            eng(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))

    return _cpu(run)[2]


def bare_defaults(images: list[bytes], threads: int) -> float:
    """rapidocr as shipped (its detector scales the SHORTER side up to 736 px), same threads."""
    from PIL import Image
    from rapidocr import RapidOCR

    eng = RapidOCR(params={"Global.log_level": "error", "EngineConfig.onnxruntime.intra_op_num_threads": threads})
    eng(np.asarray(Image.open(io.BytesIO(images[0])).convert("RGB")))  # warm

    def run():
        for data in images:
            eng(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))

    return _cpu(run)[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=8, help="scene images to read")
    ap.add_argument("--renders", type=int, default=8, help="synthetic texts to render and read back")
    ap.add_argument("--pages", type=int, default=8, help="PDF pages to render and read back")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (cores)")
    args = ap.parse_args(argv)

    from filters.augment import Augment
    from filters.ocr import Legibility, PpOcr, check_models, engine
    from filters.pdf_pages import Academic, pdf_pages
    from filters.render import RenderText, Synthetic

    check_models()
    engine(args.threads, 0.5), engine(args.threads, 0.0)  # loaded before any timing
    t = args.threads
    res: dict = {"provenance": provenance("benchmarks.ocr_throughput", argv), "threads": t,
                 "load_average": os.getloadavg()[0]}

    scenes = scene_images(args.scenes)
    batch = _rows(scenes, "scene")
    _, wall, cpu = _cpu(lambda: PpOcr().apply(batch, t))
    b = bare(scenes, t)
    d = bare_defaults(scenes, t)
    res["scene"] = {"items": len(scenes), "ours_per_core_s": len(scenes) / (cpu / t), "wall_s": wall,
                    "bare_per_core_s": len(scenes) / (b / t), "ours_vs_bare": b / cpu,
                    "rapidocr_defaults_per_core_s": len(scenes) / (d / t)}

    texts = [f"Item {i}: the quick brown fox jumps over the lazy dog; 北京欢迎你 {i}." * (1 + i % 3)
             for i in range(args.renders)]
    batch = _rows([None] * len(texts), "synthetic", texts, "render")
    rendered, _, rcpu = _cpu(lambda: RenderText(Synthetic(), Augment(), 0).apply(batch))
    _, _, lcpu = _cpu(lambda: Legibility().apply(rendered, t))
    b = bare(rendered.column("image").to_pylist(), t)
    res["synthetic"] = {"items": len(texts), "render_per_core_s": len(texts) / rcpu,
                        "render_and_read_per_core_s": len(texts) / (rcpu + lcpu / t),
                        "bare_read_per_core_s": len(texts) / (b / t), "read_vs_bare": b / lcpu}

    if os.path.exists(PDF):
        with open(PDF, "rb") as f:
            data = f.read()
        pages, _, pcpu = _cpu(lambda: list(pdf_pages(data, Academic(max_pages=args.pages))))
        imgs = [p["image"] for p in pages]
        batch = _rows(imgs, "academic", [p["text"] for p in pages], "text_layer")
        _, _, lcpu = _cpu(lambda: Legibility().apply(batch, t))
        b = bare(imgs, t)
        res["academic"] = {"items": len(pages), "pages_per_core_s": len(pages) / pcpu,
                           "pages_and_read_per_core_s": len(pages) / (pcpu + lcpu / t),
                           "bare_read_per_core_s": len(pages) / (b / t), "read_vs_bare": b / lcpu}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "ocr_throughput.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    lines = [f"# OCR throughput (one process, {t} onnxruntime thread(s), load average {res['load_average']:.1f})", "",
             header(res), "", "| branch | items | ours / core-s | bare rapidocr / core-s | notes |", "|---|---|---|---|---|"]
    s = res["scene"]
    lines.append(f"| scene | {s['items']} | {s['ours_per_core_s']:.2f} | {s['bare_per_core_s']:.2f} | "
                 f"PpOcr stage / bare = {1 / s['ours_vs_bare']:.2f}x the CPU; rapidocr's shipped detector "
                 f"settings: {s['rapidocr_defaults_per_core_s']:.2f} / core-s |")
    s = res["synthetic"]
    lines.append(f"| synthetic | {s['items']} | {s['render_and_read_per_core_s']:.2f} (render alone "
                 f"{s['render_per_core_s']:.1f}) | {s['bare_read_per_core_s']:.2f} | render + legibility read |")
    if "academic" in res:
        s = res["academic"]
        lines.append(f"| academic | {s['items']} | {s['pages_and_read_per_core_s']:.2f} (pages alone "
                     f"{s['pages_per_core_s']:.1f}) | {s['bare_read_per_core_s']:.2f} | render + text layer + read |")
    with open(os.path.join(RESULTS, "ocr_throughput.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
