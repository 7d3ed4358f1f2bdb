"""Inputs: the sample, both MovieLens layouts, and every kind of bad input."""
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.__main__ import main
from batch.inputs import INTERACTIONS, ITEMS, generate_sample, load_inputs, read_movielens
from serving.errors import InputError
from serving.store import Store

from conftest import ML100K, REPO


def test_sample_is_deterministic_and_long_tailed():
    a_inter, a_items = generate_sample(200, 300, 6000, genres=5, seed=3)
    b_inter, b_items = generate_sample(200, 300, 6000, genres=5, seed=3)
    pd.testing.assert_frame_equal(a_inter, b_inter)
    pd.testing.assert_frame_equal(a_items, b_items)
    assert len(a_inter) == 6000 and not a_inter.duplicated(["user_id", "item_id"]).any()
    counts = a_inter["item_id"].value_counts().to_numpy()
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum(), "top 10% of items take a large share"
    assert set(a_inter["rating"].unique()) <= {1, 2, 3, 4, 5} and a_inter["rating"].nunique() >= 4
    c_inter, _ = generate_sample(200, 300, 6000, genres=5, seed=4)
    assert not c_inter.equals(a_inter)


@pytest.mark.skipif(not (ML100K / "u.data").is_file(),
                    reason=f"MovieLens 100K is not at {ML100K} (its licence keeps it out of the repository; "
                           "a clone outside the shared workspace has no copy)")
def test_movielens_100k_real_copy():
    inter, items = read_movielens(ML100K)
    assert len(inter) == 100_000
    assert inter["user_id"].nunique() == 943
    assert len(items) == 1682 and items["item_id"].is_unique
    title = items.set_index("item_id")["title"]
    assert title[1] == "Toy Story (1995)"
    assert any("Misérables" in t for t in items["title"])  # Latin-1 decoded
    genres = items.set_index("item_id")["genres"]
    assert list(genres[1]) == ["Animation", "Children's", "Comedy"]
    assert inter["ts"].min() >= pd.Timestamp("1997-09-01", tz="UTC")


def test_movielens_csv_layout_with_quotes_and_crlf(tmp_path):
    src = REPO / "tests" / "fixtures" / "ml-csv"
    assert b"\r\n" in (src / "movies.csv").read_bytes()
    inter, items = read_movielens(src)
    assert len(inter) == 6 and sorted(inter["user_id"].unique()) == [1, 2, 7]
    assert sorted(inter["rating"].unique().tolist()) == [0.5, 2.5, 3.5, 4.0, 4.5, 5.0]
    t = items.set_index("item_id")
    assert t.loc[10, "title"] == "Shop Around the Corner, The (1940)"
    assert t.loc[1001, "title"] == 'Quote "Inside", Commas, Too (2001)'
    assert list(t.loc[10, "genres"]) == ["Comedy", "Drama", "Romance"] and list(t.loc[25, "genres"]) == []
    # through the CLI, into loadable inputs
    assert main(["import-movielens", str(src), "--out", str(tmp_path / "ml")]) == 0
    loaded = load_inputs(tmp_path / "ml")
    assert len(loaded.interactions) == 6 and set(loaded.items["item_id"]) == {10, 25, 1001}


def _table(frame):
    return pa.Table.from_pandas(frame, preserve_index=False)


def _corrupt(kind, inputs):
    ip, tp = inputs / INTERACTIONS, inputs / ITEMS
    inter = pq.read_table(ip).to_pandas()
    items = pq.read_table(tp).to_pandas()
    if kind == "missing":
        ip.unlink(); return f"{ip}: file not found"
    if kind == "empty":
        pq.write_table(_table(inter.iloc[:0]), ip); return f"{ip}: file has no rows"
    if kind == "malformed":
        ip.write_bytes(b"user_id,item_id\n1,2\n"); return f"{ip}: not a readable Parquet file"
    if kind == "missing_column":
        pq.write_table(_table(inter.drop(columns=["rating"])), ip); return f"{ip}: rating: missing column"
    if kind == "nan_rating":
        inter.loc[3, "rating"] = np.nan
        pq.write_table(_table(inter), ip); return f"{ip}: rating: 1 null values"
    if kind == "out_of_range":
        inter.loc[5, "rating"] = 11.0
        pq.write_table(_table(inter), ip); return f"{ip}: rating: 1 values are NaN or outside [0.5, 5.0]"
    if kind == "duplicate_item":
        items = pd.concat([items, items.iloc[[0]]])
        pq.write_table(_table(items), tp); return f"{tp}: item_id: duplicate id {items.iloc[0].item_id}"
    if kind == "duplicate_pair":
        inter = pd.concat([inter, inter.iloc[[0]]])
        pq.write_table(_table(inter), ip); return f"{ip}: user_id, item_id: 1 duplicate pairs"
    if kind == "unknown_item":
        inter.loc[0, "item_id"] = 10**9
        pq.write_table(_table(inter), ip); return f"{ip}: item_id: 1 rows name items missing"
    if kind == "text_ids":
        inter["user_id"] = "u" + inter["user_id"].astype(str)
        pq.write_table(_table(inter), ip); return f"{ip}: user_id: type large_string, expected an integer type"
    raise AssertionError(kind)


