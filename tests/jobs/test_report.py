"""End to end: one spark-submit run on the sample writes OUT/reports/index.html; it opens in headless
Chromium (Debian's, driven by playwright) with no console errors, its images load, its Data Docs link
resolves; `python -m jobs.report OUT` rebuilds the same page byte for byte."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.util import read_bytes, read_json

pytestmark = pytest.mark.slow  # whole-job runs: `pytest -m "not slow"` for a quick pass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run(sample_run):
    """The sample run of tests/jobs/conftest.py (max_samples=8, random CLIP weights)."""
    return sample_run


def test_run_writes_report_material_and_gate_results(run):
    reports = os.path.join(run, "reports")
    summary = read_json(os.path.join(reports, "summary.json"))
    gates = summary["gates"]
    assert gates["passed"] and gates["failed_critical"] == []
    # random weights by request: recorded as a warning, not a failure
    assert "image_text.totals.clip_real_weights" in gates["failed_warnings"]
    assert set(gates["suites"]) == {"image_text.ledger", "image_text.totals", "image_text.shards"}
    assert gates["sampling"]["image_text"]["shards"]["samples_read"] == summary["kinds"]["image_text"]["kept"]
    assert set(summary["stages"]) >= {"report_material", "gates", "thumbnail"}
    material = os.path.join(reports, "material", "image_text")
    assert {"rows.parquet", "bars-language.parquet", "bars-concepts.parquet", "gallery.parquet", "material.json"} <= set(
        os.listdir(material))
    assert not os.path.exists(os.path.join(run, "_work"))  # the material outlived the stage checkpoints
    assert os.path.isfile(os.path.join(reports, gates["data_docs"]))
    assert os.path.isfile(os.path.join(run, "shards", "image_text", "index.json"))  # gates passed: published


def test_report_rebuild_gives_the_same_page(run, tmp_path):
    page = os.path.join(run, "reports", "index.html")
    original = read_bytes(page)
    shutil.copy(page, tmp_path / "index.html")
    os.remove(page)
    proc = subprocess.run([sys.executable, "-m", "jobs.report", run], cwd=ROOT, check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == page
    assert read_bytes(page) == original  # byte for byte: no render time, deterministic charts


def test_report_of_a_missing_output_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.report", str(tmp_path / "nothing")], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "summary.json not found" in proc.stderr


def test_report_is_self_contained(run):
    page = read_bytes(os.path.join(run, "reports", "index.html")).decode("utf-8")
    refs = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", page)
    external = [r for r in refs if not r.startswith(("data:", "#")) and ("://" in r or r.startswith("//"))]
    assert refs and not external, external
    assert "<script" not in page and "<link" not in page


def test_report_opens_in_headless_chromium(run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make system installs it)")
    page_path = os.path.join(run, "reports", "index.html")
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            messages, errors, failed = [], [], []
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto("file://" + page_path, wait_until="load")
            assert not errors and not failed, (errors, failed)
            assert not [m for m in messages if m[0] in ("error", "warning")], messages
            for section in ("#funnel-image_text", "#distributions-image_text", "#galleries-image_text",
                            "#duplicates-image_text", "#shards-image_text", "#gates", "#run", "#gates-verdict"):
                assert page.locator(section).count() == 1, section
            assert "passed" in page.locator("#gates-verdict").inner_text()
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.closest('.gallery, .group, .plots') ? 1 : 0])")
            assert len(images) > 30 and all(c and w > 0 for c, w, _ in images), images
            assert page.locator(".gallery.kept img").count() >= 20
            assert page.locator(".group").count() == 6  # the sample's six duplicate families
            assert page.locator("figure img").count() == 6  # resolution, aspect, caption, CLIP, language, concepts
            funnel = page.locator("table.funnel").inner_text()
            assert "input\t40" in funnel and "near_duplicate 6" in funnel
            links = [page.get_attribute("#gx-docs", "href")] + page.eval_on_selector_all(
                "a.gx-page", "els => els.map(e => e.getAttribute('href'))")
            assert len(links) == 4  # the Data Docs site and the validation page of each of the three suites
            assert all(os.path.isfile(os.path.join(run, "reports", href)) for href in links), links
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    from PIL import Image

    img = Image.open(shot)
    assert img.format == "PNG" and img.width == 1400 and img.height > 3000
    assert os.path.getsize(shot) > 200_000  # photos and charts, not a blank page
    assert len(img.convert("L").resize((64, 256)).getcolors(4096) or []) > 50
