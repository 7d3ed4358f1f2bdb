"""Faults a batch run meets on a real machine: a full or read-only disk, a kill between two steps.

Each leaves the live snapshot serving, says what happened in one line, and leaves nothing behind that
the next run does not clean or finish. Full disks are real where they can be (a file symlinked to
/dev/full, whose writes fail with ENOSPC in the kernel), injected where they cannot (DuckDB, a
read-only lock file); kills are real SIGKILLs of a `python` process at the named step.
"""
import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

import batch.catalog
from batch.__main__ import main
from batch.catalog import query
from batch.job import run
from serving.store import Store, describe_os_error, layout, os_error_at

from conftest import REPO

DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.is_char_device(),
                                    reason="/dev/full (writes fail with ENOSPC) is not a device on this machine")


def _runs(store: Store, where: str = "true"):
    return query(store.catalog_path, f"SELECT run_id, status, snapshot_id, error, stage_seconds FROM runs "
                                     f"WHERE {where} ORDER BY started_at")[1]


def _full_disk_at(monkeypatch, table: str):
    """Every new snapshot's ``<table>.parquet`` is written to /dev/full."""
    real_begin = Store.begin

    def begin(self, *args, **kwargs):
        writer = real_begin(self, *args, **kwargs)
        path = writer.tmp / layout.table_file(table)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(DEV_FULL, path)
        return writer
    monkeypatch.setattr(Store, "begin", begin)


def _pending_records_on_a_full_disk(monkeypatch):
    """Every pending run record the store writes lands on /dev/full."""
    real_write = Store.write_pending

    def write_pending(self, name, data, before_replace=None):
        self.pending_runs_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(DEV_FULL, self.pending_runs_dir / (name + ".tmp"))
        return real_write(self, name, data, before_replace)
    monkeypatch.setattr(Store, "write_pending", write_pending)


# --- one line per OS error ---------------------------------------------------------------------
@needs_dev_full
def test_full_disk_while_writing_a_snapshot_one_line_exit_1(workspace, capsys, monkeypatch):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _full_disk_at(monkeypatch, "user_recs")
    rc = main(["--config", str(cfg), "run"])
    err = capsys.readouterr().err
    assert rc == 1
    assert re.fullmatch(rf"error: {re.escape(str(store.snapshots_dir))}/\.tmp-[\d-]+/models/recommender/user_recs\.parquet: "
                        rf"No space left on device \(ENOSPC\)\n", err), err
    assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]
    assert not [p for p in store.snapshots_dir.iterdir() if p.name.startswith(".")]  # the half snapshot is gone
    assert DEV_FULL.is_char_device()  # the symlink was removed, not the device
    (run_id, status, _, error, _), = _runs(store, "status = 'failed'")
    assert error.endswith("user_recs.parquet: No space left on device (ENOSPC)")


