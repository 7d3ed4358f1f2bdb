"""Answers as JSON bytes and headers: each route's body, then where the answer came from and how
old it is; Cache-Control from its remaining freshness; an ETag on precomputed answers. The hit path
and the Flask views render with these same functions."""
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
    return orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)[:-1]  # without the closing brace


def render_age(computed_at: float, now: float) -> bytes:
    """The last field of an answer's JSON (orjson's own spelling of the number) and the closing brace."""
    return b',"age_s":' + orjson.dumps(round(max(0.0, now - computed_at), 3)) + b"}"


def render(lookup: Lookup, ans: Answer, now: float, items=None) -> bytes:
    return render_head(body(lookup, ans, items), ans) + render_age(ans.computed_at, now)


def etag(lookup: Lookup, ans: Answer) -> str | None:
    """Precomputed answers never change within a snapshot, so the snapshot id names them; a model's
    canonical key has quotes in it, so a digest of it stands in."""
    if ans.source != PRECOMPUTED:
        return None
    if lookup.spec is not None:
        return f"{ans.snapshot}.m.{lookup.model}.{hashlib.blake2b(lookup.tag.encode(), digest_size=10).hexdigest()}"
    return f"{ans.snapshot}.{lookup.tag}"


def cache_control(fresh_for_s: float) -> tuple[str, str]:
    return ("Cache-Control", f"public, max-age={max(0, int(math.floor(fresh_for_s)))}")


def answer_headers(ans: Answer, tag: str | None) -> list[tuple[str, str]]:
    """Cache-Control for the answer's remaining freshness, and its ETag when it has one."""
    headers = [cache_control(ans.fresh_for_s)]
    if tag is not None:
        headers.append(("ETag", quote_etag(tag)))
    return headers


def json_bytes(fields: Any) -> bytes:
    return orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)
