"""Inputs: the seeded sample generator, MovieLens readers, and the validating loader.

Every source ends as the same two Parquet files in an inputs folder:
    interactions.parquet  user_id int64, item_id int64, rating float32, ts timestamp[s, UTC]
    items.parquet         item_id int64, title string, genres list<string>
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.errors import InputError

LOG = logging.getLogger(__name__)

INTERACTIONS = "interactions.parquet"
ITEMS = "items.parquet"

INTERACTIONS_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                                 ("rating", pa.float32()), ("ts", pa.timestamp("s", tz="UTC"))])
ITEMS_SCHEMA = pa.schema([("item_id", pa.int64()), ("title", pa.string()), ("genres", pa.list_(pa.string()))])

# The sample's clock is fixed, so the same seed gives the same files on any day.
SAMPLE_END = datetime(2026, 1, 1, tzinfo=timezone.utc)
# Up to this many items the generator scores every user against every item.
_FULL_MATRIX_ITEMS = 20_000
_ADJECTIVES = ("Silent", "Crimson", "Last", "Hidden", "Electric", "Golden", "Broken", "Distant", "Wild", "Final",
               "Frozen", "Secret", "Midnight", "Lost", "Bright", "Iron")
_NOUNS = ("River", "Empire", "Garden", "Signal", "Harbor", "Machine", "Summer", "Kingdom", "Voyage", "Mirror",
          "Frontier", "Orchard", "Storm", "Letter", "Circus", "Planet")
_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
           "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


@dataclass
class Inputs:
    interactions: pd.DataFrame
    items: pd.DataFrame
    fingerprint: str
    folder: Path


# --- the sample --------------------------------------------------------------------
def generate_sample(users: int, items: int, interactions: int, genres: int = 18, days: int = 180,
                    seed: int = 42, factors: int = 16) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded sample with latent-factor structure and long-tailed item popularity.

    Items belong to genre clusters in factor space, so nearest neighbours mean something;
    each user draws items without replacement with probability ~ popularity * exp(affinity).
    """
    if interactions > users * items // 2:
        raise ValueError("interactions must be at most half of users x items")
    rng = np.random.default_rng(seed)
    n_genres = max(1, genres)
    centres = rng.normal(size=(n_genres, factors)) * 1.5
    primary = rng.integers(0, n_genres, size=items)
    item_f = centres[primary] + rng.normal(scale=0.7, size=(items, factors))
    user_f = centres[rng.integers(0, n_genres, size=users)] + rng.normal(scale=1.0, size=(users, factors))
    # Zipf-like popularity over a random permutation of items.
    log_pop = -1.0 * np.log(rng.permutation(items) + 1.0)
    # Heavy-tailed activity per user, summing to the requested total.
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=users)
    per_user = np.maximum(1, np.round(activity / activity.sum() * interactions)).astype(np.int64)
    per_user = np.minimum(per_user, items // 2)
    diff = interactions - per_user.sum()
    order = np.argsort(-activity)
    i = 0
    while diff != 0:  # nudge the most active users until the total is exact
        u = order[i % users]
        step = 1 if diff > 0 else -1
        if 1 <= per_user[u] + step <= items // 2:
            per_user[u] += step
            diff -= step
        i += 1
    scale = np.sqrt(factors)
    user_rows, item_rows, ratings = [], [], []
    item_bias = rng.normal(scale=0.35, size=items)
    user_bias = rng.normal(scale=0.3, size=users)
    pop = np.exp(log_pop)
    pop /= pop.sum()
    # Large catalogues: score affinity only on candidates drawn by popularity (the full
    # users x items matrix would not fit); small ones: every item is a candidate.
    n_cand = items if items <= _FULL_MATRIX_ITEMS else None
    chunk = max(1, 2_000_000 // (n_cand or 2000))
    for start in range(0, users, chunk):
        stop = min(users, start + chunk)
        if n_cand is not None:
            cand = np.broadcast_to(np.arange(items), (stop - start, items))
        else:
            width = int(min(items, max(200, 8 * per_user[start:stop].max())))
            cand = rng.choice(items, size=(stop - start, width), p=pop)  # with replacement: fast
        raw_aff = np.einsum("uf,ucf->uc", user_f[start:stop], item_f[cand]) / scale
        # Standardise per user, so ratings spread around the scale's middle whatever the draw.
        affinity = (raw_aff - raw_aff.mean(axis=1, keepdims=True)) / raw_aff.std(axis=1, keepdims=True)
        # Gumbel top-k: sampling without replacement proportional to exp(logits).
        base = log_pop[cand] if n_cand is not None else 0.0  # candidates were already drawn by popularity
        logits = base + 1.2 * affinity + rng.gumbel(size=affinity.shape)
        for r in range(stop - start):
            n = per_user[start + r]
            if n_cand is not None:
                pick = np.argpartition(-logits[r], n - 1)[:n]
            else:  # candidates may repeat: keep each item's best draw, then the top n
                order = np.argsort(-logits[r])
                _, first = np.unique(cand[r, order], return_index=True)
                pick = order[np.sort(first)[:n]]
                n = len(pick)
            chosen = cand[r, pick]
            user_rows.append(np.full(n, start + r))
            item_rows.append(chosen)
            raw = 2.6 + 0.7 * affinity[r, pick] + item_bias[chosen] + user_bias[start + r]
            ratings.append(raw + rng.normal(scale=0.6, size=n))
    u = np.concatenate(user_rows)
    it = np.concatenate(item_rows)
    rating = np.clip(np.round(np.concatenate(ratings)), 1, 5).astype(np.float32)
    span = days * 86400
    ts = SAMPLE_END.timestamp() - span + np.sort(rng.uniform(0, span, size=len(u)))
    ts = ts[rng.permutation(len(u))]
    inter = pd.DataFrame({"user_id": u.astype(np.int64) + 1, "item_id": it.astype(np.int64) + 1,
                          "rating": rating, "ts": pd.to_datetime(ts.astype(np.int64), unit="s", utc=True)})
    names = [_GENRES[g % len(_GENRES)] + ("" if g < len(_GENRES) else f" {g // len(_GENRES) + 1}")
             for g in range(n_genres)]
    second = rng.integers(0, n_genres, size=items)
    has_second = rng.random(items) < 0.3
    item_genres = [[names[p]] + ([names[s]] if h and s != p else []) for p, s, h in zip(primary, second, has_second)]
    titles = [f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} {_NOUNS[rng.integers(len(_NOUNS))]} ({1950 + i % 75})"
              for i in range(items)]
    item_df = pd.DataFrame({"item_id": np.arange(1, items + 1, dtype=np.int64), "title": titles,
                            "genres": item_genres})
    return inter.sort_values(["ts", "user_id", "item_id"], kind="stable").reset_index(drop=True), item_df


def write_inputs(folder: Path, interactions: pd.DataFrame, items: pd.DataFrame) -> None:
    """Write the two input files atomically (``name.tmp`` then ``os.replace``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame, schema in ((INTERACTIONS, interactions, INTERACTIONS_SCHEMA), (ITEMS, items, ITEMS_SCHEMA)):
        table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
        tmp = folder / f"{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, folder / name)


# --- MovieLens ------------------------------------------------------------------------
def detect_movielens(path: Path) -> str:
    path = Path(path)
    if (path / "u.data").is_file():
        return "100k"
    if (path / "ratings.csv").is_file():
        return "csv"
    raise InputError(path, None, "not a MovieLens folder: expected u.data (100K layout) or ratings.csv (CSV layout)")


def read_movielens(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read either MovieLens layout into (interactions, items) frames of the input schema."""
    layout = detect_movielens(path)
    return read_movielens_100k(path) if layout == "100k" else read_movielens_csv(path)


def read_movielens_100k(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    path = Path(path)
    data = _read_csv(path / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "ts"])
    genre_names = list(_GENRES_100K)
    if (path / "u.genre").is_file():
        g = _read_csv(path / "u.genre", sep="|", header=None, names=["name", "index"], skip_blank_lines=True)
        genre_names = [str(n) for n in g.sort_values("index")["name"]]
    cols = ["item_id", "title", "release_date", "video_release_date", "url"] + [f"g{i}" for i in range(len(genre_names))]
    items = _read_csv(path / "u.item", sep="|", header=None, names=cols, encoding="latin-1")
    flags = items[[f"g{i}" for i in range(len(genre_names))]].to_numpy()
    genres = [[genre_names[j] for j in np.flatnonzero(row)] for row in flags]
    return _frames(data, path / "u.data", items["item_id"], items["title"].fillna(""), genres, path / "u.item")


_GENRES_100K = ("unknown",) + _GENRES


def read_movielens_csv(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    path = Path(path)
    ratings = _read_csv(path / "ratings.csv")
    movies = _read_csv(path / "movies.csv")
    _require(ratings, path / "ratings.csv", ["userId", "movieId", "rating", "timestamp"])
    _require(movies, path / "movies.csv", ["movieId", "title", "genres"])
    # Checked under the file's own column names, so an error names what the user sees.
    for col in ("userId", "movieId", "timestamp"):
        _check_csv_column(ratings[col], path / "ratings.csv", col, integer=True)
    _check_csv_column(ratings["rating"], path / "ratings.csv", "rating", integer=False)
    data = ratings.rename(columns={"userId": "user_id", "movieId": "item_id", "timestamp": "ts"})
    genres = [[] if (not isinstance(g, str) or g == "(no genres listed)") else g.split("|")
              for g in movies["genres"]]
    return _frames(data, path / "ratings.csv", movies["movieId"], movies["title"].fillna("").astype(str), genres,
                   path / "movies.csv", "movieId")


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except pd.errors.EmptyDataError:
        raise InputError(path, None, "file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, None, f"cannot parse: {str(exc).splitlines()[0]}") from None


def _require(frame: pd.DataFrame, path: Path, columns: list[str]) -> None:
    for col in columns:
        if col not in frame.columns:
            raise InputError(path, col, "missing column")


def _frames(data, data_path, item_ids, titles, genres, items_path=None, item_col="item_id"
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    for col in ("user_id", "item_id", "ts"):
        _check_csv_column(data[col], data_path, col, integer=True)
    _check_csv_column(data["rating"], data_path, "rating", integer=False)
    if items_path is not None:
        _check_csv_column(pd.Series(item_ids), items_path, item_col, integer=True)
    inter = pd.DataFrame({"user_id": data["user_id"].astype(np.int64), "item_id": data["item_id"].astype(np.int64),
                          "rating": data["rating"].astype(np.float32),
                          "ts": pd.to_datetime(data["ts"].astype(np.int64), unit="s", utc=True)})
    items = pd.DataFrame({"item_id": pd.Series(item_ids).astype(np.int64).to_numpy(),
                          "title": pd.Series(titles).astype(str).to_numpy(), "genres": genres})
    return inter, items


def _check_csv_column(values: pd.Series, path: Path, column: str, integer: bool) -> None:
    """A CSV column must hold numbers only (integers for ids and timestamps): a float or mixed column is
    refused here rather than truncated or failing mid-run. ``column`` is the name the file uses."""
    empty = int(values.isna().sum())
    if empty:
        raise InputError(path, column, f"{empty} empty values")
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        as_num = pd.to_numeric(values, errors="coerce")
        first = values[as_num.isna()].iloc[0] if as_num.isna().any() else values.iloc[0]
        raise InputError(path, column, f"non-numeric values (first: {first!r}), expected "
                                       + ("integers" if integer else "numbers"))
    if integer and not pd.api.types.is_integer_dtype(values):
        frac = values[values != np.floor(values)]
        detail = f"first: {float(frac.iloc[0])!r}" if len(frac) else "written as floats, e.g. 1.0"
        raise InputError(path, column, f"{values.dtype} values ({detail}), expected integers")


# --- loading and validation -------------------------------------------------------------
def load_inputs(folder: Path, rating_min: float = 0.5, rating_max: float = 5.0) -> Inputs:
    """Read and validate the input folder; any problem is an InputError naming the file and field."""
    folder = Path(folder)
    ipath, tpath = folder / INTERACTIONS, folder / ITEMS
    inter = _read_parquet(ipath, INTERACTIONS_SCHEMA)
    items = _read_parquet(tpath, ITEMS_SCHEMA)
    if items["item_id"].duplicated().any():
        dup = items.loc[items["item_id"].duplicated(), "item_id"].iloc[0]
        raise InputError(tpath, "item_id", f"duplicate id {dup}")
    r = inter["rating"].to_numpy()
    bad = ~np.isfinite(r) | (r < rating_min) | (r > rating_max)
    if bad.any():
        raise InputError(ipath, "rating", f"{int(bad.sum())} values are NaN or outside [{rating_min}, {rating_max}] "
                                          f"(first: {r[bad][0]!r})")
    pairs = inter.duplicated(["user_id", "item_id"])
    if pairs.any():
        row = inter.loc[pairs].iloc[0]
        raise InputError(ipath, "user_id, item_id",
                         f"{int(pairs.sum())} duplicate pairs (first: user {row.user_id}, item {row.item_id})")
    unknown = ~inter["item_id"].isin(items["item_id"])
    if unknown.any():
        raise InputError(ipath, "item_id", f"{int(unknown.sum())} rows name items missing from {ITEMS} "
                                           f"(first: {inter.loc[unknown, 'item_id'].iloc[0]})")
    return Inputs(inter, items, fingerprint_files([ipath, tpath]), folder)


# What each input column may be stored as. Anything else stops the run before training: a string or
# float id column would otherwise be cast ("7" -> 7, 7.9 -> 7) or fail deep inside training.
_KINDS = {"user_id": "id", "item_id": "id", "rating": "number", "ts": "time", "title": "text", "genres": "texts"}
_EXPECTED = {"id": "expected an integer type (int64)", "number": "expected a numeric type (float32)",
             "time": "expected a timestamp or integer seconds since 1970",
             "text": "expected string", "texts": "expected list<string>"}
# Timestamps outside these years are a unit mistake (e.g. milliseconds read as seconds), not history.
_TS_RANGE = (pd.Timestamp("1970-01-01", tz="UTC"), pd.Timestamp("2200-01-01", tz="UTC"))


def _type_ok(kind: str, t: pa.DataType) -> bool:
    if kind == "id":
        return pa.types.is_integer(t)
    if kind == "number":
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    if kind == "time":
        return pa.types.is_timestamp(t) or pa.types.is_integer(t)
    if kind == "text":
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    if kind == "texts":
        return ((pa.types.is_list(t) or pa.types.is_large_list(t))
                and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)))
    raise ValueError(f"unknown column kind {kind!r}")


def _read_parquet(path: Path, schema: pa.Schema) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, None, "file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, None, f"not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise InputError(path, None, "file has no rows")
    for f in schema:
        if f.name not in table.column_names:
            raise InputError(path, f.name, "missing column")
        col = table.column(f.name)
        if pa.types.is_dictionary(col.type):  # a pandas categorical: judge the values, not the codes
            col = col.cast(col.type.value_type)
        kind = _KINDS[f.name]
        if not _type_ok(kind, col.type):
            raise InputError(path, f.name, f"type {col.type}, {_EXPECTED[kind]}")
        if col.null_count:
            raise InputError(path, f.name, f"{col.null_count} null values")
        try:
            # Timestamps may lose sub-second precision (unsafe cast); ids and ratings must not change.
            col = col.cast(f.type, safe=not pa.types.is_timestamp(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InputError(path, f.name, f"type {table.column(f.name).type} cannot be read as {f.type} "
                                           f"({str(exc).splitlines()[0]})") from None
        table = table.set_column(table.schema.get_field_index(f.name), f.name, col)
    if "user_id" in schema.names and pc.min(table.column("user_id")).as_py() < 0:
        raise InputError(path, "user_id", "negative ids")
    if pc.min(table.column("item_id")).as_py() < 0:
        raise InputError(path, "item_id", "negative ids")
    if "ts" in schema.names:
        lo, hi = pc.min_max(table.column("ts").cast(pa.int64())).values()
        bad = [v for v in (lo.as_py(), hi.as_py()) if not _TS_RANGE[0].timestamp() <= v < _TS_RANGE[1].timestamp()]
        if bad:
            raise InputError(path, "ts", f"{bad[0]} s since 1970 is outside 1970-2199 (integer timestamps are "
                                         f"read as seconds, not milliseconds)")
    return table.select(schema.names).to_pandas()


def fingerprint_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()
