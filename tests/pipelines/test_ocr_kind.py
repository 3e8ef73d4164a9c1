"""The ocr kind on the spark fixture, all three branches in one run: scene photos (real ones, with and
without text), a text corpus rendered (Latin and Chinese), PDFs (a text layer and a scan); ledger,
accounting, gates, report, and the trainer's formatter reading the shards the writer produced.

Marked slow: one whole in-process run (13 items, ~11 PP-OCR reads, the spine's gates and report) takes
minutes on the shared 2-core machine; the stages themselves are covered on Arrow batches in
tests/filters/test_ocr_stages.py."""
from __future__ import annotations

import io
import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipelines import kinds, ocr
from pipelines.build import run_build
from pipelines.recipe import load
from schemas import ocr as S

pytestmark = pytest.mark.slow

SKIMAGE = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")
DEJAVU_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
EN = "The quick brown fox jumps over the lazy dog while five boxing wizards jump quickly."
ZH = "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。"
SYMBOLS = "∮∯∰ ⊕⊗⊘ ⋈⋉⋊ ∰∱∲ ⨀⨁⨂ ⊕⊗⊘ ∮∯∰"  # glyphs DejaVu has and PP-OCR's dictionary has not


def _pdfs(folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 4))
    fig.text(0.1, 0.85, "1. Introduction", fontsize=20)
    for k in range(4):
        fig.text(0.1, 0.7 - k * 0.08, f"Line {k} of the page with some ordinary body text.", fontsize=11)
    with plt.rc_context({"pdf.fonttype": 42}):
        fig.savefig(os.path.join(folder, "paper.pdf"))
    plt.close(fig)
    scan = Image.new("L", (600, 120), 255)
    ImageDraw.Draw(scan).text((20, 30), "Scanned page", fill=0, font=ImageFont.truetype(DEJAVU_BOLD, 40))
    fig = plt.figure(figsize=(6, 1.2))
    fig.figimage(np.asarray(scan), cmap="gray")
    fig.savefig(os.path.join(folder, "scan.pdf"))
    plt.close(fig)
    with open(os.path.join(folder, "broken.pdf"), "wb") as f:
        f.write(b"%PDF-1.4 this is not a PDF")


@pytest.fixture(scope="module")
def ocr_run(spark, tmp_path_factory):
    assert kinds.get(S.KIND) is ocr.KIND  # registered in pipelines/kinds.py
    root = tmp_path_factory.mktemp("ocr")
    scene, texts, pdfs = (root / "scene", root / "texts", root / "pdfs")
    for d in (scene, texts, pdfs):
        d.mkdir()
    shutil.copy(os.path.join(SKIMAGE, "motorcycle_left.png"), scene / "bike.png")
    shutil.copy(os.path.join(SKIMAGE, "motorcycle_left.png"), scene / "bike_copy.png")
    shutil.copy(os.path.join(SKIMAGE, "chelsea.png"), scene / "cat.png")
    (scene / "broken.jpg").write_bytes(b"not an image at all")
    (texts / "en.txt").write_text(EN + "\n\n" + EN.upper(), encoding="utf-8")
    rows = [{"id": "zh", "text": ZH}, {"id": "blank", "text": "   "}, None, {"id": "again", "text": EN + "\n\n" + EN.upper()},
            {"id": "symbols", "text": SYMBOLS}]
    (texts / "corpus.jsonl").write_text("\n".join("{broken" if r is None else json.dumps(r, ensure_ascii=False)
                                                  for r in rows) + "\n", encoding="utf-8")
    _pdfs(str(pdfs))
    out = str(root / "out")
    sets = ["shards.max_samples=3", "ocr.synthetic.orientations=[0]", "ocr.synthetic.orientation_weights=[1.0]",
            "ocr.synthetic.font_dirs=[/usr/share/fonts/truetype/dejavu,/usr/share/fonts/opentype/noto]",
            "ocr.chunk_chars=2000"]
    recipe = load(None, sets, [f"ocr={scene}", f"ocr={texts}", f"ocr=academic:{pdfs}"], out)
    return out, run_build(spark, recipe, dict(recipe.inputs), out)


def _ledger(out):
    return {(os.path.basename(r["source"]), r["source_key"]): r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}


