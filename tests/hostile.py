"""A generated corpus of hostile image-text inputs, mixed with valid items, and the HTTP server its
URL rows point at. Used by tests/jobs/test_hostile.py; the expected outcome of each item lives there.

    corpus = write_corpus(root, base_url)   # writes root/in/..., returns labels and escape targets

Every item has a label; `Corpus.items[label]` says where its ledger row comes from: the input file
(relative to root/in) and, for tar and table rows, the row's source_key. Tar members that try to
escape (`../`, absolute paths, links) aim at `Corpus.escape_targets`, which must never appear.

Unreadable files: the tests run as root, for whom chmod 000 changes nothing, so "unreadable" is a
dangling symlink, a symlink loop, a FIFO and a directory named like an image (and, in a table, a
path to a FIFO and to /dev/zero).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import tarfile
import zlib
from http.server import ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.make_sample import load_photo
from tests.util import QuietHandler

MAX_MEMBER_BYTES = 4_000_000  # --set read.max_member_bytes
MAX_DOWNLOAD_BYTES = 1_000_000  # --set image_text.download.max_bytes


# --- image bytes ------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(name: str, side: int = 400) -> Image.Image:
    img = load_photo(name)
    img = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB")
    img.thumbnail((side, side))
    return img


def noise(seed: int, size: tuple[int, int] = (320, 256)) -> Image.Image:
    """A smooth random colour field: distinct from every other seed (pHash included), not solid."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, idat: bytes) -> bytes:
    """A greyscale PNG whose header claims width x height, with `idat` as its (zlib) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png_bomb(side: int = 15_000) -> bytes:
    """A real decompression bomb: side x side black pixels (225 Mpx at 15,000) in a few hundred KB."""
    z = zlib.compressobj(9)
    block = b"\0" * ((side + 1) * 500)  # 500 rows: a filter byte then `side` zero pixels each
    parts = [z.compress(block) for _ in range(side // 500)]
    return png_declaring(side, side, b"".join(parts) + z.flush())


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid small JPEG whose SOF header is patched to claim width x height."""
    data = bytearray(encode(noise(99, (64, 64)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def animated(frames: list[Image.Image], fmt: str) -> bytes:
    frames = [frames[0]] + [f.convert(frames[0].mode).resize(frames[0].size) for f in frames[1:]]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated(img: Image.Image) -> bytes:
    """Stored rotated by 90 degrees, tagged with EXIF orientation 6 ("rotate 90 CW to display")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes(), quality=90)


# --- tar building -----------------------------------------------------------------------------------


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 0
    return ti, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    if kind == tarfile.CHRTYPE:
        ti.devmajor, ti.devminor = 1, 3  # /dev/null
    return ti, None


def write_tar(path: str, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, None if data is None else io.BytesIO(data))


def _pair(key: str, image: bytes, caption: str | bytes | None) -> list:
    out = [_member(f"{key}.jpg", image)]
    if caption is not None:
        out.append(_member(f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode()))
    return out


# --- the corpus -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    input_dir: str
    items: dict[str, str]  # label -> "rel/path" (a loose file) or "rel/path::source_key" (tar / table row)
    escape_targets: list[str]  # where '../', absolute and link members would land if extracted
    no_item: list[str]  # paths that must not become items (a directory named like an image)
    expect_in_shards: dict[str, dict]  # label -> fields the kept sample's json must have


def write_corpus(root: str, base_url: str, closed_port: int) -> Corpus:
    """Write the hostile corpus under root/in (the job's input) and return its labels."""
    ind = os.path.join(root, "in")
    for d in ("tars", "folder", "tables/images"):
        os.makedirs(os.path.join(ind, d), exist_ok=True)
    items: dict[str, str] = {}
    good = "A clear photograph of an everyday scene with natural colours and fine detail."

    def cap(what: str) -> str:
        return f"A clear photograph of {what}, with natural colours and fine detail."

    # --- hostile.tar: decode, caption and tar-structure problems, with valid neighbours ----------
    rng = np.random.default_rng(7)
    escape_rel = "../../escape-dotdot.jpg"  # from in/tars, lands in root/
    escape_abs = os.path.join(os.path.dirname(root), "outside", "escape-absolute.jpg")
    link_target = os.path.join(os.path.dirname(root), "outside", "escape-link-target")
    moon = photo("moon")
    m: list = []
    m += _pair("good_first", encode(photo("astronaut"), quality=90), cap("an astronaut in an orange suit"))
    m += _pair("truncated_jpeg", encode(photo("camera"))[:2000], cap("a cameraman cut short"))
    m += _pair("empty_image", b"", cap("nothing at all"))
    m += _pair("random_bytes", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), cap("random bytes"))
    m += _pair("html_as_jpg", b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>", cap("a web page"))
    m += _pair("svg_as_jpg", b'<svg xmlns="http://www.w3.org/2000/svg" width="400" height="400"><rect/></svg>',
               cap("a vector drawing"))
    m += _pair("eps_as_jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 400 400\nshowpage\n", cap("a postscript file"))
    m += _pair("decompression_bomb", png_bomb(), cap("a black square"))
    m += _pair("huge_dims_png_header", png_declaring(100_000, 100_000, zlib.compress(b"\0" * 100)), cap("a huge image"))
    m += _pair("huge_dims_jpeg_sof", jpeg_declaring(65_000, 65_000), cap("a huge jpeg"))
    m += _pair("big_dims_tiny_file", png_declaring(12_000, 12_000, zlib.compress(b"\0" * 100)), cap("a tiny file"))
    m += _pair("cmyk", encode(photo("chelsea").convert("CMYK"), "JPEG", quality=90), cap("a ginger cat"))
    gray16 = Image.fromarray(np.asarray(moon.convert("L"), dtype=np.uint16) * 257)
    m += _pair("gray16_png", encode(gray16, "PNG"), cap("the grey surface of the moon"))
    m += _pair("palette_png", encode(photo("coffee").convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
               cap("a cup of coffee on a saucer"))
    rocket = photo("rocket").convert("RGBA")
    alpha = Image.new("L", rocket.size, 255)
    alpha.paste(0, (0, 0, rocket.width // 4, rocket.height))
    rocket.putalpha(alpha)
    m += _pair("alpha_png", encode(rocket, "PNG"), cap("a rocket on the launch pad"))
    m += _pair("animated_gif", animated([photo("coins").convert("RGB"), photo("brick"), photo("grass")], "GIF"),
               cap("old coins laid out in rows"))
    m += _pair("animated_webp", animated([photo("horse").convert("RGB"), noise(50), noise(51)], "WEBP"),
               cap("a horse drawn in black"))
    m += _pair("animated_png", animated([photo("cell").convert("RGB"), noise(52)], "PNG"), cap("a cell under a microscope"))
    color = photo("color").convert("RGB").crop((0, 0, 360, 240))
    m += _pair("exif_rotated", exif_rotated(color), cap("a colour chart with many patches"))
    m += _pair("bad_utf8_caption", encode(photo("hubble_deep_field")),
               b"A deep field image of distant galaxies \xff\xfe\xc3( in space, taken by a telescope.")
    m += _pair("control_chars_caption", encode(photo("immunohistochemistry")),
               "A stained tissue\x00 sample under\x07 the microscope\x1b[0m in brown\x0b and blue colours.")
    m += _pair("html_caption", encode(photo("clock_motion")),
               "<b>A wall clock</b> &amp; its motion blur <script>alert(1)</script> on a white wall.")
    m += _pair("caption_1mb", encode(noise(1)), ("Ã©tÃ© a very long caption that goes on " * 30_000)[:1_000_000])
    m += _pair("caption_only_control", encode(noise(2)), "\x00\x01\x02 \x7f\x1b")
    m += _pair("caption_zero_width", encode(noise(3)), "\u200b\u200b\u2060 \ufeff")
    m.append(_member("no_caption.jpg", encode(noise(4))))
    m += [_member("meta_caption_number.jpg", encode(noise(5))), _member("meta_caption_number.json", b'{"caption": 42}')]
    m += [_member("meta_invalid.jpg", encode(noise(6))), _member("meta_invalid.json", b"{not json")]
    m += [_member("meta_deep.jpg", encode(noise(7))), _member("meta_deep.json", b"[" * 100_000 + b"]" * 100_000)]
    m.append(_member("image_missing.txt", cap("a caption without its image").encode()))
    m += _pair("oversized_member", bytes(MAX_MEMBER_BYTES + 1), cap("a member above the size cap"))
    m.append(_member(escape_rel, encode(noise(8))))
    m.append(_member("../sibling/escape-dotdot2.jpg", encode(noise(9))))
    m.append(_member(escape_abs, encode(noise(10))))
    m.append(_special("link_to_etc_passwd.jpg", tarfile.SYMTYPE, "/etc/passwd"))
    m.append(_special("link_escape.jpg", tarfile.SYMTYPE, link_target))
    m.append(_special("hardlink.jpg", tarfile.LNKTYPE, "good_first.jpg"))
    m.append(_special("fifo_member.jpg", tarfile.FIFOTYPE))
    m.append(_special("device_member.jpg", tarfile.CHRTYPE))
    m += _pair("after_unsafe", encode(photo("gravel")), cap("grey gravel stones on the ground"))
    # the same key and extension twice in a row: the first copy is used, the second quarantined
    m.append(_member("dup_ext.jpg", encode(photo("brick"))))
    m.append(_member("dup_ext.jpg", encode(noise(11))))
    m.append(_member("dup_ext.txt", cap("a red brick wall").encode()))
    # a key that comes back after another key
    m += _pair("dup_key", encode(photo("grass")), cap("green grass blades in a lawn"))
    m += _pair("between", encode(photo("motorcycle_left")), cap("a red motorcycle in a garage"))
    m += _pair("dup_key", encode(noise(12)), cap("a second item with the same key"))
    # dots in the key: webdataset's rule takes the key up to the first dot of the file name
    m += [_member("key.with.dots.jpg", encode(photo("retina"))), _member("key.with.dots.txt", cap("a human retina").encode())]
    # a member name whose bytes are not UTF-8
    m += _pair("name_\udcff\udcfe_latin1", encode(noise(13)), cap("a colourful pattern with a strange file name"))
    write_tar(os.path.join(ind, "tars", "hostile.tar"), m)
    tar_items = {
        "good_first": "good_first", "truncated_jpeg": "truncated_jpeg", "empty_image": "empty_image",
        "random_bytes": "random_bytes", "html_as_jpg": "html_as_jpg", "svg_as_jpg": "svg_as_jpg",
        "eps_as_jpg": "eps_as_jpg", "decompression_bomb": "decompression_bomb",
        "huge_dims_png_header": "huge_dims_png_header", "huge_dims_jpeg_sof": "huge_dims_jpeg_sof",
        "big_dims_tiny_file": "big_dims_tiny_file", "cmyk": "cmyk", "gray16_png": "gray16_png",
        "palette_png": "palette_png", "alpha_png": "alpha_png", "animated_gif": "animated_gif",
        "animated_webp": "animated_webp", "animated_png": "animated_png", "exif_rotated": "exif_rotated",
        "bad_utf8_caption": "bad_utf8_caption", "control_chars_caption": "control_chars_caption",
        "html_caption": "html_caption", "caption_1mb": "caption_1mb", "caption_only_control": "caption_only_control",
        "caption_zero_width": "caption_zero_width", "no_caption": "no_caption",
        "meta_caption_number": "meta_caption_number", "meta_invalid": "meta_invalid", "meta_deep": "meta_deep",
        "image_missing": "image_missing", "oversized_member": "oversized_member",
        "tar_dotdot": escape_rel, "tar_dotdot_sibling": "../sibling/escape-dotdot2.jpg", "tar_absolute": escape_abs,
        "tar_symlink": "link_to_etc_passwd.jpg", "tar_symlink_escape": "link_escape.jpg",
        "tar_hardlink": "hardlink.jpg", "tar_fifo": "fifo_member.jpg", "tar_device": "device_member.jpg",
        "after_unsafe": "after_unsafe", "dup_ext_first": "dup_ext", "dup_ext_second": "dup_ext.jpg",
        "dup_key_first": "dup_key", "between": "between", "dup_key_again": "dup_key#1", "key_with_dots": "key",
        "name_not_utf8": "name_\\udcff\\udcfe_latin1",
    }
    items.update({label: f"tars/hostile.tar::{key}" for label, key in tar_items.items()})

    # --- broken tars -----------------------------------------------------------------------------
    # cut in the middle of the third sample's image
    cut = _pair("t1", encode(noise(20)), cap("a pattern before the cut")) + \
        _pair("t2", encode(noise(21)), cap("another pattern before the cut")) + \
        _pair("t3", encode(noise(22)), cap("the sample that is cut"))
    path = os.path.join(ind, "tars", "truncated.tar")
    write_tar(path, cut, fmt=tarfile.USTAR_FORMAT)
    with open(path, "rb") as f:
        data = f.read()
    t3_data = data.index(cut[4][1])  # t3.jpg's bytes
    with open(path, "wb") as f:
        f.write(data[: t3_data + len(cut[4][1]) // 2])
    items.update({"truncated_tar_t1": "tars/truncated.tar::t1", "truncated_tar_t2": "tars/truncated.tar::t2",
                  "truncated_tar_t3": "tars/truncated.tar::t3", "truncated_tar_error": "tars/truncated.tar::@error"})
    # a damaged header in the middle: tarfile would end the archive there without a word
    dmg = _pair("d1", encode(noise(23)), cap("a pattern before the damage")) + \
        _pair("d2", encode(noise(24)), cap("a pattern behind the damage")) + \
        _pair("d3", encode(noise(25)), cap("a pattern hidden by the damage"))
    path = os.path.join(ind, "tars", "damaged_header.tar")
    write_tar(path, dmg, fmt=tarfile.USTAR_FORMAT)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    header = data.index(b"d2.jpg")  # the name field starts the header block
    data[header + 148: header + 156] = b"garbage!"  # checksum field
    with open(path, "wb") as f:
        f.write(bytes(data))
    items.update({"damaged_tar_d1": "tars/damaged_header.tar::d1",
                  "damaged_tar_error": "tars/damaged_header.tar::@error"})
    # two tars concatenated (`cat a.tar b.tar`): tar stops at the first end marker
    a, b = os.path.join(root, "a.tar"), os.path.join(root, "b.tar")
    write_tar(a, _pair("c1", encode(noise(26)), cap("a pattern in the first tar")))
    write_tar(b, _pair("c2", encode(noise(27)), cap("a pattern in the second tar")))
    with open(os.path.join(ind, "tars", "concatenated.tar"), "wb") as f, open(a, "rb") as fa, open(b, "rb") as fb:
        f.write(fa.read() + fb.read())
    os.remove(a)
    os.remove(b)
    items.update({"concat_tar_c1": "tars/concatenated.tar::c1", "concat_tar_error": "tars/concatenated.tar::@error"})
    with open(os.path.join(ind, "tars", "not_a_tar.tar"), "wb") as f:
        f.write(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    open(os.path.join(ind, "tars", "empty.tar"), "wb").close()
    items.update({"not_a_tar": "tars/not_a_tar.tar::@error", "empty_tar": "tars/empty.tar::@error"})

    # --- a folder of loose files -----------------------------------------------------------------
    fold = os.path.join(ind, "folder")
    with open(os.path.join(fold, "valid.png"), "wb") as f:
        f.write(encode(photo("chessboard_RGB").convert("RGB"), "PNG"))
    with open(os.path.join(fold, "valid.txt"), "w") as f:
        f.write("一张黑白相间的国际象棋棋盘图片，方格整齐排列在白色背景上。")
    os.symlink(os.path.join(root, "does-not-exist.jpg"), os.path.join(fold, "dangling.jpg"))
    os.symlink("loop.jpg", os.path.join(fold, "loop.jpg"))
    os.mkfifo(os.path.join(fold, "fifo.jpg"))
    os.makedirs(os.path.join(fold, "directory.jpg"))
    with open(os.path.join(fold, "orphan.txt"), "w") as f:
        f.write(cap("a caption with no image beside it"))
    with open(os.fsencode(os.path.join(fold, "latin1_\udce9t\udce9.jpg")), "wb") as f:  # 'été' in Latin-1
        f.write(encode(noise(30)))
    with open(os.fsencode(os.path.join(fold, "latin1_\udce9t\udce9.txt")), "wb") as f:
        f.write(cap("a pattern whose file name is Latin-1").encode())
    items.update({"folder_valid": "folder/valid.png", "folder_dangling_symlink": "folder/dangling.jpg",
                  "folder_symlink_loop": "folder/loop.jpg", "folder_fifo": "folder/fifo.jpg",
                  "folder_orphan_caption": "folder/orphan.txt",
                  "folder_name_not_utf8": "folder/latin1_\\udce9t\\udce9.jpg"})

    # --- JSONL and Parquet tables ----------------------------------------------------------------
    tables = os.path.join(ind, "tables")
    imgs = os.path.join(tables, "images")
    for name, img in (("ok.jpg", noise(40)), ("surrogate.jpg", noise(41)), ("number.jpg", noise(42))):
        with open(os.path.join(imgs, name), "wb") as f:
            f.write(encode(img))
    os.mkfifo(os.path.join(imgs, "fifo.jpg"))
    lines = [
        json.dumps({"key": "path_ok", "image_path": "images/ok.jpg", "caption": cap("a pattern read by path")}),
        "this line is not JSON",
        "[1, 2, 3]",
        '"just a string"',
        json.dumps({"key": "path_missing", "image_path": "images/missing.jpg", "caption": good}),
        json.dumps({"key": "path_fifo", "image_path": "images/fifo.jpg", "caption": good}),
        json.dumps({"key": "path_device", "image_path": "/dev/zero", "caption": good}),
        json.dumps({"key": "path_ok", "image_path": "images/ok.jpg", "caption": "the same key again"}),
        "[" * 100_000 + "]" * 100_000,
        "",
        json.dumps({"key": "lone_surrogate", "image_path": "images/surrogate.jpg",
                    "caption": "A colourful pattern \udc00 with a broken escape in its caption."}),
        json.dumps({"key": "no_image", "caption": good}),
        json.dumps({"key": "image_as_string", "image": "aGVsbG8=", "caption": good}),
        json.dumps({"key": "caption_number", "image_path": "images/number.jpg", "caption": 12345}),
    ]
    with open(os.path.join(tables, "rows.jsonl"), "wb") as f:
        f.writelines(line.encode("utf-8", "surrogatepass") + b"\n" for line in lines)
        f.write(b'{"key": "bad_utf8_line", "caption": "caf\xe9"}\n')  # line 14: Latin-1, not UTF-8
    items.update({f"jsonl_{k}": f"tables/rows.jsonl::{k}" for k in
                  ("path_ok", "path_missing", "path_fifo", "path_device", "lone_surrogate", "no_image",
                   "image_as_string", "caption_number")})
    items.update({"jsonl_not_json": "tables/rows.jsonl::line1", "jsonl_array": "tables/rows.jsonl::line2",
                  "jsonl_string": "tables/rows.jsonl::line3", "jsonl_dup_key": "tables/rows.jsonl::path_ok#1",
                  "jsonl_deep": "tables/rows.jsonl::line8", "jsonl_bad_utf8": "tables/rows.jsonl::line14"})

    pq.write_table(pa.table({
        "key": ["pq_ok", "pq_ok", "pq_no_image", "pq_garbage"],
        "caption": [cap("a pattern stored in parquet"), "the same key again", good, good],
        "jpg": [encode(noise(43)), encode(noise(44)), None, b"\x00garbage" * 10],
    }), os.path.join(tables, "good.parquet"))
    pq.write_table(pa.table({"key": ["w1", "w2"], "caption": [good, good], "image": [1, 2]}),
                   os.path.join(tables, "wrong_type.parquet"))
    hf = pa.array([{"bytes": encode(noise(45)), "path": None}, {"bytes": None, "path": "elsewhere.jpg"}],
                  pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"key": ["hf_bytes", "hf_path_only"], "caption": [cap("a pattern in a struct"), good],
                             "image": hf}), os.path.join(tables, "hf_struct.parquet"))
    with open(os.path.join(tables, "not_parquet.parquet"), "wb") as f:
        f.write(b"PAR1" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    whole = io.BytesIO()
    pq.write_table(pa.table({"key": ["x"], "caption": [good], "jpg": [encode(noise(46))]}), whole)
    with open(os.path.join(tables, "truncated.parquet"), "wb") as f:
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
    items.update({"pq_ok": "tables/good.parquet::pq_ok", "pq_dup_key": "tables/good.parquet::pq_ok#1",
                  "pq_no_image": "tables/good.parquet::pq_no_image", "pq_garbage_bytes": "tables/good.parquet::pq_garbage",
                  "pq_wrong_type_1": "tables/wrong_type.parquet::w1", "pq_wrong_type_2": "tables/wrong_type.parquet::w2",
                  "pq_hf_bytes": "tables/hf_struct.parquet::hf_bytes",
                  "pq_hf_path_only": "tables/hf_struct.parquet::hf_path_only",
                  "pq_not_parquet": "tables/not_parquet.parquet::@error",
                  "pq_truncated": "tables/truncated.parquet::@error"})

    # --- URL rows (served by HostileHandler on 127.0.0.1) ----------------------------------------
    HostileHandler.images = {"ok.jpg": encode(noise(60)), "noai.jpg": encode(noise(61))}
    urls = {
        "url_ok": f"{base_url}/ok.jpg",
        "url_closed_port": f"http://127.0.0.1:{closed_port}/x.jpg",
        "url_redirect_loop": f"{base_url}/loop",
        "url_too_large_declared": f"{base_url}/big",
        "url_too_large_streamed": f"{base_url}/big-chunked",
        "url_private": "http://10.11.12.13/x.jpg",
        "url_metadata": "http://169.254.169.254/latest/meta-data/",
        "url_userinfo_private": f"http://127.0.0.1:{closed_port}@192.168.7.7/x.jpg",
        "url_redirect_to_private": f"{base_url}/to-private",
        "url_not_found": f"{base_url}/missing.jpg",
        "url_html": f"{base_url}/page.html",
        "url_file_scheme": "file:///etc/passwd",
        "url_opt_out": f"{base_url}/noai.jpg",
    }
    with open(os.path.join(tables, "urls.jsonl"), "w") as f:
        f.writelines(json.dumps({"key": k, "url": u, "caption": cap(f"a picture behind {k}")}) + "\n"
                     for k, u in urls.items())
    items.update({k: f"tables/urls.jsonl::{k}" for k in urls})

    expect_in_shards = {
        "exif_rotated": {"width": 360, "height": 240},
        "control_chars_caption": {"caption": "A stained tissue sample under the microscope [0m in brown and blue colours."},
        "bad_utf8_caption": {"caption": "A deep field image of distant galaxies ( in space, taken by a telescope."},
        "html_caption": {"caption": "A wall clock & its motion blur alert(1) on a white wall."},
        "jsonl_lone_surrogate": {"caption": "A colourful pattern with a broken escape in its caption."},
    }
    escape_targets = [os.path.normpath(os.path.join(ind, "tars", escape_rel)),
                      os.path.join(root, "sibling", "escape-dotdot2.jpg"), escape_abs, link_target]
    return Corpus(ind, items, escape_targets, [os.path.join(fold, "directory.jpg")], expect_in_shards)


class HostileHandler(QuietHandler):
    """/ok.jpg, /noai.jpg (X-Robots-Tag: noai), /loop (redirects to itself), /big (Content-Length over
    the cap), /big-chunked (no length, streams past the cap), /to-private (redirects to 10.0.0.1),
    /page.html (HTML with status 200); anything else is a 404."""

    images: ClassVar[dict[str, bytes]] = {}

    def do_GET(self):
        path = self.path.split("?")[0]
        name = path.rsplit("/", 1)[-1]
        if path == "/loop":
            self._send(302, headers=[("Location", "/loop")])
        elif path == "/to-private":
            self._send(302, headers=[("Location", "http://10.0.0.1/x.jpg")])
        elif path == "/big":
            self._send(200, bytes(MAX_DOWNLOAD_BYTES * 3))
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = bytes(64 << 10)
            try:
                for _ in range(3 * MAX_DOWNLOAD_BYTES // len(chunk) + 1):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client hung up once it had enough: that is the point
                pass
        elif path == "/page.html":
            self._send(200, b"<html><body>Not an image</body></html>", "text/html")
        elif name == "noai.jpg":
            self._send(200, self.images[name], headers=[("X-Robots-Tag", "noai, noimageai")])
        elif name in self.images:
            self._send(200, self.images[name])
        else:
            self._send(404, b"not found", "text/plain")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up on /big and /big-chunked are expected


def serve() -> ThreadingHTTPServer:
    """HostileHandler on 127.0.0.1, an ephemeral port, in a daemon thread; call .shutdown() after."""
    import threading

    srv = _QuietServer(("127.0.0.1", 0), HostileHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
