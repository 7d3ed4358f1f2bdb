"""The Dask backend on a real LocalCluster (two spawned worker processes, one thread each): the same
rows as the local backend bit for bit, OpenMP capped per worker thread, retries, a worker killed
mid-run, and the failures an operator meets (a scheduler that cannot read the store, one that cannot
be reached), each one line, CURRENT unchanged, the run recorded.

One cluster serves the module; the job reaches it as an existing scheduler on this machine. Its
workers start as if on another machine: their own cache folder, and AWS variables that are not the
store's (an endpoint nothing listens on), so a run on S3 works only if the job shares the staged
snapshot through the bucket and hands the workers its credentials.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import faiss
import pytest

distributed = pytest.importorskip("distributed", reason="the dask extra (pip install 'hybridserve[dask]') is not installed")

import batch.job  # noqa: E402
from batch.__main__ import main  # noqa: E402
from batch.backends import BackendError, DaskBackend  # noqa: E402
from batch.catalog import query  # noqa: E402
from batch.job import run  # noqa: E402
from batch.precompute import Part, Staged, partitions  # noqa: E402
from serving.errors import ConfigError  # noqa: E402
from serving.store import Store  # noqa: E402
from serving.store.remote import ObjectSnapshotWriter  # noqa: E402

from conftest import make_settings  # noqa: E402
from dask_tasks import always_fail, fail_first_attempt, kill_worker_once, omp_threads  # noqa: E402

import numpy as np  # noqa: E402
import s3fs  # noqa: E402


WORKER_ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "not-the-stores",
              "AWS_SECRET_ACCESS_KEY": "not-the-stores"}


@pytest.fixture(scope="module")
def worker_cache(tmp_path_factory) -> Path:
    """The workers' own cache folder (XDG_CACHE_HOME): not the job's, as on another machine."""
    return tmp_path_factory.mktemp("worker-cache")


@pytest.fixture(scope="module")
def cluster(worker_cache):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  env={**WORKER_ENV, "XDG_CACHE_HOME": str(worker_cache)}) as c:
        yield c


def _dask(root: Path, cluster, **batch):
    """Settings for the store under ``root`` with the Dask backend on the module's cluster."""
    return make_settings(root, batch={"backend": "dask", "dask_scheduler": cluster.scheduler_address,
                                      "dask_timeout_s": 20.0, **batch})


def _runs(store: Store, where: str = "true"):
    return query(store.catalog_path, f"SELECT run_id, status, snapshot_id, error FROM runs WHERE {where} "
                                     "ORDER BY started_at")[1]


def _files(store: Store, snapshot_id: str) -> dict[str, str]:
    """Every file of a snapshot but its manifest, by sha256 (what the manifest recorded)."""
    return {rel: meta["sha256"] for rel, meta in store.read_manifest(snapshot_id)["files"].items()}


def _staged_empty(root: Path) -> tuple[Store, Staged]:
    """A snapshot being written with no models: what a probe task needs for the plugin to load."""
    store = Store(root / "probe-store")
    writer = store.begin()
    return store, Staged(store.url, writer.id, {})


def _probe_parts(n: int) -> list[Part]:
    return list(partitions("none", "probe", [np.arange(n, dtype=np.int64)], 1, None))


# --- the same rows --------------------------------------------------------------------------------
def test_dask_writes_the_same_snapshot_as_local_bit_for_bit(workspace, cluster):
    """The workspace's snapshot was made by the local backend; the Dask run over the same inputs (the
    model reused) must write every file with the same bytes, its parts computed on the workers."""
    root, _, _, first = workspace
    settings, _ = _dask(root, cluster)
    store = Store(settings["paths.store"])
    with distributed.Client(cluster, set_as_default=False) as client, \
            distributed.get_task_stream(client) as stream:
        result = run(settings)
    assert result.status == "published" and result.snapshot_id != first.snapshot_id
    assert store.current_id() == result.snapshot_id
    assert _files(store, result.snapshot_id) == _files(store, first.snapshot_id)
    # Every part ran as a task on the cluster, one per partition the local backend maps.
    tasks = [t for t in stream.data if str(t["key"]).startswith(f"precompute-{result.snapshot_id}-")]
    rows = first.manifest["row_counts"]
    size = settings["batch.batch_size"]
    expected = sum(-(-rows[t] // n) for t, n in (("similar_items", size), ("user_recs", size),
                                                 ("predictions", size * batch.job.PREDICTIONS_PER_RANKED)))
    assert len({t["key"] for t in tasks}) == expected
    assert len({t["worker"] for t in tasks}) == 2  # both workers took parts


