"""The lookup API blueprint: parse, ask the engine, shape the answer. Errors are mapped once, at the end."""
from __future__ import annotations

import math
import re
import time
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from serving.engine import LIVE, PRECOMPUTED, Answer
from serving.errors import BadRequest, NotFound, Unavailable

bp = Blueprint("api", __name__)

_INT = re.compile(r"[0-9]{1,19}")
_INT64_MAX = 2**63 - 1


def services():
    """The app's engine, request log, metrics and settings (one accessor, as flaskr's get_db)."""
    return current_app.extensions["hybridserve"]


# --- parsing ------------------------------------------------------------------------
def _params(allowed: tuple[str, ...]) -> dict[str, str]:
    args = request.args
    for name in args:
        if name not in allowed:
            allow = ", ".join(allowed) if allowed else "none"
            raise BadRequest(f"unknown query parameter {_show(name)} (allowed: {allow})")
        if len(args.getlist(name)) > 1:
            raise BadRequest(f"query parameter {_show(name)} given more than once")
    return {name: args[name] for name in args}


def _show(text: str, limit: int = 40) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text)


def parse_id(name: str, raw: str | None) -> int:
    if raw is None or raw == "":
        raise BadRequest(f"{name} is required: a non-negative integer")
    if not _INT.fullmatch(raw) or int(raw) > _INT64_MAX:
        raise BadRequest(f"{name} must be a non-negative integer (int64), got {_show(raw)}")
    return int(raw)


def parse_k(raw: str | None) -> int:
    limit = services().settings["serving.k_limit"]
    if raw is None:
        raise BadRequest(f"query parameter 'k' is required: an integer from 1 to {limit}")
    if not re.fullmatch(r"-?[0-9]{1,19}", raw):
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {_show(raw)}")
    k = int(raw)
    if k < 1 or k > limit:
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {k}")
    return k


def parse_items(raw: str | None) -> tuple[int, ...]:
    most = services().settings["serving.session_max_items"]
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


# --- responses ----------------------------------------------------------------------
def _json(body: Any, status: int = 200, mimetype: str = "application/json") -> Response:
    return current_app.response_class(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                                      mimetype=mimetype)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _answer(ans: Answer, endpoint: str, key: str, body: dict[str, Any]) -> Response:
    g.source = ans.source
    now = services().engine.clock()
    body.update(source=ans.source, snapshot=ans.snapshot, computed_at=_iso(ans.computed_at),
                age_s=round(ans.age_s(now), 3))
    etag = None
    if ans.source == PRECOMPUTED:
        etag = f"{ans.snapshot}.{endpoint}.{key}"  # the answer never changes within a snapshot
        if request.if_none_match.contains(etag):
            resp = current_app.response_class(status=304)
            return _cache_headers(resp, ans, etag)
    return _cache_headers(_json(body), ans, etag)


def _cache_headers(resp: Response, ans: Answer, etag: str | None) -> Response:
    resp.headers["Cache-Control"] = f"public, max-age={max(0, int(math.floor(ans.fresh_for_s)))}"
    if etag is not None:
        resp.set_etag(etag)
    return resp


def _scored(ans: Answer) -> list[dict[str, Any]]:
    return [{"item_id": int(i), "score": round(float(s), 6)} for i, s in zip(ans.ids.tolist(), ans.scores.tolist())]


def _log(endpoint: str, item_id: int | None = None, user_id: int | None = None, k: int | None = None) -> None:
    g.log = (endpoint, item_id, user_id, k)


# --- endpoints ----------------------------------------------------------------------
@bp.get("/v1/items/<item_id>/similar")
def similar_items(item_id: str):
    """Items most similar to one item."""
    g.endpoint = "similar_items"
    params = _params(("k",))
    iid = parse_id("item_id", item_id)
    _log("similar_items", item_id=iid)
    k = parse_k(params.get("k"))
    _log("similar_items", item_id=iid, k=k)
    ans = services().engine.similar_items(iid, k)
    return _answer(ans, "similar", f"{iid}.{k}", {"item_id": iid, "k": k, "items": _scored(ans)})


@bp.get("/v1/users/<user_id>/recommendations")
def user_recommendations(user_id: str):
    """Unseen items for a user, ranked by predicted rating."""
    g.endpoint = "user_recs"
    params = _params(("k",))
    uid = parse_id("user_id", user_id)
    _log("user_recs", user_id=uid)
    k = parse_k(params.get("k"))
    _log("user_recs", user_id=uid, k=k)
    ans = services().engine.user_recs(uid, k)
    return _answer(ans, "recs", f"{uid}.{k}", {"user_id": uid, "k": k, "items": _scored(ans)})


