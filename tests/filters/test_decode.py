"""Decode stage on plain Arrow batches: every mode Pillow can hand us ends as an RGB JPEG."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from filters.decode import Decode


def _batch(images):
    return pa.RecordBatch.from_pylist([{"image": d, "error": None, "error_detail": None} for d in images])


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    from jobs.make_sample import load_photo

    return load_photo("astronaut").convert("RGB")


def decode(images, **kw):
    return Decode(**kw).apply(_batch(images)).to_pylist()


def test_plain_jpeg_passes_through_byte_for_byte(photo):
    data = _encode(photo, "JPEG", quality=90)
    (row,) = decode([data])
    assert row["error"] is None and row["image"] == data
    assert (row["width"], row["height"]) == (512, 512)
    assert len(row["content_sha"]) == 64 and row["pixel_std"] > 10


def test_exif_orientation_is_applied(photo):
    wide = photo.resize((400, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise for display
    (row,) = decode([_encode(wide, "JPEG", exif=exif.tobytes())])
    assert (row["width"], row["height"]) == (200, 400)
    out = Image.open(io.BytesIO(row["image"]))
    assert out.size == (200, 400) and out.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16", "1"])
def test_modes_are_normalised_to_rgb_jpeg(photo, mode):
    if mode == "I;16":
        img = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
        data = _encode(img, "PNG")
    elif mode == "CMYK":
        data = _encode(photo.convert("CMYK"), "JPEG")
    else:
        img = photo.convert(mode)
        data = _encode(img, "PNG")
    (row,) = decode([data])
    assert row["error"] is None, row["error_detail"]
    out = Image.open(io.BytesIO(row["image"]))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (512, 512)


def test_alpha_is_flattened_on_white():
    img = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red
    (row,) = decode([_encode(img, "PNG")])
    px = Image.open(io.BytesIO(row["image"])).convert("RGB").getpixel((150, 150))
    assert all(c > 245 for c in px)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (240, 240), c) for c in [(0, 0, 255), (255, 0, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (row,) = decode([buf.getvalue()])
    assert row["error"] is None
    r, _, b = Image.open(io.BytesIO(row["image"])).getpixel((10, 10))
    assert b > 200 and r < 50


def test_decompression_bomb_is_quarantined_without_decoding():
    img = Image.new("L", (20_000, 20_000))  # 400 Mpx of zeros compress to a small PNG
    data = _encode(img, "PNG")
    (row,) = decode([data], max_pixels=100_000_000)
    assert row["error"] == "image_too_many_pixels" and "20000x20000" in row["error_detail"]


@pytest.mark.parametrize("data,reason", [
    (None, "image_missing"),
    (b"", "image_empty"),
    (b"<html><body>not found</body></html>", "image_undecodable"),
    (bytes(range(256)) * 8, "image_undecodable"),
])
def test_bad_bytes_get_specific_reasons(data, reason):
    (row,) = decode([data])
    assert row["error"] == reason and row["image"] is None


def test_truncated_jpeg(photo):
    data = _encode(photo, "JPEG")
    (row,) = decode([data[: len(data) // 2]])
    assert row["error"] == "image_truncated"


def test_existing_error_is_kept():
    batch = pa.RecordBatch.from_pylist([{"image": None, "error": "read_error", "error_detail": "gone"}])
    (row,) = Decode().apply(batch).to_pylist()
    assert (row["error"], row["error_detail"]) == ("read_error", "gone")


def test_solid_image_has_zero_std():
    (row,) = decode([_encode(Image.new("RGB", (300, 300), (10, 200, 30)), "PNG")])
    assert row["pixel_std"] < 0.5


# --- hostile inputs (tests/jobs/test_hostile.py runs them end to end) -----------------------------


def test_corrupt_files_of_every_accepted_format_become_rows_not_exceptions(photo):
    """Pillow raises OSError, ValueError, SyntaxError, ... from open() and load() on damaged files; a
    single one escaping would fail the task (and, retried, the job)."""
    small = photo.resize((96, 64))
    originals = [_encode(small, "JPEG"), _encode(small, "PNG"), _encode(small.convert("P"), "GIF"),
                 _encode(small, "WEBP"), _encode(small, "BMP"), _encode(small, "TIFF"), _encode(small, "ICO")]
    rng = np.random.default_rng(0)
    damaged = []
    for data in originals:
        for _ in range(30):
            d = bytearray(data[: int(rng.integers(1, len(data)))] if rng.random() < 0.4 else data)
            for _ in range(int(rng.integers(1, 6))):
                d[int(rng.integers(0, min(len(d), 300)))] = int(rng.integers(0, 256))
            damaged.append(bytes(d))
    rows = decode(damaged)
    assert len(rows) == len(damaged)
    assert {r["error"] for r in rows} <= {None, "image_truncated", "image_undecodable", "image_too_many_pixels"}
    assert all(r["error_detail"] for r in rows if r["error"])


def test_formats_outside_the_accepted_list_are_not_opened(photo):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 300\nshowpage\n"  # Pillow would run Ghostscript
    ppm = _encode(photo, "PPM")
    eps_row, ppm_row = decode([eps, ppm])
    assert eps_row["error"] == ppm_row["error"] == "image_undecodable"
    assert "among JPEG, PNG" in ppm_row["error_detail"]
    (row,) = decode([ppm], formats=())  # empty: anything Pillow knows
    assert row["error"] is None and (row["width"], row["height"]) == (512, 512)
    with pytest.raises(ValueError, match="decode.formats"):
        Decode(formats=("JPG",))


def test_declared_dimensions_are_checked_before_any_pixel():
    import zlib

    from tests.hostile import jpeg_declaring, png_declaring

    tiny = zlib.compress(b"\0" * 100)
    huge_png, huge_jpeg, big_png = decode([png_declaring(100_000, 100_000, tiny), jpeg_declaring(65_000, 65_000),
                                           png_declaring(12_000, 12_000, tiny)])
    assert huge_png["error"] == huge_jpeg["error"] == "image_too_many_pixels"
    assert big_png["error"] == "image_truncated"  # under the cap: decoded, and found to end early


def _jpeg_with_exif_and_icc() -> bytes:
    from PIL import ImageCms

    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x8825] = {2: (52.0, 31.0, 12.0)}  # GPSInfo: latitude
    exif[0x0131] = "CameraMaker 3000 serial 123456"  # Software
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, exif=exif.tobytes(), icc_profile=icc, comment=b"shot at home")
    return buf.getvalue()


def test_passed_through_jpegs_lose_their_metadata_but_not_a_pixel():
    from filters.decode import Decode

    data = _jpeg_with_exif_and_icc()
    assert b"Exif" in data and b"serial 123456" in data
    out = Decode().decode_one(data)["image"]
    assert b"Exif" not in out and b"serial 123456" not in out and b"shot at home" not in out
    with Image.open(io.BytesIO(out)) as a, Image.open(io.BytesIO(data)) as b:
        assert a.info.get("icc_profile") == b.info.get("icc_profile") is not None  # colour kept
        assert np.array_equal(np.asarray(a), np.asarray(b))  # not re-encoded: the same pixels
    assert Decode(keep_metadata=True).decode_one(data)["image"] == data  # the recipe knob keeps it all


def test_features_do_not_depend_on_the_decode_path():
    """A low-contrast pattern (full-resolution luma std about 4) measures the same whether the file is
    a passed-through JPEG (features from the libjpeg draft at 1/8 scale) or a PNG (full decode, then
    reduced the same way). Before, the PNG was measured from full pixels: 0.77 against the JPEG's 0.63."""
    from filters.decode import Decode

    yy, xx = np.mgrid[0:600, 0:800]
    pattern = (128 + 4 * np.sign(np.sin(2 * np.pi * xx / 24) * np.sin(2 * np.pi * yy / 24 + 0.3))).astype(np.uint8)
    img = Image.fromarray(np.stack([pattern] * 3, axis=-1))
    as_png, as_jpeg = io.BytesIO(), io.BytesIO()
    img.save(as_png, format="PNG")
    img.save(as_jpeg, format="JPEG", quality=98, subsampling=0)
    a, b = Decode().decode_one(as_jpeg.getvalue()), Decode().decode_one(as_png.getvalue())
    assert a["image"] == as_jpeg.getvalue()  # the JPEG took the pass-through path
    assert abs(a["pixel_std"] - b["pixel_std"]) < 0.05, (a["pixel_std"], b["pixel_std"])
    assert a["phash"] == b["phash"]
    assert (a["pixel_std"] < 2.0) == (b["pixel_std"] < 2.0)  # the same solid_color verdict both ways


