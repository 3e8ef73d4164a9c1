"""One formatter per shard kind: a webdataset sample (dict of bytes) -> a token sequence and its images.

An image becomes `<|begin_of_image|> <|image|> x N <|end_of_image|>` with N = its merged token count; the
vision features replace the `<|image|>` placeholders inside the model. Every sequence ends with
`<|endoftext|>`. A formatter raises on a malformed sample; the loader logs it and moves on.

A new corpus plugs in by kind name: write a class with `format(sample, ctx)` and `texts(sample)` (the
text to train the tokenizer on) and decorate it with `@register("kind")`. It reads the members its
kind's shard contract declares (`schemas/<kind>.py`, importable without Spark); each kind has a
contract test in which its formatter reads samples the pipeline's writer produced. The layouts, as
each kind's contract declares them:

- interleaved: `.json` {"texts": [str | null, ...], "images": [{"member": "0003.jpg", ...} | null, ...]}
  (aligned, one of the two per position), the images as members `{key}.0003.jpg` (schemas/interleaved.py).
  Documents over `interleaved.tokens.long_context` tokens are in their own set, `interleaved_long`, same layout.
- ocr: `.jpg` + `.txt` (the text in reading order) + `.json` (schemas/ocr.py: branch, lines with boxes
  0-999, `markup` for academic pages, used as the target where present).
- grounding: `.jpg` + `.txt` + `.json` {"caption", "phrases": [{"text", "span", "boxes"}]} as
  `schemas/grounding.py` declares; the caption is rendered by `schemas/boxes.py` (each phrase followed
  by `<|begin_of_box|>[[x1,y1,x2,y2];...]<|end_of_box|>`, corners 0-999), box markers as special ids.
- gui: `.png` (screenshot) + `.txt` (QA pairs with box blocks) + `.json` (url, viewport, device scale,
  elements with 0-999 boxes, QA pairs) as `schemas/gui.py` declares.
- video: one clip per sample (schemas/video.py): frames `{key}.0000.jpg`, `{key}.0001.jpg`, ... (an even
  count) + `.json` {"frame_indices", "timestamps": [whole seconds, one per frame pair], ...} (+ `.txt`,
  the caption). Two frames form one temporal patch; each pair is followed by its timestamp.
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from schemas import boxes
from schemas import grounding as grounding_schema
from schemas import gui as gui_schema
from schemas import image_text as image_text_schema
from schemas import interleaved as interleaved_schema
from schemas import ocr as ocr_schema
from trainer.images import ImageConfig, decode_resized, image_patches, merged_tokens, smart_resize, to_patches

if TYPE_CHECKING:  # a type only: tokenizer.py reads formatters to find training text, not the other way round
    from trainer.tokenizer import TextTokenizer

ImageInput = tuple[np.ndarray, tuple[int, int, int]]  # (patches, grid (t, h, w) in ViT patches)


@dataclass
class Formatted:
    ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    kind: str = ""
    key: str = ""


@dataclass(frozen=True)
class FormatContext:
    tokenizer: TextTokenizer
    image: ImageConfig
    max_len: int


class Formatter(Protocol):
    def format(self, sample: dict, ctx: FormatContext) -> Formatted: ...

    def texts(self, sample: dict) -> list[str]: ...


REGISTRY: dict[str, Formatter] = {}


def register(kind: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        REGISTRY[kind] = cls()
        return cls

    return wrap


def get(kind: str) -> Formatter:
    if kind not in REGISTRY:
        raise KeyError(f"no formatter for shard kind {kind!r} (known: {sorted(REGISTRY)})")
    return REGISTRY[kind]


# --- helpers -------------------------------------------------------------------------------------------

def _text(sample: dict, ext: str = "txt", required: bool = True) -> str:
    raw = sample.get(ext)
    if raw is None:
        if required:
            raise KeyError(f"sample {sample.get('__key__')} has no .{ext}")
        return ""
    return raw.decode("utf-8").strip()


def _json(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        raise KeyError(f"sample {sample.get('__key__')} has no .json")
    return json.loads(raw)


def image_block(ctx: FormatContext, grid: tuple[int, int, int]) -> list[int]:
    t = ctx.tokenizer
    return [t.begin_image_id] + [t.image_id] * merged_tokens(grid, ctx.image) + [t.end_image_id]


def fit(ids: list[int], images: list[ImageInput], ctx: FormatContext) -> tuple[list[int], list[ImageInput]]:
    """Cut a sequence longer than max_len, never inside an image block (images after the cut are dropped).

    Raises ValueError when nothing trainable would be left (e.g. one image alone is longer than max_len).
    """
    tok = ctx.tokenizer
    if len(ids) > ctx.max_len:
        cut, kept, k = ctx.max_len, 0, 0
        for i, tid in enumerate(ids):
            if i >= cut:
                break
            if tid == tok.begin_image_id:
                end = i + 1 + merged_tokens(images[k][1], ctx.image)  # index of its <|end_of_image|>
                if end >= cut:
                    cut = i
                    break
                kept, k = kept + 1, k + 1
        ids, images = ids[:cut], images[:kept]
    structural = tok.structural_ids
    if not any(t not in structural for t in ids[1:]):
        raise ValueError(f"no text to train on within max_len={ctx.max_len}")
    return ids, images


def _finish(ids: list[int], images: list[ImageInput], ctx: FormatContext, sample: dict,
            kind: str) -> Formatted:
    ids, images = fit(ids + [ctx.tokenizer.eos_id], images, ctx)
    return Formatted(ids=ids, images=images, kind=kind, key=sample.get("__key__", ""))


# --- the kinds -----------------------------------------------------------------------------------------

_IMAGE_TEXT = image_text_schema.contract()  # the layout the pipeline writes (schemas/image_text.py)
_OCR = ocr_schema.contract()  # schemas/ocr.py
_GROUNDING = grounding_schema.contract()
_GUI = gui_schema.contract()  # schemas/gui.py


@register("image_text")
class ImageText:
    """`<image>` then the caption (`.txt`: the text the pipeline chose to train on). The members are
    the ones the kind's shard contract declares."""

    kind = "image_text"
    image = _IMAGE_TEXT.thumbnail.ext
    text = next(m.ext for m in _IMAGE_TEXT.members if m.media == "text")

    def format(self, sample: dict, ctx: FormatContext) -> Formatted:
        caption = _text(sample, self.text)
        if not caption:
            raise ValueError("empty caption")
        patches, grid = image_patches(sample[self.image], ctx.image)
        ids = image_block(ctx, grid) + ctx.tokenizer.encode(caption)
        return _finish(ids, [(patches, grid)], ctx, sample, self.kind)

    def texts(self, sample: dict) -> list[str]:
        return [_text(sample, self.text, required=False)]


