"""The store on object storage (``s3://bucket/prefix``, through s3fs): the same contract as a folder,
kept without a rename.

Publish: the snapshot's files go under ``snapshots/<id>/``, its manifest last (a snapshot without a
manifest is not one: nothing lists it), then ``CURRENT`` is replaced by a conditional PUT --
``If-Match`` on the ETag read when the manifest named its parent (``If-None-Match: *`` for the first
publish). Two publishers cannot both win: the second gets 412 and a ``PublishConflict``, and its
snapshot is removed again.

The batch lock is an object created with ``If-None-Match: *``. Its holder renews it every
``LOCK_EXPIRY_S / 3`` seconds (``If-Match`` on its own ETag); a lock whose ``expires_at`` has passed,
or whose holder ran on this machine and is gone, is taken over by a conditional PUT on the ETag read,
so two runs that find the same stale lock cannot both take it.

What must be local -- a snapshot being written (models write files), a copy to memory-map, the
trained models to load, the DuckDB catalog -- lives in a cache folder on this machine
(``$XDG_CACHE_HOME/hybridserve/<bucket>-<hash>``, or ``cache_dir``). A copy of a snapshot is
downloaded, verified, then renamed into place; the machine's processes share it (a file lock), and
the two newest copies are kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from serving.errors import HybridServeError, PublishConflict, SnapshotError, StorageError, StoreLockedError
from serving.store import Store, _checked_shape, layout, parse_manifest
from serving.store.fs import filesystem
from serving.store.layout import CURRENT, MANIFEST, REQUEST_LOG_SCHEMA
from serving.store.writer import SnapshotWriter, sha256_file, sha256_files, write_parquet_atomic

LOG = logging.getLogger(__name__)

LOCK_EXPIRY_S = 300.0
# On object storage: tables written (locally), manifest written (locally), half the files uploaded,
# all files uploaded but not the manifest, the manifest uploaded and CURRENT about to move.
REMOTE_PUBLISH_STEPS = ("write", "manifest", "upload", "uploaded", "current")
VERIFIED = ".verified"   # marks a complete, verified local copy of a snapshot
FETCHED = ".fetched"     # marks a worker's copy of a snapshot being written (removed after the run)
COMPLETE = ".complete"   # written last into a trained model's folder on the store
KEEP_COPIES = 2
COPY_LOCK = ".copy.lock"  # in the cache's snapshots folder, held while a snapshot is copied into it
# Files uploaded at once while a snapshot is written; s3fs sends a large file's parts concurrently
# within each (its max_concurrency, 10 parts of 50 MiB by default).
UPLOAD_FILES = 4


def _cache_root(url: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    return base / "hybridserve" / f"{bucket}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _client_error_code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, ClientError):
            return e.response.get("Error", {}).get("Code")
    return None


def _precondition_failed(exc: BaseException) -> bool:
    return isinstance(exc, FileExistsError) or _client_error_code(exc) in (
        "PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    code = _client_error_code(exc)
    return f"{text} ({code})" if code and code not in text else text


class ObjectStore(Store):
    """A store in a bucket. Paths returned by the Store's accessors are in the local cache folder."""

    remote = True

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, replica: str | None = None):
        self.url = os.fspath(url).rstrip("/")
        # The request log's prefix of this machine: replicas never write the same names, and the
        # batch job reads every prefix (requests/**).
        self.replica = re.sub(r"[^A-Za-z0-9._-]", "_", replica or socket.gethostname()) or "replica"
        self.storage_options = dict(storage_options or {})
        self.fs, self.base = filesystem(self.url, self.storage_options)
        self.bucket = self.base.split("/", 1)[0]
        if len(self.bucket) < 3:
            from serving.errors import ConfigError
            raise ConfigError(f"paths.store: {self.url}: no bucket name (s3://bucket/prefix)")
        self.root = Path(cache_dir) if cache_dir else _cache_root(self.url)
        self._manifests: dict[str, dict[str, Any]] = {}  # published manifests never change

    @property
    def writer_class(self) -> type[SnapshotWriter]:
        return ObjectSnapshotWriter

    # --- names ------------------------------------------------------------------
    def key(self, rel: str) -> str:
        """``bucket/prefix/rel``: a path in the filesystem's terms."""
        return f"{self.base}/{rel}" if rel else self.base

    def remote_url(self, rel: str) -> str:
        return f"s3://{self.key(rel)}"

    def _object_key(self, rel: str) -> str:
        return self.key(rel).split("/", 1)[1]

    @contextlib.contextmanager
    def remote(self, what: str) -> Iterator[None]:
        """Any failure of the object store inside as one StorageError naming the store and the step
        (FileNotFoundError passes: callers decide what a missing object means)."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            yield
        except HybridServeError:
            raise
        except FileNotFoundError as exc:
            if _client_error_code(exc) == "NoSuchBucket" or "bucket does not exist" in str(exc):
                raise StorageError(f"{self.url}: bucket {self.bucket} does not exist") from exc
            raise
        except PermissionError as exc:
            raise StorageError(f"{self.url}: {what}: access denied ({_reason(exc)})") from exc
        except (OSError, BotoCoreError, ClientError) as exc:
            raise StorageError(f"{self.url}: {what}: {_reason(exc)}") from exc

    def _put(self, rel: str, data: bytes, **condition: str) -> str:
        """One PUT (whole or absent); returns the new ETag."""
        return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._object_key(rel), Body=data,
                               **condition)["ETag"]

    def _head(self, rel: str) -> str:
        """The object's ETag; FileNotFoundError when absent."""
        return self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._object_key(rel))["ETag"]

    def _upload(self, pairs: list[tuple[Path, str]]) -> None:
        if pairs:
            self.fs.put([str(p) for p, _ in pairs], [self.key(r) for _, r in pairs])

    def _download(self, prefix: str, rels: list[str], folder: Path) -> None:
        """``prefix/rel`` on the store -> ``folder/rel`` for each rel."""
        for rel in rels:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        if rels:
            self.fs.get([self.key(f"{prefix}/{r}") for r in rels], [str(folder / r) for r in rels])

    def _find(self, rel: str) -> dict[str, dict[str, Any]]:
        """Every object under ``rel/`` by its path relative to ``rel``."""
        prefix = self.key(rel) + "/"
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}

    # --- SQL --------------------------------------------------------------------
    def table_url(self, snapshot_id: str, table: str) -> str:
        return self.remote_url(f"{layout.SNAPSHOTS}/{snapshot_id}/{layout.table_file(table, self.format_of(snapshot_id))}")

    def model_table_url(self, snapshot_id: str, name: str) -> str:
        if name == layout.RATING:
            return self.table_url(snapshot_id, "predictions")
        return self.remote_url(f"{layout.SNAPSHOTS}/{snapshot_id}/{layout.model_table_file(name)}")

    def is_regular(self, url: str) -> bool:
        return True  # an object is bytes: no links, FIFOs or devices

    def requests_glob(self) -> str:
        return self.remote_url(f"{layout.REQUESTS}/**/*.parquet")

    def has_requests(self) -> bool:
        with self.remote("list the request log"):
            return any(k.endswith(".parquet") for k in self._find(layout.REQUESTS))

    # --- layout, lock -------------------------------------------------------------
    def ensure_layout(self) -> None:
        with self.remote(f"bucket {self.bucket}"):
            try:
                self.fs.call_s3("head_bucket", Bucket=self.bucket)
            except FileNotFoundError:
                raise StorageError(f"{self.url}: bucket {self.bucket} does not exist") from None
        for d in (self.snapshots_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        rel = f"{layout.REQUESTS}/{layout.SCHEMA_SEGMENT}"
        with self.remote(f"write {rel}"):
            try:
                self._head(rel)
            except FileNotFoundError:
                buf = io.BytesIO()
                pq.write_table(REQUEST_LOG_SCHEMA.empty_table(), buf)
                with contextlib.suppress(FileExistsError):
                    self._put(rel, buf.getvalue(), IfNoneMatch="*")

    def lock(self, name: str = "batch", timeout: float = 0) -> "ObjectLock":
        lock = ObjectLock(self, f".{name}.lock")
        lock.acquire()
        return lock

    # --- CURRENT ------------------------------------------------------------------
    def current_and_etag(self) -> tuple[str | None, str | None]:
        """(CURRENT's id, its ETag), (None, None) when there is none. The ETag is read first: if CURRENT
        moves in between, a compare-and-swap on this ETag fails rather than succeeding on stale data."""
        with self.remote("read CURRENT"):
            try:
                etag = self._head(CURRENT)
                text = self.fs.cat_file(self.key(CURRENT)).decode(errors="replace").strip()
            except FileNotFoundError:
                return None, None
        return text or None, etag

    def read_current(self) -> tuple[str | None, str]:
        try:
            sid, etag = self.current_and_etag()
        except StorageError as exc:
            return None, f"CURRENT unreadable ({exc})"
        if etag is None:
            return None, "CURRENT missing"
        return (sid, "") if sid else (None, "CURRENT empty")

    def current_id(self) -> str | None:
        return self.current_and_etag()[0]

    _UNREAD = object()

    def set_current(self, snapshot_id: str, before_replace: Callable[[], None] | None = None,
                    expect: Any = _UNREAD) -> None:
        """CURRENT -> ``snapshot_id`` by compare-and-swap on ``expect`` (the ETag read; default: read now;
        None: CURRENT must not exist yet)."""
        with self.remote(f"snapshot {snapshot_id}"):
            try:
                self._head(f"{layout.SNAPSHOTS}/{snapshot_id}/{MANIFEST}")
            except FileNotFoundError:
                raise SnapshotError(f"snapshot {snapshot_id}: not published") from None
        if expect is self._UNREAD:
            expect = self.current_and_etag()[1]
        if before_replace is not None:
            before_replace()
        condition = {"IfMatch": expect} if expect else {"IfNoneMatch": "*"}
        with self.remote("write CURRENT"):
            try:
                self._put(CURRENT, (snapshot_id + "\n").encode(), **condition)
            except Exception as exc:
                if _precondition_failed(exc) or (expect and isinstance(exc, FileNotFoundError)):
                    raise PublishConflict(f"{self.url}: CURRENT changed since it was read: another publisher "
                                          f"won; {snapshot_id} is not current") from None
                raise

    # --- snapshots ----------------------------------------------------------------
    def snapshot_ids(self) -> list[str]:
        with self.remote("list snapshots"):
            found = self.fs.glob(self.key(f"{layout.SNAPSHOTS}/*/{MANIFEST}"))
        ids = (p.rsplit("/", 2)[-2] for p in found)
        return sorted(i for i in ids if layout.SNAPSHOT_ID.match(i))

    def read_manifest(self, snapshot_id: str, base: Path | None = None) -> dict[str, Any]:
        if base is not None:
            return super().read_manifest(snapshot_id, base)
        if snapshot_id in self._manifests:
            return self._manifests[snapshot_id]
        rel = f"{layout.SNAPSHOTS}/{snapshot_id}/{MANIFEST}"
        with self.remote(f"read {rel}"):
            try:
                data = self.fs.cat_file(self.key(rel))
            except FileNotFoundError:
                raise SnapshotError(f"{self.remote_url(rel)}: no such snapshot") from None
        manifest = parse_manifest(data, self.remote_url(rel), snapshot_id)
        self._manifests[snapshot_id] = manifest
        return manifest

    def verify(self, snapshot_id: str, checksums: bool = True) -> dict[str, Any]:
        """Verified by copying: the local copy (``local_snapshot``) is checked as it arrives."""
        return self.read_manifest(snapshot_id, self.local_snapshot(snapshot_id, checksums))

    def local_snapshot(self, snapshot_id: str, checksums: bool = True) -> Path:
        """The snapshot in the local cache folder: downloaded under a temporary name, verified (sizes,
        checksums, schemas), then renamed into place; a partial or corrupt copy raises SnapshotError
        and leaves nothing behind. The processes of one machine share one copy."""
        folder = self.snapshot_dir(snapshot_id)
        if (folder / VERIFIED).is_file():
            return folder
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        # one lock file for every copy: filelock leaves its file behind (deleting it would race), so a
        # file per snapshot piled up; the workers of one machine copy the same snapshot anyway
        with FileLock(str(self.snapshots_dir / COPY_LOCK)):
            if (folder / VERIFIED).is_file():  # another worker copied it meanwhile
                return folder
            manifest = self.read_manifest(snapshot_id)
            files = _checked_shape(manifest, self.remote_url(f"{layout.SNAPSHOTS}/{snapshot_id}/{MANIFEST}"))
            tmp = self.snapshots_dir / f"{layout.TMP_PREFIX}copy-{snapshot_id}-{uuid.uuid4().hex[:6]}"
            try:
                with self.remote(f"copy snapshot {snapshot_id}"):
                    try:
                        self._download(f"{layout.SNAPSHOTS}/{snapshot_id}", [*files, MANIFEST], tmp)
                    except FileNotFoundError as exc:
                        raise SnapshotError(f"snapshot {snapshot_id}: {exc.filename or exc}: missing") from None
                self.verify_dir(tmp, snapshot_id, checksums)
                (tmp / VERIFIED).touch()
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            LOG.info("copied snapshot %s from %s to %s", snapshot_id, self.url, folder)
        self._prune_copies(snapshot_id)
        return folder

    def _prune_copies(self, keeping: str) -> None:
        """Keep the newest KEEP_COPIES local copies (and ``keeping``): the one served and the one before."""
        copies = sorted((p for p in self.snapshots_dir.iterdir()
                         if layout.SNAPSHOT_ID.match(p.name) and (p / VERIFIED).is_file()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for p in copies[KEEP_COPIES:]:
            if p.name != keeping:
                self._discard(p)

    def read_table(self, snapshot_id: str, table: str, columns: list[str] | None = None) -> pa.Table:
        with self.remote(f"read {table} of {snapshot_id}"):
            return pq.read_table(self.table_url(snapshot_id, table)[len("s3://"):], columns=columns,
                                 filesystem=self.fs)

    def _remove_snapshot(self, snapshot_id: str) -> None:
        """The manifest first: a half-deleted snapshot is never listed as one."""
        prefix = f"{layout.SNAPSHOTS}/{snapshot_id}"
        with self.remote(f"delete {prefix}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.key(f"{prefix}/{MANIFEST}"))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.key(prefix), recursive=True)
        self._manifests.pop(snapshot_id, None)
        if self.snapshot_dir(snapshot_id).exists():
            self._discard(self.snapshot_dir(snapshot_id))

    def clean_temp(self) -> list[str]:
        """The local leftovers, and on the store every ``snapshots/<id>/`` without a manifest (an
        interrupted publish; call only while holding the batch lock)."""
        removed = super().clean_temp()
        with self.remote("list snapshots"):
            try:
                folders = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(layout.SNAPSHOTS), detail=False)}
            except FileNotFoundError:
                folders = set()
        for sid in sorted(folders - set(self.snapshot_ids())):
            with self.remote(f"delete {layout.SNAPSHOTS}/{sid}"), contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.key(f"{layout.SNAPSHOTS}/{sid}"), recursive=True)
            removed.append(f"{layout.SNAPSHOTS}/{sid}")
        if removed:
            LOG.info("removed leftovers of interrupted runs on %s: %s", self.url, ", ".join(removed))
        return removed

    # --- the request log ----------------------------------------------------------
    def append_segment(self, table: pa.Table, name: str, write_table: Callable[..., None] = pq.write_table) -> str:
        """One PUT per segment, under this replica's prefix: a reader sees all of it or none."""
        self.requests_dir.mkdir(parents=True, exist_ok=True)
        rel = f"{layout.REQUESTS}/{self.replica}/{layout.SEGMENT_PREFIX}{name}.parquet"
        local = self.requests_dir / f".up-{name}.parquet"
        write_parquet_atomic(table, local, write_table)
        try:
            with self.remote(f"write {rel}"):
                self.fs.put_file(str(local), self.key(rel))
        finally:
            local.unlink(missing_ok=True)
        return self.remote_url(rel)

    def segments(self) -> list[str]:  # type: ignore[override]
        with self.remote("list the request log"):
            return sorted(self.remote_url(f"{layout.REQUESTS}/{k}") for k in self._find(layout.REQUESTS)
                          if k.rsplit("/", 1)[-1].startswith(layout.SEGMENT_PREFIX) and k.endswith(".parquet"))

    def log_files(self) -> list[str]:  # type: ignore[override]
        """The schema seed and every segment, as SQL names them."""
        return [self.remote_url(f"{layout.REQUESTS}/{layout.SCHEMA_SEGMENT}"), *self.segments()]

    def quarantine_segment(self, path: Path | str) -> str:  # type: ignore[override]
        """Move an unreadable segment to ``requests/quarantine/<name>.damaged`` in the bucket."""
        text = str(path)
        key = text.split("://", 1)[1] if "://" in text else text.removeprefix("s3:/")
        dest = f"{layout.REQUESTS}/{layout.QUARANTINE}/{key.rsplit('/', 1)[-1]}{layout.QUARANTINE_SUFFIX}"
        with self.remote(f"quarantine {key}"):
            self.fs.mv(key, self.key(dest))
        return self.remote_url(dest)

    # --- the trained-model cache ----------------------------------------------------
    def _trained_keys(self) -> list[str]:
        """Complete cached models on the store, newest first."""
        with self.remote("list the trained models"):
            found = self._find(layout.TRAINED)
        done = {k.split("/", 1)[0]: v.get("LastModified") for k, v in found.items() if k.endswith("/" + COMPLETE)}
        return sorted(done, key=lambda k: str(done[k]), reverse=True)

    def trained_dir(self, key: str) -> Path:
        """The local copy of cached model ``key``, fetched from the store when only the store has it."""
        local = super().trained_dir(key)
        if local.is_dir() or key not in self._trained_keys():
            return local
        rel = f"{layout.TRAINED}/{key}"
        files = [r for r in self._find(rel) if r != COMPLETE]
        tmp = self.models_dir / f"{layout.TMP_PREFIX}{key}-{uuid.uuid4().hex[:6]}"
        try:
            with self.remote(f"copy trained model {key}"):
                self._download(rel, files, tmp)
            os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local

    def trained_models(self) -> list[Path]:
        return [self.trained_dir(k) for k in self._trained_keys()]

    def save_trained(self, key: str, save: Callable[[Path], None]) -> Path:
        """Saved locally (as on disk), then uploaded with its completion marker last."""
        folder = super().save_trained(key, save)
        rel = f"{layout.TRAINED}/{key}"
        with self.remote(f"write {rel}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.key(rel), recursive=True)
            self._upload([(p, f"{rel}/{p.relative_to(folder).as_posix()}")
                          for p in sorted(folder.rglob("*")) if p.is_file()])
            self._put(f"{rel}/{COMPLETE}", b"")
        return folder

    def prune_trained(self, keep: int) -> list[str]:
        removed = []
        for key in self._trained_keys()[keep:]:
            rel = f"{layout.TRAINED}/{key}"
            with self.remote(f"delete {rel}"):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.key(f"{rel}/{COMPLETE}"))
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.key(rel), recursive=True)
            if super().trained_dir(key).is_dir():
                self._discard(super().trained_dir(key))
            removed.append(key)
        return removed

    # --- pending run records --------------------------------------------------------
    def write_pending(self, name: str, data: bytes, before_replace: Callable[[], None] | None = None) -> str:
        if before_replace is not None:
            before_replace()
        rel = f"{layout.PENDING_RUNS}/{name}"
        with self.remote(f"write {rel}"):
            self._put(rel, data)
        return self.remote_url(rel)

    def pending_records(self) -> list[tuple[str, bytes]]:
        with self.remote("read pending run records"):
            names = sorted(k for k in self._find(layout.PENDING_RUNS) if k.endswith(".json") and "/" not in k)
            return [(n, self.fs.cat_file(self.key(f"{layout.PENDING_RUNS}/{n}"))) for n in names]

    def remove_pending(self, name: str) -> None:
        with self.remote(f"delete {layout.PENDING_RUNS}/{name}"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(f"{layout.PENDING_RUNS}/{name}"))


