"""Build the bundled sample corpus from real photos that ship inside scikit-image.

`python -m jobs.make_sample [DIR]` (default data/sample). Deterministic: the same files every time.
It holds three input forms (a WebDataset tar, a folder with side-car captions, a JSONL table with
image paths) and items that exercise every stage: exact and near duplicates (re-encoded, resized,
cropped, brightened, watermarked), broken files, images too small or too elongated or blank,
captions too short, missing or in another language, and CMYK / 16-bit / palette / alpha / EXIF-rotated
images that must be normalised. The photos are public domain or CC0 (see skimage/data/README.txt).
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

PHOTOS = {
    "astronaut": "Portrait of astronaut Eileen Collins in her orange NASA flight suit in front of an American flag.",
    "camera": "Black and white photo of a cameraman standing on a lawn with a camera on a tripod.",
    "chelsea": "A ginger tabby cat named Chelsea looking at the camera, close-up portrait.",
    "coffee": "A cup of coffee with latte art on a saucer on a wooden table.",
    "rocket": "A SpaceX Falcon rocket on the launch pad under a clear blue sky.",
    "hubble_deep_field": "The Hubble deep field image showing hundreds of distant galaxies in space.",
    "retina": "A colour fundus photograph of a human retina with the optic disc and blood vessels.",
    "horse": "Silhouette of a horse standing, drawn in black on a white background.",
    "coins": "Greek coins from Pompeii laid out in rows on a dark background.",
    "moon": "Grey surface of the moon with craters seen through a telescope.",
    "motorcycle_left": "A red motorcycle parked in a garage, seen from the left camera of a stereo pair.",
    "brick": "Close-up texture of a red brick wall with mortar lines.",
    "grass": "Close-up texture of green grass blades in a lawn.",
    "gravel": "Close-up texture of grey gravel stones on the ground.",
    "immunohistochemistry": "Microscope image of tissue stained for immunohistochemistry in brown and blue.",
    "cell": "Microscope image of a single cell with a bright nucleus.",
    "clock_motion": "A wall clock photographed with motion blur.",
    "color": "A colour chart with patches of many different colours.",
}
ZH = {
    "chessboard_RGB": "一张黑白相间的国际象棋棋盘图片，方格整齐排列在白色背景上。",
    "logo": "一个带有透明背景的软件标志，蛇形图案和文字组成的图标。",
}
SKIMAGE_FILES = {"immunohistochemistry": "ihc.png"}


def _skimage_dir() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def load_photo(name: str) -> Image.Image:
    d = _skimage_dir()
    fname = SKIMAGE_FILES.get(name)
    if fname is None:
        fname = next(f for f in os.listdir(d) if os.path.splitext(f)[0] == name)
    img = Image.open(os.path.join(d, fname))
    img.load()
    return img


def jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def watermark(img: Image.Image) -> Image.Image:
    img = img.convert("RGB").copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    d.text((w * 0.6, h * 0.9), "(c) stock-photos.example", fill=(255, 255, 255))
    return img


def crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    dx, dy = int(w * frac), int(h * frac)
    return img.crop((dx, dy, w - dx, h - dy))


def items() -> list[tuple[str, str, bytes, str | None]]:
    """(form, key, image bytes, caption); form is tar, folder or table."""
    out: list[tuple[str, str, bytes, str | None]] = []
    photos = {n: load_photo(n) for n in list(PHOTOS) + list(ZH) + ["page", "microaneurysms"]}
    forms = ["tar", "tar", "folder", "table"]
    for i, (name, caption) in enumerate({**PHOTOS, **ZH}.items()):
        img = photos[name]
        data = png(img) if name in ("logo", "chessboard_RGB") else jpeg(img, 92)
        out.append((forms[i % 4], name, data, caption))
    # duplicates of kept photos
    out.append(("tar", "chelsea_exact_copy", jpeg(photos["chelsea"], 92), "The same cat photo copied to another site."))
    out.append(("folder", "astronaut_reencoded", jpeg(photos["astronaut"], 40), "Astronaut portrait, recompressed."))
    out.append(("table", "coffee_resized_brighter",
                jpeg(ImageEnhance.Brightness(photos["coffee"].resize((300, 200))).enhance(1.15), 85),
                "A cup of coffee, a smaller and brighter copy."))
    out.append(("tar", "rocket_watermarked", jpeg(watermark(photos["rocket"]), 88), "Rocket on the pad with a watermark."))
    out.append(("folder", "horse_cropped", jpeg(crop(photos["horse"], 0.03), 90), "The horse silhouette, slightly cropped."))
    # rule drops
    out.append(("tar", "page_too_small", jpeg(photos["page"]), "A scanned page of printed text from a book."))
    out.append(("tar", "microaneurysms_tiny", jpeg(photos["microaneurysms"]), "Tiny crop of a retina scan with microaneurysms."))
    out.append(("folder", "hubble_panorama", jpeg(photos["hubble_deep_field"].crop((0, 0, 872, 150))),
                "A thin strip cut from the Hubble deep field image."))
    out.append(("tar", "blank_grey", jpeg(Image.new("RGB", (400, 300), (128, 128, 128))), "An empty grey picture with nothing in it."))
    out.append(("table", "caption_short", jpeg(photos["gravel"].rotate(90)), "img"))
    out.append(("tar", "caption_german", jpeg(photos["brick"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
                "Eine rote Backsteinmauer mit hellen Fugen, aus der Nähe fotografiert."))
    out.append(("folder", "caption_missing", jpeg(photos["grass"].rotate(180)), None))
    # formats that decode must normalise
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    out.append(("tar", "cmyk_noise", _cmyk(noise), "Random colour noise saved as a CMYK JPEG file."))
    out.append(("tar", "gradient_16bit", png(Image.fromarray((np.linspace(0, 65535, 320 * 240).reshape(240, 320)).astype(np.uint16))),
                "A smooth grey gradient stored as a sixteen bit PNG image."))
    out.append(("tar", "palette_gif", _gif(photos["coffee"]), "The coffee cup photo stored as a palette GIF image."))
    out.append(("tar", "exif_rotated", _exif_rotated(photos["camera"]), "The cameraman photo stored sideways with an EXIF rotation tag."))
    # broken
    good = jpeg(photos["moon"])
    out.append(("tar", "truncated_jpeg", good[: len(good) // 3], "A moon photo whose file was cut short."))
    out.append(("tar", "random_bytes", bytes(rng.integers(0, 256, 4096, dtype=np.uint8)), "Random bytes pretending to be a picture."))
    out.append(("folder", "html_as_jpeg", b"<!doctype html><html><body>404 Not Found</body></html>", "A web page saved with a picture name."))
    out.append(("tar", "empty_file", b"", "An empty file with a picture name."))
    return out


def _cmyk(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("CMYK").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _gif(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, format="GIF")
    return buf.getvalue()


def _exif_rotated(img: Image.Image) -> bytes:
    rotated = img.convert("RGB").transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90 CW to display"
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
    tf.addfile(ti, io.BytesIO(data))


def make_sample(out_dir: str) -> str:
    """Write the sample corpus under out_dir (replacing what is there); returns out_dir."""
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.join(out_dir, "folder"))
    os.makedirs(os.path.join(out_dir, "table", "images"))
    rows = []
    with tarfile.open(os.path.join(out_dir, "sample-000000.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
        for form, key, data, caption in items():
            ext = "png" if data[:4] == b"\x89PNG" else "gif" if data[:3] == b"GIF" else "jpg"
            if form == "tar":
                _add(tf, f"{key}.{ext}", data)
                if caption is not None:
                    _add(tf, f"{key}.txt", caption.encode())
                    _add(tf, f"{key}.json", json.dumps({"origin": "skimage", "key": key}).encode())
            elif form == "folder":
                with open(os.path.join(out_dir, "folder", f"{key}.{ext}"), "wb") as f:
                    f.write(data)
                if caption is not None:
                    with open(os.path.join(out_dir, "folder", f"{key}.txt"), "w", encoding="utf-8") as f:
                        f.write(caption)
            else:
                with open(os.path.join(out_dir, "table", "images", f"{key}.{ext}"), "wb") as f:
                    f.write(data)
                rows.append({"key": key, "image_path": f"images/{key}.{ext}", "caption": caption})
    with open(os.path.join(out_dir, "table", "pairs.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return out_dir


if __name__ == "__main__":
    print(make_sample(sys.argv[1] if len(sys.argv) > 1 else "data/sample"))
