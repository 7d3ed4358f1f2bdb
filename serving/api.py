"""The lookup API blueprint: parse, ask the engine, shape the answer. Errors are mapped once, at the end."""
from __future__ import annotations

import functools
import hashlib
import math
import re
import time
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import quote_etag

from serving.engine import PRECOMPUTED, Answer
from serving.models.base import canonical_key
from serving.models.predictor import RATING
from serving.errors import BadRequest, ModelFailed, NotFound, Unavailable

bp = Blueprint("api", __name__)

_INT = re.compile(r"[0-9]{1,19}")
INT64_MAX = 2**63 - 1


def services():
    """The app's engine, request log, metrics and settings (one accessor, as flaskr's get_db)."""
    return current_app.extensions["hybridserve"]


class _State:
    """What the after-request hook needs; one object on ``g`` instead of many lookups."""

    __slots__ = ("t0", "endpoint", "source", "log")

    def __init__(self, t0: float):
        self.t0, self.endpoint, self.source, self.log = t0, None, None, None


def _state() -> _State:
    return g._hs


# --- parsing ------------------------------------------------------------------------
def _params(allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in parse_qsl(request.environ.get("QUERY_STRING", ""), keep_blank_values=True,
                                 errors="replace"):
        if name not in allowed:
            allow = ", ".join(allowed) if allowed else "none"
            raise BadRequest(f"unknown query parameter {_show(name)} (allowed: {allow})")
        if name in out:
            raise BadRequest(f"query parameter {_show(name)} given more than once")
        out[name] = value
    return out


def _show(text: str, limit: int = 40) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text)


def parse_id(name: str, raw: str | None) -> int:
    if raw is None or raw == "":
        raise BadRequest(f"{name} is required: a non-negative integer")
    if not _INT.fullmatch(raw) or int(raw) > INT64_MAX:
        raise BadRequest(f"{name} must be a non-negative integer (int64), got {_show(raw)}")
    return int(raw)


def parse_k(svc, raw: str | None) -> int:
    limit = svc.settings["serving.k_limit"]
    if raw is None:
        raise BadRequest(f"query parameter 'k' is required: an integer from 1 to {limit}")
    if not re.fullmatch(r"-?[0-9]{1,19}", raw):
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {_show(raw)}")
    k = int(raw)
    if k < 1 or k > limit:
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {k}")
    return k


def parse_items(svc, raw: str | None) -> tuple[int, ...]:
    most = svc.settings["serving.session_max_items"]
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
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status=status, mimetype=mimetype)


@functools.lru_cache(maxsize=4096)  # precomputed answers share their snapshot's timestamp
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def etag_of(ans: Answer, tag: str, key: str) -> str | None:
    """Precomputed answers never change within a snapshot, so the snapshot id names them."""
    return f"{ans.snapshot}.{tag}.{key}" if ans.source == PRECOMPUTED else None


def render(body: dict[str, Any], ans: Answer, now: float) -> bytes:
    """The JSON of an answer: the endpoint's fields, then where it came from and how old it is."""
    return render_head(body, ans) + render_age(ans.computed_at, now)


def render_head(body: dict[str, Any], ans: Answer) -> bytes:
    """All of an answer's JSON but its last field, age_s: the part that does not change with time
    (the hit path keeps it for a precomputed answer; ``render_age`` completes it)."""
    body.update(source=ans.source, snapshot=ans.snapshot, computed_at=_iso(ans.computed_at))
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)[:-1]  # without the closing brace


def render_age(computed_at: float, now: float) -> bytes:
    """The last field of an answer's JSON (orjson's own spelling of the number) and the closing brace."""
    return b',"age_s":' + orjson.dumps(round(max(0.0, now - computed_at), 3)) + b"}"


def cache_control(fresh_for_s: float) -> tuple[str, str]:
    return ("Cache-Control", f"public, max-age={max(0, int(math.floor(fresh_for_s)))}")


def answer_headers(ans: Answer, etag: str | None) -> list[tuple[str, str]]:
    """Cache-Control for the answer's remaining freshness, and its ETag when it has one."""
    headers = [cache_control(ans.fresh_for_s)]
    if etag is not None:
        headers.append(("ETag", quote_etag(etag)))
    return headers


