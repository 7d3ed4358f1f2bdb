"""A slow model stalls nothing (issue 20.2), in a real server process with one worker: while one model
is held back, hits, health and other models answer; past its deadline it gets 503 naming the model and
the deadline, or, where a precomputed answer is only past its freshness bound, that answer marked stale
with max-age=0; a late result still fills the cache; /readyz, /v1/models and /metrics count it all.

The model (tests/live_gate.py) is held back by a file the test writes, and says by another file that a
computation is waiting: the test orders events by those, never by how long anything took."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import joblib
import pytest

from batch.job import run
from batch.tools.demo import ApiServer, http_get as get
from conftest import make_settings
from live_gate import GatedRegressor
from serving.settings import load_settings
from serving.store import Store

TESTS = Path(__file__).resolve().parent

MODELS = """
[models.stuck]
artifact = "{gate}/model.joblib"
format = "joblib"
trusted = true
deadline_ms = 120000.0
[[models.stuck.inputs]]
name = "x"
type = "int"
min = 0
max = 3
[[models.stuck.inputs]]
name = "y"
type = "float"
required = false
default = 0.0

[models.gated]
artifact = "{gate}/model.joblib"
format = "joblib"
trusted = true
max_age_s = 5.0
deadline_ms = 700.0
[[models.gated.inputs]]
name = "x"
type = "int"
min = 0
max = 3
[[models.gated.inputs]]
name = "y"
type = "float"
required = false
default = 0.0
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, published):
    """One worker serving the recommender, the rating model, 'stuck' (a deadline of 120 s) and 'gated'
    (a deadline of 700 ms and a freshness bound of 5 s: its precomputed answers are soon stale)."""
    src, _, _ = published
    root = tmp_path_factory.mktemp("deadline")
    shutil.copytree(src / "inputs", root / "inputs")
    gate = root / "gate"
    gate.mkdir()
    joblib.dump(GatedRegressor(str(gate)), gate / "model.joblib")
    settings, cfg = make_settings(root, serving={"log_flush_interval_s": 0.0})
    cfg.write_text(cfg.read_text() + MODELS.format(gate=gate))
    settings = load_settings(cfg, env={})
    result = run(settings)
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    srv = ApiServer(cfg, workers=1, env=env).start()
    yield srv, gate, Store(settings["paths.store"]), result
    (gate / "block").unlink(missing_ok=True)  # nothing held back, so the worker stops at once
    (gate / "raise").unlink(missing_ok=True)
    srv.stop()


def _block(gate: Path, *ys: float) -> None:
    tmp = gate / "block.tmp"
    tmp.write_text("\n".join(str(y) for y in ys))
    os.replace(tmp, gate / "block")


