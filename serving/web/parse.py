"""Request parsing, written once: the hit path and the Flask views both turn a URL into a ``Lookup``
here (which model, which query, the canonical key, k, the request-log row), or a BadRequest naming
what is wrong. A lookup parsed by the hit path travels on to Flask in the WSGI environ, so a miss is
not parsed twice."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl

from serving.errors import BadRequest
from serving.models.base import ModelSpec, canonical_key
from serving.store.layout import RATING, RECOMMENDER

ENVIRON_KEY = "hybridserve.lookup"
INT64_MAX = 2**63 - 1
_ID = re.compile(r"[0-9]{1,19}")
_K = re.compile(r"-?[0-9]{1,19}")
# k where a list request leaves it out (the README's ``?k=10``); documented in /openapi.json
DEFAULT_K = 10
FIELDS = ("title", "genres")  # item metadata a list answer may carry
# GET /v1/items?q=: the longest query and the most results
SEARCH_MAX_CHARS, SEARCH_DEFAULT_LIMIT, SEARCH_MAX_LIMIT = 100, 10, 50

# A partial request-log row as parsing gets further: (endpoint, item_id, user_id, k[, model, input]).
Note = Callable[[tuple], None]


def _nothing(_row: tuple) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Limits:
    """What parsing checks against (serving.k_limit, serving.session_max_items)."""

    k_limit: int
    session_max_items: int


@dataclass(frozen=True, slots=True)
class Lookup:
    """One parsed lookup: the route it came by, what to ask the engine, and what to log."""

    route: str             # similar_items | user_recs | prediction | model | session
    model: str
    query: str
    key: tuple             # canonical
    k: int | None
    log: tuple             # the request-log row's (endpoint, item_id, user_id, k[, model, input])
    tag: str               # names the answer within a snapshot (its ETag with the snapshot id)
    spec: ModelSpec | None = None
    fields: tuple[str, ...] = ()  # item metadata asked for in a list answer (?fields=title,genres)


def show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def params(query_string: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string as a dict; BadRequest for a parameter not allowed or given twice."""
    out: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True, errors="replace"):
        if name not in allowed:
            allow = ", ".join(allowed) if allowed else "none"
            raise BadRequest(f"unknown query parameter {show(name)} (allowed: {allow})")
        if name in out:
            raise BadRequest(f"query parameter {show(name)} given more than once")
        out[name] = value
    return out


def parse_id(name: str, raw: str | None) -> int:
    if raw is None or raw == "":
        raise BadRequest(f"{name} is required: a non-negative integer")
    if not _ID.fullmatch(raw) or int(raw) > INT64_MAX:
        raise BadRequest(f"{name} must be a non-negative integer (int64), got {show(raw)}")
    return int(raw)


def default_k(limits: Limits) -> int:
    """DEFAULT_K, or serving.k_limit when that is lower (an omitted k is never refused)."""
    return min(DEFAULT_K, limits.k_limit)


def parse_k(raw: str | None, limits: Limits) -> int:
    limit = limits.k_limit
    if raw is None:
        return default_k(limits)
    if not _K.fullmatch(raw):
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {show(raw)}")
    k = int(raw)
    if k < 1 or k > limit:
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {k}")
    return k


def parse_fields(raw: str | None) -> tuple[str, ...]:
    """``fields=title,genres``: the item metadata to add to each listed item, in FIELDS' order."""
    if raw is None:
        return ()
    names = raw.split(",")
    unknown = [n for n in names if n not in FIELDS]
    if raw == "" or unknown:
        got = show(unknown[0]) if unknown and unknown[0] else "an empty name"
        raise BadRequest(f"fields must list one or more of {', '.join(FIELDS)}, comma-separated; got {got}")
    if len(set(names)) != len(names):
        raise BadRequest(f"fields names a field more than once: {show(raw)}")
    return tuple(f for f in FIELDS if f in names)


def _tagged(tag: str, fields: tuple[str, ...]) -> str:
    return tag + "".join(f".{f}" for f in fields)


def parse_items(raw: str | None, limits: Limits) -> tuple[int, ...]:
    most = limits.session_max_items
    if raw is None or raw.strip() == "":
        raise BadRequest(f"query parameter 'items' is required: 1 to {most} comma-separated item ids")
    parts = raw.split(",")
    if len(parts) > most:
        raise BadRequest(f"items lists {len(parts)} ids; at most {most} are allowed")
    ids = tuple(parse_id("each id in items", p.strip()) for p in parts)
    seen, dups = set(), []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    if dups:
        raise BadRequest(f"items has duplicate ids: {', '.join(map(str, dict.fromkeys(dups)))}")
    return ids


