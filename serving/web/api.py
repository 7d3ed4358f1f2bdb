"""The lookup API blueprint: parse (serving.web.parse), ask the engine, render. Errors are mapped once
(serving.web.errors); metrics and the request log are written once per request (``record``)."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jinja2
from flask import Blueprint, Flask, Response, current_app, g, request

from serving.engine import PRECOMPUTED
from serving.errors import NotFound, Unavailable
from serving.web import errors, parse, render
from serving.web.parse import Lookup

bp = Blueprint("api", __name__)
STATIC = Path(__file__).resolve().parent / "static"  # the page's files (packaged: pyproject package-data)


def services():
    """The app's engine, request log, metrics and settings (one accessor, as flaskr's get_db)."""
    return current_app.extensions["hybridserve"]


class _State:
    """What the after-request hook needs; one object on ``g`` instead of many lookups."""

    __slots__ = ("t0", "endpoint", "source", "log")

    def __init__(self, t0: float):
        self.t0, self.endpoint, self.source, self.log = t0, None, None, None


def _begin(endpoint: str) -> _State:
    st = g._hs
    st.endpoint = endpoint
    return st


def _note(row: tuple) -> None:
    g._hs.log = row


def _query_string() -> str:
    return request.environ.get("QUERY_STRING", "")


def _parsed(build) -> Lookup:
    """The lookup the hit path parsed already for this request, else parsed now."""
    found = request.environ.get(parse.ENVIRON_KEY)
    return found if found is not None else build()


def _answer(lookup: Lookup) -> Response:
    """Ask the engine, then render the answer (or 304 when the client holds it already)."""
    st, svc = g._hs, services()
    st.endpoint, st.log = lookup.route, lookup.log
    ans = svc.engine.lookup(lookup.model, lookup.query, lookup.key, lookup.k)
    st.source = ans.source
    tag = render.etag(lookup, ans)
    headers = render.answer_headers(ans, tag, svc.settings["serving.max_age_cap_s"])
    if tag is not None and "HTTP_IF_NONE_MATCH" in request.environ and request.if_none_match.contains_weak(tag):
        return Response(status=304, headers=headers)
    items = _catalogue() if lookup.fields else None
    return Response(render.render(lookup, ans, svc.engine.clock(), items), mimetype="application/json",
                    headers=headers)


def _snapshot():
    """The live snapshot, or 503 saying why there is none."""
    engine = services().engine
    snap = engine.snapshot
    if snap is None:
        raise Unavailable(engine.last_reload_error or "no snapshot loaded")
    return snap


def _catalogue():
    return _snapshot().items


def _json(body: Any, status: int = 200) -> Response:
    return Response(render.json_bytes(body), status=status, mimetype="application/json", headers=[render.NO_STORE])


# --- endpoints ----------------------------------------------------------------------
@bp.get("/v1/items/<item_id>/similar")
def similar_items(item_id: str):
    """Items most similar to one item."""
    _begin("similar_items")
    return _answer(_parsed(lambda: parse.similar_items(item_id, _query_string(), services().limits, _note)))


@bp.get("/v1/users/<user_id>/recommendations")
def user_recommendations(user_id: str):
    """Unseen items for a user, ranked by predicted rating."""
    _begin("user_recs")
    return _answer(_parsed(lambda: parse.user_recs(user_id, _query_string(), services().limits, _note)))


@bp.get("/v1/predictions")
def prediction():
    """A user's predicted rating of an item."""
    _begin("prediction")
    return _answer(_parsed(lambda: parse.prediction(_query_string(), services().limits, _note)))


@bp.get("/v1/recommendations")
def session_recommendations():
    """Recommendations from the items a visitor just viewed (from the snapshot's lists when they
    prove the answer, else live, then cached)."""
    _begin("session")
    return _answer(_parsed(lambda: parse.session(_query_string(), services().limits, _note)))