def _worker_env(staged: Staged, part: Part) -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def test_dask_on_s3_workers_read_and_write_the_bucket_bit_for_bit(s3, s3_published, tmp_path, cluster,
                                                                    worker_cache):
    """paths.store = s3://...: workers that see neither the job's cache folder nor its credentials
    load the staged models from the bucket and write their parts there; the snapshot is the local
    backend's, every file bit for bit."""
    root, _, first = s3_published
    shutil.copytree(root / "inputs", tmp_path / "inputs")
    from conftest import copy_bucket
    settings, _ = copy_bucket(s3_published[1]["paths.store"], tmp_path,
                              batch={"backend": "dask", "dask_scheduler": cluster.scheduler_address,
                                     "dask_timeout_s": 20.0})
    store = Store(settings["paths.store"])
    raw = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    # The first run saw no traffic; lookups other tests made on its bucket since were logged there, and
    # would change which keys are popular.
    logged = [k for k in raw.find(f"{store.base}/requests") if k.rsplit("/", 1)[-1].startswith("seg-")]
    if logged:
        raw.rm(logged)
    shared: list[list[str]] = []
    share = ObjectSnapshotWriter.share

    def spy(writer):  # what the bucket holds of the snapshot being written when the workers start
        share(writer)
        shared.append(sorted(writer.store._find(writer.prefix)))

    with pytest.MonkeyPatch.context() as mp, distributed.Client(cluster, set_as_default=False) as client, \
            distributed.get_task_stream(client) as stream:
        mp.setattr(ObjectSnapshotWriter, "share", spy)
        result = run(settings)
        env = client.run(_worker_env, None, None)
    assert result.status == "published" and store.current_id() == result.snapshot_id
    assert _files(store, result.snapshot_id) == _files(store, first.snapshot_id)
    assert len(shared) == 1 and shared[0] and all(r.startswith("models/") for r in shared[0])
    tasks = [t for t in stream.data if str(t["key"]).startswith(f"precompute-{result.snapshot_id}-")]
    assert tasks and len({t["worker"] for t in tasks}) == 2
    # The workers got the store's endpoint and credentials from the job, not their own.
    job = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert list(env.values()) == [job, job] and job["AWS_ENDPOINT_URL"] != WORKER_ENV["AWS_ENDPOINT_URL"]
    # They fetched the staged models into their own cache folder, and removed that copy after the run.
    fetched = list(worker_cache.glob("hybridserve/*/snapshots/*"))
    assert (worker_cache / "hybridserve").is_dir() and not fetched, fetched
    prefix = f"{store.base}/snapshots/{result.snapshot_id}"
    assert not [k for k in raw.find(prefix) if "/parts/" in k]  # the parts were assembled, then removed


# --- OpenMP per worker thread ---------------------------------------------------------------------
def test_openmp_threads_per_task_as_configured(tmp_path, cluster):
    """The Nanny's OMP_NUM_THREADS=1 is the workers' default; the setting wins in the very thread that
    searches (libgomp keeps the count per thread)."""
    _, staged = _staged_empty(tmp_path)
    for threads in (2, 1):
        settings, _ = _dask(tmp_path, cluster, dask_omp_threads=threads)
        backend = DaskBackend(settings)
        try:
            out = backend.map(omp_threads, staged, _probe_parts(4))
        finally:
            backend.close()
        assert out == [(threads, "1")] * 4


# --- retries, failures, a worker killed -----------------------------------------------------------
def test_a_failed_partition_is_retried(tmp_path, cluster):
    _, staged = _staged_empty(tmp_path)
    settings, _ = _dask(tmp_path, cluster, dask_retries=1)
    backend = DaskBackend(settings)
    try:
        assert backend.map(fail_first_attempt, staged, _probe_parts(3)) == [0, 1, 2]
    finally:
        backend.close()
    assert sorted(p.name for p in Path(staged.store).glob("attempted-*")) == ["attempted-0", "attempted-1", "attempted-2"]


def test_a_partition_failing_for_good_fails_the_run_one_line(workspace, cluster, capsys, monkeypatch):
    root, _, _, first = workspace
    _, cfg = _dask(root, cluster, dask_retries=1)
    store = Store(root / "store")
    monkeypatch.setattr(batch.job, "precompute_part", always_fail)
    assert main(["--config", str(cfg), "run"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: model recommender similar_items: partition \d+ failed \(retried 1 times\): "
                        r"RuntimeError: the model exploded\n", err), err
    assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]
    assert not [p for p in store.snapshots_dir.iterdir() if p.name.startswith(".")]  # nothing half-written left
    (_, status, sid, error), = _runs(store, "status = 'failed'")
    assert sid is None and "the model exploded" in error


def test_a_worker_killed_mid_run_never_publishes_a_partial_snapshot(workspace, cluster, monkeypatch):
    """Dask reschedules the killed worker's part (the Nanny restarts the worker): the snapshot is
    whole, the same files as the local run's; had it failed, CURRENT would be where it was."""
    root, _, _, first = workspace
    settings, _ = _dask(root, cluster)
    store = Store(settings["paths.store"])
    monkeypatch.setattr(batch.job, "precompute_part", kill_worker_once)
    try:
        result = run(settings)
    except BackendError:
        assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]
        raise
    assert (store.root / "killed-a-worker").exists()  # a worker did die mid-run
    assert result.status == "published"
    assert _files(store, result.snapshot_id) == _files(store, first.snapshot_id)


