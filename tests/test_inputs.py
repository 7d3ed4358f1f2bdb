"""Inputs: the sample, both MovieLens layouts, and every kind of bad input."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.__main__ import main
from batch.inputs import INTERACTIONS, ITEMS, generate_sample, load_inputs, read_movielens
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
        pq.write_table(_table(inter), ip); return f"{ip}: user_id: type "
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
    assert kind != "text_ids" or err.rstrip().endswith("cannot be read as int64")
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