class ObjectLock:
    """The batch lock on object storage: create-if-absent, renewed while held, taken over once expired."""

    def __init__(self, store: ObjectStore, rel: str, expiry_s: float = LOCK_EXPIRY_S):
        self.store, self.rel, self.expiry_s = store, rel, expiry_s
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.expiry_s}).encode()

    def _stale(self, held: dict[str, Any]) -> bool:
        if float(held.get("expires_at") or 0) < time.time():
            return True
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True  # its holder ran here and is gone (killed): no need to wait for the expiry
            except PermissionError:
                return False
        return False

    def acquire(self) -> "ObjectLock":
        where = self.store.remote_url(self.rel)
        with self.store.remote(f"take the lock {self.rel}"):
            try:
                self.etag = self.store._put(self.rel, self._body(), IfNoneMatch="*")
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise
                try:
                    old = self.store._head(self.rel)
                    held = json.loads(self.store.fs.cat_file(self.store.key(self.rel)))
                except (FileNotFoundError, ValueError):
                    held, old = {}, None
                if old is None or not self._stale(held if isinstance(held, dict) else {}):
                    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(held.get("expires_at") or 0)))
                    raise StoreLockedError(f"{where}: another run holds the lock (host {held.get('host')}, "
                                           f"pid {held.get('pid')}, until {until} unless renewed)") from None
                try:
                    self.etag = self.store._put(self.rel, self._body(), IfMatch=old)
                except Exception as steal:
                    if _precondition_failed(steal) or isinstance(steal, FileNotFoundError):
                        raise StoreLockedError(f"{where}: another run took the expired lock first") from None
                    raise
                LOG.warning("%s: took over an expired lock (host %s, pid %s)", where, held.get("host"), held.get("pid"))
        self._thread = threading.Thread(target=self._renew, name="store-lock", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.expiry_s / 3):
            try:
                self.etag = self.store._put(self.rel, self._body(), IfMatch=self.etag)
            except Exception as exc:  # noqa: BLE001 -- the lock is gone or unreachable; CURRENT's CAS still guards
                self.lost = True
                LOG.error("%s: lock not renewed (%s); another run may take it", self.store.remote_url(self.rel),
                          _reason(exc))
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost or self.etag is None:
            return
        try:
            if self.store._head(self.rel) == self.etag:  # still ours: nobody took it over
                self.store.fs.rm_file(self.store.key(self.rel))
        except Exception as exc:  # noqa: BLE001 -- an unreleased lock expires by itself
            LOG.warning("%s: lock not released (%s); it expires in %.0f s", self.store.remote_url(self.rel),
                        _reason(exc), self.expiry_s)
        self.etag = None