def _answer(svc, ans: Answer, tag: str, key: str, body: dict[str, Any], etag: str | None = None) -> Response:
    _state().source = ans.source
    etag = etag or etag_of(ans, tag, key)
    if etag is not None and "HTTP_IF_NONE_MATCH" in request.environ and request.if_none_match.contains(etag):
        return Response(status=304, headers=answer_headers(ans, etag))
    return Response(render(body, ans, svc.engine.clock()), mimetype="application/json",
                    headers=answer_headers(ans, etag))


def _scored(ans: Answer) -> list[dict[str, Any]]:
    scores = np.round(ans.scores.astype(np.float64), 6).tolist()
    return [{"item_id": i, "score": s} for i, s in zip(ans.ids.tolist(), scores)]


def list_body(id_name: str, key: int, k: int, ans: Answer) -> dict[str, Any]:
    """Similar items (``item_id``) or a user's recommendations (``user_id``)."""
    return {id_name: key, "k": k, "items": _scored(ans)}


def prediction_body(uid: int, iid: int, ans: Answer) -> dict[str, Any]:
    return {"user_id": uid, "item_id": iid, "prediction": round(float(ans.value), 6)}


def model_body(name: str, input_names: tuple[str, ...], values: tuple, ans: Answer) -> dict[str, Any]:
    """A registered model's prediction: the model, its version, the canonical inputs, the prediction."""
    return {"model": name, "model_version": ans.model_version, "inputs": dict(zip(input_names, values)),
            "prediction": ans.value}


def model_log(name: str, values: tuple, key: str) -> tuple:
    """The request-log row of a model's prediction; the rating model's also fills user_id and item_id
    (as /v1/predictions does), so both routes count as the same traffic."""
    if name == RATING:
        return ("prediction", values[1], values[0], 1, name, key)
    return ("model", None, None, None, name, key)


def model_etag(ans: Answer, name: str, key: str) -> str | None:
    """The ETag of a precomputed model answer (a digest: the canonical key has quotes in it)."""
    if ans.source != PRECOMPUTED:
        return None
    return f"{ans.snapshot}.m.{name}.{hashlib.blake2b(key.encode(), digest_size=10).hexdigest()}"


def _begin(endpoint: str) -> _State:
    st = _state()
    st.endpoint = endpoint
    return st


# --- endpoints ----------------------------------------------------------------------
@bp.get("/v1/items/<item_id>/similar")
def similar_items(item_id: str):
    """Items most similar to one item."""
    st, svc = _begin("similar_items"), services()
    params = _params(("k",))
    iid = parse_id("item_id", item_id)
    st.log = ("similar_items", iid, None, None)
    k = parse_k(svc, params.get("k"))
    st.log = ("similar_items", iid, None, k)
    ans = svc.engine.similar_items(iid, k)
    return _answer(svc, ans, "similar", f"{iid}.{k}", list_body("item_id", iid, k, ans))


@bp.get("/v1/users/<user_id>/recommendations")
def user_recommendations(user_id: str):
    """Unseen items for a user, ranked by predicted rating."""
    st, svc = _begin("user_recs"), services()
    params = _params(("k",))
    uid = parse_id("user_id", user_id)
    st.log = ("user_recs", None, uid, None)
    k = parse_k(svc, params.get("k"))
    st.log = ("user_recs", None, uid, k)
    ans = svc.engine.user_recs(uid, k)
    return _answer(svc, ans, "recs", f"{uid}.{k}", list_body("user_id", uid, k, ans))


@bp.get("/v1/predictions")
def prediction():
    """A user's predicted rating of an item."""
    st, svc = _begin("prediction"), services()
    params = _params(("user_id", "item_id"))
    uid = parse_id("user_id", params.get("user_id"))
    iid = parse_id("item_id", params.get("item_id"))
    st.log = model_log(RATING, (uid, iid), canonical_key((uid, iid)))
    ans = svc.engine.prediction(uid, iid)
    return _answer(svc, ans, "pred", f"{uid}.{iid}", prediction_body(uid, iid, ans))


@bp.get("/v1/models")
def models():
    """The registered models: name, version, inputs (with their types and domains), output."""
    _begin("models")
    _params(())
    snap = services().engine.snapshot
    if snap is None:
        raise Unavailable(services().engine.last_reload_error or "no snapshot loaded")
    return _json({"models": [describe(served) for _, served in sorted(snap.models.items())]})


