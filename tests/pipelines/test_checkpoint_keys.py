"""Checkpoint keys cover exactly what each checkpoint depends on: a recipe change that alters the rows
reaching a model stage recomputes it; one that only alters how its output is used does not."""
from __future__ import annotations

import pytest

from pipelines import image_text
from pipelines.kind import Context, stage_keys
from pipelines.recipe import load

BASE = ["image_text.clip.pretrained=", "image_text.recaption.endpoint=http://127.0.0.1:9/v1",
        "image_text.recaption.model=m"]


@pytest.fixture(scope="module")
def keys_for(spark, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("keys"))

    def keys(*overrides: str) -> dict[str, str]:
        recipe = load(None, [*BASE, *overrides], ["image_text=/nowhere"], work)
        ctx = Context(spark=spark, recipe=recipe, cfg=recipe.image_text, uris=["/nowhere"], out=work,
                      work_dir=work, timer=None)
        return stage_keys(image_text.plan(ctx))

    return keys


def test_keys_follow_the_rows_not_the_knobs_applied_later(keys_for):
    base = keys_for()
    assert set(base) == {"clip", "recaption"}
    for change in ("image_text.rules.min_side=100", "image_text.dedup.hamming_radius=6",
                   "image_text.balance.t=5"):
        k = keys_for(change)
        assert k["recaption"] != base["recaption"], change  # other rows reach the recaptioner
    assert keys_for("image_text.rules.min_side=100")["clip"] != base["clip"]  # other rows reach CLIP
    assert keys_for("image_text.balance.t=5")["clip"] == base["clip"]  # balancing comes after CLIP
    for change in ("image_text.clip.threshold=0.1", "image_text.clip.batch_size=7", "image_text.clip.device=cpu"):
        assert keys_for(change)["clip"] == base["clip"], change  # not re-scored
    assert keys_for("image_text.clip.model=ViT-S-32")["clip"] != base["clip"]  # other weights: re-scored
    assert keys_for("image_text.recaption.max_tokens=64")["recaption"] != base["recaption"]


def test_with_real_weights_the_threshold_decides_which_rows_reach_recaption():
    from filters.clip import ClipScore
    from pipelines.kind import Plan, Step

    def plan(threshold: float) -> Plan:
        clip = ClipScore(pretrained="w.pt", threshold=threshold)
        steps = [Step("clip", stage=clip, store="checkpoint", decide=lambda a: a, depends=clip.threshold),
                 Step("recaption", stage=ClipScore(model="other"), store="checkpoint")]
        return Plan(features=lambda: None, key="k", steps=steps, to_sample=dict, sample_size=lambda F: None)

    a, b = stage_keys(plan(0.3)), stage_keys(plan(0.2))
    assert a["clip"] == b["clip"] and a["recaption"] != b["recaption"]
