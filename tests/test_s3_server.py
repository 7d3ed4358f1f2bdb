"""Replicas on an object-store snapshot (issue 22.1, 22.2): two real server processes (two "machines":
their own cache folders) against moto's S3 server move to a new snapshot with no failed request, the
workers of one machine share one local copy, /readyz says what each serves, and after SIGTERM every
answered request has its row in the bucket."""
from __future__ import annotations

import http.client
import json
import shutil
import threading
import time

import pandas as pd
import s3fs

from batch.tools.demo import ApiServer
from conftest import copy_bucket
from serving.store import Store, layout


class _Client(threading.Thread):
    """GETs one path over keep-alive until halted: statuses and the snapshots that answered."""

    def __init__(self, port: int, path: str):
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.halt = threading.Event()
        self.statuses: list[int] = []
        self.snapshots: set[str] = set()
        self.error: str | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while not self.halt.is_set():
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
                self.statuses.append(resp.status)
                if resp.status == 200:
                    self.snapshots.add(json.loads(body)["snapshot"])
                time.sleep(0.005)
        except Exception as exc:  # noqa: BLE001 -- reported by the test
            self.error = repr(exc)
        finally:
            conn.close()


def _clone(store: Store, sid: str) -> str:
    """Publish a new snapshot with the models and tables of ``sid`` (a batch run's result, cheaply)."""
    manifest = store.read_manifest(sid)
    local = store.local_snapshot(sid)
    writer = store.begin()
    for folder in sorted((local / layout.MODELS).iterdir()):
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                 and not p.name.endswith(".parquet")]
        writer.link_files(folder, folder.name, files)
        for table in folder.glob("*.parquet"):
            shutil.copy2(table, writer.model_folder(folder.name) / table.name)
    for table in layout.TABLES:
        writer.write_table(table, store.read_table(sid, table))
    keep = {k: v for k, v in manifest.items() if k not in ("id", "files", "parent", "row_counts", "created_at")}
    return writer.publish({**keep, "created_at": pd.Timestamp.now(tz="UTC").isoformat()})["id"]


def test_two_replicas_move_to_a_new_snapshot_with_no_failed_request(s3, s3_published, tmp_path):
    root, settings, first = s3_published
    shutil.copytree(root / "inputs", tmp_path / "inputs")
    settings, cfg = copy_bucket(settings["paths.store"], tmp_path)
    cfg.write_text(cfg.read_text() + "[serving]\nlog_flush_interval_s = 0.0\nreload_interval_s = 0.2\n")
    url = settings["paths.store"]
    item = int(Store(url, cache_dir=tmp_path / "look").read_table(first.snapshot_id, "similar_items")["item_id"][0])
    path = f"/v1/items/{item}/similar?k=3"
    replicas = [ApiServer(cfg, workers=workers, env={"XDG_CACHE_HOME": str(tmp_path / f"machine-{i}")})
                for i, workers in enumerate((2, 1))]
    for r in replicas:
        r.start(timeout=180)
    clients = [_Client(r.port, path) for r in replicas for _ in range(2)]
    try:
        for c in clients:
            c.start()
        time.sleep(0.5)
        publisher = Store(url, cache_dir=tmp_path / "publisher")
        t0 = time.monotonic()
        new = _clone(publisher, first.snapshot_id)
        for r in replicas:
            r.wait_for_snapshot(new, timeout=120)
        moved_s = time.monotonic() - t0
        for r in replicas:
            conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=10)
            conn.request("GET", "/readyz")
            ready = json.loads(conn.getresponse().read())
            conn.close()
            assert ready["snapshot"] == new and ready["current"] == new, ready
            conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=10)
            conn.request("GET", "/metrics")
            served = [line for line in conn.getresponse().read().decode().splitlines()
                      if line.startswith("hybridserve_snapshot_served{")]
            conn.close()
            assert served and all(line.endswith(" 1.0") == (f'snapshot="{new}"' in line) for line in served), served
        time.sleep(0.3)
    finally:
        for c in clients:
            c.halt.set()
            c.join(30)
        codes = [r.stop() for r in replicas]
    assert codes == [0, 0]
    assert [c.error for c in clients] == [None] * len(clients)
    statuses = [s for c in clients for s in c.statuses]
    assert len(statuses) > 20 and set(statuses) == {200}  # no failed request across the swap
    assert set().union(*(c.snapshots for c in clients)) == {first.snapshot_id, new}
    print(f"both replicas on {new} {moved_s:.1f} s after the publish began")
    # One local copy per machine, shared by its workers: the two-worker machine copied it once.
    assert replicas[0].output.count(f"copied snapshot {new}") == 1, replicas[0].output[-3000:]
    copies = sorted(p.name for p in (tmp_path / "machine-0").rglob("snapshots/*") if layout.SNAPSHOT_ID.match(p.name))
    assert copies == sorted([first.snapshot_id, new])
    # Every answered request has its row in the bucket, written at SIGTERM (none lost, none twice).
    raw = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    segments = [k for k in raw.find(f"{url.removeprefix('s3://')}/requests") if "/seg-" in k]
    log = pd.concat([pd.read_parquet(k, filesystem=raw) for k in segments])
    rows = int(((log["endpoint"] == "similar_items") & (log["item_id"] == item)).sum())
    assert len(statuses) <= rows <= len(statuses) + len(clients), (len(statuses), rows)