@needs_dev_full
def test_full_disk_traceback_only_with_verbose(workspace):
    """The real process: one line by default; -v adds the traceback above it."""
    root, settings, cfg, _ = workspace
    script = textwrap.dedent("""
        import os, sys
        from serving.store import Store
        real_begin = Store.begin
        def begin(self, *args, **kwargs):
            writer = real_begin(self, *args, **kwargs)
            path = writer.tmp / "models" / "rating" / "predictions.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/dev/full", path)
            return writer
        Store.begin = begin
        from batch.__main__ import main
        sys.exit(main(sys.argv[1:]))
    """)
    for flags in ([], ["-v"]):
        proc = subprocess.run([sys.executable, "-c", script, *flags, "--config", str(cfg), "run"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.rstrip("\n").splitlines()[-1]
        assert last.startswith("error: ") and last.endswith("predictions.parquet: No space left on device (ENOSPC)")
        if flags:
            assert "Traceback (most recent call last)" in proc.stderr
        else:
            assert proc.stderr == last + "\n"


def test_read_only_lock_file_one_line_exit_1(workspace, capsys, monkeypatch):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    rc = main(["--config", str(cfg), "run"])
    assert rc == 1
    assert capsys.readouterr().err == f"error: {store.root / '.batch.lock'}: Read-only file system (EROFS)\n"
    assert store.current_id() == first.snapshot_id


def test_os_error_at_names_the_path_of_a_pyarrow_write_error():
    """pyarrow's own words for a full disk carry the errno in the text and no file name."""
    raw = OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert describe_os_error(os_error_at(raw, "/s/x.parquet")) == "/s/x.parquet: No space left on device (ENOSPC)"
    no_errno = OSError("Error writing bytes to file. Detail: [errno 30] Read-only file system")
    assert describe_os_error(os_error_at(no_errno, "/s/y")) == "/s/y: Read-only file system (EROFS)"
    named = FileNotFoundError(errno.ENOENT, "No such file or directory", "/s/z")
    assert os_error_at(named, "/elsewhere") is named


# --- a published run is never reported as failed -------------------------------------------------
class _FullDiskConnection:
    """A DuckDB connection whose writes fail as DuckDB reports a full disk."""

    def __init__(self, con):
        self._con = con

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith(("INSERT", "CREATE")):
            raise duckdb.IOException('IO Error: Could not write file "catalog.duckdb.wal": No space left on device')
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def _catalog_disk_full(monkeypatch):
    real_connect = duckdb.connect
    monkeypatch.setattr(batch.catalog.duckdb, "connect", lambda *a, **k: _FullDiskConnection(real_connect(*a, **k)))


def test_full_disk_in_catalog_after_publish_exits_0_and_the_record_waits(workspace, capsys, monkeypatch):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _catalog_disk_full(monkeypatch)
    rc = main(["--config", str(cfg), "run"])
    out, err = capsys.readouterr()
    assert rc == 0
    live = store.current_id()
    assert live != first.snapshot_id and f"published snapshot {live}" in out
    assert err == ("warning: catalog not updated (IO Error: Could not write file \"catalog.duckdb.wal\": No space "
                   "left on device): the snapshot is published; the next run adds its record to the catalog\n")
    pending = list(store.pending_runs_dir.glob("*.json"))
    assert len(pending) == 1
    monkeypatch.undo()
    after = run(settings)
    assert after.catalog_updated and not list(store.pending_runs_dir.glob("*"))
    run_id = store.read_manifest(live)["run_id"]
    (_, status, sid, error, stages), = _runs(store, f"run_id = '{run_id}'")
    assert (status, sid, error) == ("published", live, None)
    assert stages is not None  # the run's own record, not one rebuilt


@needs_dev_full
def test_disk_too_full_even_for_the_pending_record_rebuilds_it_from_the_manifest(workspace, capsys, monkeypatch):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _catalog_disk_full(monkeypatch)
    _pending_records_on_a_full_disk(monkeypatch)
    rc = main(["--config", str(cfg), "run"])
    out, err = capsys.readouterr()
    assert rc == 0 and "published snapshot" in out and err.startswith("warning: catalog not updated")
    live = store.current_id()
    assert live != first.snapshot_id
    for leftover in store.pending_runs_dir.iterdir():  # the symlink the full disk left; a kill would too
        leftover.unlink()
    monkeypatch.undo()
    run(settings)
    run_id = store.read_manifest(live)["run_id"]
    (_, status, sid, error, stages), = _runs(store, f"run_id = '{run_id}'")
    assert (status, sid) == ("published", live)
    assert error.startswith("run record rebuilt from the snapshot manifest") and stages is None


def test_failed_retention_after_publish_is_a_warning(workspace, capsys, monkeypatch):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])

    def read_only(self, keep):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.snapshots_dir))
    monkeypatch.setattr(Store, "apply_retention", read_only)
    rc = main(["--config", str(cfg), "run"])
    out, err = capsys.readouterr()
    assert rc == 0 and store.current_id() != first.snapshot_id
    assert err == (f"warning: retention not done: {store.snapshots_dir}: Read-only file system; "
                   f"the next run retries\n")


