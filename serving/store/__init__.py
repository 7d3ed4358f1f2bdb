"""The store: the only code that knows a file name in it or touches it (``layout`` has the names).

``Store(url)`` addresses a store by URL through fsspec (``fs``): a local folder by default. It reads
CURRENT and manifests, lists, verifies, rolls back and retains snapshots, holds the batch lock,
hands out a local copy of a snapshot for memory-mapping (``local_snapshot``), writes request-log
segments and keeps the trained-model cache and the catalog's pending run records. ``begin()``
returns the writer of a new snapshot (``writer``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from serving.errors import ConfigError, SnapshotError, StoreLockedError
from serving.store import layout
from serving.store.fs import filesystem, is_local, is_remote_url
from serving.store.layout import (FORMAT_VERSION, MANIFEST, REQUEST_LOG_SCHEMA, TABLE_SCHEMAS, TABLES)
from serving.store.writer import (PUBLISH_STEPS, InjectedCrash, SnapshotWriter, describe_os_error, fsync_dir,
                                  naming, os_error_at, sha256_file, sha256_files, write_atomic,
                                  write_parquet_atomic)

LOG = logging.getLogger(__name__)

__all__ = ["Store", "SnapshotWriter", "InjectedCrash", "PUBLISH_STEPS", "FORMAT_VERSION", "MANIFEST", "TABLES",
           "TABLE_SCHEMAS", "REQUEST_LOG_SCHEMA", "describe_os_error", "naming", "os_error_at", "sha256_file",
           "sha256_files", "write_atomic", "new_snapshot_id", "layout"]


def new_snapshot_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-%f")


def _checked_shape(manifest: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """The fields a reader relies on, with the types it relies on; returns ``files``.

    A hand-edited or foreign manifest must be refused with a message, not crash the reader
    (``files`` as a list, ``created_at`` as a number, a path leaving the snapshot)."""
    def bad(field: str, want: str, got: Any) -> SnapshotError:
        return SnapshotError(f"{path}: {field}: expected {want}, got {type(got).__name__} {str(got)[:60]!r}")

    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad("files", "an object of file name -> {sha256, bytes}", files)
    for rel, meta in files.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise bad("files", "paths inside the snapshot", rel)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) \
                or type(meta.get("bytes")) is not int or meta["bytes"] < 0:
            raise bad(f"files.{rel}", "{sha256: string, bytes: non-negative integer}", meta)
    created = manifest.get("created_at")
    try:
        if not isinstance(created, str):
            raise ValueError
        datetime.fromisoformat(created)
    except ValueError:
        raise bad("created_at", "an ISO 8601 timestamp string", created) from None
    k_max = manifest.get("k_max")
    if type(k_max) is not int or k_max < 0:
        raise bad("k_max", "a non-negative integer", k_max)
    return files


def _regular(path: Path) -> bool:
    """A regular file itself, not through a link (lstat: a symlink is not followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def parse_manifest(data: bytes, where: object, snapshot_id: str) -> dict[str, Any]:
    """A manifest's JSON, refused with a message when it is not one or names another snapshot."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{where}: manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("id") != snapshot_id:
        raise SnapshotError(f"{where}: manifest id does not match the folder")
    return manifest


class Store:
    """A store by URL (a local folder by default). Cheap to construct; touches nothing until asked.

    ``Store("s3://bucket/prefix")`` is an object store (``remote.ObjectStore``): the same methods, with
    a local cache folder for what must be local (staging, copies for memory-mapping, the catalog).
    ``Store(url, storage_options)`` is all a process needs to rebuild it (a Dask worker does)."""

    remote = False

    def __new__(cls, url: str | os.PathLike, *args: Any, **kwargs: Any) -> "Store":
        if cls is Store and is_remote_url(url):
            from serving.store.remote import ObjectStore
            return super().__new__(ObjectStore)
        return super().__new__(cls)

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self.fs, base = filesystem(self.url)
        if not is_local(self.fs):
            raise ConfigError(f"paths.store: {self.url}: not a store URL (a local folder, file://... or "
                              "s3://bucket/prefix)")
        self.root = Path(base)

    @property
    def writer_class(self) -> type[SnapshotWriter]:
        return SnapshotWriter

    # --- layout -----------------------------------------------------------------
    @property
    def snapshots_dir(self) -> Path:
        return self.root / layout.SNAPSHOTS

    @property
    def requests_dir(self) -> Path:
        return self.root / layout.REQUESTS

    @property
    def models_dir(self) -> Path:
        """The trained-model cache (not a snapshot's models: ``model_dir``)."""
        return self.root / layout.TRAINED

    @property
    def catalog_path(self) -> Path:
        return self.root / layout.CATALOG

    @property
    def pending_runs_dir(self) -> Path:
        """Run records that could not reach the catalog (it was locked); ingested next time."""
        return self.root / layout.PENDING_RUNS

    @property
    def current_path(self) -> Path:
        return self.root / layout.CURRENT

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots_dir / snapshot_id

    def format_of(self, snapshot_id: str) -> int:
        """The snapshot's format version (its manifest's), FORMAT_VERSION when it cannot be read."""
        try:
            version = self.read_manifest(snapshot_id).get("format_version")
        except SnapshotError:
            return FORMAT_VERSION
        return version if version in layout.READABLE_FORMATS else FORMAT_VERSION

    def table_path(self, snapshot_id: str, table: str) -> Path:
        """A contract table of a snapshot (in its model's folder; at the top in format 2)."""
        return self.snapshot_dir(snapshot_id) / layout.table_file(table, self.format_of(snapshot_id))

    def table_url(self, snapshot_id: str, table: str) -> str:
        """A contract table of a snapshot as SQL reads it (an absolute path; ``s3://...`` on S3)."""
        return str(self.table_path(snapshot_id, table).resolve())

    def model_table_url(self, snapshot_id: str, name: str) -> str:
        """A registered model's predictions as SQL reads them."""
        return str(self.model_table_path(snapshot_id, name).resolve())

    def table_paths(self, table: str) -> list[str]:
        """This table in every retained snapshot (for SQL across versions), as SQL reads them."""
        return [self.table_url(sid, table) for sid in self.snapshot_ids()]

    def is_regular(self, url: str) -> bool:
        """Whether ``url`` (as SQL reads it) is a regular file, not a link, FIFO or device: a FIFO would
        block the reader in open(), where no deadline can reach it."""
        path = Path(url)
        return path.is_file() and not path.is_symlink()

    def connect_sql(self, database: str = ":memory:", read_only: bool = False, config: dict[str, Any] | None = None):
        """A DuckDB connection that reads this store: never installs or loads an extension (nothing is
        downloaded); on an object store, the store's own fsspec filesystem is registered on it."""
        import duckdb
        con = duckdb.connect(database, read_only=read_only,
                             config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                     **(config or {})})
        if not is_local(self.fs):
            con.register_filesystem(self.fs)
        return con

    def has_requests(self) -> bool:
        """Whether the request log has any segment (the schema seed counts: SQL over it works)."""
        return self.requests_dir.is_dir() and any(self.requests_dir.rglob("*.parquet"))

    def model_dir(self, snapshot_id: str, name: str = layout.RECOMMENDER) -> Path:
        """The folder of model ``name`` in a snapshot (format 2 kept the built-in two in ``model/``)."""
        if self.format_of(snapshot_id) == 2:
            if name in (layout.RECOMMENDER, layout.RATING):
                return self.snapshot_dir(snapshot_id) / layout.LEGACY_MODEL_DIR
        return self.snapshot_dir(snapshot_id) / layout.model_folder(name)

    def model_table_path(self, snapshot_id: str, name: str) -> Path:
        """A registered model's precomputed predictions in a snapshot."""
        if name == layout.RATING:
            return self.table_path(snapshot_id, "predictions")
        return self.snapshot_dir(snapshot_id) / layout.model_table_file(name)

    def local_snapshot(self, snapshot_id: str) -> Path:
        """A local folder holding the snapshot, for memory-mapping (a local store's own folder)."""
        return self.snapshot_dir(snapshot_id)

    def requests_glob(self) -> str:
        return str(self.requests_dir.resolve() / "**" / "*.parquet")

    def ensure_layout(self) -> None:
        for d in (self.snapshots_dir, self.requests_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        # An empty, typed segment so SQL over the request log works before any traffic.
        seed = self.requests_dir / layout.SCHEMA_SEGMENT
        if not seed.exists():
            tmp = seed.with_name(seed.name + ".tmp")
            pq.write_table(REQUEST_LOG_SCHEMA.empty_table(), tmp)
            os.replace(tmp, seed)

    def lock(self, name: str = "batch", timeout: float = 0) -> FileLock:
        """An exclusive inter-process lock in the store (held by a batch run)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f".{name}.lock"), timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            raise StoreLockedError(f"{self.root / ('.' + name + '.lock')}: another run holds the lock") from None
        return lock

    # --- the request log ----------------------------------------------------------
    def append_segment(self, table: pa.Table, name: str,
                       write_table: Callable[..., None] = pq.write_table) -> Path:
        """One request-log segment ``<name>.parquet``: written under a temporary name, fsynced, then
        renamed; never rewritten."""
        self.requests_dir.mkdir(parents=True, exist_ok=True)
        path = self.requests_dir / f"{layout.SEGMENT_PREFIX}{name}.parquet"
        write_parquet_atomic(table, path, write_table)  # fsynced before the rename
        fsync_dir(self.requests_dir)  # and the rename itself, so a power cut keeps the segment it answered for
        return path

    def segments(self) -> list[Path]:
        """The request log's segments: regular files only (a symlink or FIFO planted in requests/ is
        never read)."""
        if not self.requests_dir.is_dir():
            return []
        return sorted(p for p in self.requests_dir.glob(f"{layout.SEGMENT_PREFIX}*.parquet") if _regular(p))

    def log_files(self) -> list[Path]:
        """What SQL over the request log reads: the empty, typed schema segment (so the columns exist
        before any traffic) and every segment."""
        seed = self.requests_dir / layout.SCHEMA_SEGMENT
        return ([seed] if _regular(seed) else []) + self.segments()

    def quarantine_segment(self, path: Path) -> Path:
        """Move an unreadable segment to ``requests/quarantine/<name>.damaged``: out of every reader's
        way (no longer ``*.parquet``), kept for a look rather than deleted."""
        folder = self.requests_dir / layout.QUARANTINE
        folder.mkdir(exist_ok=True)
        dest = folder / (path.name + layout.QUARANTINE_SUFFIX)
        with naming(path):
            os.replace(path, dest)
        fsync_dir(self.requests_dir)
        return dest

    # --- the trained-model cache --------------------------------------------------
    def trained_dir(self, key: str) -> Path:
        return self.models_dir / key

    def trained_models(self) -> list[Path]:
        """Cached trained models, newest first."""
        if not self.models_dir.is_dir():
            return []
        return sorted((p for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)

    def save_trained(self, key: str, save: Callable[[Path], None]) -> Path:
        """``save(folder)`` into a temporary folder, then renamed to the cache entry ``key`` (replacing it)."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.models_dir / f"{layout.TMP_PREFIX}{key}-{uuid.uuid4().hex[:6]}"
        save(tmp)
        folder = self.trained_dir(key)
        if folder.exists():  # --retrain: replace the cached model (snapshots hold hard links, not this folder)
            self._discard(folder)
        os.replace(tmp, folder)
        return folder

    def prune_trained(self, keep: int) -> list[str]:
        """Keep the newest ``keep`` cached models (snapshots hold their own hard links, so none breaks)."""
        removed = []
        for p in self.trained_models()[keep:]:
            self._discard(p)
            removed.append(p.name)
        return removed

    def _discard(self, folder: Path) -> None:
        """Rename first, so a half-deleted folder never looks like a valid one; then delete."""
        trash = folder.parent / f"{layout.TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:6]}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # --- pending run records ------------------------------------------------------
    def write_pending(self, name: str, data: bytes, before_replace: Callable[[], None] | None = None) -> Path:
        """A run record for the next catalog update, whole or absent (``before_replace``: see write_atomic)."""
        self.pending_runs_dir.mkdir(parents=True, exist_ok=True)
        path = self.pending_runs_dir / name
        write_atomic(path, data, before_replace)
        return path

    def pending_records(self) -> list[tuple[str, bytes]]:
        """(name, bytes) of every whole run record waiting for the catalog, oldest name first."""
        if not self.pending_runs_dir.is_dir():
            return []
        return [(p.name, p.read_bytes()) for p in sorted(self.pending_runs_dir.glob("*.json"))]

    def remove_pending(self, name: str) -> None:
        (self.pending_runs_dir / name).unlink(missing_ok=True)

    # --- reading ----------------------------------------------------------------
    def read_current(self) -> tuple[str | None, str]:
        """(CURRENT's snapshot id, "") or (None, what is wrong with the pointer)."""
        try:
            text = self.current_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return None, "CURRENT missing"
        except OSError as exc:
            return None, f"CURRENT unreadable ({exc.strerror or exc})"
        return (text, "") if text else (None, "CURRENT empty")

    def current_id(self) -> str | None:
        try:
            text = self.current_path.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def snapshot_ids(self) -> list[str]:
        if not self.snapshots_dir.is_dir():
            return []
        return sorted(p.name for p in self.snapshots_dir.iterdir()
                      if p.is_dir() and layout.SNAPSHOT_ID.match(p.name) and (p / MANIFEST).is_file())

    def read_manifest(self, snapshot_id: str, base: Path | None = None) -> dict[str, Any]:
        path = (base or self.snapshot_dir(snapshot_id)) / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotError(f"{path}: no such snapshot") from None
        return parse_manifest(data, path, snapshot_id)

    def verify(self, snapshot_id: str, checksums: bool = True) -> dict[str, Any]:
        """Check that every file the manifest lists exists with its size (and sha256). Returns the manifest."""
        return self.verify_dir(self.snapshot_dir(snapshot_id), snapshot_id, checksums)

    def verify_dir(self, base: Path, snapshot_id: str, checksums: bool = True) -> dict[str, Any]:
        manifest = self.read_manifest(snapshot_id, base)
        version = manifest.get("format_version")
        if version not in layout.READABLE_FORMATS:
            raise SnapshotError(f"snapshot {snapshot_id}: format_version {version!r}, expected one of "
                                f"{', '.join(map(str, layout.READABLE_FORMATS))}")
        files = _checked_shape(manifest, base / MANIFEST)
        for table in TABLES:
            if layout.table_file(table, version) not in files:
                raise SnapshotError(f"snapshot {snapshot_id}: manifest lists no {layout.table_file(table, version)}")
        for rel, meta in files.items():
            path = base / rel
            if not path.is_file():
                raise SnapshotError(f"{path}: missing")
            if path.stat().st_size != meta["bytes"]:
                raise SnapshotError(f"{path}: size {path.stat().st_size} != manifest {meta['bytes']}")
        if checksums:
            digests = sha256_files([base / rel for rel in files])
            for rel, meta in files.items():
                if digests[base / rel] != meta["sha256"]:
                    raise SnapshotError(f"{base / rel}: checksum does not match the manifest")
        for table, schema in TABLE_SCHEMAS.items():
            path = base / layout.table_file(table, version)
            got = pq.read_schema(path)
            if not got.remove_metadata().equals(schema):
                raise SnapshotError(f"{path}: schema {got} does not match the contract")
        return manifest

    def read_table(self, snapshot_id: str, table: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.table_path(snapshot_id, table), columns=columns)

    def list_snapshots(self) -> list[dict[str, Any]]:
        current = self.current_id()
        out = []
        for sid in self.snapshot_ids():
            try:
                m = self.read_manifest(sid)
            except SnapshotError as exc:
                out.append({"id": sid, "current": sid == current, "error": str(exc)})
                continue
            out.append({"id": sid, "current": sid == current, "created_at": m.get("created_at"),
                        "model_version": m.get("model_version"), "rows": m.get("row_counts", {}),
                        "models": {n: e.get("rows", 0) for n, e in (m.get("models") or {}).items()
                                   if n != layout.RATING and isinstance(e, dict)},
                        "parent": m.get("parent")})
        return out

    # --- writing ----------------------------------------------------------------
    def begin(self, now: datetime | None = None, crash_at: str | None = None) -> SnapshotWriter:
        """A writer for a new snapshot whose id is ``now`` (default: the current time), made unique."""
        self.ensure_layout()
        now = now or datetime.now(timezone.utc)
        taken = set(self.snapshot_ids())
        while new_snapshot_id(now) in taken:  # two runs within one microsecond (a fixed clock in tests)
            now += timedelta(microseconds=1)
        return self.writer_class(self, new_snapshot_id(now), crash_at=crash_at)

    def set_current(self, snapshot_id: str, before_replace: Callable[[], None] | None = None) -> None:
        if not (self.snapshot_dir(snapshot_id) / MANIFEST).is_file():
            raise SnapshotError(f"snapshot {snapshot_id}: not published")
        write_atomic(self.current_path, (snapshot_id + "\n").encode(), before_replace)

    def previous_id(self, snapshot_id: str | None = None) -> str | None:
        """The snapshot before ``snapshot_id`` (default CURRENT): its recorded parent if retained,
        else the newest older one."""
        snapshot_id = snapshot_id or self.current_id()
        if snapshot_id is None:
            return None
        ids = self.snapshot_ids()
        try:
            parent = self.read_manifest(snapshot_id).get("parent")
        except SnapshotError:
            parent = None
        if parent in ids:
            return parent
        older = [s for s in ids if s < snapshot_id]
        return older[-1] if older else None

    def rollback(self, snapshot_id: str | None = None) -> str:
        """Move CURRENT to ``snapshot_id`` (default: the one before CURRENT) after verifying it."""
        target = snapshot_id or self.previous_id()
        if target is None:
            raise SnapshotError("no earlier snapshot to roll back to")
        if target not in self.snapshot_ids():
            raise SnapshotError(f"snapshot {target}: not in {self.snapshots_dir}")
        self.verify(target)
        self.set_current(target)
        LOG.info("CURRENT -> %s (rollback)", target)
        return target

    def apply_retention(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` snapshots; never CURRENT or the one before it."""
        ids = self.snapshot_ids()
        current = self.current_id()
        protected = {current, self.previous_id(current)} - {None}
        keep_ids = set(ids[-keep:]) | protected
        removed = []
        for sid in ids:
            if sid in keep_ids:
                continue
            self._remove_snapshot(sid)
            removed.append(sid)
        if removed:
            LOG.info("retention removed %s", ", ".join(removed))
        return removed

    def _remove_snapshot(self, snapshot_id: str) -> None:
        self._discard(self.snapshot_dir(snapshot_id))

    def clean_temp(self) -> list[str]:
        """Remove leftovers of interrupted publishes, model saves and prunes: ``snapshots/.tmp-*``,
        ``models/.tmp-*``, ``.trash-*`` in both, a half-written ``CURRENT.tmp`` (call only while holding
        the batch lock: a running batch writes these). Returns the paths removed, relative to the root."""
        removed = []
        for folder in (self.snapshots_dir, self.models_dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith((layout.TMP_PREFIX, layout.TRASH_PREFIX)):
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(str(p.relative_to(self.root)))
        tmp = self.current_path.with_name(self.current_path.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
            removed.append(tmp.name)
        if removed:
            LOG.info("removed leftovers of interrupted runs: %s", ", ".join(removed))
        return removed


