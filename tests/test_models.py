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
from serving.web.app import create_app
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
     "models.m.colour: unknown key (allowed: artifact, candidates, class, deadline_ms, format, grid_max_rows, inputs, "
     "kind, max_age_s, max_log_rows, output, trusted, trusted_types, version)"),
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
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    assert m["rating"]["inputs"] == [
        {"name": "user_id", "type": "int", "required": True, "min": int(inter.user_id.min()), "max": int(inter.user_id.max())},
        {"name": "item_id", "type": "int", "required": True, "min": 1, "max": 400}]
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


# --- the API -------------------------------------------------------------------------------
def test_models_list_names_versions_and_inputs(api):
    app, client, clock, settings, first, est = api
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json["models"]}
    assert list(models) == ["churn", "demand", "price", "rating"]
    assert models["demand"]["version"] == "d1" and models["demand"]["max_age_s"] == 600.0
    assert models["demand"]["inputs"] == [
        {"name": "genre", "type": "string", "required": True, "values": GENRES},
        {"name": "weekday", "type": "int", "required": True, "min": 0, "max": 6},
        {"name": "discount", "type": "float", "required": False, "min": 0.0, "max": 0.5, "default": 0.0}]
    assert models["churn"]["output"] == "predict_proba" and models["churn"]["class"] == 1
    assert models["price"]["precomputed"] == 3 and models["demand"]["precomputed"] == len(GENRES) * 7
    assert models["rating"]["version"] == first.manifest["model_version"]
    assert client.get("/v1/models/churn").json == models["churn"]


def test_precomputed_then_live_then_cache(api):
    app, client, clock, settings, first, est = api
    sid = first.snapshot_id
    r = client.get("/v1/models/demand/predict?genre=Drama&weekday=3")
    body = r.json
    want = float(est["demand"].predict(pd.DataFrame({"genre": ["Drama"], "weekday": [3], "discount": [0.0]}))[0])
    assert body == {"model": "demand", "model_version": "d1",
                    "inputs": {"genre": "Drama", "weekday": 3, "discount": 0.0}, "prediction": want,
                    "source": "precomputed", "snapshot": sid, "computed_at": body["computed_at"], "age_s": 10.0}
    assert r.headers["Cache-Control"] == "public, max-age=589"  # the model's own max_age_s = 600
    assert client.get("/v1/models/demand/predict?genre=Drama&weekday=3", headers={"If-None-Match": r.headers["ETag"]}
                      ).status_code == 304
    # a discount is not in the grid: computed live by the same model, then cached
    q = "/v1/models/demand/predict?discount=0.25&weekday=3&genre=Drama"
    live = client.get(q).json
    want = float(est["demand"].predict(pd.DataFrame({"genre": ["Drama"], "weekday": [3], "discount": [0.25]}))[0])
    assert live["source"] == "live" and live["prediction"] == want and live["age_s"] == 0.0
    clock.advance(4)
    again = client.get("/v1/models/demand/predict?genre=Drama&weekday=3&discount=0.250")
    assert again.json["source"] == "cache" and again.json["prediction"] == want and again.json["age_s"] == 4.0
    # probability of class 1 from the joblib classifier
    p = client.get("/v1/models/churn/predict?age=20&plan=pro&active=true").json
    X = pd.DataFrame({"age": [20], "plan": ["pro"], "active": [True]})
    assert p["source"] == "precomputed" and p["prediction"] == pytest.approx(est["churn"].predict_proba(X)[0, 1])


def test_model_freshness_bound_and_cache_life(api):
    app, client, clock, settings, first, est = api
    q = "/v1/models/price/predict?product=anvil&size=1"
    assert client.get(q).json["source"] == "precomputed"
    clock.advance(55)  # price: max_age_s = 60, and the snapshot was 10 s old
    r = client.get(q)
    assert r.json["source"] == "live" and r.headers["Cache-Control"] == "public, max-age=59"
    clock.advance(59)
    assert client.get(q).json["source"] == "cache"
    clock.advance(2)  # a live price lives 60 s in the cache, not serving.cache_ttl_s (300 s)
    assert client.get(q).json["source"] == "live"
    assert client.get("/v1/models/demand/predict?genre=War&weekday=1").status_code == 400
    assert client.get("/v1/models/demand/predict?genre=Drama&weekday=1").json["source"] == "precomputed"


