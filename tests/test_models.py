"""Registered scikit-learn models end to end: config, real skops/joblib/MLflow artifacts, a real batch
run and snapshot, the real Flask app. Stored predictions are compared with the model's own predict."""
from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import shutil
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skops.io as sio
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from batch.__main__ import main
from batch.job import run
from batch.sample_models import DEMAND_INPUTS, demand_frame, train_demand
from conftest import make_settings
from serving.app import create_app
from serving.errors import ConfigError
from serving.models.base import ModelSpec, canonical_key, canonical_keys, parse_models
from serving.settings import DEFAULT_MODELS_TOML, load_settings
from serving.store import Store
from test_api import Clock

TREES = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Children's"]
PRODUCTS = ["anvil", "rocket", "magnet"]


def _toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def models_toml(d: Path) -> str:
    """Three models: demand (skops, a grid), churn (joblib, predict_proba, a grid with a bool),
    price (skops, an open float input: candidates and the request log, and raises on an unknown product)."""
    return f"""
[models.demand]
artifact = "{d / 'demand.skops'}"
trusted_types = ["{TREES}"]
version = "d1"
max_age_s = 600.0
[[models.demand.inputs]]
name = "genre"
type = "string"
values = {_toml_list(GENRES)}
[[models.demand.inputs]]
name = "weekday"
type = "int"
min = 0
max = 6
[[models.demand.inputs]]
name = "discount"
type = "float"
required = false
default = 0.0
min = 0.0
max = 0.5

[models.churn]
artifact = "{d / 'churn.joblib'}"
format = "joblib"
trusted = true
output = "predict_proba"
class = 1
[[models.churn.inputs]]
name = "age"
type = "int"
min = 18
max = 30
[[models.churn.inputs]]
name = "plan"
type = "string"
values = ["basic", "pro"]
[[models.churn.inputs]]
name = "active"
type = "bool"

[models.price]
artifact = "{d / 'price.skops'}"
candidates = "{d / 'price_candidates.parquet'}"
max_age_s = 60.0
[[models.price.inputs]]
name = "product"
type = "string"
[[models.price.inputs]]
name = "size"
type = "float"
min = 0.0
"""


def write_artifacts(d: Path, interactions: pd.DataFrame, items: pd.DataFrame) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    frame = demand_frame(interactions, items)
    frame = frame[frame["genre"].isin(GENRES)]
    demand = train_demand(frame)
    sio.dump(demand, d / "demand.skops")
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"age": rng.integers(18, 31, 400), "plan": rng.choice(["basic", "pro"], 400),
                      "active": rng.random(400) < 0.5})
    y = ((X["age"] < 24) ^ X["active"]).astype(int).to_numpy()
    churn = Pipeline([("enc", ColumnTransformer([("plan", OneHotEncoder(), ["plan"])], remainder="passthrough")),
                      ("clf", LogisticRegression())]).fit(X, y)
    joblib.dump(churn, d / "churn.joblib")
    P = pd.DataFrame({"product": rng.choice(PRODUCTS, 200), "size": rng.uniform(0, 10, 200)})
    price = Pipeline([("enc", ColumnTransformer([("p", OneHotEncoder(handle_unknown="error"), ["product"])],
                                                remainder="passthrough")),
                      ("reg", LinearRegression())]).fit(P, P["size"] * 3 + (P["product"] == "rocket") * 50)
    sio.dump(price, d / "price.skops")
    pq.write_table(pa.table({"product": PRODUCTS, "size": [1.0, 2.5, 4.0]}), d / "price_candidates.parquet")
    return {"demand": demand, "churn": churn, "price": price}


def with_models(root: Path, extra: str = "", **overrides):
    """Settings (and config path) for a store under root, registering the test models."""
    settings, cfg = make_settings(root, **overrides)
    cfg.write_text(cfg.read_text() + models_toml(root / "artifacts") + extra)
    return load_settings(cfg, env={}), cfg


@pytest.fixture(scope="module")
def registered(tmp_path_factory, sample_frames):
    """One batch run with the three models on the small sample: (root, settings, cfg, result, estimators)."""
    from batch.inputs import write_inputs
    root = tmp_path_factory.mktemp("models")
    write_inputs(root / "inputs", *sample_frames)
    estimators = write_artifacts(root / "artifacts", *sample_frames)
    settings, cfg = with_models(root)
    return root, settings, cfg, run(settings), estimators


@pytest.fixture
def mws(tmp_path, registered):
    """A private copy of the registered-models store: (root, settings, cfg, first result, estimators)."""
    root, _, _, result, estimators = registered
    for sub in ("inputs", "store", "artifacts"):
        shutil.copytree(root / sub, tmp_path / sub, symlinks=True)
    settings, cfg = with_models(tmp_path)
    return tmp_path, settings, cfg, result, estimators


