"""Heuristic quality rules (GLM-4.1V image-text filters; defaults follow DataComp's "basic" filter).

Reads the columns written by decode and caption; writes nothing itself: `Rules.reason()` is a Spark
expression giving the first failed rule's stable reason code, or null when all pass. Rows with an
`error` (reading, downloading, decoding) never get here: the spine quarantines them first
(pipelines/kind.py). `image_checks` are the image rules every kind shares.
"""
from __future__ import annotations

import dataclasses

from schemas import image_text as S


@dataclasses.dataclass(frozen=True)
class Rules:
    min_side: int = 200  # shorter side in pixels
    max_aspect_ratio: float = 3.0  # longer side / shorter side
    min_pixel_std: float = 2.0  # grey-level std of the 32x32 feature thumbnail; below it the image is solid
    min_caption_words: int = 3  # DataComp: more than 2 words
    min_caption_chars: int = 6  # DataComp: more than 5 characters
    max_caption_chars: int = 2000
    languages: tuple[str, ...] = ("en", "zh")  # fastText lid.176 codes; empty: any language
    min_language_score: float = 0.0

    def reason(self):
        """Column: the reason this row is quarantined or dropped by a rule, else null."""
        from pyspark.sql import functions as F

        c = F.col
        checks = [
            *image_checks(self.min_side, self.max_aspect_ratio, self.min_pixel_std),
            (c(S.CAPTION_CHARS) == 0, F.lit("caption_missing")),
            ((c(S.CAPTION_WORDS) < self.min_caption_words) | (c(S.CAPTION_CHARS) < self.min_caption_chars),
             F.lit("caption_too_short")),
            (c(S.CAPTION_CHARS) > self.max_caption_chars, F.lit("caption_too_long")),
        ]
        if self.languages:
            bad_lang = ~c(S.LANGUAGE).isin(list(self.languages)) | (c(S.LANGUAGE_SCORE) < self.min_language_score)
            checks.append((bad_lang, F.lit("language")))
        return first_reason(checks)


def image_checks(min_side: int, max_aspect_ratio: float, min_pixel_std: float) -> list:
    """The size, aspect and solid-colour rules of any decoded image, wherever it sits (a pair, a page,
    a frame, the image of a document): (condition, reason) on the columns filters.decode writes."""
    from pyspark.sql import functions as F

    short = F.least(F.col(S.WIDTH), F.col(S.HEIGHT))
    long_ = F.greatest(F.col(S.WIDTH), F.col(S.HEIGHT))
    return [
        (short < min_side, F.lit("image_too_small")),
        (long_ > short * max_aspect_ratio, F.lit("aspect_ratio")),
        (F.col(S.PIXEL_STD) < min_pixel_std, F.lit("solid_color")),
    ]


def first_reason(checks: list):
    """Column: the reason of the first check that holds, else null (a null condition does not hold)."""
    from pyspark.sql import functions as F

    expr = F.lit(None).cast("string")
    for cond, code in reversed(checks):
        expr = F.when(F.coalesce(cond, F.lit(False)), code).otherwise(expr)
    return expr