# --- kills: the next run cleans up and records what was published --------------------------------
KILL_AT = textwrap.dedent("""
    import os, signal, sys
    step, cfg = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if step in ("record_rename", "record_partial"):
        from serving.store import Store
        real = Store.write_pending

        def write_pending(self, name, data, before_replace=None):
            def at_rename():
                if step == "record_partial":  # as if the disk had taken only part of it
                    tmp = self.pending_runs_dir / (name + ".tmp")
                    tmp.write_bytes(tmp.read_bytes()[:20])
                die()
            real(self, name, data, at_rename)
        Store.write_pending = write_pending
    elif step == "model_save":
        from serving.models.recommender import ModelBundle
        real_save = ModelBundle.save

        def save(self, folder):
            real_save(self, folder)
            die()  # saved under models/.tmp-*, not yet renamed into place
        ModelBundle.save = save
    from batch.job import run
    from serving.settings import load_settings
    run(load_settings(cfg, env={}), retrain=step == "model_save")
""")


def _kill_at(step: str, cfg: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_AT, step, str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("step", ["record_rename", "record_partial"])
def test_kill_at_the_run_record_rename_the_next_run_records_the_published_run(workspace, step):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _kill_at(step, cfg)
    live = store.current_id()
    assert live != first.snapshot_id  # the killed run had published
    assert len(list(store.pending_runs_dir.glob("*.json.tmp"))) == 1
    killed_run = store.read_manifest(live)["run_id"]
    assert not _runs(store, f"run_id = '{killed_run}'")
    nxt = run(settings)
    assert nxt.catalog_updated
    assert not list(store.pending_runs_dir.iterdir())
    (_, status, sid, error, stages), = _runs(store, f"run_id = '{killed_run}'")
    assert (status, sid) == ("published", live)
    if step == "record_rename":  # the complete record, as the run wrote it
        assert error is None and "publish" in stages
    else:
        assert error.startswith("run record rebuilt from the snapshot manifest") and stages is None


def test_kill_during_a_retrains_model_save_leaves_nothing_after_the_next_run(workspace):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    models_before = sorted(p.name for p in store.models_dir.iterdir())
    _kill_at("model_save", cfg)
    left = [p.name for p in store.models_dir.iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 1 and any((store.models_dir / left[0]).iterdir())
    assert store.current_id() == first.snapshot_id
    nxt = run(settings)
    assert sorted(p.name for p in store.models_dir.iterdir()) == models_before
    assert store.current_id() == nxt.snapshot_id


def test_a_live_writers_pending_record_is_left_alone(workspace):
    """recover_pending runs while a locked-out run may be writing its record: a .tmp whose writer is
    alive is neither renamed nor removed."""
    root, settings, _, _ = workspace
    store = Store(settings["paths.store"])
    store.pending_runs_dir.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as other:
        try:
            tmp = store.pending_runs_dir / f"run-20260101-000000-000000-{other.pid}.json.tmp"
            tmp.write_text('{"run_id": "run-')  # half written, by a process still running
            assert batch.catalog.recover_pending(store) == []
            assert tmp.exists()
        finally:
            other.stdin.close()
            other.wait(timeout=30)
    assert batch.catalog.recover_pending(store) == [f"{tmp.name}: incomplete, removed"]
    assert not tmp.exists()


@needs_dev_full
def test_pending_folder_full_but_catalog_writable_records_the_run_directly(workspace, monkeypatch):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _pending_records_on_a_full_disk(monkeypatch)
    result = run(settings)
    assert result.catalog_updated
    (_, status, sid, error, stages), = _runs(store, f"run_id = '{result.run_id}'")
    assert (status, sid, error) == ("published", result.snapshot_id, None) and "publish" in stages