@bp.get("/")
def page():
    """The page: a browser view of the API (serving.page)."""
    if not services().settings["serving.page"]:
        raise NotFound("no page here: serving.page is off (an API-only deployment)")
    template, parts = _page_template()
    resp = Response(template.render(first=_first_answer(), first_query=FIRST_QUERY, **parts), mimetype="text/html",
                    headers={"Cache-Control": "no-cache"})
    resp.add_etag()  # no-cache: a browser asks again each time, and a 304 answers if nothing changed
    return resp.make_conditional(request)


# the query of the similar items the page puts in itself; index.html names it beside them, and page.js
# takes them only if it is the query it would send (otherwise it asks the API)
FIRST_QUERY = "k=10&fields=title,genres"

# what a precomputed answer put in the page can hold that would end its <script> early ("</script>",
# "<!--" in a title): JSON's own escapes of them, valid inside any JSON string
_SCRIPT_ESCAPES = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"))


def _first_answer() -> str | None:
    """The similar items of the page's ``?item=`` as ``GET /v1/items/<id>/similar?<FIRST_QUERY>``
    answers them, when that is a fresh precomputed hit (counted and logged as that request): the page
    shows them in its first paint, with no request to wait for. None otherwise (the page asks the API,
    which computes a miss live or words the error)."""
    item, hits = request.args.get("item", ""), services().hits
    if not item.isascii() or not item.isdigit() or hits is None:
        return None
    body = hits.answer(f"/v1/items/{item}/similar", FIRST_QUERY)
    if body is None:
        return None
    for char, escape in _SCRIPT_ESCAPES:
        body = body.replace(char, escape)
    return body.decode("utf-8")


@functools.cache
def _page_template() -> tuple[jinja2.Template, dict[str, str]]:
    """index.html (a jinja2 template, as Flask renders them) and the page.css and page.js it takes in:
    one document, so the page's first paint waits for no other request. Read once per process."""
    parts = {name: (STATIC / f"page.{name}").read_text(encoding="utf-8") for name in ("css", "js")}
    for name, text in parts.items():
        if f"</{'style' if name == 'css' else 'script'}" in text.lower():
            raise RuntimeError(f"{STATIC / f'page.{name}'}: must not contain the tag that would end it in index.html")
    template = jinja2.Template((STATIC / "index.html").read_text(encoding="utf-8"), undefined=jinja2.StrictUndefined,
                               keep_trailing_newline=True)
    return template, parts


@bp.get("/v1/items/<item_id>")
def item(item_id: str):
    """One item's title and genres."""
    _begin("item")
    iid = parse.item(item_id, _query_string())
    snap = _snapshot()
    found = snap.items.get(iid)
    if found is None:
        raise NotFound(f"item {iid} is not in the catalogue")
    return _from_snapshot(snap, {"item_id": iid, **found})


@bp.get("/v1/items")
def search():
    """Items whose title contains q (case and accents ignored): title prefixes first, then by popularity."""
    _begin("item_search")
    q, limit = parse.search(_query_string())
    snap = _snapshot()
    items = snap.items
    rows = items.search(q, limit)
    found = [{"item_id": int(items.ids[r]), "title": items.titles[r], "genres": items.genres_of(r)} for r in rows]
    return _from_snapshot(snap, {"q": q, "limit": limit, "items": found})


def _from_snapshot(snap, fields: dict[str, Any]) -> Response:
    """An answer read from the snapshot's items table: provenance as any precomputed answer's."""
    engine = services().engine
    g._hs.source = "precomputed"
    now = engine.clock()
    fields.update(source="precomputed", snapshot=snap.id, computed_at=render.iso(snap.created_at),
                  age_s=round(max(0.0, now - snap.created_at), 3))
    resp = _json(fields)
    resp.headers.set(*render.cache_control(engine.max_age_s - (now - snap.created_at)))
    return resp


@bp.get("/v1/models/<name>/predict")
def model_predict(name: str):
    """A registered model's prediction for the inputs in the query string."""
    st = _begin("model")
    if name == parse.RATING:
        st.endpoint = "prediction"
    _, m = services().engine.model(name, "predict")
    return _answer(_parsed(lambda: parse.model(name, m.spec, _query_string(), _note)))