MODEL_BAD_REQUESTS = [
    ("/v1/models/demand/predict?genre=Drama&weekday=3&colour=red",
     "unknown input 'colour' for model 'demand' (inputs: genre, weekday, discount)"),
    ("/v1/models/demand/predict?weekday=3", "input 'genre' is required: one of \"Action\", \"Comedy\", \"Drama\", "
                                           "\"Sci-Fi\", \"Children's\""),
    ("/v1/models/demand/predict?genre=Drama&weekday=3&weekday=4", "input 'weekday' given more than once"),
    ("/v1/models/demand/predict?genre=Drama&weekday=three", "input 'weekday' must be an integer from 0 to 6, got 'three'"),
    ("/v1/models/demand/predict?genre=Drama&weekday=2.0", "input 'weekday' must be an integer from 0 to 6, got '2.0'"),
    ("/v1/models/demand/predict?genre=Drama&weekday=7", "input 'weekday' must be an integer from 0 to 6, got '7'"),
    ("/v1/models/demand/predict?genre=Western&weekday=1",
     "input 'genre' must be one of \"Action\", \"Comedy\", \"Drama\", \"Sci-Fi\", \"Children's\", got 'Western'"),
    ("/v1/models/demand/predict?genre=Drama&weekday=1&discount=nan",
     "input 'discount' must be a number from 0.0 to 0.5, got 'nan'"),
    ("/v1/models/demand/predict?genre=Drama&weekday=1&discount=0.9",
     "input 'discount' must be a number from 0.0 to 0.5, got '0.9'"),
    ("/v1/models/demand/predict?genre=Drama&weekday=", "input 'weekday' must be an integer from 0 to 6, got ''"),
    ("/v1/models/churn/predict?age=20&plan=pro&active=maybe", "input 'active' must be true or false, got 'maybe'"),
    ("/v1/models/price/predict?product=anvil&size=-1", "input 'size' must be a number >= 0.0, got '-1'"),
    ("/v1/models/rating/predict?user_id=1", "input 'item_id' is required: an integer from 1 to 400"),
]


@pytest.mark.parametrize("url,detail", MODEL_BAD_REQUESTS)
def test_bad_inputs_are_400_problems_naming_the_input(api, url, detail):
    app, client, clock, settings, first, est = api
    r = client.get(url)
    assert r.status_code == 400 and r.mimetype == "application/problem+json"
    assert r.json == {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail,
                      "instance": url.split("?")[0]}


def test_unknown_model_is_404(api):
    app, client, clock, settings, first, est = api
    r = client.get("/v1/models/nope/predict?x=1")
    assert r.status_code == 404 and r.json["detail"] == "no model 'nope' (models: churn, demand, price, rating)"


def test_a_raising_model_is_503_naming_it_and_the_others_keep_serving(api):
    app, client, clock, settings, first, est = api
    # the price model's encoder raises on a product it was not trained on: a live predict that fails
    with pytest.raises(ValueError):
        est["price"].predict(pd.DataFrame({"product": ["kite"], "size": [1.0]}))
    for _ in range(2):
        r = client.get("/v1/models/price/predict?product=kite&size=1")
        assert r.status_code == 503 and r.mimetype == "application/problem+json"
        assert r.json["detail"] == "model 'price' failed to predict (ValueError); the error has been logged"
    assert client.get("/v1/models/price/predict?product=anvil&size=7").json["source"] == "live"
    assert client.get("/v1/models/demand/predict?genre=Drama&weekday=3&discount=0.1").json["source"] == "live"
    assert client.get("/v1/models/churn/predict?age=21&plan=basic&active=false").status_code == 200
    metrics = client.get("/metrics").text
    assert 'hybridserve_model_errors_total{model="price"} 2.0' in metrics
    assert 'hybridserve_requests_total{endpoint="model",source="error",status="503"} 2.0' in metrics
    assert app.extensions["hybridserve"].engine.counts["model_errors"] == 2


def test_concurrent_misses_are_computed_once(api):
    import threading
    app, client, clock, settings, first, est = api
    served = app.extensions["hybridserve"].engine.snapshot.models["demand"]
    calls = []
    gate = threading.Event()

    class Slow:  # the estimator itself, held up until every request is waiting
        def __init__(self, estimator):
            self.estimator = estimator

        def predict(self, X):
            calls.append(1)
            gate.wait(5)
            return self.estimator.predict(X)

    served.predictor.estimator = Slow(served.predictor.estimator)
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        app.test_client().get("/v1/models/demand/predict?genre=Action&weekday=2&discount=0.3").json["source"]))
        for _ in range(6)]
    for t in threads:
        t.start()
    import time
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(out) == ["cache"] * 5 + ["live"]


