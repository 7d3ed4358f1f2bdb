"""The caching front: a real nginx with config/nginx.conf (its ports substituted) in front of a real
server process. Live answers are fresh for 3.2 s (serving.cache_ttl_s), precomputed ones for a day
with max-age capped at 5 s (serving.max_age_cap_s). Hits come from the front, errors and max-age=0
answers are never kept, a burst of one miss reaches the API once, no answer through the front is
older than its bound, an expired entry is revalidated (304), and a new snapshot shows through the
front within the cap."""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from batch.job import run
from batch.tools.demo import ApiServer, http_get as get
from conftest import make_settings
from serving.store import Store
from serving.web.metrics import HIT_FLUSH_S

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from bench_front import Front, nginx_binary  # noqa: E402

BOUND_S = 3.2   # live answers' bound; not a whole number: a whole-second cache overshoots a floor()ed max-age most
CAP_S = 5       # above the live answers' max-age (2), so it is the precomputed answers' alone


@pytest.fixture(scope="module")
def front(tmp_path_factory, published):
    """(nginx front, API server, settings, items without precomputed lists, items with them)."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed: this test runs a real one (make test-tools installs it)")
    src, _, first = published
    root = tmp_path_factory.mktemp("front")
    shutil.copytree(src / "inputs", root / "inputs")
    shutil.copytree(src / "store", root / "store", symlinks=True)
    # one worker: one live tier, so the test knows which cached answer the API holds
    settings, cfg = make_settings(root, serving={"cache_ttl_s": BOUND_S, "max_age_cap_s": CAP_S, "workers": 1,
                                                 "reload_interval_s": 0.2, "log_flush_interval_s": 0.0})
    store = Store(settings["paths.store"])
    hot = store.read_table(first.snapshot_id, "similar_items").to_pandas()["item_id"].tolist()
    cold = [i for i in store.read_table(first.snapshot_id, "items").to_pandas()["item_id"] if i not in set(hot)]
    with ApiServer(cfg) as api, Front(api.port) as nginx:
        yield nginx, api, settings, iter(cold), iter(hot)


def _origin_requests(api) -> float:
    """Requests the API answered (its /metrics, which counts none of its own), once every worker has
    added the hits it counted in memory (within HIT_FLUSH_S)."""
    time.sleep(2 * HIT_FLUSH_S)
    _, _, body = get(api.base + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("hybridserve_requests_total{"))


def _age_at(sent: float, body: dict) -> float:
    """How old the answer was when the request was sent (it was served after that, so at least this
    old then), from its computed_at: the age_s in a kept body is the API's. +1 ms: computed_at is
    written truncated to milliseconds."""
    return sent - datetime.fromisoformat(body["computed_at"].replace("Z", "+00:00")).timestamp() - 0.001


def test_hits_come_from_the_front_errors_never_kept(front):
    nginx, api, settings, items, hot = front
    url = f"/v1/items/{next(hot)}/similar?k=5"
    n0 = _origin_requests(api)
    status, h1, b1 = get(nginx.base + url)
    status2, h2, b2 = get(nginx.base + url)
    assert status == status2 == 200 and b2 == b1
    assert (h1["X-Cache-Status"], h2["X-Cache-Status"]) == ("MISS", "HIT")
    assert json.loads(b1)["source"] == "precomputed" and h1["X-Origin-Cache-Control"] == f"public, max-age={CAP_S}"
    assert h2["Cache-Control"] == "no-cache"
    for bad in ("/v1/items/999999999/similar?k=5", "/v1/items/1/similar?k=0", "/v1/snapshot"):
        got = [get(nginx.base + bad) for _ in range(2)]
        assert [h["X-Cache-Status"] for _, h, _ in got] == ["MISS", "MISS"], bad
        assert all(h["Cache-Control"] == "no-store" for _, h, _ in got), bad
    assert _origin_requests(api) - n0 == 1 + 6


def test_no_answer_through_the_front_is_older_than_its_bound(front):
    """A live answer polled through the front for 8 s (2-3 lifetimes of a cached one): every answer
    younger than BOUND_S by its own computed_at, most of them hits. With max-age = floor(freshness left), nginx
    (which keeps an entry through the second its max-age ends) served answers up to 4 s old."""
    nginx, api, settings, items, hot = front
    url = f"/v1/items/{next(items)}/similar?k=5"
    ages, states = [], []
    end = time.time() + 8.0
    while (sent := time.time()) < end:
        status, headers, body = get(nginx.base + url)
        assert status == 200
        ages.append(_age_at(sent, json.loads(body)))
        states.append(headers["X-Cache-Status"])
        time.sleep(0.04)
    assert max(ages) <= BOUND_S, (max(ages), states)
    assert states.count("HIT") > len(states) / 2 and states.count("HIT") < len(states) - 1  # renewed, mostly hits


def test_an_answer_with_max_age_0_is_not_kept(front):
    """An answer the API marks max-age=0 (here: its cached live answer with under 2 s left; a
    stale-if-error answer says the same) goes to the API on every request through the front."""
    nginx, api, settings, items, hot = front
    url = f"/v1/items/{next(items)}/similar?k=5"
    status, _, body = get(api.base + url)  # computed and cached by the API, fresh for BOUND_S
    assert status == 200
    computed = datetime.fromisoformat(json.loads(body)["computed_at"].replace("Z", "+00:00")).timestamp()
    time.sleep(max(0.0, computed + BOUND_S - 1.8 - time.time()))
    n0, got = _origin_requests(api), []
    # until 3 answers, or the API's entry is about to expire (a loaded machine may be slow)
    while len(got) < 3 and time.time() < computed + BOUND_S - 0.3:
        status, headers, body = get(nginx.base + url)
        assert status == 200 and json.loads(body)["source"] == "cache"
        got.append((headers["X-Origin-Cache-Control"], headers["X-Cache-Status"]))
    assert len(got) >= 2 and set(got) == {("public, max-age=0", "MISS")}, got
    assert _origin_requests(api) - n0 == len(got)


def test_a_burst_of_one_miss_reaches_the_api_once(front):
    """20 requests at once for an answer nobody asked before: proxy_cache_lock lets one through."""
    nginx, api, settings, items, hot = front
    url = f"/v1/items/{next(items)}/similar?k=9"
    n0 = _origin_requests(api)
    barrier, out = threading.Barrier(20), []

    def one():
        barrier.wait()
        out.append(get(nginx.base + url))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == 20 and {s for s, _, _ in out} == {200} and len({b for _, _, b in out}) == 1
    assert _origin_requests(api) - n0 == 1


def test_revalidation_then_a_new_snapshot_within_the_cap(front):
    """A precomputed answer (fresh for a day, max-age capped at CAP_S): once nginx's entry expires it
    asks the API with If-None-Match and gets 304 (REVALIDATED, the same bytes). Then a batch run
    publishes a snapshot: within the cap (+1 s of nginx's whole seconds, + the reload interval) the
    front answers from it, and never from the old one again."""
    nginx, api, settings, items, hot = front
    url = f"/v1/items/{next(hot)}/similar?k=5"
    _, h0, first = get(nginx.base + url)
    old = json.loads(first)["snapshot"]
    assert h0["X-Cache-Status"] == "MISS" and json.loads(first)["source"] == "precomputed"
    states, t0 = [], time.time()
    while time.time() < t0 + CAP_S + 2.0 and "REVALIDATED" not in states:
        _, headers, body = get(nginx.base + url)
        states.append(headers["X-Cache-Status"])
        assert body == first, states  # a hit, or revalidated: the body nginx kept
        time.sleep(0.1)
    assert states[-1] == "REVALIDATED" and set(states[:-1]) <= {"HIT"}, states
    new = run(settings).snapshot_id
    published = time.time()
    assert new != old
    seen = []
    while time.time() < published + CAP_S + 3.0:
        seen.append((time.time() - published, json.loads(get(nginx.base + url)[2])["snapshot"]))
        time.sleep(0.05)
    first_new = next((t for t, sid in seen if sid == new), None)
    assert first_new is not None and first_new <= CAP_S + 1 + settings["serving.reload_interval_s"] + 0.5, seen
    assert all(sid == new for t, sid in seen if t >= first_new), seen


def test_the_front_benchmark_runs_end_to_end(tmp_path, workspace):
    """tests/bench/bench_front.py at a tiny size with the Python load generator (make bench runs wrk):
    every path a hit through the front, the same bytes as the static copy, no request failed."""
    import bench_front
    r = bench_front.run(seconds=0.3, rounds=1, loadgen="python", out_dir=tmp_path, n_paths=20, config=workspace[2])
    saved = json.loads((tmp_path / "front.json").read_text())
    assert saved["paths"] == 20 and sum(saved["sources"].values()) == 20
    for name in ("front", "static"):
        for key in ("at_16", "at_1"):
            assert r[name][key]["requests"] > 0 and r[name][key]["non_2xx"] == 0, (name, key)
    assert r["origin_lookups_during_run"] == 0  # every measured request was answered by nginx
    assert r["front_vs_static_rps"] > 0
