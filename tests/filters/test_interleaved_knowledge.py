"""The shipped knowledge-density classifier (filters/knowledge.py) on real figures and photos it was not
trained on: Debian's debian-handbook diagrams and photographs shipped with scikit-image and matplotlib
(benchmarks/interleaved_knowledge_train.py trains it and records the same figures in the weights file)."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
from PIL import Image

from benchmarks.interleaved_knowledge_train import held_out
from filters.knowledge import KNOWLEDGE_SCORE, KnowledgeScore, image_features, load_weights, score


def test_held_out_figures_score_high_and_photos_low():
    weights = load_weights()
    figures, photos = held_out(np.random.default_rng(1))
    assert len(figures) >= 10 and len(photos) == 20
    fs = [score(image_features(im), weights) for im in figures]
    ps = [score(image_features(im), weights) for im in photos]
    accuracy = (sum(s >= 0.5 for s in fs) + sum(s < 0.5 for s in ps)) / (len(fs) + len(ps))
    assert accuracy >= 0.9
    assert weights["held_out"]["accuracy"] == round(accuracy, 4)  # what the weights file reports


def test_stage_scores_image_bytes():
    diagram = os.path.join("/usr/share/doc/debian-handbook/html/en-US/images", "package-lifecycle.png")
    with open(diagram, "rb") as f:
        png = f.read()
    photo = io.BytesIO()
    Image.open(os.path.join(os.path.dirname(__import__("skimage").__file__), "data", "coffee.png")).convert(
        "RGB").save(photo, format="JPEG")
    batch = pa.RecordBatch.from_pylist([{"image": png}, {"image": photo.getvalue()}, {"image": None}])
    out = KnowledgeScore().apply(batch).column(KNOWLEDGE_SCORE).to_pylist()
    assert out[0] > 0.5 > out[1] and out[2] is None
