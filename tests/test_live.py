"""The live path's parts (serving/live.py) and what they promise through the app: a failing model is
logged once per interval with a count (issue 20.10), a full queue is refused at once."""
from __future__ import annotations

import logging
import threading

import pandas as pd
import pytest

from serving.errors import Busy
from serving.live import Runner
from serving.store import Store
from serving.web.app import create_app


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def app_clock(workspace):
    root, settings, cfg, first = workspace
    clock = Clock(pd.Timestamp(first.manifest["created_at"]).timestamp() + 10.0)
    app = create_app(settings.replace(serving__error_log_interval_s=60.0), clock=clock, background=False)
    yield app, clock, Store(settings["paths.store"]), first
    app.extensions["hybridserve"].close()


def _unstored_pairs(store, sid, n):
    stored = set(map(tuple, store.read_table(sid, "predictions").to_pandas()[["user_id", "item_id"]].to_numpy()))
    users = store.read_table(sid, "user_recs").to_pandas()["user_id"].tolist()
    items = store.read_table(sid, "items").to_pandas()["item_id"].tolist()
    return [(u, i) for u in users for i in items if (u, i) not in stored][:n]


def test_a_failing_model_is_logged_once_per_interval_with_a_count(app_clock, caplog):
    app, clock, store, first = app_clock
    rating = app.extensions["hybridserve"].engine.snapshot.models["rating"]

    def broken(*args, **kwargs):
        raise ZeroDivisionError("the model's own bug")

    rating.answer_one = broken
    client = app.test_client()
    pairs = _unstored_pairs(store, first.snapshot_id, 41)
    with caplog.at_level(logging.ERROR, logger="serving.engine"):
        burst = [client.get(f"/v1/predictions?user_id={u}&item_id={i}") for u, i in pairs[:40]]
        assert [r.status_code for r in burst] == [503] * 40
        assert all("model 'rating' failed to predict (ZeroDivisionError)" in r.json["detail"] for r in burst)
        records = [r for r in caplog.records if r.name == "serving.engine"]
        assert len(records) == 1 and records[0].exc_info[0] is ZeroDivisionError  # one traceback for 40
        clock.t += 61  # the next interval: the next failure is logged, saying how many were not
        u, i = pairs[40]
        assert client.get(f"/v1/predictions?user_id={u}&item_id={i}").status_code == 503
    records = [r for r in caplog.records if r.name == "serving.engine"]
    assert len(records) == 2 and records[1].exc_info[0] is ZeroDivisionError
    assert "(39 more times in the last 61 s, not logged)" in records[1].getMessage()
    text = client.get("/metrics").text
    assert 'hybridserve_model_errors_total{model="rating"} 41.0' in text
    assert 'hybridserve_live_refused_total{model="rating",reason="error"} 41.0' in text


def test_a_full_queue_is_refused_at_once_and_frees_as_computations_end():
    runner = Runner("slow", threads=1, queue=1)
    gate = threading.Event()
    try:
        running = runner.submit(gate.wait)
        queued = runner.submit(lambda: "second")
        with pytest.raises(Busy, match=r"model 'slow' is busy: 1 live computation running and 1 queued"):
            runner.submit(lambda: "third")
        gate.set()
        assert running.result(5) is True and queued.result(5) == "second"
        assert runner.submit(lambda: "again").result(5) == "again"
    finally:
        gate.set()
        runner.shutdown()
