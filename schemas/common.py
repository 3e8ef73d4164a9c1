"""Columns every corpus shares, and the Arrow -> Spark type bridge."""
from __future__ import annotations

import hashlib

import pyarrow as pa

# Identity of an input item. sample_id is derived from (kind, source, source_key), so the same
# input always gets the same id and the same shard position.
SAMPLE_ID = "sample_id"
KIND = "kind"
SOURCE = "source"
SOURCE_KEY = "source_key"
# Set by the reader or a row-wise stage when an item is unusable: a stable snake_case code and a
# free-text detail. A non-null ERROR means the item is quarantined.
ERROR = "error"
ERROR_DETAIL = "error_detail"
# The read unit an item came from (a tar, a table or its part, a folder's loose files): the reader
# counts the items of every unit as it reads them, and the ledger is reconciled with those counts.
READ_UNIT = "read_unit"

IDENTITY_FIELDS = [
    pa.field(SAMPLE_ID, pa.string(), nullable=False),
    pa.field(KIND, pa.string(), nullable=False),
    pa.field(SOURCE, pa.string(), nullable=False),
    pa.field(SOURCE_KEY, pa.string(), nullable=False),
]
SAMPLE_ID_REGEX = r"[0-9a-f]{32}"  # what make_sample_id gives
ERROR_FIELDS = [pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]


def make_sample_id(kind: str, source: str, source_key: str) -> str:
    """32 hex chars (128 bits) of sha1 over the item's identity; stable across runs and machines. At 1e9
    items the chance that any two ids collide is about n^2 / 2^129 = 1.5e-21 (64 bits: 2.7 %)."""
    h = hashlib.sha1(f"{kind}\x00{source}\x00{source_key}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def spark_type(schema: pa.Schema):
    """The Spark StructType for an Arrow schema (import is lazy: stage code stays Spark-free)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)
