"""Runs shared by more than one test module, made once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def interleaved_run(spark, tmp_path_factory):
    """The interleaved kind on its mixed corpus (tests/pipelines/test_interleaved_kind.py), read by that module
    and by tests/pipelines/test_report_documents.py: (out, summary, expected ledger rows)."""
    from pipelines import kinds
    from pipelines.build import run_build
    from pipelines.recipe import load
    from tests.pipelines.test_interleaved_kind import TEST_SETTINGS, make_corpus

    assert "interleaved" in kinds.REGISTRY
    tmp = tmp_path_factory.mktemp("interleaved")
    corpus = str(tmp / "pages")
    want = make_corpus(corpus)
    out = str(tmp / "out")
    recipe = load(None, TEST_SETTINGS, [f"interleaved={corpus}"], out)
    summary = run_build(spark, recipe, dict(recipe.inputs), out)
    return out, summary, want