@bp.get("/v1/models/<name>")
def model(name: str):
    """One registered model."""
    _begin("models")
    _params(())
    return _json(describe(services().engine.served(name)[1]))


def describe(served) -> dict[str, Any]:
    spec = served.spec
    out = {"name": spec.name, "version": served.version, "kind": spec.kind,
           "inputs": [i.describe() for i in spec.inputs], "output": spec.output,
           "max_age_s": services().engine.max_age(served), "precomputed": served.precomputed_rows(),
           "predict": f"/v1/models/{spec.name}/predict"}
    if spec.output_class is not None:
        out["class"] = spec.output_class
    return out


@bp.get("/v1/models/<name>/predict")
def model_predict(name: str):
    """A registered model's prediction for the inputs in the query string."""
    st, svc = _begin("model"), services()
    _, served = svc.engine.served(name)
    spec = served.spec
    if name == RATING:
        st.endpoint = "prediction"
    pairs = parse_qsl(request.environ.get("QUERY_STRING", ""), keep_blank_values=True, errors="replace")
    values = spec.parse_query(pairs)
    key = canonical_key(values)
    st.log = model_log(name, values, key)
    ans = svc.engine.predict(name, values)
    return _answer(svc, ans, "", key, model_body(name, spec.input_names, values, ans),
                   etag=model_etag(ans, name, key))


@bp.get("/v1/recommendations")
def session_recommendations():
    """Recommendations from the items a visitor just viewed (from the snapshot's lists when they
    prove the answer, else live, then cached)."""
    st, svc = _begin("session"), services()
    params = _params(("items", "k"))
    items = parse_items(svc, params.get("items"))
    k = parse_k(svc, params.get("k"))
    st.log = ("session", None, None, k)
    ans = svc.engine.session(items, k)  # an unknown id: 404, as on every endpoint (a well-formed list)
    return _answer(svc, ans, "session", session_key(items, k), session_body(items, k, ans))


def session_key(items: tuple[int, ...], k: int) -> str:
    """The ETag key of a session answer: the body lists the items in the order asked."""
    return f"{'-'.join(map(str, items))}.{k}"


def session_body(items: tuple[int, ...], k: int, ans: Answer) -> dict[str, Any]:
    return {"viewed": list(items), "k": k, "items": _scored(ans)}


@bp.get("/v1/snapshot")
def snapshot():
    """The live snapshot's manifest and age."""
    _begin("snapshot")
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
    return Response(services().metrics.render(), content_type=CONTENT_TYPE)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 document."""
    from serving.openapi import document
    s = services().settings
    snap = services().engine.snapshot
    specs = [m.spec for _, m in sorted(snap.models.items())] if snap is not None else []
    return _json(document(s["serving.k_limit"], s["serving.session_max_items"], specs))


# --- errors, metrics and the request log, in one place -----------------------------------
_STATUS = {BadRequest: 400, NotFound: 404, Unavailable: 503, ModelFailed: 503}


def problem(status: int, detail: str) -> Response:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
            "instance": request.path[:200]}
    st = g.get("_hs")
    if st is not None:
        st.source = "error"
    return _json(body, status=status, mimetype="application/problem+json")


def register(app: Flask) -> None:
    app.register_blueprint(bp)

    limit = app.extensions["hybridserve"].settings["serving.max_url_bytes"]

    @app.before_request
    def _start():
        g._hs = st = _State(time.perf_counter())
        env = request.environ
        if len(env.get("PATH_INFO", "")) + len(env.get("QUERY_STRING", "")) > limit:
            st.endpoint = "too_long"
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

    services_ = app.extensions["hybridserve"]

    @app.after_request
    def _record(resp: Response) -> Response:
        st = g.get("_hs")
        if st is None or st.endpoint is None:
            return resp
        status = resp.status_code
        record(services_, st.endpoint, st.source or ("error" if status >= 400 else "none"), status,
               time.perf_counter() - st.t0, st.log)
        return resp


def record(svc, endpoint: str, source: str, status: int, elapsed_s: float, log: tuple | None) -> None:
    """Count a request in the metrics and, for a lookup, append it to the request log."""
    svc.metrics.observe(endpoint, source, status, elapsed_s)
    if log is not None:
        svc.requestlog.append(*log[:4], source, status, int(elapsed_s * 1e6), *log[4:])