@bp.get("/v1/predictions")
def prediction():
    """A user's predicted rating of an item."""
    g.endpoint = "prediction"
    params = _params(("user_id", "item_id"))
    uid = parse_id("user_id", params.get("user_id"))
    iid = parse_id("item_id", params.get("item_id"))
    _log("prediction", item_id=iid, user_id=uid, k=1)
    ans = services().engine.prediction(uid, iid)
    return _answer(ans, "pred", f"{uid}.{iid}",
                   {"user_id": uid, "item_id": iid, "prediction": round(float(ans.value), 6)})


@bp.get("/v1/recommendations")
def session_recommendations():
    """Recommendations from the items a visitor just viewed (always live, then cached)."""
    g.endpoint = "session"
    params = _params(("items", "k"))
    items = parse_items(params.get("items"))
    k = parse_k(params.get("k"))
    _log("session", k=k)
    try:
        ans = services().engine.session(items, k)
    except NotFound as exc:  # an unknown id inside the list is a malformed list, not a missing resource
        raise BadRequest(str(exc)) from None
    return _answer(ans, "session", "", {"viewed": list(items), "k": k, "items": _scored(ans)})


@bp.get("/v1/snapshot")
def snapshot():
    """The live snapshot's manifest and age."""
    g.endpoint = "snapshot"
    _params(())
    engine = services().engine
    snap = engine.snapshot
    if snap is None:
        raise Unavailable(engine.last_reload_error or "no snapshot loaded")
    body = dict(snap.manifest)
    body["age_s"] = round(engine.clock() - snap.created_at, 3)
    body["max_age_s"] = engine.max_age_s
    return _json(body)


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers."""
    return _json({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Readiness: a valid snapshot is loaded; otherwise 503 and why."""
    info = services().engine.status()
    return _json(info, status=200 if info["ready"] else 503)


@bp.get("/metrics")
def metrics():
    """Prometheus metrics."""
    from serving.metrics import CONTENT_TYPE
    return current_app.response_class(services().metrics.render(), mimetype=None, content_type=CONTENT_TYPE)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 document."""
    from serving.openapi import document
    s = services().settings
    return _json(document(s["serving.k_limit"], s["serving.session_max_items"]))


# --- errors, metrics and the request log, in one place -----------------------------------
_STATUS = {BadRequest: 400, NotFound: 404, Unavailable: 503}


def problem(status: int, detail: str) -> Response:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
            "instance": request.path[:200]}
    g.source = "error"
    return _json(body, status=status, mimetype="application/problem+json")


def register(app: Flask) -> None:
    app.register_blueprint(bp)

    @app.before_request
    def _start():
        g.t0 = time.perf_counter()
        limit = app.extensions["hybridserve"].settings["serving.max_url_bytes"]
        if len(request.full_path.encode("utf-8", "surrogateescape")) > limit:
            g.endpoint = "too_long"
            return problem(414, f"URL is longer than {limit} bytes")

    @app.errorhandler(BadRequest)
    @app.errorhandler(NotFound)
    @app.errorhandler(Unavailable)
    def _domain(exc):
        return problem(_STATUS[type(exc)], str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        resp = problem(exc.code or 500, exc.description or HTTPStatus(exc.code).phrase)
        if exc.code == 405:
            resp.headers["Allow"] = ", ".join(sorted(exc.valid_methods or ["GET"]))  # type: ignore[attr-defined]
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error on %s", request.path[:200])
        return problem(500, "internal error; it has been logged")

    @app.after_request
    def _record(resp: Response) -> Response:
        ext = app.extensions["hybridserve"]
        endpoint = g.get("endpoint")
        if endpoint is None:
            return resp
        elapsed = time.perf_counter() - g.get("t0", time.perf_counter())
        source = g.get("source") or ("error" if resp.status_code >= 400 else "none")
        ext.metrics.requests.labels(endpoint, source, str(resp.status_code)).inc()
        ext.metrics.latency.labels(endpoint, source).observe(elapsed)
        entry = g.get("log")
        if entry is not None:
            ep, item_id, user_id, k = entry
            ext.requestlog.append(ep, item_id, user_id, k, source, resp.status_code, int(elapsed * 1e6))
        return resp


__all__ = ["bp", "register", "services", "LIVE"]