@register("ocr")
class Ocr(ImageText):
    """`<image>` then the text to read out of it (schemas/ocr.py): the `.txt` member (lines in reading
    order), or for an academic page read from its text layer the json's light `markup` (Nougat's target)."""

    kind = "ocr"
    image = _OCR.thumbnail.ext
    text = next(m.ext for m in _OCR.members if m.media == "text")

    def _target(self, sample: dict) -> str:
        markup = json.loads(sample["json"]).get("markup") if "json" in sample else None
        return markup.strip() if markup and markup.strip() else _text(sample, self.text)

    def format(self, sample: dict, ctx: FormatContext) -> Formatted:
        text = self._target(sample)
        if not text:
            raise ValueError("empty OCR text")
        patches, grid = image_patches(sample[self.image], ctx.image)
        ids = image_block(ctx, grid) + ctx.tokenizer.encode(text)
        return _finish(ids, [(patches, grid)], ctx, sample, self.kind)

    def texts(self, sample: dict) -> list[str]:
        return [self._target(sample)]


def _image_then_pieces(image: bytes, pieces: list[tuple[str, str]], ctx: FormatContext, sample: dict,
                       kind: str) -> Formatted:
    """`<image>`, then text and box pieces (`schemas.boxes`), each box block between the box tokens."""
    tok = ctx.tokenizer
    patches, grid = image_patches(image, ctx.image)
    ids = image_block(ctx, grid)
    for what, text in pieces:
        ids += tok.encode(text) if what == "text" else [tok.begin_box_id] + tok.encode(text) + [tok.end_box_id]
    return _finish(ids, [(patches, grid)], ctx, sample, kind)


@register("grounding")
class Grounding:
    """`<image>`, then the caption with each grounded phrase followed by its box block: the pieces
    `schemas.boxes.render` makes from the json's caption and phrases (the `.txt` member is the same text;
    the contract checks it), box markers as the special ids."""

    kind = "grounding"
    image = _GROUNDING.thumbnail.ext

    def format(self, sample: dict, ctx: FormatContext) -> Formatted:
        doc = _json(sample)
        pieces = boxes.render(doc["caption"], doc["phrases"])
        if not boxes.count_boxes(doc["phrases"]):
            raise ValueError("no boxes")
        return _image_then_pieces(sample[self.image], pieces, ctx, sample, self.kind)

    def texts(self, sample: dict) -> list[str]:
        doc = _json(sample)
        return [boxes.render_text(doc["caption"], doc["phrases"])]


