"""A generated, real-looking image-text corpus: crops of scikit-image's photos with varied size,
colour and JPEG quality, captions from templates, and a share of planted near duplicates.

`python -m benchmarks.corpus DIR --n 2000` writes DIR/corpus-NNNNNN.tar shards (webdataset layout).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageEnhance

from jobs.make_sample import PHOTOS, load_photo

SUBJECTS = ["a photo", "a close-up picture", "an image", "a wide shot", "a snapshot", "a detailed view"]
PLACES = ["in a studio", "outdoors", "on a table", "at night", "in the morning light", "from above"]


def _variant(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.45, 0.9)), int(h * rng.uniform(0.45, 0.9))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch))
    scale = rng.uniform(0.8, 1.6)
    out = out.resize((max(224, int(cw * scale)), max(224, int(ch * scale))))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))


def generate(out_dir: str, n: int = 2000, per_shard: int = 500, dup_share: float = 0.1, seed: int = 0,
             truth: dict | None = None) -> list[str]:
    """Write n pairs; about dup_share of them are re-encoded copies of earlier ones. Returns the tar paths.

    `truth`, when given, is filled with the ground truth per key: {"photo": the scikit-image photo it
    comes from, "copy_of": the key it is a re-encoded copy of, or None} (the shards are unchanged)."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    photos = [(name, load_photo(name).convert("RGB"), caption) for name, caption in PHOTOS.items()]
    made: list[bytes] = []
    paths, tf = [], None
    for i in range(n):
        if i % per_shard == 0:
            if tf is not None:
                tf.close()
            paths.append(os.path.join(out_dir, f"corpus-{i // per_shard:06d}.tar"))
            tf = tarfile.open(paths[-1], "w")  # noqa: SIM115 - one tar open at a time, closed below
        if made and rng.random() < dup_share:
            j = int(rng.integers(0, len(made)))
            src = Image.open(io.BytesIO(made[j]))
            img, caption = src.resize((int(src.width * 0.9), int(src.height * 0.9))), "A copy of an earlier picture."
            origin = {"photo": truth[f"{j:08d}"]["photo"] if truth is not None else None, "copy_of": f"{j:08d}"}
        else:
            name, photo, base = photos[int(rng.integers(0, len(photos)))]
            img = _variant(rng, photo)
            caption = f"{SUBJECTS[int(rng.integers(0, 6))].capitalize()} {PLACES[int(rng.integers(0, 6))]}: {base}"
            origin = {"photo": name, "copy_of": None}
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 95)))
        data = buf.getvalue()
        made.append(data)
        key = f"{i:08d}"
        if truth is not None:
            truth[key] = origin
        for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps({"i": i}).encode())):
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime = len(payload), 0
            tf.addfile(ti, io.BytesIO(payload))
    tf.close()
    return paths


def distinct_tiles(tile: int = 128, size: int = 256, min_std: float = 12.0) -> list[tuple[str, Image.Image, str]]:
    """Images that share no pixels: the non-overlapping tile x tile grid cells of every photo, scaled to
    size x size; near-solid cells (grey-level std below min_std: the black around the retina, empty sky)
    are left out. (key, photo name, image, caption) each; about 250 with the defaults. Used as the distinct images
    among which near-duplicate copies are planted (benchmarks.compare)."""
    out = []
    for name, caption in PHOTOS.items():
        photo = load_photo(name).convert("RGB")
        w, h = photo.size
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                cell = photo.crop((x, y, x + tile, y + tile))
                if float(np.asarray(cell.convert("L"), dtype=np.float32).std()) < min_std:
                    continue
                out.append((f"t{len(out):04d}", name, cell.resize((size, size), Image.Resampling.BICUBIC),
                            f"A detail of a photo: {caption}"))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=2000, help="number of pairs")
    p.add_argument("--per-shard", type=int, default=500, help="pairs per input tar")
    a = p.parse_args()
    print("\n".join(generate(a.out_dir, a.n, a.per_shard)))
