"""Where the precompute's parts run: ``map(fn, staged, parts, desc)`` -> each part's result, in order.

``local`` runs them in this process, one after another (FAISS uses every core inside each). ``dask``
runs them on a ``distributed`` cluster: a LocalCluster the job starts, or an existing scheduler
(``batch.dask_scheduler``). Both map exactly the parts they are given (``precompute.partitions``),
with the same function, so they write the same rows bit for bit.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import faiss
from tqdm import tqdm

from batch.precompute import Part, Staged, release, staged_models
from serving.errors import ConfigError, HybridServeError
from serving.store import Store
from serving.store.fs import is_local

LOG = logging.getLogger(__name__)

# The store's credentials a worker needs: the standard AWS variables (endpoint included), which is
# where the store's filesystem reads them from.
CREDENTIAL_PREFIXES = ("AWS_",)


class BackendError(HybridServeError):
    """The cluster could not be reached, or a partition failed on it for good."""


class LocalBackend:
    """The parts in this process, in order, with a progress bar in a terminal."""

    name = "local"

    def prepare(self, writer) -> None:
        """Nothing to share: the parts run in this process, which wrote the staged models."""

    def map(self, fn: Callable[[Staged, Part], Any], staged: Staged, parts: Sequence[Part], desc: str = "") -> list:
        return [fn(staged, part) for part in tqdm(parts, desc=desc, unit="part", disable=None, leave=False)]

    def close(self) -> None:
        pass


def _loopback(address: str) -> bool:
    """Whether a scheduler address names this machine (by a loopback address; no name is resolved)."""
    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _answer(fn: Callable[[Staged, Part], Any], staged: Staged, part: Part, omp_threads: int) -> Any:
    """One part on a worker thread. OpenMP's thread count is per calling thread (libgomp keeps it in
    the thread's own ICVs; a new thread starts from OMP_NUM_THREADS), so it is set here, in the thread
    that searches, not once in the plugin's setup, which runs on the worker's event loop."""
    faiss.omp_set_num_threads(omp_threads)
    return fn(staged, part)


def _plugin_class():
    from distributed.diagnostics.plugin import WorkerPlugin

    class StagedModels(WorkerPlugin):
        """Loads the staged snapshot's models once per worker, from the store (never through the task
        graph: tasks carry only the Staged and Part descriptors)."""

        def __init__(self, staged: Staged, env: dict[str, str], threads: int):
            self.staged, self.env, self.threads = staged, env, threads

        async def setup(self, worker) -> None:
            from threadpoolctl import threadpool_limits
            os.environ.update(self.env)  # the store's credentials, before its filesystem is opened
            # BLAS pools are process-wide (numpy's OpenBLAS ignores OMP_NUM_THREADS when a worker runs
            # without a Nanny); OpenMP's is per thread, set in each task (_answer).
            threadpool_limits(limits=self.threads, user_api="blas")
            # Loading reads the model files: off the event loop, so the worker keeps its heartbeats.
            await asyncio.get_running_loop().run_in_executor(None, staged_models, self.staged)
            LOG.info("worker %s: models of snapshot %s loaded", worker.address, self.staged.snapshot)

        def teardown(self, worker) -> None:
            release(self.staged)

    return StagedModels


class DaskBackend:
    """The parts as Dask tasks on a ``distributed`` cluster; each worker loads the staged models once
    (a worker plugin), answers its parts with the same ``fn`` and writes their Parquet parts into the
    snapshot being written. ``map`` returns only when every part is written: a part that failed after
    its retries, or whose workers kept dying, fails the run (and so nothing is published)."""

    name = "dask"

    def __init__(self, settings):
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("batch.backend: dask needs the dask extra: pip install 'hybridserve[dask]'") from None
        self.retries, self.omp = settings["batch.dask_retries"], settings["batch.dask_omp_threads"]
        self.cluster = self.client = None
        if not LOG.isEnabledFor(logging.DEBUG):
            # distributed logs every connection and worker at INFO (its scheduler runs in this process
            # for a LocalCluster); the job's own lines say what matters, -vv shows the rest.
            logging.getLogger("distributed").setLevel(logging.WARNING)
        self._plugins: dict[str, str] = {}  # snapshot id -> plugin name
        store = Store(settings["paths.store"])
        self.local_store = is_local(store.fs)
        address, timeout = settings["batch.dask_scheduler"], settings["batch.dask_timeout_s"]
        if address and self.local_store and not _loopback(address):
            raise ConfigError(f"batch.dask_scheduler: {address}: the workers of a scheduler on another machine cannot "
                              f"read the local store {store.url} (paths.store): use a store they share (s3://...), "
                              "or an empty batch.dask_scheduler for a LocalCluster here")
        try:
            if address:
                self.client = Client(address, timeout=timeout, set_as_default=False)
            else:
                if dask.config.get("distributed.worker.multiprocessing-method") == "fork":
                    # A process forked after OpenMP ran can hang in its first FAISS search; kept for
                    # this process, so that a worker the Nanny restarts later is spawned too.
                    LOG.warning("distributed.worker.multiprocessing-method = fork overridden: spawn")
                    dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})
                workers = settings["batch.dask_workers"] or os.cpu_count() or 1
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=settings["batch.dask_threads_per_worker"],
                                            processes=True, dashboard_address=settings["batch.dask_dashboard"] or None)
                self.client = Client(self.cluster, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise BackendError(f"{_where(address)}: {_one_line(exc)}") from None
        except BaseException:
            self.close()
            raise
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            self.close()
            raise BackendError(f"{_where(address)}: no worker connected within {timeout:g} s "
                               "(batch.dask_timeout_s)") from None
        if address and self.local_store:
            far = [w for w in self.client.scheduler_info(n_workers=-1)["workers"] if not _loopback(w)]
            if far:
                self.close()
                raise ConfigError(f"batch.dask_scheduler: {address}: worker {far[0]} is on another machine and cannot "
                                  f"read the local store {store.url} (paths.store): use a store they share (s3://...)")
        LOG.info("dask: %s, %d workers; dashboard %s", address or "LocalCluster",
                 len(self.client.scheduler_info(n_workers=-1)["workers"]), self.client.dashboard_link)

    def prepare(self, writer) -> None:
        """Make the staged models readable where the workers run, before any part is mapped: on object
        storage they are uploaded into the snapshot being written (a worker on another machine cannot
        read this machine's cache folder); a local store's workers read its folder in place."""
        writer.share()

    def _for_workers(self, staged: Staged) -> Staged:
        """The descriptor as a worker reads it: a local store by its absolute path (a worker's working
        directory is its own)."""
        return replace(staged, store=str(Path(staged.store).resolve())) if self.local_store else staged

    def _register(self, staged: Staged) -> None:
        if staged.snapshot in self._plugins:
            return
        env = {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_PREFIXES)} if not self.local_store else {}
        name = f"hybridserve-staged-{staged.snapshot}"
        try:
            self.client.register_plugin(_plugin_class()(staged, env, self.omp), name=name)
        finally:
            self._plugins[staged.snapshot] = name  # unregistered on close even when a worker's setup failed

    def map(self, fn: Callable[[Staged, Part], Any], staged: Staged, parts: Sequence[Part], desc: str = "") -> list:
        from distributed import as_completed
        staged = self._for_workers(staged)
        self._register(staged)
        futures = [self.client.submit(_answer, fn, staged, part, self.omp, retries=self.retries, pure=False,
                                      key=f"precompute-{staged.snapshot}-{part.model}-{part.query}-{part.number}")
                   for part in parts]
        by_key = {f.key: part for f, part in zip(futures, parts)}
        try:
            for future in tqdm(as_completed(futures, loop=self.client.loop), total=len(futures), desc=desc, unit="part", disable=None,
                               leave=False):
                if future.status != "finished":
                    raise self._failed(future, by_key[future.key])
            return [f.result() for f in futures]
        except BaseException:
            self.client.cancel(futures)
            raise

    def _failed(self, future, part: Part) -> BaseException:
        exc = future.exception()
        if isinstance(exc, (HybridServeError, OSError)):
            return exc  # a domain error's own line (a full disk, a missing snapshot) says it best
        if type(exc).__name__ == "KilledWorker":  # distributed.scheduler.KilledWorker
            last = getattr(getattr(exc, "last_worker", None), "address", "unknown")
            return BackendError(f"model {part.model} {part.query}: partition {part.number}: every worker that ran "
                                f"it died (the last: {last}); see the workers' logs")
        return BackendError(f"model {part.model} {part.query}: partition {part.number} failed "
                            f"(retried {self.retries} times): {type(exc).__name__}: {_one_line(exc)}")

    def close(self) -> None:
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        if client is not None:
            for name in self._plugins.values():
                try:
                    client.unregister_worker_plugin(name)
                except Exception as exc:  # a lost worker or scheduler: nothing left to tidy there
                    LOG.info("worker plugin %s not unregistered: %s", name, exc)
            client.close()
        if cluster is not None:
            cluster.close()


def _where(address: str) -> str:
    """What the one line of a cluster that could not be used starts with."""
    return f"batch.dask_scheduler: {address}" if address else "batch.backend: dask: the LocalCluster"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


BACKENDS: dict[str, Callable[..., Any]] = {"local": lambda settings: LocalBackend(), "dask": DaskBackend}


def backend(settings) -> Any:
    """The backend ``batch.backend`` names."""
    return BACKENDS[settings["batch.backend"]](settings)
