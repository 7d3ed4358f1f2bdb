"""Watches CURRENT: loads, checks and swaps in a new snapshot off the request path; keeps serving the
old one when the new one fails in any way, and says why (``last_error``)."""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable

from serving.errors import SnapshotError, StorageError
from serving.models.rating import RatingModel
from serving.models.recommender import ModelBundle
from serving.snapshot import LoadedSnapshot
from serving.store import Store, layout

LOG = logging.getLogger(__name__)


class Reloader:
    """The snapshot being served (``snapshot``), swapped atomically by ``reload()``."""

    def __init__(self, store: Store, verify_checksums: bool = True, counts: Counter | None = None):
        self.store, self.verify_checksums = store, verify_checksums
        self.snapshot: LoadedSnapshot | None = None
        self.last_error: str | None = None
        self.pointer: str | None = None  # what CURRENT named at the last check
        self.counts: Counter = Counter() if counts is None else counts
        self._refused: str | None = None
        self._lock = threading.Lock()
        self.on_snapshot: Callable[[LoadedSnapshot], None] | None = None
        self.on_failure: Callable[[str], None] | None = None

    def reload(self) -> bool:
        """Load CURRENT if it changed; swap it in when it passes its checks. True if swapped.

        A snapshot that fails, in any way, is refused (logged, counted, reported by /readyz) and the
        old one keeps serving; it is not retried until CURRENT changes again. CURRENT moving back to
        the snapshot being served clears the refusal; a missing or empty CURRENT is reported.
        """
        with self._lock:
            target, pointer_problem = self.store.read_current()
            self.pointer = target
            current = self.snapshot.id if self.snapshot else None
            if target is None:
                if current is None:
                    self.last_error = f"no snapshot published in {self.store.url} ({pointer_problem})"
                    self._fall_back_to_model()
                elif self.last_error is None or not self.last_error.startswith(pointer_problem):
                    self.last_error = f"{pointer_problem} in {self.store.url}; still serving {current}"
                    LOG.error("%s", self.last_error)
                return False
            if target == current:
                if self.last_error is not None:  # CURRENT is back at what is served: nothing is wrong now
                    LOG.info("CURRENT points at %s again, which is being served", current)
                self._refused, self.last_error = None, None
                return False
            if target == self._refused:
                return False
            try:
                snap = LoadedSnapshot.load(self.store, target, checksums=self.verify_checksums)
            except Exception as exc:  # whatever is wrong with it, one path: refuse, count, keep serving
                # an object store out of reach is retried next interval; a bad snapshot waits for CURRENT
                self._refused = None if isinstance(exc, StorageError) else target
                reason = exc if isinstance(exc, (SnapshotError, OSError)) else f"{type(exc).__name__}: {exc}"
                self.last_error = f"snapshot {target} refused: {reason}"
                self.counts["reload_failures"] += 1
                LOG.error("%s; still serving %s", self.last_error, current)
                if self.on_failure:
                    self.on_failure(self.last_error)
                if self.snapshot is None:
                    self._fall_back_to_model()
                return False
            self.snapshot = snap  # atomic reference swap; requests in flight keep the old object
            self._refused, self.last_error = None, None
            self.counts["reloads"] += 1
            LOG.info("serving snapshot %s (was %s)", snap.id, current)
            if self.on_snapshot:
                self.on_snapshot(snap)
            return True

    def _fall_back_to_model(self) -> None:
        """No valid snapshot: serve live from the newest trained model in the store, if any."""
        try:
            folders = self.store.trained_models()
        except OSError as exc:  # an object store out of reach: nothing to fall back to this time
            LOG.warning("no trained model to serve live from: %s", exc)
            return
        for folder in folders:
            try:
                bundle = ModelBundle.load(folder / layout.RECOMMENDER)
                rating = RatingModel.load(folder / layout.RATING, layout.RATING, {})
                self.snapshot = LoadedSnapshot.live_only(bundle, rating)
            except Exception as exc:  # try the next one
                LOG.warning("model %s does not load: %s", folder.name, exc)
                continue
            LOG.warning("no valid snapshot: serving live only from model %s", folder.name)
            return
