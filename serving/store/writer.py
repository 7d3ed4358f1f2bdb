"""Writing into a store: whole files or nothing, fsynced; a snapshot's parts, then its manifest,
then CURRENT moved once.

A snapshot is written under ``snapshots/.tmp-<id>/``: each model's files in its folder, the
precompute's Parquet parts under ``parts/`` (assembled into the models' tables, then removed),
then the manifest with every file's checksum, fsync, one rename into ``snapshots/`` and only then
CURRENT. A crash at any step leaves CURRENT at the old, complete snapshot.
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
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from serving.errors import SnapshotError
from serving.store import layout

if TYPE_CHECKING:
    from serving.store import Store

LOG = logging.getLogger(__name__)

# The order in which a publish happens; a test injects a crash at each step.
PUBLISH_STEPS = ("write", "manifest", "fsync", "rename", "current")


class InjectedCrash(RuntimeError):
    """Raised by a writer at its ``crash_at`` step (failure injection for tests)."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_files(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file, one thread per core: hashlib releases the GIL while it hashes, so a
    1.4 GB snapshot verifies in about half the time of one file after another."""
    order = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)  # largest first: even shares
    with ThreadPoolExecutor(max_workers=max(1, min(len(order), os.cpu_count() or 1))) as pool:
        return dict(zip(order, pool.map(sha256_file, order)))


def fsync_file(path: Path) -> None:
    """fsync ``path``; an error (EIO from a failing disk) names it."""
    with naming(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync the folder ``path`` (a rename in it); an error names it."""
    with naming(path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)
# numpy's tofile (np.save) reports a short write as "150000 requested and 109552 written", with no errno:
# the disk or the quota is full.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def os_error_at(exc: OSError, path: Path | str) -> OSError:
    """``exc`` as an OSError naming ``path`` with the errno's own words: pyarrow's write errors carry
    no file name ("Error writing bytes to file. Detail: [errno 28] ..."), so an operator could not
    tell which disk filled up."""
    if exc.filename is not None and exc.strerror:
        return exc
    code = exc.errno
    if code is None and (m := _ERRNO_IN_TEXT.search(str(exc))):
        code = int(m.group(1))
    if code is None and _SHORT_WRITE.match(str(exc)):
        code = errno.ENOSPC
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


def save_array(path: Path | str, array: Any) -> None:
    """``np.save`` with an error naming the file (a full disk is a short write numpy reports without
    errno or path)."""
    import numpy as np
    with naming(path):
        np.save(path, array)


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
    fsync_dir(path.parent)


