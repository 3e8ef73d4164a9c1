"""Train the knowledge-density classifier (filters/knowledge.py) offline and report its accuracy on real
figures and photos it was not trained on.

Training set, all made or found on this machine:
- figures: matplotlib charts (line, bar, scatter, pie, histogram, heat map) with random data and styles,
  and graphviz diagrams (random directed graphs, flowchart-like shapes);
- photos: random crops, scales and flips of the photographs shipped with scikit-image and matplotlib
  (TRAIN_PHOTOS).
Held out (never seen in training): the diagrams of Debian's debian-handbook (HANDBOOK_FIGURES) and the
other shipped photographs (HELD_OUT_PHOTOS, four crops each).

    .venv/bin/python benchmarks/interleaved_knowledge_train.py  # writes filters/knowledge_weights.json
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from filters.knowledge import FEATURES, WEIGHTS, image_features, score

SKIMAGE = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")
MPL = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data")
TRAIN_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "grass.png", "gravel.png",
                "motorcycle_left.png", "brick.png", "moon.png"]
HELD_OUT_PHOTOS = [os.path.join(SKIMAGE, n) for n in ("camera.png", "coins.png", "hubble_deep_field.jpg",
                                                      "retina.jpg")] + [os.path.join(MPL, "grace_hopper.jpg")]
HANDBOOK = "/usr/share/doc/debian-handbook/html/en-US/images"
HANDBOOK_FIGURES = ["autobuilder.png", "case-study.png", "developers-map.png", "mail-server.png", "netfilter.png",
                    "package-lifecycle.png", "release-cycle.png", "selinux-context.png", "selinux-transitions.png",
                    "ssh-L.png", "ssh-R.png", "startup-systemd.png", "startup-sysvinit.png", "virtual-package.png"]


def _pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def charts(n: int, rng) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for i in range(n):
        fig, ax = plt.subplots(figsize=(rng.uniform(3, 6), rng.uniform(2.5, 4.5)), dpi=int(rng.integers(60, 120)))
        kind = i % 6
        x = np.arange(int(rng.integers(5, 40)))
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                ax.plot(x, np.cumsum(rng.normal(size=len(x))), marker=rng.choice(["", "o", "s"]))
        elif kind == 1:
            ax.bar(x[:12], rng.uniform(1, 10, size=len(x[:12])))
        elif kind == 2:
            ax.scatter(rng.normal(size=80), rng.normal(size=80), s=8, c=rng.uniform(size=80), cmap="viridis")
        elif kind == 3:
            ax.pie(rng.uniform(1, 5, size=int(rng.integers(3, 7))), labels=None)
        elif kind == 4:
            ax.hist(rng.normal(size=400), bins=int(rng.integers(8, 30)))
        else:
            ax.imshow(rng.uniform(size=(8, 8)), cmap=str(rng.choice(["viridis", "Blues", "magma"])))
        ax.set_title(f"Figure {i}: measured values")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        if rng.uniform() < 0.5:
            ax.grid(True)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append(_pil(buf.getvalue()))
    return out


def diagrams(n: int, rng) -> list:
    out = []
    shapes = ["box", "ellipse", "diamond", "record", "circle"]
    for i in range(n):
        nodes = int(rng.integers(3, 10))
        lines = [f"digraph g{i} {{", f"rankdir={rng.choice(['TB', 'LR'])};",
                 f"node [shape={rng.choice(shapes)}, style=filled, fillcolor=\"{rng.choice(['white', 'lightblue', 'lightyellow', 'grey90'])}\"];"]
        for k in range(1, nodes):
            lines.append(f"n{int(rng.integers(0, k))} -> n{k} [label=\"step {k}\"];")
        lines.append("}")
        png = subprocess.run(["dot", "-Tpng", f"-Gdpi={int(rng.integers(50, 96))}"], input="\n".join(lines).encode(),
                             capture_output=True, check=True, timeout=60).stdout
        out.append(_pil(png))
    return out


def photo_crops(paths: list[str], per: int, rng) -> list:
    from PIL import Image, ImageOps

    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        for _ in range(per):
            w, h = img.size
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = img.crop((x, y, x + cw, y + ch))
            crop = crop.resize((max(32, int(cw * rng.uniform(0.4, 1.0))), max(32, int(ch * rng.uniform(0.4, 1.0)))))
            out.append(ImageOps.mirror(crop) if rng.uniform() < 0.5 else crop)
    return out


def fit(x: np.ndarray, y: np.ndarray, steps: int = 3000, lr: float = 0.3, l2: float = 1e-3) -> dict:
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        w -= lr * (z.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float((p - y).mean())
    return {"features": list(FEATURES), "mean": mean.tolist(), "std": std.tolist(), "coef": w.tolist(), "bias": b}


def held_out(rng) -> tuple[list, list]:
    from PIL import Image

    figures = [Image.open(os.path.join(HANDBOOK, n)) for n in HANDBOOK_FIGURES if os.path.exists(os.path.join(HANDBOOK, n))]
    photos = photo_crops(HELD_OUT_PHOTOS, 4, rng)
    return figures, photos


def main() -> None:
    rng = np.random.default_rng(0)
    figures = charts(90, rng) + diagrams(60, rng)
    photos = photo_crops([os.path.join(SKIMAGE, n) for n in TRAIN_PHOTOS], 17, rng)
    x = np.stack([image_features(im) for im in figures + photos])
    y = np.array([1.0] * len(figures) + [0.0] * len(photos))
    weights = fit(x, y)
    train_acc = float(np.mean([(score(f, weights) >= 0.5) == bool(t) for f, t in zip(x, y)]))
    fig_out, photo_out = held_out(np.random.default_rng(1))
    fs = [score(image_features(im), weights) for im in fig_out]
    ps = [score(image_features(im), weights) for im in photo_out]
    acc = (sum(s >= 0.5 for s in fs) + sum(s < 0.5 for s in ps)) / (len(fs) + len(ps))
    weights["trained_on"] = {"figures": len(figures), "photos": len(photos), "accuracy": round(train_acc, 4)}
    weights["held_out"] = {"figures": len(fs), "photos": len(ps), "accuracy": round(acc, 4),
                           "figure_recall": round(sum(s >= 0.5 for s in fs) / len(fs), 4),
                           "photo_recall": round(sum(s < 0.5 for s in ps) / len(ps), 4),
                           "sets": "debian-handbook diagrams; scikit-image camera, coins, hubble_deep_field, retina "
                                   "and matplotlib grace_hopper (4 crops each)"}
    with open(WEIGHTS, "w", encoding="utf-8") as f:
        json.dump(weights, f, indent=1)
    print(json.dumps({k: weights[k] for k in ("trained_on", "held_out")}, indent=1))


if __name__ == "__main__":
    main()