@pytest.fixture
def api(mws):
    root, settings, cfg, first, estimators = mws
    settings = settings.replace(serving__log_flush_interval_s=0.0, serving__log_flush_rows=100000,
                                serving__cache_ttl_s=300.0)
    clock = Clock(pd.Timestamp(first.manifest["created_at"]).timestamp() + 10.0)
    app = create_app(settings, clock=clock, background=False)
    yield app, app.test_client(), clock, settings, first, estimators
    app.extensions["hybridserve"].close()


def _stored(store: Store, sid: str, name: str) -> pd.DataFrame:
    return pd.read_parquet(store.snapshot_dir(sid) / "models" / name / "predictions.parquet")


# --- config --------------------------------------------------------------------------------
BAD_CONFIGS = [
    ('[models.m]\nartifact = "a.skops"\n[[models.m.inputs]]\nname = "x"\ntype = "decimal"\n',
     "models.m.inputs.x.type: must be one of int, float, string, bool, got 'decimal'"),
    ('[models.m]\nartifact = "a.joblib"\nformat = "joblib"\n[[models.m.inputs]]\nname = "x"\ntype = "int"\n',
     "models.m.trusted: format 'joblib' loads with pickle, which runs code from the file: set trusted = true "
     "only for an artifact you made (or use format = \"skops\")"),
    ('[models.m]\nartifact = "a.skops"\ncolour = 1\n[[models.m.inputs]]\nname = "x"\ntype = "int"\n',
     "models.m.colour: unknown key (allowed: artifact, candidates, class, format, grid_max_rows, inputs, "
     "max_age_s, max_log_rows, output, trusted, trusted_types, version)"),
    ('[models.m]\nartifact = "a.skops"\n[[models.m.inputs]]\nname = "x"\ntype = "int"\nmin = 5\nmax = 1\n',
     "models.m.inputs.x.max: is below min (1 < 5)"),
    ('[models.m]\nartifact = "a.skops"\n[[models.m.inputs]]\nname = "x"\ntype = "int"\nvalues = [1, "b"]\n',
     "models.m.inputs.x.values: input 'x' must be an integer, got 'b'"),
    ('[models.m]\nartifact = "a.skops"\n[[models.m.inputs]]\nname = "x"\ntype = "int"\ndefault = 3\n',
     "models.m.inputs.x.default: only for an input with required = false"),
    ('[models.m]\nartifact = "a.skops"\noutput = "predict_proba"\n[[models.m.inputs]]\nname = "x"\ntype = "int"\n',
     "models.m.class: required with output = \"predict_proba\": the class whose probability is served"),
    ('[models.m]\nartifact = "a.skops"\n', "models.m.inputs: required: at least one input (name, type)"),
    ('[models.m]\n[[models.m.inputs]]\nname = "x"\ntype = "int"\n',
     "models.m.artifact: required: the path of the model file (or MLflow model folder)"),
    ('[models.rating]\nartifact = "a.skops"\n[[models.rating.inputs]]\nname = "x"\ntype = "int"\n',
     "models.rating: 'rating' is the built-in rating model's name"),
    ('[models.m]\nartifact = "a.skops"\n[[models.m.inputs]]\nname = "x"\ntype = "int"\n'
     '[[models.m.inputs]]\nname = "x"\ntype = "float"\n', "models.m.inputs: input 'x' declared more than once"),
]


@pytest.mark.parametrize("text,problem", BAD_CONFIGS)
def test_bad_model_tables_are_one_line_naming_file_and_key(tmp_path, text, problem):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(err.value) == f"{cfg}: {problem}"
    assert main(["--config", str(cfg), "run"]) == 1


def test_default_config_registers_the_demand_model():
    settings = load_settings(Path(__file__).resolve().parent.parent / "config" / "default.toml", env={})
    (demand,) = settings.models
    assert demand.name == "demand" and demand.input_names == DEMAND_INPUTS
    assert demand.grid_size() == 18 * 7  # genre x weekday; the optional discount at its default
    assert DEFAULT_MODELS_TOML in (Path(__file__).resolve().parent.parent / "config" / "default.toml").read_text()


# --- the canonicalisation --------------------------------------------------------------------
def test_one_canonical_key_for_query_log_and_snapshot():
    (spec,) = parse_models({"m": {"artifact": "x.skops", "inputs": [
        {"name": "s", "type": "string"}, {"name": "f", "type": "float", "required": False},
        {"name": "i", "type": "int"}, {"name": "b", "type": "bool"}]}}, "c.toml")
    rows = [("a\"b", 0.1, 3, True), ("ünï", None, -7, False), ("x", -0.0, 0, True), ("x", 1e300, 2**62, False)]
    canon = [spec.cast_row(r) for r in rows]
    cols = [np.array([r[j] for r in canon], dtype=object) for j in range(4)]
    assert canonical_keys(cols) == [canonical_key(r) for r in canon]
    assert canonical_key(canon[2]) == '["x",0.0,0,true]'  # -0.0 and 0.0 are one key
    assert json.loads(canonical_key(canon[0])) == ["a\"b", 0.1, 3, True]
    # the query string parses to the same tuple, in schema order whatever the order of the parameters
    assert spec.parse_query([("b", "true"), ("i", "3"), ("s", 'a"b'), ("f", "0.10")]) == canon[0]
    assert spec.parse_query([("i", "-7"), ("s", "ünï"), ("b", "0")]) == canon[1]