# --- a cluster the run cannot use -----------------------------------------------------------------
def test_a_scheduler_elsewhere_with_a_local_store_is_refused_before_anything(workspace, capsys):
    root, _, _, first = workspace
    # .invalid never resolves (RFC 2606): nothing is contacted, the refusal comes first.
    _, cfg = make_settings(root, batch={"backend": "dask", "dask_scheduler": "tcp://scheduler.invalid:8786"})
    store = Store(root / "store")
    assert main(["--config", str(cfg), "run"]) == 1
    err = capsys.readouterr().err
    assert err == (f"config error: batch.dask_scheduler: tcp://scheduler.invalid:8786: the workers of a scheduler on "
                   f"another machine cannot read the local store {store.url} (paths.store): use a store they share "
                   "(s3://...), or an empty batch.dask_scheduler for a LocalCluster here\n")
    assert store.current_id() == first.snapshot_id
    (_, status, _, error), = _runs(store, "status = 'failed'")
    assert error.startswith("batch.dask_scheduler: tcp://scheduler.invalid:8786: the workers")


def test_an_unreachable_scheduler_fails_before_training_one_line(workspace, capsys, monkeypatch):
    root, _, _, first = workspace
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    _, cfg = make_settings(root, batch={"backend": "dask", "dask_scheduler": address, "dask_timeout_s": 1.0})
    store = Store(root / "store")
    trained = []
    monkeypatch.setattr(batch.job, "obtain_model", lambda *a, **k: trained.append(1))
    assert main(["--config", str(cfg), "run", "--retrain"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: batch\.dask_scheduler: {re.escape(address)}: Timed out trying to connect to "
                        rf"{re.escape(address)} after 1(\.0)? s\n", err), err
    assert not trained
    assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]
    (_, status, _, error), = _runs(store, "status = 'failed'")
    assert error.startswith(f"batch.dask_scheduler: {address}: Timed out")


# --- a LocalCluster of the job's own --------------------------------------------------------------
def test_no_scheduler_starts_a_local_cluster_of_spawned_workers(tmp_path):
    """Empty batch.dask_scheduler: the backend starts (and stops) its own LocalCluster, whose workers
    are spawned, never forked from this process (where OpenMP has run)."""
    faiss.omp_set_num_threads(2)
    np.dot(np.ones((64, 64), np.float32), np.ones((64, 64), np.float32))  # this process has used its pools
    _, staged = _staged_empty(tmp_path)
    settings, _ = make_settings(tmp_path, batch={"backend": "dask", "dask_workers": 1, "dask_dashboard": ":0"})
    backend = DaskBackend(settings)
    try:
        cluster = backend.cluster
        assert cluster is not None and backend.client.dashboard_link.startswith("http://127.0.0.1:")
        (pid,) = backend.client.run(os.getpid).values()
        assert pid != os.getpid()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "spawn_main" in cmdline or "forkserver" in cmdline, cmdline
        assert backend.map(omp_threads, staged, _probe_parts(2)) == [(1, "1")] * 2
    finally:
        backend.close()
    assert cluster.status.name == "closed"


def test_the_refusal_needs_no_cluster_for_a_loopback_name(tmp_path):
    """A scheduler named by a loopback address may use a local store (its workers share this machine's
    files); any other name may not, whatever it is."""
    from batch.backends import _loopback
    assert _loopback("tcp://127.0.0.1:8786") and _loopback("localhost:8786") and _loopback("tcp://[::1]:8786")
    assert not _loopback("tcp://10.0.0.5:8786") and not _loopback("tcp://dask.example:8786")
    settings, _ = make_settings(tmp_path, batch={"backend": "dask", "dask_scheduler": "tls://10.0.0.5:8786"})
    with pytest.raises(ConfigError, match="cannot read the local store"):
        DaskBackend(settings)


def test_dask_benchmark_small(tmp_path, cluster):
    """The Dask benchmark end to end on a tiny catalogue, on the module's cluster: both backends wrote
    every row, and the same rows (never a timing)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
    import bench_dask
    result = bench_dask.run(items=3000, dim=16, scheduler=cluster.scheduler_address, out_dir=tmp_path)
    saved = __import__("json").loads((tmp_path / "batch_dask.json").read_text())
    assert saved["items"] == 3000 and saved["rows"] == 3000 and saved["parts"] == 1
    assert result["same_rows_bit_for_bit"] is True
    assert result["dask_queries_per_s"] > 0 and result["local_queries_per_s"] > 0


def test_a_scheduler_without_workers_fails_in_one_line(tmp_path):
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1",
                                  dashboard_address=":0") as empty:
        settings, _ = make_settings(tmp_path, batch={"backend": "dask", "dask_scheduler": empty.scheduler_address,
                                                     "dask_timeout_s": 1.0})
        with pytest.raises(BackendError) as failed:
            DaskBackend(settings)
    assert str(failed.value) == (f"batch.dask_scheduler: {empty.scheduler_address}: no worker connected within 1 s "
                                 "(batch.dask_timeout_s)")
