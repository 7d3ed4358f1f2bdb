"""`python -m batch demo`: the whole loop on the sample, end to end, in a couple of minutes.

sample -> batch run -> the API server -> replay a Zipf trace -> batch run (reads the request log)
-> replay again -> the hit rate rises -> one SQL query -> stop the server.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import pyarrow.parquet as pq
from werkzeug.datastructures import Headers

from batch import catalog
from batch.inputs import INTERACTIONS, ITEMS, generate_sample, load_inputs, write_inputs
from batch.sample_models import ensure_sample_models
from batch.job import run
from batch.tools.trace import hit_rate, hit_rates_by_endpoint, make_trace, replay, shown_items, summarise
from serving.models.recommender import ModelBundle
from serving.settings import Settings
from serving.store import Store

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, Headers, bytes]:
    """(status, headers, body); 4xx/5xx and 304 are returned, not raised. Header names are looked up
    case-insensitively, as HTTP says (granian sends them in lower case)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, Headers(list(r.headers.items())), r.read()
    except urllib.error.HTTPError as e:
        return e.code, Headers(list(e.headers.items())), e.read()


class ApiServer:
    """The API under its production server (``python -m serving.server``, granian) in a child process,
    on a free loopback port."""

    def __init__(self, config: Path | None, env: dict[str, str] | None = None, workers: int | None = None,
                 app: str | None = None, port: int | None = None):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the server makes its own unless told
        self.env.update(HYBRIDSERVE_SERVING_HOST="127.0.0.1", HYBRIDSERVE_SERVING_PORT=str(self.port), **(env or {}))
        if config is not None:
            self.env["HYBRIDSERVE_CONFIG"] = str(config)
        if workers is not None:
            self.env["HYBRIDSERVE_SERVING_WORKERS"] = str(workers)
        self.app = app  # another WSGI app factory ("module:function"), for the benchmarks' baselines
        self.proc: subprocess.Popen | None = None
        self.output = ""  # what the server printed, once stopped

    def command(self) -> list[str]:
        return [sys.executable, "-m", "serving.server"] + (["--app", self.app] if self.app else [])

    def start(self, ready_path: str = "/readyz", timeout: float = 90.0) -> "ApiServer":
        # A file, not a pipe: nobody reads the server's log while it runs, and a full pipe would block it.
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.command(), cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log()}")
            try:
                if self._all_workers_started() and http_get(self.base + ready_path, timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer {ready_path} within {timeout:.0f}s")

    def stop(self, timeout: float = 45.0, sig: int = signal.SIGTERM) -> int | None:
        """``sig`` (SIGTERM or SIGINT: the workers drain and flush their request logs), then wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.output = self.log()
        self._log.close()
        return self.proc.returncode

    def _all_workers_started(self) -> bool:
        """Every worker granian spawned has built its app and serves (not only the one that answered)."""
        text = self.log()
        spawned = text.count("Spawning worker-")
        return spawned > 0 and text.count("Started worker-") >= spawned

    def log(self) -> str:
        """What the server has printed so far (its own lines and its workers')."""
        if self._log.closed:
            return self.output
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def wait_for_snapshot(self, snapshot_id: str, timeout: float = 30.0, probes: int = 16) -> None:
        """Until every probe (spread over the workers) answers from ``snapshot_id``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            ids = {json.loads(http_get(self.base + "/v1/snapshot")[2]).get("id") for _ in range(probes)}
            if ids == {snapshot_id}:
                return
            time.sleep(0.2)
        raise RuntimeError(f"server did not switch to snapshot {snapshot_id}")

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _table(title: str, df) -> str:
    s = summarise(df)
    lines = [title, f"  {'source':<12}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}"]
    for src, row in s.iterrows():
        lines.append(f"  {src:<12}{int(row.requests):>10}{row.p50_ms:>10.2f}{row.p99_ms:>10.2f}")
    lines.append(f"  hit rate (answered from the snapshot): {hit_rate(df):.3f}")
    return "\n".join(lines)


def _model_query(spec, overrides: dict) -> str:
    """A query for ``spec``: each input's first value (or its default, or its minimum), with overrides."""
    from urllib.parse import urlencode
    params = {}
    for inp in spec.inputs:
        if inp.name in overrides:
            params[inp.name] = overrides[inp.name]
        elif inp.values is not None:
            params[inp.name] = inp.values[0]
        elif not inp.required:
            continue
        elif inp.min is not None:
            params[inp.name] = inp.min
        else:
            return ""
    text = {k: ("true" if v is True else "false" if v is False else v) for k, v in params.items()}
    return f"/v1/models/{spec.name}/predict?{urlencode(text)}"


def _models_before(base: str, settings: Settings, manifest: dict, echo) -> tuple:
    """The first registered model: its grid precomputed; a miss answered live, then from the cache.
    Returns ((path of the miss, its answer) or None with no model, model requests made)."""
    spec = next((s for s in settings.models if s.name in (manifest.get("models") or {})), None)
    if spec is None:  # nothing to show (and nothing printed: the README shows a run without models)
        return None, 0
    status, _, body = http_get(base + "/v1/models")
    listed = [f"{m['name']} {m['version']}" for m in json.loads(body)["models"]]
    sel = manifest["models"][spec.name]["selection"]
    echo(f"   registered models (GET /v1/models): {', '.join(listed)}; {spec.name}: "
         f"{manifest['models'][spec.name]['rows']} rows precomputed ({sel['grid_rows']} from the grid)")
    hit = _model_query(spec, {})
    # a value of an open optional input (e.g. a discount) is not in the grid: a miss
    open_inp = next((i for i in spec.inputs if i.values is None and i.type == "float"), None)
    if not hit or open_inp is None:
        return None, 0
    lo, hi = open_inp.min or 0.0, open_inp.max if open_inp.max is not None else (open_inp.min or 0.0) + 1.0
    miss = _model_query(spec, {open_inp.name: round(lo + (hi - lo) * 0.37, 3)})
    answers = [json.loads(http_get(base + path)[2]) for path in (hit, miss, miss, miss)]
    sources = [f"{a.get('source', 'error')} {shown_prediction(a.get('prediction'))}" for a in answers]
    echo(f"   GET {hit}\n     -> {sources[0]}")
    echo(f"   GET {miss}  (3 times)\n     -> " + ", then ".join(sources[1:3]) + " (the request log keeps the miss)")
    return (miss, answers[-1], answers[0]), len(answers)


def shown_prediction(value) -> str:
    """A prediction as the demo prints it: numbers to two decimals (the demo model is trained on the
    machine that runs it, and a trained model's floats differ in their digits between CPUs)."""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _models_after(base: str, miss: tuple, manifest: dict, echo) -> dict:
    """The miss again, now precomputed by the second run. Returns the model's answers the demo saw
    (the hit, the miss live, the miss precomputed), for a caller to check against the model."""
    path, before, hit = miss
    answer = json.loads(http_get(base + path)[2])
    name = before["model"]
    echo(f"   GET {path} after the second run\n     -> {answer['source']} {shown_prediction(answer['prediction'])} "
         f"(snapshot {answer['snapshot']}: {manifest['models'][name]['selection']['from_log']} "
         f"{name} input(s) taken from the request log)")
    return {"hit": hit, "miss": before, "after": answer}


def demo_store(settings: Settings) -> Path:
    """The demo's own store beside ``paths.store`` (``data/store`` -> ``data/store-demo``)."""
    store = Path(settings["paths.store"])
    return store.with_name(store.name + "-demo")


def _fresh_store(folder: Path) -> Store:
    """Empty the demo's store, so that every demo starts with no request log and prints the same
    numbers; a folder the demo did not make is never deleted."""
    marker = folder / ".hybridserve-demo"
    if folder.exists():
        if not marker.is_file():
            raise click.ClickException(f"{folder}: exists and was not made by the demo; move it away or "
                                       f"set paths.store elsewhere")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    marker.write_text("made by `python -m batch demo`, emptied by every demo run\n")
    return Store(folder)


def _wait_for_log_rows(store: Store, rows: int, timeout: float = 60.0) -> int:
    """Until the workers have flushed ``rows`` request-log rows (not a guessed sleep)."""
    deadline = time.time() + timeout
    while True:
        have = sum(pq.read_metadata(p).num_rows for p in store.segments())
        if have >= rows or time.time() > deadline:
            return have
        time.sleep(0.2)


def demo(settings: Settings, config: Path | None, requests: int = 3000, concurrency: int = 6,
         echo=click.echo) -> dict:
    """The loop, in a store of its own emptied first: what it prints depends only on the settings,
    except for times, ids, the port, and which worker's cache answered a repeated live request."""
    t_start = time.perf_counter()
    inputs = Path(settings["paths.inputs"])
    s = settings
    store = _fresh_store(demo_store(settings))
    made = not ((inputs / INTERACTIONS).is_file() and (inputs / ITEMS).is_file())
    if made:
        write_inputs(inputs, *generate_sample(s["sample.users"], s["sample.items"], s["sample.interactions"],
                                              s["sample.genres"], s["sample.days"], s["sample.seed"]))
    # The demo's traffic spans seconds: a decay over hours would change no weight, only break ties
    # between keys asked equally often by which worker answered first -- and so the numbers shown.
    settings = settings.replace(paths__store=str(store.root), batch__decay_half_life_hours=0.0)
    echo(f"inputs {inputs} ({'generated now' if made else 'there already'}), demo store {store.root} (emptied first)")
    inputs_now = load_inputs(inputs, settings["train.rating_min"], settings["train.rating_max"])
    for path in ensure_sample_models(settings, inputs_now.interactions, inputs_now.items, settings["sample.seed"]):
        echo(f"trained the sample's demand model into {path}")
    first = run(settings)
    echo(f"1. batch run: snapshot {first.snapshot_id}, rows {first.manifest['row_counts']}, "
         f"expected hit rate {first.manifest['popularity']['expected_hit_rate']:.3f}")
    bundle_items = store.read_table(first.snapshot_id, "items").column("item_id").to_numpy()
    bundle = ModelBundle.load(store.model_dir(first.snapshot_id))
    users = bundle.user_ids
    shown = shown_items(bundle, users)
    env = {"HYBRIDSERVE_PATHS_STORE": str(store.root), "HYBRIDSERVE_SERVING_LOG_FLUSH_INTERVAL_S": "1.0",
           "HYBRIDSERVE_SERVING_RELOAD_INTERVAL_S": "0.5"}
    with ApiServer(config, env=env) as server:
        echo(f"2. the API (granian) on {server.base}, {settings['serving.workers']} worker processes")
        before = replay(server.base, make_trace(bundle_items, users, requests, seed=1, shown=shown), concurrency)
        echo(_table(f"3. replayed {requests} GET requests (Zipf 1.1 over all endpoints), {concurrency} at a time:",
                    before))
        miss, asked = _models_before(server.base, settings, first.manifest, echo)
        logged = _wait_for_log_rows(store, len(before) + asked)
        second = run(settings)
        echo(f"4. batch run again, now from the request log ({logged} rows): snapshot {second.snapshot_id}, "
             f"rows {second.manifest['row_counts']}, expected hit rate "
             f"{second.manifest['popularity']['expected_hit_rate']:.3f}")
        server.wait_for_snapshot(second.snapshot_id)
        after = replay(server.base, make_trace(bundle_items, users, requests, seed=2, shown=shown), concurrency)
        echo(_table("5. replayed a fresh trace from the same distribution:", after))
        echo(f"   hit rate {hit_rate(before):.3f} -> {hit_rate(after):.3f}; by endpoint:")
        b, a = hit_rates_by_endpoint(before), hit_rates_by_endpoint(after)
        for ep in sorted(b):
            echo(f"     {ep:<14}{b[ep]:.3f} -> {a.get(ep, 0.0):.3f}")
        echo("   (a session comes from the snapshot when its items' similar-item lists prove the answer)")
        model_answers = _models_after(server.base, miss, second.manifest, echo) if miss is not None else {}
    sql = ("SELECT endpoint, source, count(*) AS requests, round(quantile_cont(latency_us, 0.5)) AS p50_us "
           "FROM requests GROUP BY ALL ORDER BY endpoint, source")
    cols, rows, _ = catalog.query(store, sql)
    echo(f"6. SQL over the catalog (python -m batch sql \"...\"):\n   {sql}\n" + catalog.format_table(cols, rows))
    echo(f"7. server stopped; demo took {time.perf_counter() - t_start:.0f}s")
    return {"before": hit_rate(before), "after": hit_rate(after), "first": first.snapshot_id,
            "second": second.snapshot_id, "store": store.root, "model_answers": model_answers}