# --- one function per route ---------------------------------------------------------------
def similar_items(item_raw: str, query_string: str, limits: Limits, note: Note = _nothing) -> Lookup:
    """GET /v1/items/<item_id>/similar?k="""
    p = params(query_string, ("k", "fields"))
    iid = parse_id("item_id", item_raw)
    note(("similar_items", iid, None, None))
    k = parse_k(p.get("k"), limits)
    fields = parse_fields(p.get("fields"))
    return Lookup("similar_items", RECOMMENDER, "similar_items", (iid,), k, ("similar_items", iid, None, k),
                  _tagged(f"similar.{iid}.{k}", fields), fields=fields)


def user_recs(user_raw: str, query_string: str, limits: Limits, note: Note = _nothing) -> Lookup:
    """GET /v1/users/<user_id>/recommendations?k="""
    p = params(query_string, ("k", "fields"))
    uid = parse_id("user_id", user_raw)
    note(("user_recs", None, uid, None))
    k = parse_k(p.get("k"), limits)
    fields = parse_fields(p.get("fields"))
    return Lookup("user_recs", RECOMMENDER, "user_recs", (uid,), k, ("user_recs", None, uid, k),
                  _tagged(f"recs.{uid}.{k}", fields), fields=fields)


def session(query_string: str, limits: Limits, note: Note = _nothing) -> Lookup:
    """GET /v1/recommendations?items=&k= (the key is the items in the order asked; the model's cache
    key ignores the order)."""
    p = params(query_string, ("items", "k", "fields"))
    items = parse_items(p.get("items"), limits)
    k = parse_k(p.get("k"), limits)
    fields = parse_fields(p.get("fields"))
    return Lookup("session", RECOMMENDER, "session", (items,), k, ("session", None, None, k),
                  _tagged(f"session.{'-'.join(map(str, items))}.{k}", fields), fields=fields)


def item(item_raw: str, query_string: str) -> int:
    """GET /v1/items/<item_id>: the id."""
    params(query_string, ())
    return parse_id("item_id", item_raw)


def search(query_string: str) -> tuple[str, int]:
    """GET /v1/items?q=&limit=: (the query as given, the limit)."""
    p = params(query_string, ("q", "limit"))
    q = p.get("q")
    if q is None or q.strip() == "":
        raise BadRequest("query parameter 'q' is required: some text of an item's title")
    if len(q) > SEARCH_MAX_CHARS:
        raise BadRequest(f"q is {len(q)} characters long; at most {SEARCH_MAX_CHARS} are allowed")
    raw = p.get("limit")
    if raw is None:
        return q, SEARCH_DEFAULT_LIMIT
    if not _K.fullmatch(raw) or not 1 <= int(raw) <= SEARCH_MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {SEARCH_MAX_LIMIT}, got {show(raw)}")
    return q, int(raw)


def prediction(query_string: str, limits: Limits, note: Note = _nothing) -> Lookup:
    """GET /v1/predictions?user_id=&item_id= (the rating model's prediction)."""
    p = params(query_string, ("user_id", "item_id"))
    uid = parse_id("user_id", p.get("user_id"))
    iid = parse_id("item_id", p.get("item_id"))
    key = (uid, iid)
    return Lookup("prediction", RATING, "predict", key, None, model_log(RATING, key, canonical_key(key)),
                  f"pred.{uid}.{iid}")


def model(name: str, spec: ModelSpec, query_string: str, note: Note = _nothing) -> Lookup:
    """GET /v1/models/<name>/predict?<input>=... (``spec``: the model's input schema)."""
    values = spec.parse_query(parse_qsl(query_string, keep_blank_values=True, errors="replace"))
    key = canonical_key(values)
    return Lookup("prediction" if name == RATING else "model", name, "predict", values, None,
                  model_log(name, values, key), key, spec)


def model_log(name: str, values: tuple, key: str) -> tuple:
    """The request-log row of a model's prediction; the rating model's also fills user_id and item_id
    (as /v1/predictions does), so both routes count as the same traffic."""
    if name == RATING:
        return ("prediction", values[1], values[0], 1, name, key)
    return ("model", None, None, None, name, key)
