"""The registry of corpus kinds: the one place a kind is plugged in.

Each entry is a `pipelines.kind.Kind` declared in its own module. The recipe gets a section per
registered kind, `--input KIND=URI` accepts its name, and the spine (build, gates, report, writer)
iterates over what is registered without naming any kind.
"""
from __future__ import annotations

from pipelines import grounding, gui, image_text, interleaved, ocr, video
from pipelines.kind import Kind

REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Plug a kind in (the built-in ones below; tests and extensions add their own)."""
    REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def get(name: str) -> Kind:
    if name not in REGISTRY:
        raise KeyError(f"no corpus kind {name!r} is registered (registered: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


register(image_text.KIND)
register(grounding.KIND)
register(gui.KIND)
register(interleaved.KIND)
register(ocr.KIND)
register(video.KIND)