def test_phash_is_imagehash_phash_without_scipy():
    """filters.decode.phash gives imagehash.phash's bits on photos (every 64 px crop of the bundled
    photos, at several scales) and on noise, and a fixed hash where coefficients are exactly zero. A fresh
    Python that decodes an image never imports scipy (~26 MiB per Python worker)."""
    import subprocess
    import sys

    import imagehash

    from filters.decode import phash
    from jobs.make_sample import load_photo

    grays = []
    for name in ("astronaut", "coffee", "chelsea"):
        g = load_photo(name).convert("L")
        for scale in (1, 2, 4):
            s = g.reduce(scale)
            grays += [s.crop((x, y, x + 64, y + 64)) for x in range(0, s.width - 63, 64) for y in range(0, s.height - 63, 64)]
    rng = np.random.default_rng(0)
    grays += [Image.fromarray(rng.integers(0, 256, (int(h), int(w)), dtype=np.uint8))
              for h, w in rng.integers(8, 300, (50, 2))]
    assert len(grays) > 150
    assert [phash(g) for g in grays] == [int(str(imagehash.phash(g)), 16) for g in grays]
    # a gradient along one axis: all but one column of coefficients are exactly zero in theory
    ramp = Image.fromarray(np.outer(np.linspace(0, 255, 100), np.ones(50)).astype(np.uint8))
    assert phash(ramp) == 0x8000000000008000
    assert phash(ramp.transpose(Image.Transpose.TRANSPOSE)) == 0x8200000000000000
    code = ("import io, sys; from PIL import Image; from filters.decode import Decode; b = io.BytesIO(); "
            "Image.new('RGB', (80, 70), (9, 99, 199)).save(b, format='PNG'); Decode().decode_one(b.getvalue()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