BAD = ["missing", "empty", "malformed", "missing_column", "nan_rating", "out_of_range", "duplicate_item",
       "duplicate_pair", "unknown_item", "text_ids"]


def _store_state(store):
    return store.current_id(), store.snapshot_ids(), sorted(p.name for p in store.snapshots_dir.rglob("*"))


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_nonzero_exit_store_untouched(workspace, capsys, kind):
    root, settings, cfg, _ = workspace
    store = Store(settings["paths.store"])
    before = _store_state(store)
    want = _corrupt(kind, root / "inputs")
    rc = main(["--config", str(cfg), "run"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: " + want), err
    assert err.count("\n") == 1, err
    assert _store_state(store) == before


@pytest.mark.parametrize("content,want", [
    ("[batch]\nk_maxx = 3\n", "batch.k_maxx: unknown setting"),
    ("[batch]\nk_max = 2.5\n", "batch.k_max: expected int, got float 2.5"),
    ("[train]\nindex = \"LSH\"\n", "train.index: 'LSH' does not match"),
])
def test_bad_config_one_line_nonzero_exit_store_untouched(workspace, capsys, content, want):
    root, settings, cfg, _ = workspace
    store = Store(settings["paths.store"])
    before = _store_state(store)
    cfg.write_text(f'[paths]\nstore = "{settings["paths.store"]}"\ninputs = "{settings["paths.inputs"]}"\n'
                   + content)
    rc = main(["--config", str(cfg), "run"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"config error: {cfg}: {want}"), err
    assert err.count("\n") == 1, err
    assert _store_state(store) == before


def test_cli_process_exit_code_and_message(tmp_path):
    """The real `python -m batch` process: one line on stderr, exit 1."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\ninputs = "{tmp_path / "nothing"}"\nstore = "{tmp_path / "store"}"\n')
    proc = subprocess.run([sys.executable, "-m", "batch", "--config", str(cfg), "run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"error: {tmp_path / 'nothing' / INTERACTIONS}: file not found\n"


# --- strict input types: every column that is not stored as its kind stops the run before training ---
_SEC = pd.Timedelta(seconds=1)
WRONG_TYPES = {
    # name: (file, column, change, the type named in the error)
    "numeric_string_user_ids": (INTERACTIONS, "user_id", lambda f: f["user_id"].astype(str), "large_string"),
    "float_item_ids": (INTERACTIONS, "item_id", lambda f: f["item_id"].astype(np.float64), "double"),
    "mixed_ids_as_categorical_strings": (INTERACTIONS, "item_id",
                                         lambda f: f["item_id"].map(lambda v: f"i{v}" if v % 2 else str(v))
                                         .astype("category"), "string"),
    "string_ratings": (INTERACTIONS, "rating", lambda f: f["rating"].astype(str), "large_string"),
    "float_seconds_ts": (INTERACTIONS, "ts", lambda f: (f["ts"] - pd.Timestamp(0, tz="UTC")) / _SEC, "double"),
    "string_ts": (INTERACTIONS, "ts", lambda f: f["ts"].astype(str), "large_string"),
    "float_item_ids_in_items": (ITEMS, "item_id", lambda f: f["item_id"].astype(np.float64), "double"),
    "numeric_titles": (ITEMS, "title", lambda f: pd.Series(np.arange(len(f)), index=f.index), "int64"),
    "joined_genres": (ITEMS, "genres", lambda f: f["genres"].map("|".join), "large_string"),
}


@pytest.mark.parametrize("name", sorted(WRONG_TYPES))
def test_wrong_parquet_column_type_stops_the_run_before_training(workspace, capsys, monkeypatch, name):
    root, settings, cfg, _ = workspace
    filename, column, change, got_type = WRONG_TYPES[name]
    path = root / "inputs" / filename
    frame = pq.read_table(path).to_pandas()
    frame[column] = change(frame)
    pq.write_table(_table(frame), path)
    import batch.job

    def no_training(*args, **kwargs):
        raise AssertionError("training started on inputs of the wrong type")
    monkeypatch.setattr(batch.job, "train_and_evaluate", no_training)
    store = Store(settings["paths.store"])
    before = _store_state(store), sorted(p.name for p in store.models_dir.iterdir())
    rc = main(["--config", str(cfg), "run"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"error: {path}: {column}: type {got_type}, expected "), err
    assert err.count("\n") == 1, err
    assert (_store_state(store), sorted(p.name for p in store.models_dir.iterdir())) == before


def test_accepted_parquet_types_read_as_the_schema(tmp_path, sample_frames):
    """Narrower integers, categoricals of integers, integer ratings, integer epoch seconds and naive
    timestamps are what users write: they load, with the values unchanged."""
    inter, items = sample_frames
    seconds = ((inter["ts"] - pd.Timestamp(0, tz="UTC")) // _SEC).astype(np.int64)
    variant = inter.assign(user_id=inter["user_id"].astype(np.int32), item_id=inter["item_id"].astype("category"),
                           rating=inter["rating"].astype(np.int16), ts=seconds)
    pq.write_table(_table(variant), tmp_path / INTERACTIONS)
    pq.write_table(_table(items.assign(item_id=items["item_id"].astype(np.uint32))), tmp_path / ITEMS)
    got = load_inputs(tmp_path)
    np.testing.assert_array_equal(got.interactions["user_id"].to_numpy(), inter["user_id"].to_numpy())
    np.testing.assert_array_equal(got.interactions["item_id"].to_numpy(), inter["item_id"].to_numpy())
    np.testing.assert_array_equal(got.interactions["rating"].to_numpy(), inter["rating"].to_numpy())
    assert (got.interactions["ts"] == inter["ts"].dt.floor("s")).all()
    assert got.interactions["user_id"].dtype == np.int64 and got.items["item_id"].dtype == np.int64
    naive = inter.assign(ts=inter["ts"].dt.tz_localize(None))
    pq.write_table(_table(naive), tmp_path / INTERACTIONS)
    assert (load_inputs(tmp_path).interactions["ts"] == inter["ts"].dt.floor("s")).all()  # naive = UTC


def test_millisecond_integer_timestamps_are_refused(tmp_path, sample_frames):
    inter, items = sample_frames
    ms = ((inter["ts"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).astype(np.int64)
    pq.write_table(_table(inter.assign(ts=ms)), tmp_path / INTERACTIONS)
    pq.write_table(_table(items), tmp_path / ITEMS)
    with pytest.raises(InputError, match=r"interactions.parquet: ts: \d+ s since 1970 is outside 1970-2199 "
                                         r"\(integer timestamps are read as seconds, not milliseconds\)"):
        load_inputs(tmp_path)


CSV_WRONG = {
    # name: (file, text replaced once, replacement, column, message after the column)
    "string_user_id": ("ratings.csv", "\n1,10,", "\nu1,10,", "userId", "non-numeric values (first: 'u1'), expected integers"),
    "float_user_id": ("ratings.csv", "\n2,10,", "\n2.5,10,", "userId", "float64 values (first: 2.5), expected integers"),
    "integral_float_item_id": ("ratings.csv", "\n1,25,", "\n1,25.0,", "movieId",
                               "float64 values (written as floats, e.g. 1.0), expected integers"),
    "empty_item_id": ("ratings.csv", "\n1,25,", "\n1,,", "movieId", "1 empty values"),
    "string_rating": ("ratings.csv", ",4.0,", ",four,", "rating", "non-numeric values (first: 'four'), expected numbers"),
    "string_timestamp": ("ratings.csv", ",964982703", ",2000-07-30", "timestamp",
                         "non-numeric values (first: '2000-07-30'), expected integers"),
    "mixed_movie_id": ("movies.csv", "\n25,", "\nm25,", "movieId", "non-numeric values (first: 'm25'), expected integers"),
}


@pytest.mark.parametrize("name", sorted(CSV_WRONG))
def test_wrong_csv_column_type_stops_the_import(tmp_path, capsys, name):
    filename, old, new, column, message = CSV_WRONG[name]
    src = tmp_path / "ml"
    shutil.copytree(REPO / "tests" / "fixtures" / "ml-csv", src)
    text = (src / filename).read_bytes().replace(b"\r\n", b"\n").decode()
    assert old in text
    (src / filename).write_text(text.replace(old, new, 1))
    rc = main(["import-movielens", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == f"error: {src / filename}: {column}: {message}\n"
    assert not (tmp_path / "out").exists()


def test_wrong_100k_column_type_stops_the_import(tmp_path, capsys):
    src = tmp_path / "ml"
    src.mkdir()
    (src / "u.data").write_text("1\t10\t4\t881250949\n2\t1x\t3\t881250950\n")
    (src / "u.item").write_text("10|Ten (1990)|01-Jan-1990||http://x|" + "|".join("0" * 19) + "\n")
    rc = main(["import-movielens", str(src), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert capsys.readouterr().err == (f"error: {src / 'u.data'}: item_id: non-numeric values (first: '1x'), "
                                       f"expected integers\n")
