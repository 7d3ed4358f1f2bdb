"""Object storage that fails: a SIGKILL at every publish step, an unreachable endpoint, missing
credentials, a bucket that does not exist, a denied write, an upload cut off halfway. Each: one line
naming what failed, exit 1, CURRENT unchanged, nothing half-published listed, the run recorded."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys

import duckdb
import pytest
import s3fs

from conftest import REPO, copy_bucket, make_settings
from serving.store import Store
from serving.store.remote import REMOTE_PUBLISH_STEPS

# A publisher of one small snapshot (the published run's tables) under the batch lock, SIGKILLed at
# one publish step: the store's protocol, without the cost of a whole batch run per step.
_KILLED_AT = """
import os, signal, sys
from datetime import datetime, timezone
from serving.store import SnapshotWriter, Store, layout
step, url, source, sid = sys.argv[1:5]
def kill_at(self, at):
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)
SnapshotWriter._maybe_crash = kill_at
store, local = Store(url), Store(source)
lock = store.lock()
writer = store.begin()
for table in layout.TABLES:
    writer.write_table(table, local.read_table(sid, table))
writer.publish({"k_max": 20, "created_at": datetime.now(timezone.utc).isoformat()})
"""


def _raw() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _unlisted(url: str) -> set[str]:
    """Folders under snapshots/ with no manifest: what a reader must never take for a snapshot."""
    raw, base = _raw(), url.removeprefix("s3://")
    folders = {p.rsplit("/", 1)[-1] for p in raw.ls(f"{base}/snapshots", detail=False)}
    return {f for f in folders if not raw.exists(f"{base}/snapshots/{f}/manifest.json")}


def _runs(store: Store) -> list[tuple]:
    con = duckdb.connect(str(store.catalog_path), read_only=True)
    try:
        return con.execute("SELECT status, error FROM runs ORDER BY started_at").fetchall()
    finally:
        con.close()


def test_sigkill_at_every_publish_step_on_s3_leaves_a_complete_current(s3, published, tmp_path):
    from conftest import new_bucket
    _, local_settings, local_first = published
    source = Store(local_settings["paths.store"])
    first = {}
    for step in REMOTE_PUBLISH_STEPS:  # one bucket per step, each with a complete snapshot; killed side by side
        url = f"s3://{new_bucket('kill')}/store"
        store = Store(url, cache_dir=tmp_path / f"w-{step}")
        writer = store.begin()
        for table in ("similar_items", "user_recs", "predictions", "items"):
            writer.write_table(table, source.read_table(local_first.snapshot_id, table))
        first[step] = (url, writer.publish({"k_max": 20, "created_at": "2026-01-01T00:00:00+00:00"})["id"])
    killed = {step: subprocess.Popen([sys.executable, "-c", _KILLED_AT, step, url, str(source.root),
                                      local_first.snapshot_id], cwd=REPO, stderr=subprocess.PIPE, text=True)
              for step, (url, _) in first.items()}
    for step, proc in killed.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, err[-2000:])
    for step, (url, sid) in first.items():
        store = Store(url, cache_dir=tmp_path / f"fresh-{step}")  # another machine: nothing local
        assert store.current_id() == sid, step
        store.verify(sid)  # copied whole, checksums and schemas
        extra = set(store.snapshot_ids()) - {sid}
        if step == "current":  # the manifest was up: a complete snapshot, never made current
            assert len(extra) == 1
            store.verify(extra.pop())
        else:
            assert not extra, step
        if step in ("upload", "uploaded"):
            assert _unlisted(url), step  # what was uploaded is there, and nothing lists it
        # The next publisher: the dead holder's lock is taken over at once, the leftovers go.
        lock = store.lock()
        store.clean_temp()
        writer = store.begin()
        for table in ("similar_items", "user_recs", "predictions", "items"):
            writer.write_table(table, source.read_table(local_first.snapshot_id, table))
        new = writer.publish({"k_max": 20, "created_at": "2026-01-02T00:00:00+00:00"})["id"]
        lock.release()
        assert Store(url, cache_dir=tmp_path / f"after-{step}").current_id() == new
        assert not _unlisted(url), step


def _cli(cfg, capsys, *args) -> tuple[int, str]:
    from batch.__main__ import main
    code = main(["--config", str(cfg), *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def private(s3, s3_published, tmp_path):
    root, settings, first = s3_published
    shutil.copytree(root / "inputs", tmp_path / "inputs")
    settings, cfg = copy_bucket(settings["paths.store"], tmp_path)
    return settings, cfg, first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def shared(s3, s3_published, tmp_path):
    """The published bucket itself, for runs that cannot write to it (no endpoint, no credentials,
    no permission); a private cache folder, so each test has its own catalog."""
    root, settings, first = s3_published
    shutil.copytree(root / "inputs", tmp_path / "inputs")
    settings, cfg = make_settings(tmp_path, paths={"store": settings["paths.store"]})
    return settings, cfg, first


def test_an_unreachable_endpoint_is_one_line_and_the_run_is_recorded(shared, monkeypatch, capsys):
    settings, cfg, first = shared
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    code, line = _cli(cfg, capsys, "run")
    assert code == 1 and line.startswith("error: s3://") and "Could not connect" in line, line
    assert _runs(Store(settings["paths.store"]))[-1][0] == "failed"


def test_missing_credentials_are_one_line(shared, monkeypatch, capsys):
    settings, cfg, first = shared
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    code, line = _cli(cfg, capsys, "run")
    assert code == 1 and "Unable to locate credentials" in line, line
    assert _runs(Store(settings["paths.store"]))[-1][0] == "failed"


def test_a_bucket_that_does_not_exist_is_one_line(s3, tmp_path, published, capsys):
    shutil.copytree(published[0] / "inputs", tmp_path / "inputs")
    settings, cfg = make_settings(tmp_path, paths={"store": "s3://no-such-bucket-here/store"})
    code, line = _cli(cfg, capsys, "run")
    assert code == 1 and line == "error: s3://no-such-bucket-here/store: bucket no-such-bucket-here does not exist"
    assert _runs(Store(settings["paths.store"]))[-1] == ("failed", line.removeprefix("error: "))


def test_a_denied_write_is_one_line_and_changes_nothing(shared, monkeypatch, capsys, moto_endpoint):
    """An IAM user that may read the bucket but not write it (moto's IAM simulation switched on)."""
    import boto3
    from moto.core.authorization import enable_iam_authentication
    settings, cfg, first = shared
    iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name="us-east-1")
    user = f"reader-{first.snapshot_id[-6:]}-{id(cfg) % 10000}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with enable_iam_authentication():
        code, line = _cli(cfg, capsys, "run")
    assert code == 1 and "access denied" in line and ".batch.lock" in line, line
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    assert Store(settings["paths.store"]).current_id() == first.snapshot_id
    assert _runs(Store(settings["paths.store"]))[-1][0] == "failed"