def test_a_failed_computation_lets_its_waiters_compute_and_live_cpu_is_counted(api):
    """The first request's predict fails while a second identical one waits: the first gets a 503,
    the second computes it itself; each live computation adds its CPU time to the model's metric."""
    import threading
    import time
    app, client, clock, settings, first, est = api
    engine = app.extensions["hybridserve"].engine
    served = engine.snapshot.models["demand"]
    calls, gate = [], threading.Event()

    class FailsFirst:
        feature_names_in_ = est["demand"].feature_names_in_

        def predict(self, X):
            calls.append(1)
            if len(calls) == 1:
                gate.wait(5)
                raise RuntimeError("first call fails")
            return est["demand"].predict(X)

    served.predictor.estimator = FailsFirst()
    q = "/v1/models/demand/predict?genre=Comedy&weekday=1&discount=0.3"
    out = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, app.test_client().get(q)), daemon=True)
               for i in range(2)]
    threads[0].start()
    while not calls:
        time.sleep(0.01)
    threads[1].start()
    time.sleep(0.3)  # the second request is waiting for the first
    gate.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a waiter was never woken"
    want = float(est["demand"].predict(pd.DataFrame({"genre": ["Comedy"], "weekday": [1], "discount": [0.3]}))[0])
    assert out[0].status_code == 503 and out[1].json["source"] == "live" and out[1].json["prediction"] == want
    assert len(calls) == 2 and client.get(q).json["source"] == "cache"
    line = next(x for x in client.get("/metrics").text.splitlines()
                if x.startswith('hybridserve_live_compute_seconds_total{endpoint="model"}'))
    before = float(line.split()[-1])
    assert before > 0
    assert client.get(q.replace("0.3", "0.35")).json["source"] == "live"
    line = next(x for x in client.get("/metrics").text.splitlines()
                if x.startswith('hybridserve_live_compute_seconds_total{endpoint="model"}'))
    assert float(line.split()[-1]) > before


def test_rating_predictions_are_one_registered_model(api):
    app, client, clock, settings, first, est = api
    store = Store(settings["paths.store"])
    p = next(store.read_table(first.snapshot_id, "predictions").to_pandas().iloc[4:5].itertuples())
    old = client.get(f"/v1/predictions?user_id={p.user_id}&item_id={p.item_id}").json
    new = client.get(f"/v1/models/rating/predict?item_id={p.item_id}&user_id={p.user_id}").json
    assert old["source"] == new["source"] == "precomputed"
    assert set(old) == {"user_id", "item_id", "prediction", "source", "snapshot", "computed_at", "age_s"}
    assert new["inputs"] == {"user_id": int(p.user_id), "item_id": int(p.item_id)}
    assert old["prediction"] == pytest.approx(new["prediction"], abs=1e-6) == pytest.approx(p.prediction, abs=1e-6)
    assert new["model_version"] == first.manifest["model_version"]
    assert client.get(f"/v1/models/rating/predict?user_id=299&item_id={p.item_id}").status_code in (200, 404)
    # both routes share one cache: a live rating asked one way is a cache hit the other way
    users = store.read_table(first.snapshot_id, "user_recs").column("user_id").to_pylist()
    stored = set(zip(*(store.read_table(first.snapshot_id, "predictions").column(c).to_pylist()
                       for c in ("user_id", "item_id"))))
    u = next(x for x in users if (x, int(p.item_id)) not in stored)
    assert client.get(f"/v1/predictions?user_id={u}&item_id={p.item_id}").json["source"] == "live"
    assert client.get(f"/v1/models/rating/predict?user_id={u}&item_id={p.item_id}").json["source"] == "cache"