def _stamp(path: Path) -> tuple[int, int, int]:
    """What tells a file rewritten since it was sent: a file replaced by a rename has another inode."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


class ObjectSnapshotWriter(SnapshotWriter):
    """A snapshot written in the local cache folder, published to the bucket: files, manifest, CURRENT.

    Precompute parts go to the bucket (``snapshots/<id>/parts/``) so a worker on any machine can write
    them; ``share()`` uploads the staged models for workers elsewhere, which ``local_folder()`` fetches."""

    steps = REMOTE_PUBLISH_STEPS
    store: ObjectStore

    def __init__(self, store: ObjectStore, snapshot_id: str, crash_at: str | None = None, create: bool = True):
        super().__init__(store, snapshot_id, crash_at, create)
        self.prefix = f"{layout.SNAPSHOTS}/{snapshot_id}"
        # file -> (its stamp when sent, the future of its sha256 and upload)
        self._sent: dict[Path, tuple[tuple[int, int, int], Future]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def exists(self) -> bool:
        if self.tmp.is_dir():
            return True
        with self.store.remote(f"find {self.prefix}"):
            return bool(self.store._find(self.prefix))

    def share(self) -> None:
        """Upload the staged models so far, for precompute workers that do not share this machine's disk.
        Publish does not upload them again unless they changed since."""
        self.send_written()
        with self.store.remote(f"write {self.prefix}"):
            self._settle()

    # --- uploads in the background: the bytes travel while the next table is computed and compressed
    def _rel(self, path: Path) -> str:
        return f"{self.prefix}/{path.relative_to(self.tmp).as_posix()}"

    def _hash_and_put(self, path: Path) -> str:
        """One file's sha256 and its upload (s3fs: one PUT, or a multipart upload of concurrent parts
        for a large file), read while the file is still in the page cache."""
        digest = sha256_file(path)
        self.store._upload([(path, self._rel(path))])
        return digest

    def send_written(self) -> None:
        """Start uploading every file written so far that is not on its way yet (or changed since its
        upload finished). Nothing is listed before the manifest, so these objects are invisible until
        publish; abort waits for them, then removes them."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=UPLOAD_FILES, thread_name_prefix=f"upload-{self.id}")
        for path in self._files():
            sent = self._sent.get(path)
            if sent is not None and (not sent[1].done() or sent[0] == _stamp(path)):
                continue  # under way (a change is caught by _settle), or there unchanged
            self._sent[path] = (_stamp(path), self._pool.submit(self._hash_and_put, path))

    def _settle(self) -> dict[Path, str]:
        """Wait for every upload under way (raising the first failure); the sha256 of each file that is
        on the bucket as it is now. A file changed after it was sent is forgotten, to be sent again."""
        digests = {}
        for path, (stamp, future) in list(self._sent.items()):
            digest = future.result()
            if path.is_file() and _stamp(path) == stamp:
                digests[path] = digest
            else:
                del self._sent[path]
        return digests

    def _stop_sending(self) -> None:
        """Cancel uploads not started and wait for those in flight (one landing after the prefix was
        removed would leave objects behind)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def write_table(self, table: str, data: pa.Table) -> None:
        self.send_written()  # what the model kinds and the job wrote before: under way while this one compresses
        super().write_table(table, data)
        self.send_written()

    def local_folder(self) -> Path:
        if self.tmp.is_dir():
            return self.tmp
        staging = self.tmp.with_name(self.tmp.name + f"-{uuid.uuid4().hex[:6]}")
        try:
            with self.store.remote(f"copy {self.prefix}"):
                rels = [r for r in self.store._find(self.prefix) if r.startswith(layout.MODELS + "/")]
                if not rels:
                    raise SnapshotError(f"{self.store.remote_url(self.prefix)}: no staged models: the job did not "
                                        "share the snapshot being written")
                self.store._download(self.prefix, rels, staging)
            (staging / FETCHED).touch()
            with contextlib.suppress(OSError):  # another worker of this machine got there first
                os.replace(staging, self.tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.tmp

    def drop_local_copy(self) -> None:
        """Remove the copy ``local_folder()`` fetched on a worker's machine (never the job's own folder)."""
        if (self.tmp / FETCHED).is_file():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_part(self, model: str, table: str, part: int, data: pa.Table) -> str:  # type: ignore[override]
        buf = io.BytesIO()
        pq.write_table(data, buf, compression="zstd")
        rel = f"{self.prefix}/{layout.part_file(model, table, part)}"
        with self.store.remote(f"write {rel}"):
            self.store._put(rel, buf.getvalue())
        return self.store.remote_url(rel)

    def read_parts(self, model: str, table: str) -> pa.Table | None:
        folder = f"{self.prefix}/{layout.part_file(model, table, 0)}".rsplit("/", 1)[0]
        with self.store.remote(f"read {folder}"):
            names = sorted(k for k in self.store._find(folder) if k.startswith("part-") and k.endswith(".parquet"))
            if not names:
                return None
            return pa.concat_tables([pq.read_table(self.store.key(f"{folder}/{n}"), filesystem=self.store.fs)
                                     for n in names])

    def publish(self, manifest: dict[str, Any], check: Callable[[Path], None] | None = None) -> dict[str, Any]:
        missing = [t for t in layout.TABLES if t not in self._tables]
        if missing:
            raise SnapshotError(f"snapshot {self.id}: tables not written: {', '.join(missing)}")
        store = self.store
        shutil.rmtree(self.tmp / layout.PARTS, ignore_errors=True)
        with store.remote(f"delete {self.prefix}/{layout.PARTS}"), contextlib.suppress(FileNotFoundError):
            if store._find(f"{self.prefix}/{layout.PARTS}"):
                store.fs.rm(store.key(f"{self.prefix}/{layout.PARTS}"), recursive=True)
        with store.remote(f"upload snapshot {self.id}"):
            sent = self._settle()  # hashed as they were uploaded
        files = list(self._files())
        digests = {**sha256_files([p for p in files if p not in sent]), **sent}
        parent, etag = store.current_and_etag()  # the CAS below expects exactly this CURRENT
        manifest = dict(manifest)
        manifest.update({
            "id": self.id, "format_version": layout.FORMAT_VERSION, "parent": parent,
            "row_counts": dict(self._tables),
            "files": {p.relative_to(self.tmp).as_posix(): {"sha256": digests[p], "bytes": p.stat().st_size}
                      for p in files},
        })
        from datetime import datetime, timezone
        manifest.setdefault("created_at", datetime.now(timezone.utc).isoformat())
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        self._maybe_crash("manifest")
        store.verify_dir(self.tmp, self.id, checksums=False)
        if check is not None:
            check(self.tmp)
        pairs = [(p, self._rel(p)) for p in files if p not in sent]  # the rest is on the bucket already
        half = len(pairs) // 2
        with store.remote(f"upload snapshot {self.id}"):
            store._upload(pairs[:half])
            self._maybe_crash("upload")
            store._upload(pairs[half:])
            self._maybe_crash("uploaded")
            # The manifest last, and never over another's: from here the snapshot is listed.
            try:
                store._put(f"{self.prefix}/{MANIFEST}", (self.tmp / MANIFEST).read_bytes(), IfNoneMatch="*")
            except Exception as exc:
                if _precondition_failed(exc):
                    raise PublishConflict(f"{store.url}: snapshot {self.id} published by another run") from None
                raise
        try:
            store.set_current(self.id, before_replace=lambda: self._maybe_crash("current"), expect=etag)
        except PublishConflict:
            with contextlib.suppress(Exception):
                store._remove_snapshot(self.id)
            raise
        self._stop_sending()
        (self.tmp / VERIFIED).touch()  # the local copy is the one just hashed and uploaded
        shutil.rmtree(store.snapshot_dir(self.id), ignore_errors=True)
        os.replace(self.tmp, store.snapshot_dir(self.id))
        LOG.info("published snapshot %s", self.id)
        return manifest

    def abort(self) -> None:
        """The local folder, and on the bucket whatever of this snapshot is there without a manifest."""
        self._stop_sending()
        shutil.rmtree(self.tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            try:
                self.store._head(f"{self.prefix}/{MANIFEST}")
            except FileNotFoundError:
                if self.store._find(self.prefix):
                    self.store.fs.rm(self.store.key(self.prefix), recursive=True)
