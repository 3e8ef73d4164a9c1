"""A corpus kind defined only here, to show that a kind plugs into the spine without touching it.

`toy_cards`: a folder of images `{name}.png` with captions `{name}.txt`. Each card has one sub-item,
its centre crop (unit `crop`). Rules: a card's caption must name a colour (`no_colour_word`, this
kind's own reason); any image, card or crop, that is one solid colour is dropped (`solid_color`, the
shared image reason). A sample is the card's image, its text, and the crop when the crop was kept.
It reuses the shared stages (decode, spool) and declares everything else here: schema, reasons,
contract, plan; the trainer formatter is registered by the test.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage, apply_stages
from filters.decode import Decode
from filters.media import Spool, read_ref, ref_column, size_column
from filters.rules import first_reason, image_checks
from pipelines.checkpoint import fingerprint
from pipelines.kind import Context, Kind, Plan, Step
from schemas import ledger as L
from schemas.common import ERROR, ERROR_DETAIL, IDENTITY_FIELDS, SAMPLE_ID, SAMPLE_ID_REGEX, make_sample_id
from schemas.contract import Check, Contract, Field, Member

NAME = "toy_cards"
COLOURS = ("red", "green", "blue", "yellow")
ROWS = pa.schema(IDENTITY_FIELDS + [
    pa.field(L.UNIT, pa.string()), pa.field(L.PARENT_ID, pa.string()), pa.field("path", pa.string()),
    pa.field("caption", pa.string()),
])
REASONS = L.reasons(L.IMAGE, (L.Reason("no_colour_word", L.DROPPED, "rules", "the caption names no colour",
                                       shows=("caption_chars",)),), L.STRUCTURE)


@dataclasses.dataclass(frozen=True)
class Toy:
    """The recipe section `toy_cards`."""

    decode: Decode = Decode()
    min_pixel_std: float = 2.0
    crop: float = 0.25  # the crop is the centre square of this share of the shorter side


@dataclasses.dataclass(frozen=True)
class ReadToy(Stage):
    """Reads `path`; writes `image` (the file, or for a crop its centre cropped, as PNG), `error`."""

    name: ClassVar[str] = "read_toy"
    crop: float = 0.25

    def adds(self) -> list[pa.Field]:
        return [pa.field("image", pa.binary()), pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        from PIL import Image

        out: dict[str, list] = {"image": [], ERROR: [], ERROR_DETAIL: []}
        for path, unit in zip(batch.column("path").to_pylist(), batch.column(L.UNIT).to_pylist()):
            with open(path, "rb") as f:
                data = f.read()
            if unit == "crop":
                # a crop that cannot be made keeps the bytes: the shared decode stage names the problem
                with contextlib.suppress(Exception):
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                    side = max(1, int(min(img.size) * self.crop))
                    x, y = (img.width - side) // 2, (img.height - side) // 2
                    buf = io.BytesIO()
                    img.crop((x, y, x + side, y + side)).save(buf, format="PNG")
                    data = buf.getvalue()
            out["image"].append(data)
            out[ERROR].append(None)
            out[ERROR_DETAIL].append(None)
        return out


def contract(cfg: Toy | None = None, facts: dict | None = None) -> Contract:
    return Contract(
        kind=NAME,
        members=(Member("jpg", "jpeg", thumbnail=True), Member("crop.jpg", "jpeg", required=False),
                 Member("txt", "text"), Member("json", "json")),
        fields=(
            Field("sample_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("caption", "str", False),
            Field("width", "int", False, 1, 65535), Field("height", "int", False, 1, 65535),
            Field("has_crop", "bool", False),
            Field("colour", "str", False, values=COLOURS, plot="bars", description="colour named by the caption"),
            Field("caption_chars", "int", True, 1, None, derive=lambda d: len(d["caption"]), plot="hist",
                  marks=((1, "min 1"),)),
        ),
        checks=(Check("crop_member_matches", "a .crop.jpg member exactly when has_crop",
                      lambda members, doc: ("crop.jpg" in members) == doc["has_crop"]),),
        text_field="caption",
    )


def _colour(caption: str | None) -> str | None:
    words = (caption or "").lower().split()
    return next((c for c in COLOURS if c in words), None)


def to_sample(row: dict) -> dict:
    doc = {"sample_id": row[SAMPLE_ID], "caption": row["caption"], "width": row["width"], "height": row["height"],
           "has_crop": row["crop_ref"] is not None, "colour": _colour(row["caption"])}
    sample = {"__key__": row[SAMPLE_ID], "jpg": read_ref(row[ref_column("image")]),
              "txt": row["caption"].encode(), "json": json.dumps(doc, sort_keys=True).encode()}
    if row["crop_ref"] is not None:
        sample["crop.jpg"] = read_ref(row["crop_ref"])
    return sample


def plan(ctx: Context) -> Plan:
    cfg: Toy = ctx.cfg
    folder = ctx.uris[0]
    names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".png"))
    key = fingerprint(NAME, sorted(ctx.uris), names, cfg)
    spool = Spool(directory=f"{ctx.work_dir}/media/{NAME}-{key}", columns=("image",))

    def features():
        rows = []
        for n in names:
            path = os.path.join(folder, n + ".png")
            with open(os.path.join(folder, n + ".txt"), encoding="utf-8") as f:
                caption = f.read().strip()
            card = make_sample_id(NAME, path, n)
            rows.append({SAMPLE_ID: card, "kind": NAME, "source": path, "source_key": n, L.UNIT: "card",
                         L.PARENT_ID: None, "path": path, "caption": caption})
            rows.append({SAMPLE_ID: make_sample_id(NAME, path, n + "#crop"), "kind": NAME, "source": path,
                         "source_key": n + "#crop", L.UNIT: "crop", L.PARENT_ID: card, "path": path, "caption": None})
        df = ctx.spark.createDataFrame(pa.Table.from_pylist(rows, schema=ROWS).to_pandas(),
                                       schema="sample_id string, kind string, source string, source_key string, "
                                              "unit string, parent_id string, path string, caption string")
        return apply_stages(df.repartition(2), [ReadToy(cfg.crop), cfg.decode, spool], ctx.timer)

    def rules(F):
        no_colour = (F.col(L.UNIT) == "card") & ~F.lower(F.col("caption")).rlike(r"\b(" + "|".join(COLOURS) + r")\b")
        # the shared image rules (size, aspect, solid colour) on cards and crops alike, then the kind's own
        return first_reason([*image_checks(1, 100.0, cfg.min_pixel_std), (no_colour, F.lit("no_colour_word"))])

    def samples(alive):
        from pyspark.sql import functions as F

        crops = alive.filter(F.col(L.UNIT) == "crop").select(F.col(L.PARENT_ID).alias("_card"),
                                                             F.col(ref_column("image")).alias("crop_ref"),
                                                             F.col(size_column("image")).alias("crop_size"))
        cards = alive.filter(F.col(L.UNIT) == "card")
        return cards.join(crops, cards[SAMPLE_ID] == crops["_card"], "left").drop("_card")

    return Plan(
        features=features, key=key, steps=[Step("rules", reason=rules, depends=cfg)], to_sample=to_sample,
        sample_size=lambda F: F.col(size_column("image")) + F.coalesce(F.col("crop_size"), F.lit(0)) + 400,
        samples=samples,
        report={"caption_chars": lambda F: F.length("caption"), "pixel_std": lambda F: F.col("pixel_std"),
                "colour": lambda F: F.regexp_extract(F.lower("caption"), r"\b(" + "|".join(COLOURS) + r")\b", 1)},
        thumbnail="image", text="caption", facts={"toy": {"crop": cfg.crop}},
        assertions=[{"name": "some_crops_kept", "severity": "warning", "ok": True, "description": "crops kept"}],
    )


KIND = Kind(name=NAME, config=Toy, units=("card", "crop"), reasons=REASONS, contract=contract, plan=plan,
            layouts=("a folder of {name}.png + {name}.txt",))
