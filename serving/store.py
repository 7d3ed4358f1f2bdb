"""The snapshot store contract: layout, manifest, atomic writer, verifying reader, CURRENT, retention.

Both the batch job and the API use it; no other module knows a file name in the store.

    <root>/CURRENT                     the live snapshot id (replaced with os.replace)
    <root>/snapshots/<id>/             immutable once published
        manifest.json                  written last; lists every other file with its sha256
        similar_items.parquet  user_recs.parquet  predictions.parquet  items.parquet
        model/                         the model bundle (serving.model)
        serving/*.npy                  precomputed answers as arrays, memory-mapped by the API
    <root>/requests/*.parquet          request-log segments
    <root>/models/<key>/               trained bundles, reused while inputs are unchanged
    <root>/catalog.duckdb              for people and tools; the API never opens it
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from serving.errors import SnapshotError, StoreLockedError

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_DIR = "model"
SERVING_DIR = "serving"
TABLES = ("similar_items", "user_recs", "predictions", "items")
# The order in which a publish happens; a test injects a crash at each step.
PUBLISH_STEPS = ("write", "manifest", "fsync", "rename", "current")

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "similar_items": pa.schema([("item_id", pa.int64()), ("neighbor_ids", pa.list_(pa.int64())),
                                ("scores", pa.list_(pa.float32()))]),
    "user_recs": pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64())),
                            ("scores", pa.list_(pa.float32()))]),
    "predictions": pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("prediction", pa.float32())]),
    "items": pa.schema([("item_id", pa.int64()), ("title", pa.string()), ("genres", pa.list_(pa.string()))]),
}

REQUEST_LOG_SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")),
    ("endpoint", pa.string()),
    ("item_id", pa.int64()),
    ("user_id", pa.int64()),
    ("k", pa.int32()),
    ("source", pa.string()),
    ("status", pa.int16()),
    ("latency_us", pa.int64()),
    # registered models (GET /v1/models/<name>/predict, and /v1/predictions as model 'rating'): the model's
    # name and the canonical input (serving.models.base.canonical_key); null for other endpoints
    ("model", pa.string()),
    ("input", pa.string()),
])

_ID_RE = re.compile(r"^\d{8}-\d{6}-\d{6}$")


class InjectedCrash(RuntimeError):
    """Raised by a writer at its ``crash_at`` step (failure injection for tests)."""


def new_snapshot_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-%f")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_files(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file, one thread per core: hashlib releases the GIL while it hashes, so a
    1.4 GB snapshot verifies in about half the time of one file after another."""
    order = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)  # largest first: even shares
    with ThreadPoolExecutor(max_workers=max(1, min(len(order), os.cpu_count() or 1))) as pool:
        return dict(zip(order, pool.map(sha256_file, order)))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


def os_error_at(exc: OSError, path: Path | str) -> OSError:
    """``exc`` as an OSError naming ``path`` with the errno's own words: pyarrow's write errors carry
    no file name ("Error writing bytes to file. Detail: [errno 28] ..."), so an operator could not
    tell which disk filled up."""
    if exc.filename is not None and exc.strerror:
        return exc
    code = exc.errno
    if code is None and (m := _ERRNO_IN_TEXT.search(str(exc))):
        code = int(m.group(1))
    out = OSError(code, os.strerror(code) if code else str(exc), str(path))
    out.__cause__ = exc
    return out