def write_parquet_atomic(table: pa.Table, path: Path, write_table: Callable[..., None] = pq.write_table) -> None:
    """A Parquet file under a temporary name, fsynced, then renamed into place: a reader sees all of
    it or none; a failed write leaves nothing behind (a full disk must not fill up with halves)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with naming(tmp):
            write_table(table, tmp, compression="zstd")
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class SnapshotWriter:
    """Writes one snapshot under ``snapshots/.tmp-<id>/`` and publishes it atomically.

    Publish order: model files and tables -> manifest (with checksums) -> fsync -> rename -> CURRENT.
    """

    steps = PUBLISH_STEPS

    def __init__(self, store: "Store", snapshot_id: str, crash_at: str | None = None, create: bool = True):
        if crash_at is not None and crash_at not in self.steps:
            raise ValueError(f"crash_at must be one of {self.steps}")
        self.store, self.id, self.crash_at = store, snapshot_id, crash_at
        self.tmp = store.snapshots_dir / f"{layout.TMP_PREFIX}{snapshot_id}"
        if create:
            self.tmp.mkdir(parents=True)
        self._tables: dict[str, int] = {}

    @classmethod
    def reopen(cls, store: "Store", snapshot_id: str) -> "SnapshotWriter":
        """The snapshot ``snapshot_id`` being written, from another process (a precompute worker)."""
        writer = store.writer_class(store, snapshot_id, create=False)
        if not writer.exists():
            raise SnapshotError(f"{writer.tmp}: no snapshot {snapshot_id} being written")
        return writer

    def exists(self) -> bool:
        """Whether this snapshot is being written (its folder is there)."""
        return self.tmp.is_dir()

    @property
    def row_counts(self) -> dict[str, int]:
        """Rows of each contract table written so far."""
        return dict(self._tables)

    def local_folder(self) -> Path:
        """A local folder holding the snapshot as written so far, for loading its staged models (a
        local store's own temporary folder)."""
        return self.tmp

    def send_written(self) -> None:
        """Start sending the files written so far to where the snapshot is published, in the background:
        nothing to send for a folder, which is written in place."""

    def share(self) -> None:
        """Make the staged models readable by precompute workers on other machines: nothing to do for a
        folder, whose workers are on this machine (the Dask backend refuses any other)."""

    def drop_local_copy(self) -> None:
        """Remove a worker's copy of this snapshot: a folder's workers read it in place, so none."""

    def _maybe_crash(self, step: str) -> None:
        if self.crash_at == step:
            raise InjectedCrash(f"injected crash at {step}")

    def model_folder(self, name: str) -> Path:
        """The folder of model ``name`` in this snapshot (created)."""
        d = self.tmp / layout.model_folder(name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_table(self, table: str, data: pa.Table) -> None:
        """A contract table (layout.TABLES), checked against its schema, into its model's folder."""
        schema = layout.TABLE_SCHEMAS[table]
        if not data.schema.remove_metadata().equals(schema):
            data = data.select(schema.names).cast(schema)
        path = self.tmp / layout.table_file(table)
        path.parent.mkdir(parents=True, exist_ok=True)
        with naming(path):
            pq.write_table(data, path, compression="zstd")
        self._tables[table] = data.num_rows
        self._maybe_crash("write")

    def write_part(self, model: str, table: str, part: int, data: pa.Table) -> Path:
        """One partition's answers as a Parquet part (whole or absent: a retried partition rewrites it)."""
        path = self.tmp / layout.part_file(model, table, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(data, path)
        return path

    def read_parts(self, model: str, table: str) -> pa.Table | None:
        """Every part of one table in partition order, as one table (None when none was written)."""
        folder = self.tmp / layout.part_file(model, table, 0)
        paths = sorted(folder.parent.glob("part-*.parquet")) if folder.parent.is_dir() else []
        if not paths:
            return None
        return pa.concat_tables([pq.read_table(p) for p in paths])

    def link_files(self, source: Path, name: str, files: Iterable[str]) -> None:
        """Hard-link (or copy) a trained model's ``files`` (names relative to ``source``) into model
        ``name``'s folder. Only those: every other file of a new snapshot is written new, never through
        a link to a published one."""
        for rel in sorted(files):
            path = Path(source) / rel
            dest = self.model_folder(name) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest)
            except OSError:
                with naming(dest):
                    shutil.copy2(path, dest)

    def _files(self) -> Iterable[Path]:
        return sorted(p for p in self.tmp.rglob("*") if p.is_file() and p.name != layout.MANIFEST)

    def publish(self, manifest: dict[str, Any], check: Callable[[Path], None] | None = None) -> dict[str, Any]:
        """Finish the snapshot and make it CURRENT.

        ``check(folder)`` runs on the complete, fsynced, unpublished folder and may raise to refuse it.
        """
        missing = [t for t in layout.TABLES if t not in self._tables]
        if missing:
            raise SnapshotError(f"snapshot {self.id}: tables not written: {', '.join(missing)}")
        shutil.rmtree(self.tmp / layout.PARTS, ignore_errors=True)  # assembled into the tables by now
        manifest = dict(manifest)
        files = list(self._files())
        digests = sha256_files(files)
        manifest.update({
            "id": self.id,
            "format_version": layout.FORMAT_VERSION,
            "parent": self.store.current_id(),
            "row_counts": dict(self._tables),
            "files": {p.relative_to(self.tmp).as_posix(): {"sha256": digests[p], "bytes": p.stat().st_size}
                      for p in files},
        })
        manifest.setdefault("created_at", datetime.now(timezone.utc).isoformat())
        with naming(self.tmp / layout.MANIFEST):
            (self.tmp / layout.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        self._maybe_crash("manifest")
        for p in files:
            fsync_file(p)
        fsync_file(self.tmp / layout.MANIFEST)
        for d in sorted({p.parent for p in self.tmp.rglob("*")} | {self.tmp}):
            fsync_dir(d)
        self._maybe_crash("fsync")
        # The digests were just computed from these files: check the manifest, sizes and schemas
        # without hashing every byte a second time.
        self.store.verify_dir(self.tmp, self.id, checksums=False)
        if check is not None:
            check(self.tmp)
        os.replace(self.tmp, self.store.snapshot_dir(self.id))
        fsync_dir(self.store.snapshots_dir)
        self._maybe_crash("rename")
        self.store.set_current(self.id, before_replace=lambda: self._maybe_crash("current"))
        LOG.info("published snapshot %s", self.id)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
