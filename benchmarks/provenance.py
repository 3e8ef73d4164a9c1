"""What produced a benchmark's figures, recorded beside them in its JSON and markdown: the command, the
code (the checkout's commit, and whether it had uncommitted changes to tracked files), when, and where.
Figures quoted in the README or a note can then be traced to the code they measured."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(module: str, argv: list[str] | None = None) -> dict:
    """`module`: the benchmark's module (`python -m module`); `argv`: its arguments (default sys.argv[1:]).
    `commit` and `uncommitted_changes` are None outside a git checkout."""
    args = sys.argv[1:] if argv is None else argv
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "command": " ".join(["python", "-m", module, *(shlex.quote(str(a)) for a in args)]),
        "commit": commit,
        "uncommitted_changes": None if changes is None else bool(changes),
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
    }


def line(p: dict) -> str:
    """The markdown line that says which code and command gave a result's figures."""
    code = f"commit {p['commit'][:12]}" if p.get("commit") else "code outside a git checkout"
    if p.get("uncommitted_changes"):
        code += " with uncommitted changes"
    return f"Code: {code}, run {p['at']} on {p['machine']}: `{p['command']}`"


def header(r: dict) -> str:
    """The markdown line naming what produced result `r`: its `provenance`, or for a result written before
    provenance was recorded, its bare `command`."""
    p = r.get("provenance")
    return line(p) if p else f"Command: `{r.get('command')}`"