def test_grid_is_every_combination_in_schema_order():
    (spec,) = parse_models({"m": {"artifact": "x.skops", "inputs": [
        {"name": "g", "type": "string", "values": ["a", "b", "c"]}, {"name": "w", "type": "int", "min": 1, "max": 4},
        {"name": "on", "type": "bool"}, {"name": "d", "type": "float", "required": False, "default": 0.5}]}}, "c")
    want = list(itertools.product(["a", "b", "c"], [1, 2, 3, 4], [False, True], [0.5]))
    cols = spec.grid()
    got = list(zip(*[c.tolist() for c in cols]))
    assert spec.grid_size() == len(want) == 24 and got == want
    open_spec = ModelSpec.from_json({**spec.to_json(), "inputs": [{"name": "x", "type": "float"}]})
    assert open_spec.grid_size() is None


# --- the batch job -------------------------------------------------------------------------
def test_snapshot_stores_the_grid_candidates_and_their_predictions(registered):
    root, settings, cfg, result, est = registered
    store = Store(settings["paths.store"])
    sid = result.snapshot_id
    demand = _stored(store, sid, "demand")
    # the whole grid, in schema order, each row predicted by the model itself
    want = pd.DataFrame(list(itertools.product(GENRES, range(7), [0.0])), columns=list(DEMAND_INPUTS))
    pd.testing.assert_frame_equal(demand[list(DEMAND_INPUTS)], want, check_dtype=False)
    np.testing.assert_allclose(demand["prediction"], est["demand"].predict(want), rtol=1e-12)
    assert set(demand["model_version"]) == {"d1"}
    assert demand["input"].tolist() == [canonical_key(r) for r in want.itertuples(index=False)]
    churn = _stored(store, sid, "churn")
    cw = pd.DataFrame(list(itertools.product(range(18, 31), ["basic", "pro"], [False, True])),
                      columns=["age", "plan", "active"])
    pd.testing.assert_frame_equal(churn[["age", "plan", "active"]], cw, check_dtype=False)
    np.testing.assert_allclose(churn["prediction"], est["churn"].predict_proba(cw)[:, 1], rtol=1e-12)
    # no grid for an open float: the user's candidates
    price = _stored(store, sid, "price")
    pw = pd.DataFrame({"product": PRODUCTS, "size": [1.0, 2.5, 4.0]})
    pd.testing.assert_frame_equal(price[["product", "size"]], pw)
    np.testing.assert_allclose(price["prediction"], est["price"].predict(pw), rtol=1e-12)
    assert price["model_version"].iloc[0].startswith("sha256:")


def test_manifest_lists_models_versions_schema_hashes_and_checksums(registered):
    root, settings, cfg, result, est = registered
    m = result.manifest["models"]
    assert set(m) == {"rating", "demand", "churn", "price"}
    artifact = root / "artifacts" / "price.skops"
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert m["price"]["artifact_sha256"] == digest and m["price"]["version"] == f"sha256:{digest[:12]}"
    assert m["demand"]["version"] == "d1" and m["demand"]["rows"] == len(GENRES) * 7
    assert m["demand"]["schema_hash"] == settings.models[0].schema_hash()
    assert m["rating"]["version"] == result.manifest["model_version"]
    assert m["rating"]["inputs"] == [{"name": "user_id", "type": "int", "required": True, "min": 0},
                                     {"name": "item_id", "type": "int", "required": True, "min": 0}]
    assert result.manifest["validation"]["models"]["demand"] == {"checked": len(GENRES) * 7, "mismatches": 0}
    # the snapshot carries its own copy of each artifact, listed with its checksum
    files = result.manifest["files"]
    assert files["models/price/model.skops"]["sha256"] == digest
    assert "models/churn/model.joblib" in files and "models/demand/predictions.parquet" in files


def test_catalog_views_per_model_across_snapshots(mws):
    root, settings, cfg, first, est = mws
    second = run(settings)
    rc = main(["--config", str(cfg), "sql",
               "SELECT count(*) AS n, min(prediction) > 0 AS positive FROM predictions_demand WHERE genre = 'Drama'"])
    assert rc == 0
    import duckdb
    con = duckdb.connect(str(Store(settings["paths.store"]).catalog_path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM predictions_demand WHERE genre = 'Drama'").fetchone()[0] == 7
        by_snap = dict(con.execute("SELECT snapshot, count(*) FROM all_predictions_churn GROUP BY ALL").fetchall())
        assert by_snap == {first.snapshot_id: 13 * 4, second.snapshot_id: 13 * 4}
        n = con.execute("SELECT count(*) FROM predictions_rating").fetchone()[0]
        assert n == second.manifest["row_counts"]["predictions"]
    finally:
        con.close()