def test_every_item_of_every_branch_has_its_reason(ocr_run):
    out, summary = ocr_run
    got = {k: (r["status"], r["reason"]) for k, r in _ledger(out).items()}
    assert got == {
        ("bike.png", "bike"): ("kept", None),
        ("bike_copy.png", "bike_copy"): ("dropped", "exact_duplicate"),
        ("cat.png", "cat"): ("dropped", "no_text_detected"),  # a real photo without text
        ("broken.jpg", "broken"): ("quarantined", "image_undecodable"),
        ("en.txt", "chunk000000"): ("kept", None),
        ("corpus.jsonl", "zh"): ("kept", None),
        ("corpus.jsonl", "blank"): ("quarantined", "text_missing"),
        ("corpus.jsonl", "line2"): ("quarantined", "read_error"),
        ("corpus.jsonl", "again"): ("dropped", "duplicate_text"),  # the same text as en.txt, another render
        ("corpus.jsonl", "symbols"): ("dropped", "illegible_render"),
        ("paper.pdf", "page00001"): ("kept", None),
        ("scan.pdf", "page00001"): ("kept", None),
        ("broken.pdf", "@error"): ("quarantined", "pdf_unreadable"),
    }
    led = _ledger(out)
    assert led[("corpus.jsonl", "again")]["duplicate_of"] == led[("en.txt", "chunk000000")]["sample_id"]
    k = summary["kinds"]["ocr"]
    assert k["units"]["image"]["input"] == 13 and k["kept"] == 5
    assert k["read"] == {"units": 6, "items": 13}  # every read unit reconciled with the ledger
    assert k["facts"]["ocr"]["inputs"][f"academic:{os.path.dirname(led[('paper.pdf', 'page00001')]['source'])}"] == [
        "academic"]
    assert summary["gates"]["passed"], summary["gates"]["failed_critical"]
    names = {c["name"] for s in summary["gates"]["suites"].values() for c in s["expectations"]}
    assert {"ocr.shards.contract", "ocr.shards.box_min_range", "ocr.shards.box_max_range"} <= names or \
        "ocr.shards.contract" in names


def _samples(out):
    from trainer import shards

    found = shards.find_kinds(os.path.join(out, "shards"), ["ocr"])["ocr"]
    return list(shards.iter_raw_samples([s.url for s in found]))


def test_shards_hold_the_contract_and_the_trainer_formatter_reads_them(ocr_run):
    out, _ = ocr_run
    from trainer import formatters
    from trainer.formatters import FormatContext
    from trainer.images import ImageConfig
    from trainer.tokenizer import train_bpe

    samples = _samples(out)
    contract = S.contract()
    assert len(samples) == 5 and all(contract.violations(s) == [] for s in samples)
    docs = {}
    for s in samples:
        d = json.loads(s["json"])
        docs[f"{os.path.basename(d['source'])}/{d['source_key']}/{d['branch']}"] = (s, d)
    _, bike_doc = docs["bike.png/bike/scene"]
    assert "YAMA" in bike_doc["text"] and bike_doc["text_source"] == "ocr" and bike_doc["lines"][0]["score"] >= 0.5
    _, zh_doc = docs["corpus.jsonl/zh/synthetic"]
    # the ground truth is what was drawn: the text, NFKC-normalised, up to where the canvas ended
    assert len(zh_doc["text"]) >= 10 and ZH.replace("，", ",").startswith(zh_doc["text"].replace("\n", ""))
    assert zh_doc["cer"] <= 0.05 and "CJK" in zh_doc["render"]["font"]
    assert zh_doc["render"]["seed"] and (zh_doc["augmentation"] is None or zh_doc["augmentation"]["seed"])
    page = next(d for k, (s, d) in docs.items() if d["source"].endswith("paper.pdf"))
    assert page["text_source"] == "text_layer" and re.match(r"#{1,2} 1\. Introduction\n\nLine 0 of", page["markup"])
    assert page["cer"] <= 0.1 and page["page"] == 1
    scan = next(d for k, (s, d) in docs.items() if d["source"].endswith("scan.pdf"))
    assert scan["text_source"] == "ocr" and scan["text"] == "Scanned page" and scan["markup"] is None
    for s, d in docs.values():
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (d["width"], d["height"]) and img.format == "JPEG"
        assert s["txt"].decode() == d["text"] and all(S.box_ok(ln["box"]) for ln in d["lines"])
    fmt = formatters.get("ocr")
    tok = train_bpe([t for s in samples for t in fmt.texts(s)] * 20, vocab_size=400, min_frequency=1)
    ctx = FormatContext(tok, ImageConfig(min_pixels=4 * 784, max_pixels=64 * 784), max_len=1024)
    for s, d in docs.values():
        f = fmt.format(s, ctx)
        assert len(f.images) == 1
        want = d["markup"] if d["markup"] else d["text"]
        assert tok.decode(f.ids).endswith(want + "<|endoftext|>")


def test_report_shows_the_images_with_their_boxes(ocr_run):
    out, _ = ocr_run
    with open(os.path.join(out, "reports", "index.html"), encoding="utf-8") as f:
        page = f.read()
    for anchor in ("kind-ocr", "funnel-ocr", "gallery-ocr-no_text_detected", "gallery-ocr-illegible_render",
                   "plot-branch", "plot-cer"):
        assert f"id='{anchor}'" in page, anchor
    gallery = pq.read_table(os.path.join(out, "reports", "material", "ocr", "gallery.parquet")).to_pylist()
    kept = [g for g in gallery if g["section"] == "kept"]
    assert len(kept) == 5 and all(g["thumb"] for g in kept)
    bike = next(g for g in kept if g["source_key"] == "bike")
    thumb = np.asarray(Image.open(io.BytesIO(bike["thumb"])).convert("RGB"), dtype=int)
    red = (thumb[..., 0] > 180) & (thumb[..., 1] < 90) & (thumb[..., 2] < 90)
    assert red.sum() > 20  # the detected line's box, drawn in red
