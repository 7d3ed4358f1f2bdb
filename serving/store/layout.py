"""Every name in a store, and the snapshot layout: one folder per model.

    <root>/CURRENT                      the live snapshot id
    <root>/snapshots/<id>/              immutable once published
        manifest.json                   written last; lists every other file with its sha256
        models/<name>/                  one folder per model; the model kind owns the names inside
            recommender/                similar_items.parquet, user_recs.parquet, items.parquet,
                                        the bundle (vectors, FAISS index, seen items), serving arrays
            rating/                     predictions.parquet, the rating model's arrays
            <registered>/               predictions.parquet, spec.json, the artifact
    <root>/snapshots/.tmp-<id>/         a snapshot being written (parts/ holds the precompute's
                                        Parquet parts until they are assembled)
    <root>/requests/seg-*.parquet       request-log segments, one per flush per process
    <root>/requests/quarantine/         segments a run found unreadable (``*.damaged``), moved out of the way
    <root>/models/<key>/                trained models, reused while the inputs are unchanged
    <root>/pending-runs/*.json          run records waiting for the catalog
    <root>/catalog.duckdb               for people and tools; the API never opens it

Format 2 (before one folder per model) kept the recommender and the rating model in ``model/``, their
precomputed arrays in ``serving/`` and their tables at the top; it still loads (``table_file``).
"""
from __future__ import annotations

import re

import pyarrow as pa

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)

CURRENT = "CURRENT"
SNAPSHOTS = "snapshots"
REQUESTS = "requests"
TRAINED = "models"
PENDING_RUNS = "pending-runs"
CATALOG = "catalog.duckdb"
MANIFEST = "manifest.json"
MODELS = "models"
PARTS = "parts"
TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"
SEGMENT_PREFIX = "seg-"
SCHEMA_SEGMENT = "_schema.parquet"   # an empty, typed segment: SQL over the log works before any traffic
QUARANTINE = "quarantine"            # requests/quarantine/<segment>.damaged: unreadable segments, kept for a look
QUARANTINE_SUFFIX = ".damaged"       # not .parquet: no glob over the log reaches them again

SNAPSHOT_ID = re.compile(r"^\d{8}-\d{6}-\d{6}$")
SNAPSHOT_ID_IN_PATH = r"/snapshots/(\d{8}-\d{6}-\d{6})/"

# The built-in models' names: the lookup routes of the API answer from these two.
RECOMMENDER, RATING = "recommender", "rating"

# The contract tables (DESIGN "The store"), each kept by one model in its folder.
TABLES = ("similar_items", "user_recs", "predictions", "items")
TABLE_OWNER = {"similar_items": RECOMMENDER, "user_recs": RECOMMENDER, "items": RECOMMENDER, "predictions": RATING}

# Format 2's folders
LEGACY_MODEL_DIR, LEGACY_SERVING_DIR = "model", "serving"

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "similar_items": pa.schema([("item_id", pa.int64()), ("neighbor_ids", pa.list_(pa.int64())),
                                ("scores", pa.list_(pa.float32()))]),
    "user_recs": pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64())),
                            ("scores", pa.list_(pa.float32()))]),
    "predictions": pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("prediction", pa.float32())]),
    "items": pa.schema([("item_id", pa.int64()), ("title", pa.string()), ("genres", pa.list_(pa.string()))]),
}

REQUEST_LOG_SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")),
    ("endpoint", pa.string()),
    ("item_id", pa.int64()),
    ("user_id", pa.int64()),
    ("k", pa.int32()),
    ("source", pa.string()),
    ("status", pa.int16()),
    ("latency_us", pa.int64()),
    # registered models (GET /v1/models/<name>/predict, and /v1/predictions as model 'rating'): the model's
    # name and the canonical input (serving.models.base.canonical_key); null for other endpoints
    ("model", pa.string()),
    ("input", pa.string()),
])

# The request-log endpoints that are lookups: what /metrics' hit rate and a run's observed hit rate count.
LOOKUP_ENDPOINTS = ("similar_items", "user_recs", "prediction", "session", "model")


def model_folder(name: str) -> str:
    """A model's folder, relative to its snapshot."""
    return f"{MODELS}/{name}"


def table_file(table: str, format_version: int = FORMAT_VERSION) -> str:
    """A contract table's file, relative to its snapshot."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    if format_version == 2:
        return f"{table}.parquet"
    return f"{model_folder(TABLE_OWNER[table])}/{table}.parquet"


def model_table_file(name: str) -> str:
    """A registered model's precomputed predictions, relative to its snapshot (both formats)."""
    return f"{model_folder(name)}/predictions.parquet"


def part_file(model: str, table: str, part: int) -> str:
    """One precompute partition's Parquet part, relative to the snapshot being written."""
    return f"{PARTS}/{model}/{table}/part-{part:05d}.parquet"
