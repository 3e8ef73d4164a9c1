"""Recipes: defaults, overrides, and errors that name the bad key before any Spark work."""
from __future__ import annotations

import pytest

from pipelines import kinds
from pipelines.recipe import DEFAULT_RECIPE, Recipe, RecipeError, load


def test_default_recipe_loads_with_the_papers_numbers():
    r = load(DEFAULT_RECIPE)
    assert isinstance(r, Recipe)
    assert r.image_text.clip.threshold == 0.3 and r.image_text.balance.t == 20_000
    assert r.image_text.rules.languages == ("en", "zh") and r.image_text.rules.min_side == 200
    assert not r.image_text.recaption.endpoint  # off unless configured


def test_set_overrides_parse_yaml_values():
    r = load(None, ["image_text.clip.threshold=0.28", "image_text.rules.languages=[en]", "shards.max_samples=5",
                    "image_text.clip.pretrained="])
    assert r.image_text.clip.threshold == 0.28 and r.image_text.rules.languages == ("en",)
    assert r.shards.max_samples == 5 and r.image_text.clip.pretrained == ""


def test_inputs_and_output_from_the_command_line():
    r = load(None, [], ["image_text=/data/a", "image_text=s3://b/c"], "s3://bucket/out")
    assert r.inputs == {"image_text": ["/data/a", "s3://b/c"]} and r.output == "s3://bucket/out"


@pytest.mark.parametrize("override,message", [
    ("image_text.clip.treshold=0.2", "unknown recipe key 'image_text.clip.treshold'"),
    ("imagetext.clip.threshold=0.2", "unknown recipe key 'imagetext'"),
    ("image_text.rules.min_side=big", "'image_text.rules.min_side' must be int"),
    ("image_text.dedup=3", "'image_text.dedup' must be a mapping"),
])
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        load(None, [override])


def test_unknown_kinds_are_refused_and_every_glm_kind_is_registered():
    with pytest.raises(RecipeError, match=r"unknown input kind 'audio' \(registered: .*image_text"):
        load(None, [], ["audio=/x"])
    assert {"image_text", "interleaved", "ocr", "grounding", "gui", "video"} <= set(kinds.REGISTRY)


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("image_text:\n  clip:\n    modle: ViT-B-32\n")
    with pytest.raises(RecipeError, match="image_text.clip.modle"):
        load(str(bad))


def test_a_nested_section_keeps_its_own_defaults_for_keys_left_out():
    from filters.clip import ClipScore
    from pipelines.video import Video

    default = Video().dedup.clip
    assert default.threshold != ClipScore().threshold  # video's dedup CLIP differs from the class default
    r = load(None, ["video.dedup.clip.model=RN50"], [], "out")
    assert r.section("video").dedup.clip.model == "RN50"
    assert r.section("video").dedup.clip.threshold == default.threshold