@register("gui")
class Gui:
    """`<image>` (the screenshot), then the referring-expression QA pairs of the `.txt` member
    (schemas/gui.py), each box block between the box tokens (`schemas.boxes.pieces`)."""

    kind = "gui"
    image = _GUI.thumbnail.ext
    text = next(m.ext for m in _GUI.members if m.media == "text")

    def format(self, sample: dict, ctx: FormatContext) -> Formatted:
        pieces = boxes.pieces(_text(sample, self.text))
        if not any(what == "box" for what, _ in pieces):
            raise ValueError("no boxes in the QA pairs")
        return _image_then_pieces(sample[self.image], pieces, ctx, sample, self.kind)

    def texts(self, sample: dict) -> list[str]:
        return [_text(sample, self.text, required=False)]


_INTERLEAVED = interleaved_schema.contract()  # the layout the pipeline writes (schemas/interleaved.py)


@register("interleaved")
class Interleaved:
    """Texts and images in document order (`.json` `texts`/`images`, aligned as OBELICS has them: at each
    position exactly one is non-null; an image entry names its member, e.g. `0003.jpg`). Consecutive
    texts are joined by a blank line."""

    kind = "interleaved"

    def format(self, sample: dict, ctx: FormatContext) -> Formatted:
        tok = ctx.tokenizer
        doc = _json(sample)
        texts, entries = doc.get("texts"), doc.get("images")
        if not texts or entries is None or len(texts) != len(entries):
            raise ValueError("texts and images must be non-empty lists of the same length")
        ids: list[int] = []
        images: list[ImageInput] = []
        prev_text = False
        for t, im in zip(texts, entries):
            if (t is None) == (im is None):
                raise ValueError("exactly one of texts[i] and images[i] must be set")
            if im is not None:
                data = sample.get(im["member"])
                if data is None or not _INTERLEAVED.member(im["member"]):
                    raise KeyError(f"image member {im['member']} is missing")
                patches, grid = image_patches(data, ctx.image)
                ids += image_block(ctx, grid)
                images.append((patches, grid))
                prev_text = False
            elif t:
                ids += tok.encode(("\n\n" if prev_text else "") + t)
                prev_text = True
        return _finish(ids, images, ctx, sample, self.kind)

    def texts(self, sample: dict) -> list[str]:
        return [t for t in (_json(sample).get("texts") or []) if t]


# documents over the recipe's token bound, written to their own shard set for the long-context stage
register(interleaved_schema.LONG_SET)(Interleaved)


_FRAME = re.compile(r"^(\d{4})\.jpg$")


@register("video")
class Video:
    """`<|begin_of_video|>`, each frame pair as an image then its integer second, `<|end_of_video|>`, caption.

    Reads what `schemas/video.py` declares: frames `NNNN.jpg` in order, `timestamps` (one per pair) in the
    json. All frames take the size smart_resize gives the first one, so the pairs stack into temporal
    patches.
    """

    kind = "video"

    def format(self, sample: dict, ctx: FormatContext) -> Formatted:
        tok = ctx.tokenizer
        names = sorted((int(m.group(1)), k) for k in sample if (m := _FRAME.match(k)))
        if not names:
            raise KeyError("no NNNN.jpg frame members")
        tp = ctx.image.temporal_patch_size
        stamps = _json(sample).get("timestamps") or []
        if len(stamps) != -(-len(names) // tp):
            raise ValueError(f"{len(names)} frames but {len(stamps)} timestamps (one per {tp} frames)")
        with Image.open(io.BytesIO(sample[names[0][1]])) as first:  # the header is enough for the size
            size = smart_resize(first.height, first.width, ctx.image)
        frames = [decode_resized(sample[k], size, ctx.image) for _, k in names]
        ids, images = [tok.begin_video_id], []
        for pair, start in enumerate(range(0, len(frames), tp)):
            patches, grid = to_patches(frames[start:start + tp], ctx.image)
            ids += image_block(ctx, grid) + tok.encode(str(int(stamps[pair])))
            images.append((patches, grid))
        ids.append(tok.end_video_id)
        caption = _text(sample, required=False)
        if caption:
            ids += tok.encode(caption)
        return _finish(ids, images, ctx, sample, self.kind)

    def texts(self, sample: dict) -> list[str]:
        return [_text(sample, required=False)]