@bp.get("/v1/models")
def models():
    """The models that predict: name, version, inputs (with their types and domains), output."""
    _begin("models")
    parse.params(_query_string(), ())
    engine = services().engine
    snap = engine.snapshot
    if snap is None:
        raise Unavailable(engine.last_reload_error or "no snapshot loaded")
    counts = services().metrics.per_model()
    return _json({"models": [describe(m, counts) for _, m in sorted(snap.models.items()) if "predict" in m.queries]})


@bp.get("/v1/models/<name>")
def model(name: str):
    """One model."""
    _begin("models")
    parse.params(_query_string(), ())
    return _json(describe(services().engine.model(name, "predict")[1]))


def describe(m, counts: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """A model as /v1/models lists it (``counts``: Metrics.per_model(), read once for a list)."""
    engine = services().engine
    out = {**m.describe(), "max_age_s": engine.max_age(m), "deadline_ms": engine.deadline(m.name),
           "live": live_counts(m.name, services().metrics.per_model() if counts is None else counts)}
    spec = getattr(m, "spec", None)
    if "predict" in m.queries:
        out["precomputed"] = m.precomputed().get("predict", 0)
        out["predict"] = f"/v1/models/{m.name}/predict"
        if spec is not None and spec.output_class is not None:
            out["class"] = spec.output_class
    return out


@bp.get("/v1/snapshot")
def snapshot():
    """The live snapshot's manifest and age."""
    _begin("snapshot")
    parse.params(_query_string(), ())
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


def live_counts(name: str, counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """A model's live counts over every worker (serving.web.metrics.PER_MODEL), zeros when it has none."""
    from serving.web.metrics import PER_MODEL
    return counts.get(name) or dict.fromkeys(PER_MODEL, 0)


@bp.get("/readyz")
def readyz():
    """Readiness: a valid snapshot is loaded; otherwise 503 and why. Each model's deadline and live
    counts (deadline misses, full queues, failures, stale answers served) come along."""
    engine = services().engine
    info = engine.status()
    snap = engine.snapshot
    if snap is not None:
        counts = services().metrics.per_model()
        info["models"] = {name: {"deadline_ms": engine.deadline(name), **live_counts(name, counts)}
                          for name in sorted(snap.models)}
    return _json(info, status=200 if info["ready"] else 503)


@bp.get("/metrics")
def metrics():
    """Prometheus metrics."""
    from serving.web.metrics import CONTENT_TYPE
    return Response(services().metrics.render(), content_type=CONTENT_TYPE, headers=[render.NO_STORE])


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 document."""
    from serving.web.openapi import document
    s = services().settings
    snap = services().engine.snapshot
    specs = ([m.spec for _, m in sorted(snap.models.items()) if "predict" in m.queries]
             if snap is not None else [])
    return _json(document(s["serving.k_limit"], s["serving.session_max_items"], specs))


# --- the request's start and end, in one place -----------------------------------------
def register(app: Flask) -> None:
    app.register_blueprint(bp)
    errors.register(app)
    services_ = app.extensions["hybridserve"]
    limit = services_.settings["serving.max_url_bytes"]

    @app.before_request
    def _start():
        g._hs = st = _State(time.perf_counter())
        env = request.environ
        # a lookup the hit path parsed has passed this check already
        if parse.ENVIRON_KEY not in env and len(env.get("PATH_INFO", "")) + len(env.get("QUERY_STRING", "")) > limit:
            st.endpoint = "too_long"
            return errors.problem(414, f"URL is longer than {limit} bytes")

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


def record_hit(svc, endpoint: str, elapsed_s: float, log: tuple) -> None:
    """``record`` for a precomputed hit answered below Flask: counted in memory (Metrics.hit)."""
    svc.metrics.hit(endpoint, elapsed_s)
    svc.requestlog.append(*log[:4], PRECOMPUTED, 200, int(elapsed_s * 1e6), *log[4:])
