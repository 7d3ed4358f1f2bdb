"""SIGKILL at every publish step (the battery's kill test, kept cheap): the live snapshot stays
complete and verifiable, the API loads it, and the next run publishes as if nothing happened.

An exception at each step is tested in test_store.py; a kill is harsher: no finally, no cleanup,
no lock release but the kernel's.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys

from conftest import REPO, make_settings
from serving.snapshot import LoadedSnapshot
from serving.store import PUBLISH_STEPS, Store

# The CLI's `run`, with the store's failure-injection point turned into SIGKILL at one step.
_KILLED_AT = """
import os, signal, sys
from serving import store
step = sys.argv[1]
inject = store.SnapshotWriter._maybe_crash
def kill_at(self, at):
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return inject(self, at)
store.SnapshotWriter._maybe_crash = kill_at
from batch.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def _batch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_sigkill_at_every_publish_step_leaves_a_complete_current(published, tmp_path):
    root, _, first = published
    stores = {}
    for step in PUBLISH_STEPS:  # one copy of the store per step, killed side by side
        work = tmp_path / step
        shutil.copytree(root / "inputs", work / "inputs")
        shutil.copytree(root / "store", work / "store", symlinks=True)
        stores[step] = make_settings(work)
    killed = {step: _batch(["-c", _KILLED_AT, step, "--config", str(cfg), "run"])
              for step, (_, cfg) in stores.items()}
    for step, proc in killed.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, err[-2000:])
    for step, (settings, _) in stores.items():
        store = Store(settings["paths.store"])
        assert store.current_id() == first.snapshot_id, step  # CURRENT never moved to a half-published one
        assert store.verify(first.snapshot_id, checksums=True)["id"] == first.snapshot_id
        assert LoadedSnapshot.load(store, first.snapshot_id).id == first.snapshot_id
    again = {step: _batch(["-m", "batch", "--config", str(cfg), "run"]) for step, (_, cfg) in stores.items()}
    for step, proc in again.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (step, err[-2000:])  # the lock died with the killed run
        store = Store(stores[step][0]["paths.store"])
        new = store.current_id()
        assert new != first.snapshot_id and f"published snapshot {new}" in out
        assert LoadedSnapshot.load(store, new).id == new
        assert not [p for p in store.snapshots_dir.iterdir() if p.name.startswith(".tmp")], step