def test_openapi_describes_each_models_inputs(api):
    app, client, clock, settings, first, est = api
    doc = client.get("/openapi.json").json
    op = doc["paths"]["/v1/models/demand/predict"]["get"]
    assert op["parameters"] == [
        {"name": "genre", "in": "query", "required": True, "description": "string input of the model",
         "schema": {"type": "string", "enum": GENRES}},
        {"name": "weekday", "in": "query", "required": True, "description": "int input of the model",
         "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 6}},
        {"name": "discount", "in": "query", "required": False, "description": "float input of the model (optional)",
         "schema": {"type": "number", "minimum": 0.0, "maximum": 0.5, "default": 0.0}}]
    assert "/v1/models" in doc["paths"] and "/v1/models/rating/predict" in doc["paths"]
    assert "400" in op["responses"] and "503" in op["responses"]


# --- the request log feeds the next run ----------------------------------------------------------
def test_a_miss_is_logged_with_its_canonical_input_and_precomputed_by_the_next_run(api):
    app, client, clock, settings, first, est = api
    svc = app.extensions["hybridserve"]
    assert client.get("/v1/models/price/predict?size=6.50&product=rocket").json["source"] == "live"
    assert client.get("/v1/models/demand/predict?genre=Comedy&weekday=5&discount=.2").json["source"] == "live"
    assert client.get("/v1/models/demand/predict?genre=Comedy&weekday=5").json["source"] == "precomputed"
    assert client.get("/v1/models/demand/predict?genre=Comedy&weekday=9").status_code == 400
    svc.requestlog.flush()
    store = Store(settings["paths.store"])
    log = pd.concat([pd.read_parquet(p) for p in store.requests_dir.glob("seg-*.parquet")])
    rows = log[log["model"].notna()][["endpoint", "model", "input", "source", "status"]].values.tolist()
    assert rows == [["model", "price", '["rocket",6.5]', "live", 200],
                    ["model", "demand", '["Comedy",5,0.2]', "live", 200],
                    ["model", "demand", '["Comedy",5,0.0]', "precomputed", 200]]
    assert log[log["status"] == 400]["model"].isna().all()  # nothing but a valid input is a key
    second = run(settings)
    sid = second.snapshot_id
    price = _stored(store, sid, "price")
    assert price[["product", "size"]].values.tolist() == [["anvil", 1.0], ["rocket", 2.5], ["magnet", 4.0],
                                                           ["rocket", 6.5]]
    np.testing.assert_allclose(price["prediction"], est["price"].predict(price[["product", "size"]]), rtol=1e-12)
    demand = _stored(store, sid, "demand")
    assert len(demand) == len(GENRES) * 7 + 1 and demand["input"].iloc[-1] == '["Comedy",5,0.2]'
    assert second.manifest["models"]["demand"]["selection"]["from_log"] == 1
    svc.engine.reload()
    assert client.get("/v1/models/price/predict?product=rocket&size=6.5").json["source"] == "precomputed"
    assert client.get("/v1/models/demand/predict?genre=Comedy&weekday=5&discount=0.2").json["source"] == "precomputed"


def test_fast_path_answers_model_hits_exactly_as_flask(mws):
    root, settings, cfg, first, est = mws
    settings = settings.replace(serving__log_flush_interval_s=0.0, serving__log_flush_rows=100000)
    clock = Clock(pd.Timestamp(first.manifest["created_at"]).timestamp() + 10.0)
    fast = create_app(settings, clock=clock, background=False)
    slow = create_app(settings.replace(serving__fast_path=False), clock=clock, background=False)
    urls = ["/v1/models/demand/predict?genre=Drama&weekday=3", "/v1/models/demand/predict?weekday=3&genre=Drama",
            "/v1/models/demand/predict?genre=Children%27s&weekday=0&discount=0",
            "/v1/models/churn/predict?age=30&plan=basic&active=1", "/v1/models/price/predict?product=magnet&size=4",
            "/v1/models/demand/predict?genre=Drama&weekday=3&discount=0.3",  # a miss
            "/v1/models/demand/predict?genre=Drama", "/v1/models/nope/predict"]
    store = Store(settings["paths.store"])
    p = next(store.read_table(first.snapshot_id, "predictions").to_pandas().iloc[:1].itertuples())
    urls.append(f"/v1/models/rating/predict?user_id={p.user_id}&item_id={p.item_id}")
    try:
        for url in urls:
            a, b = fast.test_client().get(url), slow.test_client().get(url)
            assert (a.status_code, sorted(a.headers.items()), a.data) == (b.status_code, sorted(b.headers.items()),
                                                                           b.data), url
        hitpath = fast.wsgi_app
        assert hitpath.answered == 6 and hitpath.passed == 3
        logs = []
        for app in (fast, slow):
            svc = app.extensions["hybridserve"]
            logs.append([r[1:] for r in svc.requestlog._rows])
        strip = [[r[:6] + r[7:] for r in rows] for rows in logs]  # all but the latency
        assert strip[0] == strip[1] and len(strip[0]) == len(urls) - 2
    finally:
        for app in (fast, slow):
            app.extensions["hybridserve"].close()


# --- bad input: one line, exit 1, the live snapshot untouched ---------------------------------------
def _bad_run(mws, capsys, extra: str = "", edit=None):
    root, settings, cfg, first, est = mws
    text = cfg.read_text()
    if edit is not None:
        text = edit(text)
    cfg.write_text(text + extra)
    store = Store(settings["paths.store"])
    before = (store.current_id(), store.snapshot_ids())
    rc = main(["--config", str(cfg), "run"])
    err = capsys.readouterr().err
    assert (store.current_id(), store.snapshot_ids()) == before
    assert rc == 1 and err.count("\n") == 1, err
    return err.strip(), root


def test_missing_artifact(mws, capsys):
    err, root = _bad_run(mws, capsys, edit=lambda t: t.replace("churn.joblib", "gone.joblib"))
    assert err == f"error: {root / 'artifacts' / 'gone.joblib'}: models.churn.artifact: no such file or folder"


def test_truncated_artifacts(mws, capsys):
    root = mws[0]
    for name in ("demand.skops", "churn.joblib"):
        path = root / "artifacts" / name
        path.write_bytes(path.read_bytes()[:300])
    err, _ = _bad_run(mws, capsys)
    assert err.startswith(f"error: {root / 'artifacts' / 'demand.skops'}: models.demand.artifact: truncated or not "
                          "a skops file (BadZipFile")
    (root / "artifacts" / "demand.skops").write_bytes(b"")
    cfg = mws[2]
    cfg.write_text(cfg.read_text().replace("demand.skops", "churn.joblib\"\nformat = \"joblib\"\ntrusted = true\n#"))
    rc = main(["--config", str(cfg), "run"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith(f"error: {root / 'artifacts' / 'churn.joblib'}: models.demand.artifact: "
                                      "truncated or not a joblib file")


def test_untrusted_skops_types(mws, capsys):
    err, root = _bad_run(mws, capsys, edit=lambda t: t.replace(f'trusted_types = ["{TREES}"]\n', ""))
    assert err.startswith(f"error: {root / 'artifacts' / 'demand.skops'}: models.demand.trusted_types: the artifact "
                          f"holds types skops does not trust by default: {TREES}; list them in trusted_types")


def test_schema_column_the_model_does_not_know(mws, capsys):
    err, _ = _bad_run(mws, capsys, edit=lambda t: t.replace('name = "plan"', 'name = "tier"'))
    cfg = mws[2]
    assert err == (f"error: {cfg}: models.churn.inputs.tier: column 'tier' is not known to the model "
                   "(it was fit on age, plan, active)")


def test_grid_over_the_limit_with_no_request_log(mws, capsys):
    err, _ = _bad_run(mws, capsys, edit=lambda t: t.replace('[models.churn]\n', '[models.churn]\ngrid_max_rows = 50\n'))
    cfg = mws[2]
    assert err == (f"error: {cfg}: models.churn.grid_max_rows: the grid of the inputs' domains has 52 rows, over "
                   "grid_max_rows = 50, and the request log has no requests for model 'churn' to choose from "
                   "(raise grid_max_rows, narrow the inputs, or give candidates)")


def test_over_the_limit_the_most_requested_tuples_are_precomputed(api):
    app, client, clock, settings, first, est = api
    for q, n in (("age=20&plan=pro&active=true", 5), ("age=21&plan=pro&active=true", 3),
                 ("age=22&plan=basic&active=false", 1)):
        for _ in range(n):
            assert client.get(f"/v1/models/churn/predict?{q}").status_code == 200
    app.extensions["hybridserve"].requestlog.flush()
    cfg = Path(settings.source)
    cfg.write_text(cfg.read_text().replace('[models.churn]\n', '[models.churn]\ngrid_max_rows = 50\n'))
    result = run(load_settings(cfg, env={}).replace(batch__coverage=0.8))
    churn = _stored(Store(settings["paths.store"]), result.snapshot_id, "churn")
    assert churn["input"].tolist() == ['[20,"pro",true]', '[21,"pro",true]']  # 8 of 9 requests cover 0.8
    sel = result.manifest["models"]["churn"]["selection"]
    assert sel["grid_rows"] == 0 and sel["from_log"] == 2 and sel["log_hit_rate"] == pytest.approx(8 / 9)


def test_mlflow_model_folder_with_its_signature(mws, capsys):
    root, settings, cfg, first, est = mws
    folder = root / "artifacts" / "mlflow-price"
    folder.mkdir()
    with open(folder / "model.pkl", "wb") as fh:
        pickle.dump(est["price"], fh)
    sig = json.dumps([{"type": "string", "name": "product", "required": True},
                      {"type": "double", "name": "size", "required": True}])
    (folder / "MLmodel").write_text(
        "artifact_path: model\nflavors:\n  python_function:\n    loader_module: mlflow.sklearn\n"
        "    model_path: model.pkl\n  sklearn:\n    pickled_model: model.pkl\n    serialization_format: cloudpickle\n"
        f"    sklearn_version: 1.5.0\nmlflow_version: 2.16.0\nsignature:\n  inputs: '{sig}'\n  outputs: null\n")
    cfg.write_text(cfg.read_text() + f'\n[models.mlprice]\nartifact = "{folder}"\nformat = "mlflow"\ntrusted = true\n'
                   f'candidates = "{root / "artifacts" / "price_candidates.parquet"}"\n')
    settings = load_settings(cfg, env={})
    result = run(settings)
    spec = result.manifest["models"]["mlprice"]
    assert spec["inputs"] == [{"name": "product", "type": "string", "required": True},
                              {"name": "size", "type": "float", "required": True}]
    stored = _stored(Store(settings["paths.store"]), result.snapshot_id, "mlprice")
    np.testing.assert_allclose(stored["prediction"], est["price"].predict(stored[["product", "size"]]), rtol=1e-12)
    assert "models/mlprice/mlflow/MLmodel" in result.manifest["files"]
    app = create_app(settings, background=False)
    try:
        r = app.test_client().get("/v1/models/mlprice/predict?product=rocket&size=2.5").json
        assert r["source"] == "precomputed" and r["prediction"] == pytest.approx(stored["prediction"].iloc[1])
    finally:
        app.extensions["hybridserve"].close()
    # the signature and the config must agree
    cfg.write_text(cfg.read_text() + '[[models.mlprice.inputs]]\nname = "size"\ntype = "int"\n')
    rc = main(["--config", str(cfg), "run"])
    assert rc == 1 and capsys.readouterr().err.strip() == (
        f"error: {cfg}: models.mlprice.inputs.size.type: int here, float in the MLflow signature of {folder}")


def test_demo_shows_the_grid_a_live_miss_and_the_next_run_precomputing_it(mws):
    """`make demo` with a registered model, at a tiny size, through a real server."""
    from batch.tools.demo import demo
    root, settings, cfg, first, est = mws
    cfg.write_text(cfg.read_text().replace("[serving]", "[serving]\nworkers = 1", 1)
                   if "[serving]" in cfg.read_text() else cfg.read_text() + "\n[serving]\nworkers = 1\n")
    lines = []
    result = demo(load_settings(cfg, env={}), cfg, requests=200, concurrency=4, echo=lines.append)
    text = "\n".join(lines)
    assert "registered models (GET /v1/models): churn " in text
    assert "demand: 35 rows precomputed (35 from the grid)" in text
    miss = "/v1/models/demand/predict?genre=Action&weekday=0&discount=0.185"
    assert "GET /v1/models/demand/predict?genre=Action&weekday=0\n     -> precomputed " in text
    assert f"GET {miss}  (3 times)\n     -> live " in text and ", then cache " in text
    assert f"GET {miss} after the second run\n     -> precomputed " in text
    assert f"(snapshot {result['second']}: 1 demand input(s) taken from the request log)" in text


def test_generate_sample_trains_the_demand_model_the_default_config_registers(tmp_path, capsys):
    """`make batch` = generate-sample --if-missing + run: the default config's demand model is made beside
    the sample, matches the registered schema, and a run precomputes its 18 x 7 grid."""
    from serving.models.predictor import SklearnModel, choose, resolve
    artifact = tmp_path / "inputs" / "demand.skops"
    settings, cfg = make_settings(tmp_path)
    cfg.write_text(cfg.read_text() + DEFAULT_MODELS_TOML.replace('"data/sample/demand.skops"',
                                                                 json.dumps(str(artifact))))
    assert main(["--config", str(cfg), "generate-sample"]) == 0
    assert f"wrote the demand model (registered in config/default.toml) to {artifact}" in capsys.readouterr().out
    artifact.unlink()
    assert main(["--config", str(cfg), "generate-sample", "--if-missing"]) == 0  # the sample is there, the model not
    assert f"wrote the demand model to {artifact}" in capsys.readouterr().out
    (spec,) = load_settings(cfg, env={}).models
    spec, predictor, checksum = resolve(spec)
    assert predictor.feature_names == list(DEMAND_INPUTS) and spec.version == "demand-1"
    cols, report = choose(spec, None, 0.95)
    model = SklearnModel(predictor)
    table = model.part("predict", cols, model.answer("predict", cols))
    assert report["grid_rows"] == table.num_rows == 18 * 7
    frame = table.select(list(DEMAND_INPUTS)).to_pandas()
    np.testing.assert_array_equal(table.column("prediction").to_numpy(), predictor.estimator.predict(frame))


def test_request_log_segments_from_before_the_model_columns_still_read(tmp_path):
    """Old segments (no model, input columns) next to new ones: both readers take what each has."""
    from datetime import datetime, timezone

    from batch.models import read_model_log
    from batch.popularity import read_request_counts
    from serving.requestlog import RequestLog
    from serving.store import REQUEST_LOG_SCHEMA
    store = Store(tmp_path / "store")
    store.requests_dir.mkdir(parents=True)
    old_schema = pa.schema([f for f in REQUEST_LOG_SCHEMA if f.name not in ("model", "input")])
    old = pa.table({"ts": [datetime(2024, 1, 1, tzinfo=timezone.utc)], "endpoint": ["similar_items"], "item_id": [7],
                    "user_id": [None], "k": [10], "source": ["live"], "status": [200], "latency_us": [90]},
                   schema=old_schema)
    pq.write_table(old, store.requests_dir / "seg-old.parquet")
    now = datetime.now(timezone.utc)
    assert read_model_log(store, now) == {}
    log = RequestLog(store, clock=lambda: now.timestamp())
    log.append("model", None, None, None, "live", 200, 120, "price", '["rocket",6.5]')
    log.append("model", None, None, None, "cache", 200, 20, "price", '["rocket",6.5]')
    log.append("similar_items", 7, None, 10, "precomputed", 200, 30)
    log.flush()
    keys, weights = read_model_log(store, now)["price"]
    assert keys == ['["rocket",6.5]'] and weights.tolist() == [2.0]
    counts = read_request_counts(store, now)
    assert counts.loc[counts["endpoint"] == "similar_items", "n"].sum() == 2


# --- one-row frames: the live path's input equals a freshly built frame ------------------------
def _fresh_columns(values) -> list:
    return [np.array([v], dtype=object if v is None or isinstance(v, str) else None) for v in values]


def _by_hand(est, spec, values) -> pd.DataFrame:
    """The one-row frame a user would build for the model by hand, in the model's column order."""
    row = dict(zip(spec.input_names, values))
    return pd.DataFrame({name: [row[name]] for name in est.feature_names_in_})


def _rows(spec, n: int, rng, products=PRODUCTS) -> list[tuple]:
    """n canonical tuples drawn over the schema; few string values, so most rows reuse a kept frame."""
    rows = []
    for _ in range(n):
        row = []
        for inp in spec.inputs:
            if inp.values is not None:
                row.append(inp.values[rng.integers(len(inp.values))])
            elif inp.type == "string":
                row.append(products[rng.integers(len(products))])
            elif inp.type == "int":
                row.append(int(rng.integers(inp.min, inp.max + 1)))
            elif inp.type == "float":
                row.append(float(np.round(rng.uniform(inp.min or 0.0, inp.max or 10.0), 6)))
            else:
                row.append(bool(rng.integers(2)))
        rows.append(spec.cast_row(row))
    return rows


def _predictor(registered, name: str, estimator=None):
    from serving.models.predictor import SklearnPredictor
    _, settings, _, _, estimators = registered
    spec = next(s for s in settings.models if s.name == name)
    return SklearnPredictor(spec, estimators[name] if estimator is None else estimator), estimators[name]


def _assert_same_frame(got, want):
    pd.testing.assert_frame_equal(got, want, check_exact=True, check_index_type=True, check_column_type=True)
    assert list(got.dtypes) == list(want.dtypes)


@pytest.mark.parametrize("name", ["demand", "churn", "price"])
def test_one_row_frames_equal_fresh_frames_and_the_models_own_predict(registered, name):
    p, est = _predictor(registered, name)
    rows = _rows(p.spec, 150, np.random.default_rng(3))
    handed = []
    for values in rows:
        got = p.frame_one(values)
        _assert_same_frame(got, p.frame(_fresh_columns(values)))
        want = (est.predict_proba(_by_hand(est, p.spec, values))[0, 1] if name == "churn"
                else est.predict(_by_hand(est, p.spec, values))[0])
        assert p.answer_one(values) == want
        handed.append((values, got))
    # a frame handed out earlier still holds its own row: reusing a frame never reaches one given away
    for values, got in handed:
        _assert_same_frame(got, p.frame(_fresh_columns(values)))


def test_one_row_frames_of_other_types_or_none_are_fresh_frames(registered):
    p, est = _predictor(registered, "demand")
    p.frame_one(("Drama", 3, 0.5))  # a kept frame for Drama with an int64 and a float64 column
    for values in [("Drama", 3, 1), ("Drama", True, 0.25), ("Drama", None, 0.25), ("Drama", 2**63, 0.25),
                   ("Drama", 4, np.float32(0.25)), ("Drama", 5, 0.125)]:
        _assert_same_frame(p.frame_one(values), p.frame(_fresh_columns(values)))
    assert p.answer_one(("Drama", 5, 0.125)) == est.predict(_by_hand(est, p.spec, ("Drama", 5, 0.125)))[0]


def test_one_row_frames_past_the_per_thread_bound_and_in_another_column_order(registered):
    """An open string input with more values than a thread keeps frames for; an int input with too
    many values to pick a kept frame; a model fit with its columns in another order than the schema's."""
    from sklearn.compose import ColumnTransformer

    from serving.models.predictor import SklearnPredictor
    p, _ = _predictor(registered, "price")
    many = [f"product-{i}" for i in range(400)]
    for values in _rows(p.spec, 600, np.random.default_rng(4), products=many):
        _assert_same_frame(p.frame_one(values), p.frame(_fresh_columns(values)))
    # demand with a weekday of 1,000 values: too many to keep a frame each, so it is set in the kept frame
    from dataclasses import replace
    d, est = _predictor(registered, "demand")
    wide = SklearnPredictor(replace(d.spec, inputs=(d.spec.inputs[0], replace(d.spec.inputs[1], max=999),
                                                    d.spec.inputs[2])), est)
    assert [k for k, _ in wide._row_set] == [1, 2] and [k for k, _ in d._row_set] == [2]
    for values in _rows(wide.spec, 200, np.random.default_rng(8)):
        _assert_same_frame(wide.frame_one(values), wide.frame(_fresh_columns(values)))
        assert wide.answer_one(values) == est.predict(_by_hand(est, wide.spec, values))[0]
    X = pd.DataFrame({"size": [1.0, 2.0, 3.0, 4.0], "product": ["anvil", "rocket", "anvil", "magnet"]})
    reordered = Pipeline([("enc", ColumnTransformer([("p", OneHotEncoder(), ["product"])], remainder="passthrough")),
                          ("reg", LinearRegression())]).fit(X, [3.0, 56.0, 9.0, 12.0])
    q, _ = _predictor(registered, "price", reordered)
    assert list(q.frame_one(("rocket", 2.5)).columns) == ["size", "product"]
    for values in _rows(q.spec, 50, np.random.default_rng(5)):
        _assert_same_frame(q.frame_one(values), q.frame(_fresh_columns(values)))
        assert q.answer_one(values) == reordered.predict(_by_hand(reordered, q.spec, values))[0]


def test_a_model_that_changes_its_input_does_not_change_the_next_rows(registered):
    _, est = _predictor(registered, "demand")

    class Meddling:  # writes into the frame it is given and adds a column, as careless user code does
        feature_names_in_ = est.feature_names_in_

        def predict(self, X):
            y = est.predict(X)
            X.iat[0, 0], X.iat[0, 1] = "Comedy", 6
            X["extra"] = 1.0
            return y

    p, _ = _predictor(registered, "demand", Meddling())
    for values in _rows(p.spec, 100, np.random.default_rng(6)):
        _assert_same_frame(p.frame_one(values), p.frame(_fresh_columns(values)))
        assert p.answer_one(values) == est.predict(_by_hand(est, p.spec, values))[0]


def test_one_row_frames_from_many_threads_at_once_hold_each_threads_own_row(registered):
    """Threads switching every microsecond, all on the same string value (so on kept frames): each
    frame holds its own thread's row, then and after the others carried on."""
    import sys
    import threading
    p, est = _predictor(registered, "demand")
    rows = [("Drama", d % 7, round(0.0001 * (d + 1), 6)) for d in range(4 * 150)]
    got, wrong, barrier = [], [], threading.Barrier(4)

    def work(mine):
        barrier.wait()
        try:
            for values in mine:
                f = p.frame_one(values)
                if [f.iat[0, 0], f.iat[0, 1], f.iat[0, 2]] != list(values):
                    wrong.append((values, f.iloc[0].tolist()))
                got.append((values, f))
        except Exception as exc:  # a thread's failure fails the test
            wrong.append((mine[0], repr(exc)))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(rows[t::4],)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert wrong == [] and len(got) == len(rows)
    for values, f in got:
        _assert_same_frame(f, p.frame(_fresh_columns(values)))
    # (predictions stay out of the threads: scikit-learn's joblib helper, which ColumnTransformer calls,
    # resets the process-wide warning filters per call, so concurrent predicts warn spuriously)
    for values, f in got[::60]:
        assert est.predict(f)[0] == est.predict(_by_hand(est, p.spec, values))[0]


def test_a_model_fit_on_arrays_gets_the_same_array_one_row_at_a_time(registered):
    from serving.models.predictor import SklearnPredictor
    spec = ModelSpec("lin", inputs=parse_models({"lin": {"artifact": "x", "inputs": [
        {"name": "a", "type": "int"}, {"name": "b", "type": "float"}, {"name": "c", "type": "bool"}]}},
        "t.toml")[0].inputs)
    rng = np.random.default_rng(7)
    X = np.column_stack([rng.integers(0, 9, 50), rng.uniform(0, 1, 50), rng.integers(0, 2, 50)]).astype(float)
    lin = LinearRegression().fit(X, X @ [1.0, 2.0, 3.0])
    p = SklearnPredictor(spec, lin)
    for values in [(3, 0.5, True), (8, 0.25, False), (-1, 2.0, True)]:
        got = p.frame_one(values)
        want = p.frame(_fresh_columns(values))
        assert got.dtype == want.dtype == np.float64 and np.array_equal(got, want)
        assert p.answer_one(values) == lin.predict(np.array([values], dtype=np.float64))[0]
