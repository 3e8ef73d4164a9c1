"""Shard contracts: what one sample of a kind holds in its WebDataset tar, declared once per kind.

A contract lists the sample's members (`{key}.{ext}` files with their media type) and the fields of
its `.json` member (type, nullability, value range, allowed values, pattern). It is the single source
for:

- the shard writer: a sample that breaks its contract is a bug and fails the task loudly
  (`Contract.violations`, `ContractViolation`);
- the quality gates: one great-expectations expectation per declared bound (`pipelines/gates.py`);
- the report: which fields get a distribution (`Field.plot`), which member is the thumbnail;
- the trainer's formatters (which member holds the image, which the text) and each kind's contract
  test, in which the formatter reads samples the writer produced.

Nothing here imports Spark or torch, so the trainer may import it. Ranges that come from a recipe
(a rule's threshold) are filled in by the kind's `contract(cfg)` function; the trainer uses the
defaults, which fix the layout.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

# media types a member can have, with the check of its bytes
MEDIA_CHECKS: dict[str, Callable[[bytes], bool]] = {
    "jpeg": lambda b: b[:3] == b"\xff\xd8\xff",
    "png": lambda b: b[:8] == b"\x89PNG\r\n\x1a\n",
    "mp4": lambda b: b[4:8] == b"ftyp",
    "text": lambda b: _utf8(b),
    "json": lambda b: _json_object(b),
    "bytes": lambda b: True,
}
TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,),
    "any": (object,),
}


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _json_object(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except ValueError:
        return False


class ContractViolation(ValueError):
    """A sample does not match its kind's shard contract: a pipeline bug, never a data problem."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One file of a sample: `{key}.{ext}`. `pattern`: a family of members (e.g. r"img\\d+\\.jpg")."""

    ext: str
    media: str  # a key of MEDIA_CHECKS
    required: bool = True
    pattern: str = ""  # regex over the extension; when set, `ext` names the family in messages
    thumbnail: bool = False  # the image the report shows for a sample
    description: str = ""

    def matches(self, ext: str) -> bool:
        return re.fullmatch(self.pattern, ext) is not None if self.pattern else ext == self.ext


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of the sample json, or (with `derive`) a value computed from it that has bounds.

    `plot`: how the report draws this value over every input item (hist, loghist, bars; a list-valued
    field counts its elements); the kind's report rows carry a column of the same name."""

    name: str
    type: str  # a key of TYPES
    nullable: bool = True
    min: float | None = None
    max: float | None = None
    values: tuple | None = None  # allowed values
    regex: str = ""
    items: Field | None = None  # for lists: the contract of each element
    derive: Callable[[dict], Any] | None = dataclasses.field(default=None, compare=False)
    plot: str = ""  # "", "hist", "loghist", "bars"
    marks: tuple = ()  # (value, label) lines the report draws on the plot: the recipe's thresholds
    description: str = ""

    def problems(self, value: Any, where: str) -> list[str]:
        if value is None:
            return [] if self.nullable else [f"{where} is null"]
        allowed = TYPES[self.type]
        if not isinstance(value, allowed) or (self.type in ("int", "float") and isinstance(value, bool)):
            return [f"{where} is {type(value).__name__}, want {self.type}"]
        out = []
        if self.type in ("int", "float"):
            if isinstance(value, float) and not math.isfinite(value):
                out.append(f"{where} is {value}")
            if self.min is not None and value < self.min:
                out.append(f"{where} = {value} < {self.min}")
            if self.max is not None and value > self.max:
                out.append(f"{where} = {value} > {self.max}")
        if self.values is not None and value not in self.values:
            out.append(f"{where} = {value!r} not in {list(self.values)}")
        if self.regex and isinstance(value, str) and not re.fullmatch(self.regex, value):
            out.append(f"{where} = {value!r} does not match {self.regex}")
        if self.items is not None and isinstance(value, list):
            for i, v in enumerate(value):
                out += self.items.problems(v, f"{where}[{i}]")
        return out


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule over several members or fields (e.g. the .txt member is the json's chosen text)."""

    name: str
    description: str
    test: Callable[[dict, dict], bool] = dataclasses.field(compare=False)  # (members, json) -> ok


@dataclasses.dataclass(frozen=True)
class Contract:
    kind: str
    members: tuple[Member, ...]
    fields: tuple[Field, ...]
    checks: tuple[Check, ...] = ()
    text_field: str = ""  # the json field the report shows on a card

    @property
    def stored(self) -> tuple[Field, ...]:
        """Fields present in the json itself (not derived)."""
        return tuple(f for f in self.fields if f.derive is None)

    @property
    def derived(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.derive is not None)

    @property
    def thumbnail(self) -> Member | None:
        return next((m for m in self.members if m.thumbnail), None)

    def member(self, ext: str) -> Member | None:
        return next((m for m in self.members if m.matches(ext)), None)

    def values(self, doc: dict) -> dict[str, Any]:
        """The json's fields and the derived values, by name (None where they cannot be computed)."""
        out = {f.name: doc.get(f.name) for f in self.stored}
        for f in self.derived:
            try:
                out[f.name] = f.derive(doc)
            except (TypeError, ValueError, KeyError, ZeroDivisionError):
                out[f.name] = None
        return out

    def violations(self, sample: Mapping[str, Any]) -> list[str]:
        """Every way `sample` ({ext: bytes}, plus '__key__') breaks the contract; [] when it holds."""
        out = []
        exts = [e for e in sample if not e.startswith("__")]
        for ext in exts:
            m = self.member(ext)
            if m is None:
                out.append(f"member .{ext} is not in the {self.kind} contract")
            elif not isinstance(sample[ext], (bytes, bytearray)) or not MEDIA_CHECKS[m.media](bytes(sample[ext])):
                out.append(f"member .{ext} is not {m.media}")
        for m in self.members:
            if m.required and not any(m.matches(e) for e in exts):
                out.append(f"member .{m.ext} is missing")
        doc = {}
        if "json" in sample:
            try:
                doc = json.loads(sample["json"])
            except ValueError:
                return out + ["member .json does not parse"]
            known = {f.name for f in self.stored}
            out += [f"json field '{k}' is not in the {self.kind} contract" for k in doc if k not in known]
            out += [f"json field '{f.name}' is missing" for f in self.stored if f.name not in doc]
        values = self.values(doc)
        for f in self.fields:
            if f.derive is None and f.name not in doc:
                continue
            out += f.problems(values[f.name], f"{'derived' if f.derive else 'json'} field '{f.name}'")
        for c in self.checks:
            try:
                ok = c.test(sample, doc)
            except Exception:  # noqa: BLE001 - a check that cannot run on a sample fails for it
                ok = False
            if not ok:
                out.append(f"check '{c.name}' fails: {c.description}")
        return out

    def validate(self, sample: Mapping[str, Any]) -> None:
        bad = self.violations(sample)
        if bad:
            raise ContractViolation(f"{self.kind} sample {sample.get('__key__')!r} breaks its shard contract: "
                                    + "; ".join(bad[:10]))