def describe_os_error(exc: OSError) -> str:
    """One line: the path, the errno's meaning and its symbol ("data/store/x: No space left on device
    (ENOSPC)")."""
    symbol = errno.errorcode.get(exc.errno or -1)
    text = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}: "
    return f"{where}{text}" + (f" ({symbol})" if symbol else "")


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Re-raise an OSError from the block as one naming ``path`` (see os_error_at)."""
    try:
        yield
    except OSError as exc:
        raise os_error_at(exc, path) from exc


def write_atomic(path: Path, data: bytes, before_replace: Callable[[], None] | None = None) -> None:
    """Write ``name.tmp``, fsync, then ``os.replace`` it over ``name``."""
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp), open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


class Store:
    """A store root on disk. Cheap to construct; touches nothing until asked."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # --- layout -----------------------------------------------------------------
    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def requests_dir(self) -> Path:
        return self.root / "requests"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def pending_runs_dir(self) -> Path:
        """Run records that could not reach the catalog (it was locked); ingested next time."""
        return self.root / "pending-runs"

    @property
    def current_path(self) -> Path:
        return self.root / "CURRENT"

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots_dir / snapshot_id

    def table_path(self, snapshot_id: str, table: str) -> Path:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        return self.snapshot_dir(snapshot_id) / f"{table}.parquet"

    def table_glob(self, table: str) -> str:
        """A glob over this table in every retained snapshot (for SQL across versions)."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        return str(self.snapshots_dir.resolve() / "*" / f"{table}.parquet")

    def model_dir(self, snapshot_id: str) -> Path:
        return self.snapshot_dir(snapshot_id) / MODEL_DIR

    def read_arrays(self, snapshot_id: str, names: tuple[str, ...]) -> dict:
        """The snapshot's serving arrays, memory-mapped (workers share their pages). Plain ndarray
        views of the maps: slicing a ``np.memmap`` costs microseconds of subclass bookkeeping."""
        import numpy as np
        base = self.snapshot_dir(snapshot_id) / SERVING_DIR
        return {n: np.asarray(np.load(base / f"{n}.npy", mmap_mode="r")) for n in names}

    def requests_glob(self) -> str:
        return str(self.requests_dir.resolve() / "**" / "*.parquet")

    def ensure_layout(self) -> None:
        for d in (self.snapshots_dir, self.requests_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        # An empty, typed segment so SQL over the request log works before any traffic.
        seed = self.requests_dir / "_schema.parquet"
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

    # --- reading ----------------------------------------------------------------
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
                      if p.is_dir() and _ID_RE.match(p.name) and (p / MANIFEST).is_file())

    def read_manifest(self, snapshot_id: str, base: Path | None = None) -> dict[str, Any]:
        path = (base or self.snapshot_dir(snapshot_id)) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{path}: no such snapshot") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"{path}: manifest is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("id") != snapshot_id:
            raise SnapshotError(f"{path}: manifest id does not match the folder")
        return manifest

    def verify(self, snapshot_id: str, checksums: bool = True) -> dict[str, Any]:
        """Check that every file the manifest lists exists with its size (and sha256). Returns the manifest."""
        return self.verify_dir(self.snapshot_dir(snapshot_id), snapshot_id, checksums)

    def verify_dir(self, base: Path, snapshot_id: str, checksums: bool = True) -> dict[str, Any]:
        manifest = self.read_manifest(snapshot_id, base)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(f"snapshot {snapshot_id}: format_version {manifest.get('format_version')!r}, "
                                f"expected {FORMAT_VERSION}")
        files = _checked_shape(manifest, base / MANIFEST)
        for table in TABLES:
            if f"{table}.parquet" not in files:
                raise SnapshotError(f"snapshot {snapshot_id}: manifest lists no {table}.parquet")
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
            got = pq.read_schema(base / f"{table}.parquet")
            if not got.remove_metadata().equals(schema):
                raise SnapshotError(f"{base / (table + '.parquet')}: schema {got} does not match the contract")
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
                        "parent": m.get("parent")})
        return out

    # --- writing ----------------------------------------------------------------
    def begin(self, now: datetime | None = None, crash_at: str | None = None) -> "SnapshotWriter":
        """A writer for a new snapshot whose id is ``now`` (default: the current time), made unique."""
        self.ensure_layout()
        now = now or datetime.now(timezone.utc)
        taken = set(self.snapshot_ids())
        while new_snapshot_id(now) in taken:  # two runs within one microsecond (a fixed clock in tests)
            now += timedelta(microseconds=1)
        return SnapshotWriter(self, new_snapshot_id(now), crash_at=crash_at)

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
            # Rename first, so a half-deleted folder never looks like a snapshot.
            trash = self.snapshots_dir / f".trash-{sid}-{uuid.uuid4().hex[:6]}"
            os.replace(self.snapshot_dir(sid), trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(sid)
        if removed:
            LOG.info("retention removed %s", ", ".join(removed))
        return removed

    def clean_temp(self) -> list[str]:
        """Remove leftovers of interrupted publishes, model saves and prunes: ``snapshots/.tmp-*``,
        ``models/.tmp-*``, ``.trash-*`` in both, a half-written ``CURRENT.tmp`` (call only while holding
        the batch lock: a running batch writes these). Returns the paths removed, relative to the root."""
        removed = []
        for folder in (self.snapshots_dir, self.models_dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith((".tmp-", ".trash-")):
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(str(p.relative_to(self.root)))
        tmp = self.current_path.with_name(self.current_path.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
            removed.append(tmp.name)
        if removed:
            LOG.info("removed leftovers of interrupted runs: %s", ", ".join(removed))
        return removed


class SnapshotWriter:
    """Writes one snapshot under ``snapshots/.tmp-<id>/`` and publishes it atomically.

    Publish order: tables and model -> manifest (with checksums) -> fsync -> rename -> CURRENT.
    A crash at any step leaves CURRENT at the old, complete snapshot.
    """

    def __init__(self, store: Store, snapshot_id: str, crash_at: str | None = None):
        if crash_at is not None and crash_at not in PUBLISH_STEPS:
            raise ValueError(f"crash_at must be one of {PUBLISH_STEPS}")
        self.store, self.id, self.crash_at = store, snapshot_id, crash_at
        self.tmp = store.snapshots_dir / f".tmp-{snapshot_id}"
        self.tmp.mkdir(parents=True)
        self._tables: dict[str, int] = {}

    def _maybe_crash(self, step: str) -> None:
        if self.crash_at == step:
            raise InjectedCrash(f"injected crash at {step}")

    @property
    def model_dir(self) -> Path:
        d = self.tmp / MODEL_DIR
        d.mkdir(exist_ok=True)
        return d

    def write_table(self, table: str, data: pa.Table) -> None:
        schema = TABLE_SCHEMAS[table]
        if not data.schema.remove_metadata().equals(schema):
            data = data.select(schema.names).cast(schema)
        path = self.tmp / f"{table}.parquet"
        with naming(path):
            pq.write_table(data, path, compression="zstd")
        self._tables[table] = data.num_rows
        self._maybe_crash("write")

    def write_arrays(self, arrays: dict) -> None:
        """Save the serving arrays (``serving/<name>.npy``)."""
        import numpy as np
        folder = self.tmp / SERVING_DIR
        folder.mkdir(exist_ok=True)
        for name, arr in arrays.items():
            with naming(folder / f"{name}.npy"):
                np.save(folder / f"{name}.npy", np.ascontiguousarray(arr))

    def link_model(self, source: Path) -> None:
        """Hard-link (or copy) a trained bundle's files into this snapshot's model/ folder."""
        for path in sorted(Path(source).rglob("*")):
            if path.is_dir():
                continue
            dest = self.model_dir / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest)
            except OSError:
                with naming(dest):
                    shutil.copy2(path, dest)

    def _files(self) -> Iterable[Path]:
        return sorted(p for p in self.tmp.rglob("*") if p.is_file() and p.name != MANIFEST)

    def publish(self, manifest: dict[str, Any], check: Callable[[Path], None] | None = None) -> dict[str, Any]:
        """Finish the snapshot and make it CURRENT.

        ``check(folder)`` runs on the complete, fsynced, unpublished folder and may raise to refuse it.
        """
        missing = [t for t in TABLES if t not in self._tables]
        if missing:
            raise SnapshotError(f"snapshot {self.id}: tables not written: {', '.join(missing)}")
        manifest = dict(manifest)
        files = list(self._files())
        digests = sha256_files(files)
        manifest.update({
            "id": self.id,
            "format_version": FORMAT_VERSION,
            "parent": self.store.current_id(),
            "row_counts": dict(self._tables),
            "files": {str(p.relative_to(self.tmp)): {"sha256": digests[p], "bytes": p.stat().st_size}
                      for p in files},
        })
        manifest.setdefault("created_at", datetime.now(timezone.utc).isoformat())
        with naming(self.tmp / MANIFEST):
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        self._maybe_crash("manifest")
        for p in files:
            _fsync_file(p)
        _fsync_file(self.tmp / MANIFEST)
        for d in sorted({p.parent for p in self.tmp.rglob("*")} | {self.tmp}):
            _fsync_dir(d)
        self._maybe_crash("fsync")
        # The digests were just computed from these files: check the manifest, sizes and schemas
        # without hashing every byte a second time.
        self.store.verify_dir(self.tmp, self.id, checksums=False)
        if check is not None:
            check(self.tmp)
        os.replace(self.tmp, self.store.snapshot_dir(self.id))
        _fsync_dir(self.store.snapshots_dir)
        self._maybe_crash("rename")
        self.store.set_current(self.id, before_replace=lambda: self._maybe_crash("current"))
        LOG.info("published snapshot %s", self.id)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
