"""Each kind's formatter: sample -> tokens and images, as the model reads them."""
from __future__ import annotations

import json

import pytest

from trainer import formatters
from trainer.formatters import FormatContext
from trainer.images import ImageConfig, merged_tokens

IMG = ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784)


@pytest.fixture()
def ctx(tok):
    return FormatContext(tok, IMG, max_len=256)


def blocks(ids, tok):
    """[(start, n_image_tokens)] of each <|begin_of_image|> ... <|end_of_image|> block."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == tok.begin_image_id:
            j = ids.index(tok.end_image_id, i)
            assert all(t == tok.image_id for t in ids[i + 1:j])
            out.append((i, j - i - 1))
            i = j
        i += 1
    return out


def test_image_text_is_image_then_caption(ctx, tok, corpus):
    s = corpus.image_text(3)
    f = formatters.get("image_text").format(s, ctx)
    (start, n), = blocks(f.ids, tok)
    assert start == 0 and n == merged_tokens(f.images[0][1])
    assert f.ids[-1] == tok.eos_id
    assert tok.decode(f.ids[n + 2:-1]) == s["txt"].decode()
    assert f.images[0][0].shape[0] == 4 * n  # 4 ViT patches per LLM token


def test_special_token_text_in_a_caption_stays_text(ctx, tok, corpus):
    s = corpus.image_text(1)
    s["txt"] = b"look <|image|><|begin_of_box|> here"
    f = formatters.get("image_text").format(s, ctx)
    assert f.ids.count(tok.image_id) == merged_tokens(f.images[0][1])
    assert tok.begin_box_id not in f.ids
    assert "<|image|><|begin_of_box|>" in tok.decode(f.ids)


def test_ocr_is_image_then_its_text(ctx, tok, corpus):
    s = corpus.image_text(2)
    s["txt"] = b"STOP\nNo entry 9-17h"
    f = formatters.get("ocr").format(s, ctx)
    assert tok.decode(f.ids).endswith("STOP\nNo entry 9-17h<|endoftext|>")


def test_grounding_writes_boxes_between_box_tokens(ctx, tok, corpus):
    from schemas import grounding

    s = corpus.grounding(0)
    assert grounding.contract().violations(s) == []  # the conftest sample has the pipeline's layout
    f = formatters.get("grounding").format(s, ctx)
    text = tok.decode(f.ids)
    assert "the shape 0<|begin_of_box|>[[250,250,750,750]]<|end_of_box|>" in text
    assert "the background<|begin_of_box|>[[0,0,999,999]]<|end_of_box|><|endoftext|>" in text
    assert f.ids.count(tok.begin_box_id) == 2 and f.ids.count(tok.end_box_id) == 2
    assert text.split("<|end_of_image|>", 1)[1] == s["txt"].decode() + "<|endoftext|>"


@pytest.mark.parametrize("box", [[0, 0, 1000, 10], [5, 5, 1, 1], [0.5, 0, 1, 1], [1, 2, 3]])
def test_grounding_rejects_boxes_off_the_0_999_grid(ctx, box, corpus):
    s = corpus.grounding(0)
    doc = json.loads(s["json"])
    doc["phrases"][0]["boxes"] = [box]
    s["json"] = json.dumps(doc).encode()
    with pytest.raises(ValueError):
        formatters.get("grounding").format(s, ctx)


def test_gui_reads_qa_pairs_with_box_tokens(ctx, tok, corpus):
    import io

    from PIL import Image

    from schemas import gui

    buf = io.BytesIO()
    Image.open(io.BytesIO(corpus.picture(3)[0])).save(buf, format="PNG")
    qa = [{"task": "reg", "question": "What element is at <|begin_of_box|>[[10,20,300,80]]<|end_of_box|>?",
           "answer": 'the button "OK": <button>OK</button>'},
          {"task": "rec", "question": 'Where is the link "Help"?', "answer": "<|begin_of_box|>[[5,5,60,30]]<|end_of_box|>"}]
    s = {"__key__": "r0", "png": buf.getvalue(), "txt": gui.qa_text(qa).encode(), "json": json.dumps({"qa": qa}).encode()}
    f = formatters.get("gui").format(s, ctx)
    text = tok.decode(f.ids)
    assert f.ids.count(tok.begin_box_id) == 2 and f.ids.count(tok.end_box_id) == 2
    assert text.split("<|end_of_image|>", 1)[1] == gui.qa_text(qa) + "<|endoftext|>"
    s["txt"] = b"Where? <|begin_of_box|>[[5,5,1000,30]]<|end_of_box|>"
    with pytest.raises(ValueError):
        formatters.get("gui").format(s, ctx)


def interleaved_sample(key: str, items: list, **images: bytes) -> dict:
    """A sample in the interleaved layout (schemas/interleaved.py): items are texts, or None where an
    image sits; images by member name (e.g. `m0001=...` for `0001.jpg`)."""
    entries = [None if t is not None else {"member": f"{i:04d}.jpg"} for i, t in enumerate(items)]
    return {"__key__": key, "json": json.dumps({"texts": items, "images": entries}).encode(),
            **{k.removeprefix("m") + ".jpg": v for k, v in images.items()}}


def test_interleaved_keeps_document_order(ctx, tok, corpus):
    a, b = corpus.picture(1)[0], corpus.picture(2)[0]
    texts = ["First paragraph.", None, "Second.", "Third.", None]
    s = interleaved_sample("doc", texts, m0001=a, m0004=b)
    f = formatters.get("interleaved").format(s, ctx)
    bl = blocks(f.ids, tok)
    assert len(bl) == 2 and len(f.images) == 2
    assert tok.decode(f.ids[:bl[0][0]]) == "First paragraph."
    between = tok.decode(f.ids[bl[0][0] + bl[0][1] + 2:bl[1][0]])
    assert between == "Second.\n\nThird."
    assert f.ids[-2:] == [tok.end_image_id, tok.eos_id]


def test_interleaved_missing_image_is_an_error(ctx):
    s = interleaved_sample("doc", ["a", None])
    with pytest.raises(KeyError):
        formatters.get("interleaved").format(s, ctx)
    s = {"__key__": "doc", "json": json.dumps({"texts": ["a", None], "images": [None, None]}).encode()}
    with pytest.raises(ValueError):  # neither text nor image at position 1
        formatters.get("interleaved").format(s, ctx)


def test_video_frame_pairs_each_followed_by_whole_seconds(ctx, tok, corpus):
    frames = {f"{i:04d}.jpg": corpus.picture(0)[0] for i in range(3)}
    stamps = json.dumps({"timestamps": [0, 2]}).encode()  # one per pair (schemas/video.py)
    s = {"__key__": "vid", "json": stamps, "txt": b"a clip", **frames}
    f = formatters.get("video").format(s, ctx)
    assert f.ids[0] == tok.begin_video_id
    assert len(f.images) == 2 and all(g[0] == 1 for _, g in f.images)  # 3 frames -> 2 temporal patches
    bl = blocks(f.ids, tok)
    first_end = bl[0][0] + bl[0][1] + 1
    assert tok.decode(f.ids[first_end + 1:bl[1][0]]) == "0"
    second_end = bl[1][0] + bl[1][1] + 1
    assert f.ids[second_end + 1:second_end + 3] == tok.encode("2") + [tok.end_video_id]
    assert tok.decode(f.ids).endswith("<|end_of_video|>a clip<|endoftext|>")
    with pytest.raises(ValueError, match="timestamps"):  # one timestamp per frame is the wrong layout
        formatters.get("video").format({**s, "json": json.dumps({"timestamps": [0, 1, 2]}).encode()}, ctx)


def test_too_long_sequences_are_cut_outside_image_blocks(tok, corpus):
    a = corpus.picture(1)[0]
    long_text = "word " * 200
    s = interleaved_sample("doc", ["intro", None, long_text, None], m0001=a, m0003=a)
    ctx = FormatContext(tok, IMG, max_len=120)
    f = formatters.get("interleaved").format(s, ctx)
    assert len(f.ids) == 120 and len(f.images) == 1
    assert f.ids.count(tok.begin_image_id) == 1 and f.ids.count(tok.end_image_id) == 1
    # cut right before an image that does not fit whole: the image is dropped, the text kept
    s2 = interleaved_sample("doc2", ["intro words", None], m0001=a)
    n_img = len(formatters.get("interleaved").format(s2, FormatContext(tok, IMG, 256)).ids)
    f2 = formatters.get("interleaved").format(s2, FormatContext(tok, IMG, n_img - 3))
    assert f2.images == [] and tok.begin_image_id not in f2.ids


def test_an_image_too_big_for_the_row_is_an_error(tok, corpus):
    with pytest.raises(ValueError, match="max_len"):
        formatters.get("image_text").format(corpus.image_text(3), FormatContext(tok, IMG, max_len=6))


def test_unknown_kind_is_named():
    with pytest.raises(KeyError, match="audio"):
        formatters.get("audio")
