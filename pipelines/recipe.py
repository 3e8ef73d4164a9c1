"""Recipes: YAML files whose sections are the stages' own dataclass configs.

The run-wide keys are below (`Recipe`); each registered corpus kind (`pipelines/kinds.py`) adds one
section, its own config class, with every default filled in: a kind with no input costs nothing.
Unknown keys and wrong types are errors raised here, on the driver, before any Spark work.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from pipelines import kinds

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "default.yaml")


class RecipeError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Read:
    files_per_task: int = 256  # loose image files (with side-cars) read by one task
    max_member_bytes: int = 64_000_000  # larger tar members / files are quarantined unread
    dataset: str = ""  # part of every item id (with the path relative to the input root); "" = the input folder's name


@dataclasses.dataclass(frozen=True)
class Shards:
    max_samples: int = 10_000  # per shard
    max_bytes: int = 1_000_000_000  # per shard; with max_samples, sets samples per shard from the mean size


@dataclasses.dataclass(frozen=True)
class Recipe:
    output: str = "out"
    inputs: dict = dataclasses.field(default_factory=dict)  # kind -> list of URIs (folder, glob, file, s3://)
    seed: int = 0
    keep_work: bool = False  # keep the stage checkpoints after a successful run
    work_dir: str = ""  # stage checkpoints; default OUT/_work (./_work for s3 output). Shared storage on a cluster.
    progress_seconds: float = 5.0  # how often a terminal gets the progress line (pipelines/progress.py)
    read: Read = Read()
    shards: Shards = Shards()
    sections: dict = dataclasses.field(default_factory=dict)  # kind -> its section (filled in by `load`)

    def __getattr__(self, name: str) -> Any:  # recipe.image_text: the kind's section
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"recipe has no key or kind section {name!r}")

    def section(self, kind: str) -> Any:
        return self.sections[kind]

    def to_dict(self) -> dict:
        out = {f.name: dataclasses.asdict(self)[f.name] for f in dataclasses.fields(self) if f.name != "sections"}
        out.update({k: dataclasses.asdict(v) for k, v in sorted(self.sections.items())})
        return out


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{path}' must be a mapping, got {type(value).__name__}")
        return build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], path)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key '{path}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, path) for v in value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{path}' must be a mapping, got {value!r}")
        return value
    if tp is str and value is None:  # `--set key=` and `key:` in YAML mean the empty string
        return ""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise RecipeError(f"recipe key '{path}' must be {tp.__name__}, got {value!r}")
    return value


def build(cls: type, data: dict, path: str = "", base: Any = None) -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys by their dotted path. Keys
    left out keep their defaults, the field's own default included: a section whose default is
    `ClipScore(threshold=0.0)` keeps that threshold when the recipe sets only its model."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in (data or {}).items():
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            raise RecipeError(f"unknown recipe key '{dotted}' (known here: {', '.join(sorted(fields))})")
        field = fields[key]
        default = getattr(base, key) if base is not None else (
            field.default if field.default is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and dataclasses.is_dataclass(default):
            kwargs[key] = build(hints[key], value, dotted, base=default)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load(path: str | None = None, overrides: list[str] = (), inputs: list[str] = (), output: str | None = None) -> Recipe:
    """Read a recipe file, apply `--set key=value` overrides and `--input KIND=URI`, validate it all."""
    with open(path or DEFAULT_RECIPE, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects dotted.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    if inputs:
        data["inputs"] = {}
        for item in inputs:
            if "=" not in item:
                raise RecipeError(f"--input expects KIND=URI, got {item!r}")
            kind, uri = item.split("=", 1)
            data["inputs"].setdefault(kind.strip(), []).append(uri.strip())
    if output:
        data["output"] = output
    sections = {}
    for name, kind in sorted(kinds.REGISTRY.items()):
        sections[name] = build(kind.config, data.pop(name, None) or {}, name)
    if "sections" in data:
        raise RecipeError("unknown recipe key 'sections'")
    recipe = dataclasses.replace(build(Recipe, data), sections=sections)
    for kind, uris in recipe.inputs.items():
        if kind not in kinds.REGISTRY:
            raise RecipeError(f"unknown input kind '{kind}' (registered: {', '.join(sorted(kinds.REGISTRY))})")
        if isinstance(uris, str):
            recipe.inputs[kind] = [uris]
    return recipe
