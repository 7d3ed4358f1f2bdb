"""A request log that cannot be written at shutdown says how many answered requests it lost: one final
ERROR with the count and the reason, in a real server process whose requests/ folder is a full tmpfs."""
from __future__ import annotations

import errno
import logging
import re
import subprocess
import time

import pytest

from batch.tools.demo import ApiServer
from serving.requestlog import RequestLog
from serving.store import Store

from test_server import _Client, _similar_path


def _full(table, where, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_close_with_unwritable_rows_logs_one_error_with_the_count(tmp_path, caplog):
    store = Store(tmp_path / "store")
    store.ensure_layout()
    log = RequestLog(store, flush_interval_s=0, max_buffer=5, write_table=_full)
    for i in range(7):
        log.append("similar_items", i, None, 10, "precomputed", 200, 50)
    caplog.set_level(logging.ERROR, "serving.requestlog")
    caplog.clear()
    assert log.close() == 7
    assert log.close() == 7  # closed again at exit: said once
    (line,) = [r.getMessage() for r in caplog.records if "lost at shutdown" in r.getMessage()]
    assert re.fullmatch(rf"request log: 7 rows lost at shutdown \(5 not written to {re.escape(str(store.requests_dir))}, "
                        rf"2 dropped earlier from the full buffer\): .*\.tmp: No space left on device \(ENOSPC\)", line)


def test_close_after_a_good_flush_says_nothing(tmp_path, caplog):
    store = Store(tmp_path / "store")
    log = RequestLog(store, flush_interval_s=0)
    log.append("similar_items", 1, None, 10, "precomputed", 200, 50)
    caplog.set_level(logging.ERROR, "serving.requestlog")
    assert log.close() == 0 and not caplog.records


@pytest.fixture
def full_requests_folder(workspace):
    """The workspace store's requests/ on a 64 KiB tmpfs, filled up (root can mount; skipped otherwise)."""
    root, settings, cfg, first = workspace
    folder = Store(settings["paths.store"]).requests_dir
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        Store(settings["paths.store"]).ensure_layout()  # the schema segment, as the run left it
        try:
            with open(folder / "filler", "wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        probe = subprocess.run(["df", "-k", str(folder)], capture_output=True, text=True).stdout
        assert " 100% " in probe, probe
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_sigterm_with_the_log_folder_full_says_how_many_rows_were_lost(workspace, full_requests_folder):
    root, settings, cfg, first = workspace
    cfg.write_text(cfg.read_text() + "[serving]\nlog_flush_interval_s = 0.0\n")
    srv = ApiServer(cfg, workers=2).start()
    try:
        clients = [_Client(srv.port, _similar_path(workspace, row=i), keep_alive=True) for i in range(2)]
        for c in clients:
            c.start()
        deadline = time.time() + 30
        while sum(len(c.statuses) for c in clients) < 100 and time.time() < deadline:
            time.sleep(0.05)
        for c in clients:
            c.halt.set()
            c.join(15)
    finally:
        assert srv.stop() == 0
    answered = sum(len(c.statuses) for c in clients)
    assert answered >= 100 and {s for c in clients for s in c.statuses} == {200}
    lines = re.findall(r"ERROR serving\.requestlog: request log: (\d+) rows lost at shutdown \((\d+) not written to "
                       rf"{re.escape(str(full_requests_folder))}, 0 dropped earlier from the full buffer\): "
                       r"\S+\.tmp: No space left on device \(ENOSPC\)", srv.output)
    assert lines, srv.output[-3000:]
    lost = sum(int(n) for n, _ in lines)
    assert answered <= lost <= sum(c.attempted for c in clients), (answered, lost)
    assert not list(full_requests_folder.glob("seg-*.parquet"))
