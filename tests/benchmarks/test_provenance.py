"""benchmarks/provenance.py: every benchmark's result names the command and the code that produced it."""
from __future__ import annotations

import re
import subprocess

from benchmarks import provenance as P


def test_names_the_checkouts_commit_and_the_command():
    p = P.provenance("benchmarks.compare", ["--n", "2000", "--ours-set", "a=b c"])
    head = subprocess.run(["git", "-C", P.ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert p["commit"] == head and re.fullmatch(r"[0-9a-f]{40}", p["commit"])
    assert isinstance(p["uncommitted_changes"], bool)
    assert p["command"] == "python -m benchmarks.compare --n 2000 --ours-set 'a=b c'"  # as a shell would take it
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["at"])
    text = P.line(p)
    assert f"commit {head[:12]}" in text and p["command"] in text and p["at"] in text


def test_outside_a_checkout_the_code_is_said_to_be_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "ROOT", str(tmp_path))
    p = P.provenance("benchmarks.gui_render", [])
    assert p["commit"] is None and p["uncommitted_changes"] is None
    assert P.line(p).startswith("Code: code outside a git checkout, run ")


def test_uncommitted_changes_are_said():
    p = {"commit": "a" * 40, "uncommitted_changes": True, "at": "2026-12-05T10:00:00+00:00", "machine": "2 cores",
         "command": "python -m benchmarks.video_throughput"}
    assert P.line(p).startswith("Code: commit aaaaaaaaaaaa with uncommitted changes, run 2026-12-05T10:00:00+00:00")


def test_a_result_written_before_provenance_shows_its_command():
    assert P.header({"command": "python -m benchmarks.compare --n 2000"}) == "Command: `python -m benchmarks.compare --n 2000`"
    made = P.provenance("benchmarks.compare", ["--n", "2000"])
    assert P.header({"provenance": made, "command": "ignored"}) == P.line(made)