def _wait_for(path: Path, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: {path.name} never appeared")
        time.sleep(0.01)


def _json(url: str):
    status, headers, body = get(url, timeout=150)
    return status, headers, json.loads(body)


def _in_background(url: str):
    out: dict = {}
    done = threading.Event()

    def fetch():
        out["answer"] = _json(url)
        done.set()

    threading.Thread(target=fetch, daemon=True).start()
    return out, done


def test_a_held_back_model_stalls_no_hit_health_or_other_model(served):
    srv, gate, store, result = served
    sid = result.snapshot_id
    sim = store.read_table(sid, "similar_items").to_pandas()
    pairs = store.read_table(sid, "predictions").to_pandas()
    _block(gate, 0.5)
    slow, slow_done = _in_background(f"{srv.base}/v1/models/stuck/predict?x=1&y=0.5")
    _wait_for(gate / "entered-0.5", "the held-back computation")
    # the stuck computation is waiting in the worker; everything else answers meanwhile
    answers = [_json(f"{srv.base}/v1/items/{sim.item_id.iloc[0]}/similar?k=3"),
               _json(f"{srv.base}/healthz"), _json(f"{srv.base}/readyz"),
               _json(f"{srv.base}/v1/models/stuck/predict?x=2&y=0.25"),   # the same model, another input
               _json(f"{srv.base}/v1/models/gated/predict?x=1&y=0.125"),  # another model, live
               _json(f"{srv.base}/v1/predictions?user_id={pairs.user_id.iloc[0]}&item_id={pairs.item_id.iloc[0]}")]
    assert [a[0] for a in answers] == [200] * 6, answers
    assert answers[0][2]["source"] == "precomputed"
    assert answers[3][2]["prediction"] == 20.25 and answers[3][2]["source"] == "live"
    assert answers[4][2]["prediction"] == 10.125
    assert not slow_done.is_set(), "the held-back request answered before it was let go"
    _block(gate)  # let it go: it answers, computed live
    assert slow_done.wait(60)
    status, _, body = slow["answer"]
    assert status == 200 and body["prediction"] == 10.5 and body["source"] == "live"


def test_past_its_deadline_a_model_gets_503_naming_it_and_a_late_result_fills_the_cache(served):
    srv, gate, store, result = served
    _block(gate, 0.75)
    url = f"{srv.base}/v1/models/gated/predict?x=2&y=0.75"
    status, headers, body = _json(url)
    assert status == 503 and headers["Content-Type"] == "application/problem+json"
    assert body["detail"] == "model 'gated' did not answer within its deadline of 700 ms; try again shortly"
    assert headers["Retry-After"] == "1"  # its computation goes on and fills the cache
    _block(gate)
    _wait_for(gate / "released-0.75", "the computation the 503 left behind")
    time.sleep(0.2)  # it has let go; now it hands its result to the cache (live results live 5 s)
    status, _, body = _json(url)
    assert status == 200 and body["source"] == "cache" and body["prediction"] == 20.75
    counted = _json(f"{srv.base}/readyz")[2]["models"]["gated"]
    assert counted["deadline_ms"] == 700.0 and counted["deadline"] >= 1
    listed = {m["name"]: m for m in _json(f"{srv.base}/v1/models")[2]["models"]}
    assert listed["gated"]["deadline_ms"] == 700.0 and listed["gated"]["live"]["deadline"] == counted["deadline"]
    assert listed["stuck"]["deadline_ms"] == 120000.0
    metrics = get(f"{srv.base}/metrics")[2].decode()
    line = next(x for x in metrics.splitlines()
                if x.startswith('hybridserve_live_refused_total{model="gated",reason="deadline"}'))
    assert float(line.split()[-1]) == counted["deadline"]


def test_a_stale_precomputed_answer_is_served_marked_stale_when_live_misses_or_fails(served):
    srv, gate, store, result = served
    snap = json.loads(get(f"{srv.base}/v1/snapshot")[2])
    sim = store.read_table(result.snapshot_id, "similar_items").to_pandas()
    created = _json(f"{srv.base}/v1/items/{sim.item_id.iloc[0]}/similar?k=2")[2]["computed_at"]  # the snapshot's
    time.sleep(max(0.0, 5.1 - snap["age_s"]))  # past gated's 5 s freshness bound: its precomputed answers are stale
    _block(gate, 0.0)  # the live answer of every precomputed key (y = 0) is held back: past the deadline
    status, headers, body = _json(f"{srv.base}/v1/models/gated/predict?x=3")
    assert status == 200, body
    assert body["stale"] is True and body["source"] == "precomputed" and body["prediction"] == 30.0
    assert body["computed_at"] == created and body["snapshot"] == result.snapshot_id
    assert headers["Cache-Control"] == "public, max-age=0" and "ETag" not in headers
    _block(gate)
    (gate / "raise").touch()  # the model raises: the same, stale, for a precomputed key ...
    try:
        status, headers, body = _json(f"{srv.base}/v1/models/gated/predict?x=2")
        assert status == 200 and body["stale"] is True and body["prediction"] == 20.0
        assert headers["Cache-Control"] == "public, max-age=0"
        # ... and 503 naming the model where nothing was precomputed
        status, headers, body = _json(f"{srv.base}/v1/models/gated/predict?x=2&y=0.875")
        assert status == 503 and "model 'gated' failed to predict" in body["detail"]
        assert "Retry-After" not in headers  # nothing says it will stop raising soon
    finally:
        (gate / "raise").unlink()
    counted = _json(f"{srv.base}/readyz")[2]["models"]["gated"]
    assert counted["stale_deadline"] == 1 and counted["stale_error"] == 1 and counted["error"] == 2
    # a fresh answer never says stale
    status, _, body = _json(f"{srv.base}/v1/models/gated/predict?x=1&y=0.0625")
    assert status == 200 and "stale" not in body
