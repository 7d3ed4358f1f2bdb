"""The shared tier of live results: one Redis for a fleet of servers (``serving.shared_cache``).

A miss is computed once across the fleet: the replica that misses takes a short lock (``SET NX`` with
an expiry), computes, stores the result with the local tier's TTL and lets the lock go; the others
find the result, or wait for it briefly and compute themselves when the lock goes without one.
Redis slow or down costs nothing but the tier: every call has a socket timeout, failures are counted
and logged once per interval, and a circuit breaker (pybreaker) skips Redis for a while after a few
failures in a row, then tries it again by itself. Runs on the models' live threads (serving/live.py).
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import orjson
import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from serving.errors import ConfigError
from serving.live import Live, Throttled

LOG = logging.getLogger(__name__)

PREFIX = "hybridserve:live:"
POLL_S = 0.01  # how often a replica waiting for another's computation looks again
# compare-and-delete: only the replica that holds the lock lets it go (the lock may have expired and
# been taken by another meanwhile)
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# outcomes counted per lookup (metrics: hybridserve_shared_cache_total{outcome})
OUTCOMES = ("hit", "waited", "miss", "error", "skipped")


class SharedUnavailable(Exception):
    """Redis did not answer in time, failed, or the breaker is open: use the local tiers."""


def shared_key(cache_key: tuple) -> str:
    """The Redis key of a local cache key (snapshot, model, version, query, canonical input, k): the model
    readable, the rest a digest (canonical inputs can be long)."""
    digest = hashlib.blake2b(repr(cache_key).encode(), digest_size=16).hexdigest()
    return f"{PREFIX}{cache_key[1]}:{digest}"


def encode(live: Live) -> bytes:
    """A Live as bytes: a JSON head, then a ranked answer's two arrays raw (exact, no text round trip)."""
    answer = live.answer
    if isinstance(answer, tuple) and len(answer) == 2 and all(isinstance(a, np.ndarray) for a in answer):
        ids, scores = (np.ascontiguousarray(a) for a in answer)
        head = {"c": live.computed_at, "e": live.expires, "lists": [ids.dtype.str, scores.dtype.str, ids.size]}
        return orjson.dumps(head) + b"\n" + ids.tobytes() + scores.tobytes()
    return orjson.dumps({"c": live.computed_at, "e": live.expires, "v": answer}, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(data: bytes) -> Live:
    head, _, rest = data.partition(b"\n")
    meta = orjson.loads(head)
    if "lists" in meta:
        id_type, score_type, n = meta["lists"]
        ids = np.frombuffer(rest, dtype=id_type, count=n)
        scores = np.frombuffer(rest, dtype=score_type, count=n, offset=ids.nbytes)
        answer: Any = (ids, scores)
    else:
        answer = meta["v"]
    return Live(meta["c"], meta["e"], answer, shared=True)


class SharedTier:
    """``get_or_compute(key, compute, wait_s)`` -> Live, through Redis at ``url`` when it answers."""

    def __init__(self, url: str, timeout_s: float, retry_s: float, clock: Callable[[], float],
                 log_interval_s: float = 60.0, fail_max: int = 3):
        try:
            # no retries inside the client: one call, one timeout; the breaker decides when to try again
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        except ValueError as exc:
            raise ConfigError(f"serving.shared_cache: {exc}") from None
        self.url = redact(url)
        self.clock = clock
        self.breaker = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=retry_s, name="shared_cache",
                                                listeners=[_Announce(self)])
        self._unlock = self.client.register_script(_UNLOCK)
        self.failures = Throttled(LOG, log_interval_s)
        self.counts: Counter = Counter()
        self.on_outcome: Callable[[str], None] | None = None

    def close(self) -> None:
        """Let the connections go (the app's close, tests)."""
        self.client.close()

    # --- one guarded call -----------------------------------------------------------
    def _call(self, fn: Callable, *args, **kwargs) -> Any:
        try:
            return self.breaker.call(fn, *args, **kwargs)
        except pybreaker.CircuitBreakerError:
            raise SharedUnavailable("open") from None
        except (redis.RedisError, OSError) as exc:
            self.failures.failed("redis", f"shared cache {self.url}: {type(exc).__name__}: {exc}; answering "
                                          "from the local tiers")
            raise SharedUnavailable(str(exc)) from None

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.on_outcome:
            self.on_outcome(outcome)

    def get(self, key: str) -> Live | None:
        data = self._call(self.client.get, key)
        return None if data is None else decode(data)

    def put(self, key: str, live: Live) -> None:
        ttl_ms = int((live.expires - self.clock()) * 1000)
        if ttl_ms > 0:
            self._call(self.client.set, key, encode(live), px=ttl_ms)

    # --- the one lookup -------------------------------------------------------------------
    def get_or_compute(self, key: str, compute: Callable[[], Live], wait_s: float) -> Live:
        """The fleet's result for ``key``; else ``compute()`` once across the fleet: under the lock, or
        after waiting up to ``wait_s`` for the replica that holds it. Redis failing at any step: the
        computation goes on without it (counted, never an error)."""
        token = None
        try:
            try:
                found, token = self._find(key, wait_s)
                if found is not None:
                    return found
            except SharedUnavailable as exc:
                self._count("skipped" if str(exc) == "open" else "error")
                return compute()
            live = compute()
            try:
                self.put(key, live)
            except SharedUnavailable:
                self._count("error")
            return live
        finally:
            if token is not None:
                try:
                    self._call(self._unlock, keys=[key + ":lock"], args=[token])
                except SharedUnavailable:
                    pass  # it expires by itself

    def _find(self, key: str, wait_s: float) -> tuple[Live | None, str | None]:
        """(the stored result, counted hit or waited, or None: counted miss, to compute here) and the
        lock's token when this replica took it (None when it waited in vain for another's)."""
        found = self.get(key)
        if found is not None:
            self._count("hit")
            return found, None
        token = secrets.token_hex(8)
        if self._call(self.client.set, key + ":lock", token, nx=True, px=max(1, int(wait_s * 1000))):
            # the replica that held it may have stored its result and let go between our GET and SET
            found = self.get(key)
            if found is not None:
                self._count("hit")
                return found, token
        else:
            token = None
            found = self._wait(key, wait_s)
            if found is not None:
                self._count("waited")
                return found, None
        self._count("miss")
        return None, token

    def _wait(self, key: str, wait_s: float) -> Live | None:
        """Another replica computes ``key``: its result once stored, or None when its lock went without
        one (it failed) or ``wait_s`` passed."""
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            time.sleep(POLL_S)
            found = self.get(key)
            if found is not None:
                return found
            if not self._call(self.client.exists, key + ":lock"):
                return self.get(key)
        return None


class _Announce(pybreaker.CircuitBreakerListener):
    """pybreaker listener: one line when the breaker opens (Redis skipped) and when it closes again."""

    def __init__(self, tier: SharedTier):
        self.tier = tier

    def state_change(self, cb, old_state, new_state) -> None:
        name = getattr(new_state, "name", str(new_state))
        if name == "open":
            LOG.warning("shared cache %s: skipped for %.1f s after %d failures in a row", self.tier.url,
                        cb.reset_timeout, cb.fail_max)
        elif name == "closed" and getattr(old_state, "name", "") != "closed":
            LOG.info("shared cache %s: answering again", self.tier.url)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
