"""MINT-1T PDF shards (webdataset tars of `{key}.json` + a multi-frame `{key}.tiff`) read as interleaved
documents: detection among the inputs, one document row per sample and one image row per image position,
each frame re-encoded losslessly, and a clear reason for every broken sample (no JVM)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
from PIL import Image

from filters.html_extract import MINT, UNITS, ReadDocuments
from filters.interleaved_sources import is_mint_tar
from pipelines.interleaved import list_units


def frame(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def tiff(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def sample(texts, images, **more) -> bytes:
    meta = [{"page": 0, "xref": 5 + k, "width": 64 + k, "height": 48} for k, im in enumerate(i for i in images if i)]
    return json.dumps({"texts": texts, "images": images, "image_metadata": meta, "url": "https://e.org/a.pdf",
                       "pdf_name": "a.pdf", **more}).encode()


FRAMES = [frame(64, 48, 1), frame(80, 60, 2)]


def mint_tar(tmp_path) -> str:
    # `""` is null: position 2 is an empty text slot
    good = sample(["Intro text.", None, "Between the figures.", None], [None, "page_0_image_5", "", "page_1_image_9"])
    short = sample(["One.", None, None, "Two.", None], [None, "page_0_image_1", "page_0_image_2", "", "page_2_image_3"])
    return write_tar(tmp_path / "mint" / "CC-MAIN-shard-0" / "shard-00000.tar", [
        ("a1.json", good), ("a1.tiff", tiff(FRAMES)),
        ("b2.json", short), ("b2.tiff", tiff(FRAMES)),  # three images, two frames
        ("c3.json", sample(["Text.", None], [None, "page_0_image_1"])), ("c3.tiff", b"II*\x00 not a tiff at all"),
        ("d4.json", json.dumps({"images": [None], "image_metadata": []}).encode()),  # no texts
        ("e5.json", b"{broken"),
        ("f6.json", sample(["Only text, no images."], [None])),  # no TIFF, none needed
        ("g7.json", sample(["Text."], [None])), ("g7.tiff", tiff(FRAMES[:1])), ("g7.json", b"{}"),  # a second json
        ("h8.tiff", tiff(FRAMES[:1])),  # a TIFF without its json
        ("i9.json", sample(["Text.", None], [None, "page_0_image_1"])),  # an image but no TIFF
    ])


def read(uri: str, root: str) -> list[list[dict]]:
    unit = {"format": MINT, "uri": uri, "root": root, "read_unit": uri, "dataset": "d"}
    return list(ReadDocuments().read_unit(unit))


def test_mint_tar_is_detected_among_the_inputs(tmp_path):
    uri = mint_tar(tmp_path)
    # an image-text webdataset tar beside it is not a MINT-1T shard, and no item of this kind
    buf = io.BytesIO()
    FRAMES[0].save(buf, format="JPEG")
    other = write_tar(tmp_path / "mint" / "pairs.tar", [("k1.jpg", buf.getvalue()), ("k1.txt", b"a caption")])
    assert is_mint_tar(uri) and not is_mint_tar(other)
    (tmp_path / "mint" / "not-a.tar").write_bytes(b"garbage")
    assert list_units([str(tmp_path / "mint")]) == [(MINT, uri, str(tmp_path / "mint"))]


def test_mint_samples_become_documents_with_their_frames(tmp_path):
    uri = mint_tar(tmp_path)
    docs = {rows[0]["source_key"].split("::")[1]: rows for rows in read(uri, str(tmp_path / "mint"))}
    prefix = "CC-MAIN-shard-0/shard-00000.tar::"
    assert all(rows[0]["source_key"].startswith(prefix) for rows in docs.values())
    # one document row per sample, and one for the second json of g7 (a duplicate member)
    assert sorted(docs) == ["a1", "b2", "c3", "d4", "e5", "f6", "g7", "g7.json", "h8", "i9"]
    rows = docs["a1"]
    doc, images = rows[0], rows[1:]
    assert doc.get("error") is None and doc["page_url"] == "https://e.org/a.pdf" and doc["title"] == "a.pdf"
    assert json.loads(doc["segments"]) == [{"text": "Intro text."}, {"image": 1}, {"text": "Between the figures."},
                                           {"image": 3}]
    assert [r["source_key"] for r in images] == [prefix + "a1::1", prefix + "a1::3"]
    assert [r["parent_id"] for r in images] == [doc["sample_id"]] * 2
    assert [r["src"] for r in images] == ["page_0_image_5", "page_1_image_9"]
    assert [(r["declared_width"], r["declared_height"]) for r in images] == [(64, 48), (65, 48)]
    for r, want in zip(images, FRAMES):  # each frame, in order, re-encoded losslessly
        got = Image.open(io.BytesIO(r["image"]))
        assert got.format == "PNG" and np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def test_broken_mint_samples_get_their_reasons(tmp_path):
    uri = mint_tar(tmp_path)
    docs = {rows[0]["source_key"].split("::", 1)[1]: rows for rows in read(uri, str(tmp_path / "mint"))}
    b2 = docs["b2"]
    assert b2[0].get("error") is None
    errors = {r["source_key"].rsplit("::", 1)[1]: (r.get("error"), r.get("error_detail")) for r in b2[1:]}
    assert errors["1"][0] is None and errors["2"][0] is None
    assert errors["4"] == ("image_missing", "the TIFF has 2 frames; image 3 of 3 has none")
    c3 = docs["c3"]
    assert c3[0].get("error") is None and c3[1]["error"] == "image_undecodable"
    assert c3[1]["error_detail"].startswith("the sample's TIFF cannot be read")
    assert docs["d4"][0]["error"] == "row_invalid" and "no 'texts' list" in docs["d4"][0]["error_detail"]
    assert docs["e5"][0]["error"] == "meta_invalid"
    assert docs["f6"][0].get("error") is None and len(docs["f6"]) == 1  # text only: no TIFF needed
    assert docs["g7"][0].get("error") is None  # the first copy is used; the second json is its own row
    assert docs["g7.json"][0]["error"] == "duplicate_member"
    assert docs["h8"][0]["error"] == "read_error" and "no .json" in docs["h8"][0]["error_detail"]
    assert docs["i9"][1]["error"] == "image_missing" and "no TIFF" in docs["i9"][1]["error_detail"]


def test_read_counts_count_every_mint_document(tmp_path):
    uri = mint_tar(tmp_path)

    class Counter:  # what a readers.ReadCounts accumulator does with the reader's counts
        def __init__(self) -> None:
            self.value: dict = {}

        def add(self, counts: dict) -> None:
            self.value.update(counts)

    counter = Counter()
    units = pa.RecordBatch.from_pylist([{"format": MINT, "uri": uri, "root": str(tmp_path / "mint"),
                                         "read_unit": uri, "dataset": "d"}], schema=UNITS)
    out = pa.Table.from_batches(list(ReadDocuments(counter=counter).run([units])))
    documents = sum(u == "document" for u in out.column("unit").to_pylist())
    assert counter.value == {f"local|{uri}": documents} and documents == len(read(uri, str(tmp_path / "mint")))
