"""Scheduled runs: the store lock, the APScheduler daemon, validation before publish, the closed loop."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import duckdb
import pyarrow as pa
import pytest

from batch import job as job_module
from batch.__main__ import main
from batch.catalog import query
from batch.job import run
from batch.schedule import Daemon, make_trigger
from serving.cli import EXIT_LOCKED, EXIT_REFUSED
from serving.errors import ConfigError
from serving.store import Store

from conftest import REPO
from test_popularity import write_log


def _runs(store: Store) -> list[dict]:
    con = duckdb.connect(str(store.catalog_path), read_only=True)
    try:
        cur = con.execute("SELECT * FROM runs ORDER BY started_at")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def _cli(cfg, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batch", "--config", str(cfg), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# The first run, stopped inside the store lock until told to go on: the overlap is certain, not timed.
_HOLDING_RUN = """
import sys
from serving.store import Store
from batch.__main__ import main

take = Store.lock
def lock_and_hold(self, *args, **kwargs):
    lock = take(self, *args, **kwargs)
    print("holding the lock", flush=True)
    sys.stdin.readline()
    return lock
Store.lock = lock_and_hold
sys.exit(main(sys.argv[1:]))
"""


def test_two_runs_at_once_one_publishes_the_other_exits_75(workspace):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    before = store.snapshot_ids()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDING_RUN, "--config", str(cfg), "run"], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == f"config: {cfg} (--config)\n"  # a run's first line
        assert holder.stdout.readline() == "holding the lock\n"
        second = _cli(cfg, "run")
        out_b, err_b = second.communicate(timeout=300)  # runs and ends while the first one holds the lock
    finally:
        out_a, err_a = holder.communicate("go on\n", timeout=300)
    assert holder.returncode == 0, err_a
    assert second.returncode == EXIT_LOCKED, (out_b, err_b)
    assert err_b.startswith("locked: ") and err_b.count("\n") == 1
    assert "published snapshot" in out_a
    after = store.snapshot_ids()
    assert len(after) == len(before) + 1  # the locked run changed nothing
    statuses = [r["status"] for r in _runs(store)]
    assert statuses.count("locked") == 1 and "published" in statuses


def test_daemon_fires_and_skips_an_overlapping_run(workspace):
    root, settings, _, _ = workspace
    calls, release = [], threading.Event()

    def slow_run(settings, should_stop):
        calls.append(time.time())
        release.wait(10)  # longer than the interval: the next fire would overlap
        return "done"

    daemon = Daemon(settings, run_job=slow_run, trigger=make_trigger("every 0.2s"))
    t = threading.Thread(target=daemon.serve, kwargs={"install_signals": False})
    t.start()
    try:
        deadline = time.time() + 10
        while daemon.counts["skipped_overlap"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert len(calls) == 1 and daemon.counts["skipped_overlap"] >= 2
    finally:
        release.set()
        daemon.stop()
        t.join(10)
    assert not t.is_alive() and daemon.counts["published"] == 1


def test_daemon_runs_the_real_job_on_a_short_interval(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    daemon = Daemon(settings.replace(batch__schedule="every 0.5s"))
    t = threading.Thread(target=daemon.serve, kwargs={"install_signals": False})
    t.start()
    try:
        deadline = time.time() + 60
        while daemon.counts["published"] < 2 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        daemon.stop()
        t.join(60)
    assert daemon.counts["published"] >= 2
    assert store.current_id() != first.snapshot_id
    store.verify(store.current_id())


def test_sigterm_during_a_run_leaves_current_complete(workspace):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    text = cfg.read_text().replace("[batch]\n", '[batch]\nschedule = "every 1s"\n')
    cfg.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "batch", "--config", str(cfg), "-v", "schedule"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.time() + 60
        for line in proc.stderr:  # wait until a run is under way
            lines.append(line)
            if "stage precompute" in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "stopping: a run in progress finishes or is abandoned" in log
    assert "scheduler stopped" in log
    current = store.current_id()
    store.verify(current)  # complete, whichever way the run ended
    assert not [p for p in store.snapshots_dir.iterdir() if p.name.startswith(".tmp-")]
    assert ("published snapshot" in log) == (current != first.snapshot_id)


def test_stop_before_current_moves_abandons_the_run(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    asked = iter([False, False, False, True])  # stop at the last checkpoint, after everything is computed
    with pytest.raises(job_module.Abandoned, match="before CURRENT moves"):
        run(settings, should_stop=lambda: next(asked, True))
    assert store.current_id() == first.snapshot_id
    assert store.snapshot_ids() == [first.snapshot_id]
    assert _runs(store)[-1]["status"] == "abandoned"


def test_bad_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="is not a crontab expression"):
        make_trigger("*/99 * * * *")
    assert make_trigger("*/15 * * * *") is not None


# --- validation before publish ---------------------------------------------------------
def _refused(cfg, capsys, *args):
    rc = main(["--config", str(cfg), "run", *args])
    return rc, capsys.readouterr().err


def test_refused_when_recomputed_answers_differ(workspace, capsys, monkeypatch):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    from serving.models.recommender import RecommenderModel
    real = RecommenderModel.part

    def corrupted(self, query, columns, answers):  # the precompute writes each similar list reversed
        table = real(self, query, columns, answers)
        if query != "similar_items":
            return table
        lists = [list(reversed(x)) for x in table.column("neighbor_ids").to_pylist()]
        return table.set_column(1, "neighbor_ids", pa.array(lists, pa.list_(pa.int64())))

    monkeypatch.setattr(RecommenderModel, "part", corrupted)
    rc, err = _refused(cfg, capsys)
    assert rc == EXIT_REFUSED
    assert err.startswith("refused: validation refused the snapshot: ") and "similar-item lists differ" in err
    assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]
    assert _runs(store)[-1]["status"] == "refused"


def test_refused_when_ann_recall_is_too_low(workspace, capsys):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    cfg.write_text(cfg.read_text().replace("[train]\n", '[train]\nindex = "IVF32,Flat"\nivf_nprobe = 1\n'))
    rc, err = _refused(cfg, capsys)
    assert rc == EXIT_REFUSED and "ANN recall@10" in err and "< batch.min_recall 0.95" in err
    assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]


def test_refused_when_row_counts_fall_unless_forced(workspace, capsys):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    cfg.write_text(cfg.read_text().replace("[batch]\n", "[batch]\nmax_items = 5\n"))
    rc, err = _refused(cfg, capsys)
    assert rc == EXIT_REFUSED and "similar_items rows fell from" in err and "--force" in err
    assert store.current_id() == first.snapshot_id
    rc, _ = _refused(cfg, capsys, "--force")
    assert rc == 0 and store.current_id() != first.snapshot_id
    forced = store.read_manifest(store.current_id())
    assert forced["row_counts"]["similar_items"] == 5 and forced["validation"]["forced"]


# --- incremental runs and the closed loop ----------------------------------------------------
def test_model_reused_from_the_live_snapshot_when_the_cache_was_pruned(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    import shutil
    shutil.rmtree(store.models_dir)
    second = run(settings)
    assert second.manifest["retrained"] is False
    assert second.manifest["model_version"] == first.manifest["model_version"]


def test_observed_hit_rate_is_recorded_by_the_next_run(workspace):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    created = datetime.fromisoformat(first.manifest["created_at"])
    ts = created + timedelta(seconds=5)
    rows = ([dict(ts=ts, endpoint="similar_items", item_id=1, k=5, source="precomputed", status=200,
                  latency_us=100)] * 3
            + [dict(ts=ts, endpoint="user_recs", user_id=1, k=5, source="live", status=200, latency_us=900)]
            + [dict(ts=ts, endpoint="similar_items", item_id=10**9, k=5, source="error", status=404,
                    latency_us=10)] * 5  # errors do not count
            + [dict(ts=created - timedelta(days=1), endpoint="similar_items", item_id=1, k=5, source="live",
                    status=200, latency_us=100)] * 10)  # before the live snapshot: not counted
    write_log(store, rows)
    second = run(settings)
    assert second.manifest["observed_hit_rate_since_previous"] == pytest.approx(0.75)
    runs = _runs(store)
    assert runs[-1]["observed_hit_rate"] == pytest.approx(0.75)
    assert runs[-1]["expected_hit_rate"] is not None
    # the trend query from the README
    cols, rows_, _ = query(store, "SELECT run_id, expected_hit_rate, observed_hit_rate FROM runs "
                                  "WHERE status = 'published' ORDER BY started_at")
    assert rows_[-1][2] == pytest.approx(0.75)