def test_an_upload_cut_off_halfway_publishes_nothing(private, monkeypatch, capsys, moto_endpoint, tmp_path):
    """A second emulator endpoint (the same buckets) that goes away after half the files are up."""
    from moto.server import ThreadedMotoServer

    from serving.store import SnapshotWriter
    settings, cfg, first = private
    doomed = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    doomed.start()
    host, port = doomed.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    inject = SnapshotWriter._maybe_crash

    def cut_at_upload(self, at):
        if at == "upload":
            doomed.stop()
        return inject(self, at)

    monkeypatch.setattr(SnapshotWriter, "_maybe_crash", cut_at_upload)
    code, line = _cli(cfg, capsys, "run")
    assert code == 1 and "upload snapshot" in line and "Could not connect" in line, line
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setattr(SnapshotWriter, "_maybe_crash", inject)
    url = settings["paths.store"]
    store = Store(url, cache_dir=tmp_path / "look")
    assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]
    assert _unlisted(url)  # half a snapshot is there, but nothing lists it
    assert _runs(Store(url))[-1][0] == "failed"
    # The lock could not be released (the endpoint was gone); its holder, this test's process, is
    # alive, so it stands until it expires: let it expire, as 300 s would.
    lock_key = f"{url.removeprefix('s3://')}/.batch.lock"
    held = json.loads(_raw().cat_file(lock_key))
    _raw().pipe_file(lock_key, json.dumps({**held, "expires_at": 0}).encode())
    code, _ = _cli(cfg, capsys, "run")  # the next run removes the half and publishes
    assert code == 0 and not _unlisted(url) and store.current_id() != first.snapshot_id
