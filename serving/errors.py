"""Domain errors shared by the batch job and the API; each carries a one-line message."""
from __future__ import annotations


class HybridServeError(Exception):
    """Base: an error a user can act on, printed as one line."""


class ConfigError(HybridServeError):
    """A bad config file, key, type or value. The message names the file and the key."""


class InputError(HybridServeError):
    """A missing, empty or malformed input file. The message names the file and the field."""

    def __init__(self, path: object, field: str | None, message: str):
        self.path, self.field = str(path), field
        where = f"{self.path}: {field}" if field else self.path
        super().__init__(f"{where}: {message}")


class SnapshotError(HybridServeError):
    """A snapshot that is missing, incomplete or fails its checks."""


class StorageError(HybridServeError, OSError):
    """Object storage unreachable, refusing or failing (no credentials, no bucket, access denied, an
    upload cut off). An OSError too: whoever tolerates a full disk tolerates this the same way."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "storage error"


class PublishConflict(SnapshotError):
    """CURRENT moved between reading it and replacing it: another publisher won the compare-and-swap."""


class StoreLockedError(HybridServeError):
    """Another process holds a lock in the store."""


class Abandoned(HybridServeError):
    """A batch run asked to stop (SIGTERM to the scheduler) before CURRENT moved."""


class ValidationFailed(HybridServeError):
    """A new snapshot failed its checks before publish; it is not published."""


class PortTaken(HybridServeError):
    """The server's listen address is in use (or cannot be bound)."""


class NotFound(HybridServeError):
    """An id that is not in the live snapshot's catalogue (HTTP 404)."""


class BadRequest(HybridServeError):
    """A malformed request (HTTP 400); the message says what is wrong."""


class Unavailable(HybridServeError):
    """Nothing loaded to answer from yet (HTTP 503). ``retry_after``: what the answer's Retry-After
    header says ("reload": the reload interval, when a new snapshot is looked for; None: no header)."""

    retry_after: str | int | None = "reload"


class ModelFailed(Unavailable):
    """A registered model raised while predicting (HTTP 503 naming the model; other models keep serving)."""

    retry_after = None  # no reason to think it will not raise again soon


class DeadlineExceeded(Unavailable):
    """A live answer not ready within its model's deadline (HTTP 503 naming the model and the deadline;
    the computation goes on and may still fill the cache)."""

    retry_after = 1  # the computation goes on: its result is likely in the cache by then


class Busy(Unavailable):
    """A model's live queue is full (HTTP 503 naming the model); its computations already queued go on."""

    retry_after = 1
