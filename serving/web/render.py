"""Answers as JSON bytes and headers: each route's body, then where the answer came from and how
old it is; Cache-Control from its remaining freshness (``cache_control``, the one rule); an ETag on
precomputed answers. The hit path and the Flask views render with these same functions."""
from __future__ import annotations

import functools
import hashlib
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson
from werkzeug.http import quote_etag

from serving.engine import PRECOMPUTED, Answer
from serving.web.parse import Lookup


@functools.lru_cache(maxsize=4096)  # precomputed answers share their snapshot's timestamp
def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def scored(ans: Answer, fields: tuple[str, ...] = (), items=None) -> list[dict[str, Any]]:
    """The ranked items; with ``fields``, each also carries that metadata from ``items`` (the
    snapshot's serving.catalogue.Catalogue, in memory)."""
    ids = ans.ids.tolist()
    scores = np.round(ans.scores.astype(np.float64), 6).tolist()
    out = [{"item_id": i, "score": s} for i, s in zip(ids, scores)]
    if fields:
        for row, extra in zip(out, items.fields(ids, fields)):
            row.update(extra)
    return out


def body(lookup: Lookup, ans: Answer, items=None) -> dict[str, Any]:
    """The route's own fields of an answer (``items``: the catalogue, for ``lookup.fields``)."""
    route, key = lookup.route, lookup.key
    if route == "similar_items":
        return {"item_id": key[0], "k": lookup.k, "items": scored(ans, lookup.fields, items)}
    if route == "user_recs":
        return {"user_id": key[0], "k": lookup.k, "items": scored(ans, lookup.fields, items)}
    if route == "session":
        return {"viewed": list(key[0]), "k": lookup.k, "items": scored(ans, lookup.fields, items)}
    if lookup.spec is None:  # /v1/predictions
        return {"user_id": key[0], "item_id": key[1], "prediction": round(float(ans.value), 6)}
    return {"model": lookup.model, "model_version": ans.model_version,
            "inputs": dict(zip(lookup.spec.input_names, key)), "prediction": ans.value}


def render_head(fields: dict[str, Any], ans: Answer) -> bytes:
    """All of an answer's JSON but its last field, age_s: the part that does not change with time
    (the hit path keeps it for a precomputed answer; ``render_age`` completes it)."""
    fields.update(source=ans.source, snapshot=ans.snapshot, computed_at=iso(ans.computed_at))
    if ans.stale:  # past its freshness bound, served because the live answer was not had in time
        fields["stale"] = True
    return orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)[:-1]  # without the closing brace


def render_age(computed_at: float, now: float) -> bytes:
    """The last field of an answer's JSON (orjson's own spelling of the number) and the closing brace."""
    return b',"age_s":' + orjson.dumps(round(max(0.0, now - computed_at), 3)) + b"}"


def render(lookup: Lookup, ans: Answer, now: float, items=None) -> bytes:
    return render_head(body(lookup, ans, items), ans) + render_age(ans.computed_at, now)


def etag(lookup: Lookup, ans: Answer) -> str | None:
    """Precomputed answers never change within a snapshot, so the snapshot id names them (a new
    snapshot, a new ETag); a model's canonical key has quotes in it, so a digest of it stands in."""
    if ans.source != PRECOMPUTED or ans.stale:  # a stale answer is never revalidated into a fresh one
        return None
    if lookup.spec is not None:
        return f"{ans.snapshot}.m.{lookup.model}.{hashlib.blake2b(lookup.tag.encode(), digest_size=10).hexdigest()}"
    return f"{ans.snapshot}.{lookup.tag}"


def etag_header(tag: str) -> tuple[str, str]:
    """A weak ETag: the answer's data is the same within a snapshot, its ``age_s`` is not (so the
    bytes are not, which a strong one would promise); If-None-Match compares weakly anyway."""
    return ("ETag", quote_etag(tag, weak=True))


def cache_control(fresh_for_s: float, cap_s: int = 0) -> tuple[str, str]:
    """The one Cache-Control rule, for every answer on both paths: ``max-age`` is the whole seconds
    the answer stays fresh, less one, and at most ``cap_s`` (``serving.max_age_cap_s``; 0: no cap).

    HTTP caches count age in whole seconds: nginx keeps an entry while ``valid_sec >= now`` with
    ``valid_sec = now + max_age``, both truncated to the second, so it serves an entry up to
    max-age + 1 s after it got it. Less one, an answer with 3.7 s left says max-age=2 and no cache
    serves it past its freshness bound (tests/test_front.py). An answer with under 2 s left, or one
    with ``fresh_for_s`` 0 (served past its bound), says max-age=0: no cache keeps it."""
    seconds = max(0, math.floor(fresh_for_s) - 1)
    if cap_s and seconds > cap_s:
        seconds = cap_s
    return ("Cache-Control", f"public, max-age={seconds}")


# Errors and the status endpoints (health, readiness, the manifest, metrics): never kept by a cache,
# since each says what holds now (a 404 may be answered after the next snapshot).
NO_STORE = ("Cache-Control", "no-store")


def answer_headers(ans: Answer, tag: str | None, cap_s: int = 0) -> list[tuple[str, str]]:
    """Cache-Control for the answer's remaining freshness (at most ``cap_s``; max-age=0 for a stale one,
    so no front cache keeps it), and its ETag when it has one."""
    headers = [cache_control(ans.fresh_for_s, cap_s)]
    if tag is not None:
        headers.append(etag_header(tag))
    return headers


def json_bytes(fields: Any) -> bytes:
    return orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)
