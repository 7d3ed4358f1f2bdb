"""Precomputed hits answered below Flask's routing: WSGI middleware around ``app.wsgi_app``.

A hit is a dictionary lookup and a few microseconds of formatting; Flask's request context,
routing, hooks and response object cost ten times that. This middleware answers the requests
it can prove are plain hits (GET, canonical path and query, a fresh snapshot answer) with the
same bytes, headers, metrics and request-log row the Flask views produce, built by the same
functions (``serving.api``). Anything else -- a miss, a stale answer, an error, an unusual
query, ``If-None-Match``, a CORS preflight -- goes to Flask untouched. Tests compare the two
paths response by response.
"""
from __future__ import annotations

import functools
import re
import time
from typing import Callable, Iterable
from urllib.parse import parse_qsl

from werkzeug.http import quote_etag

from serving import api
from serving.engine import PRECOMPUTED
from serving.errors import HybridServeError
from serving.models.base import canonical_key
from serving.models.predictor import RATING

_ID = r"([0-9]{1,19})"
_PATH = re.compile(rf"/v1/(?:items/{_ID}/similar|users/{_ID}/recommendations|predictions)")
_MODEL = re.compile(r"/v1/models/([A-Za-z][A-Za-z0-9_]{0,62})/predict")
_K = re.compile(rf"k={_ID}")
_PAIR = re.compile(rf"user_id={_ID}&item_id={_ID}|item_id={_ID}&user_id={_ID}")
_SESSION = re.compile(r"items=([0-9]{1,19}(?:,[0-9]{1,19})*)&k=([0-9]{1,19})")
_JSON = ("Content-Type", "application/json")
# Request headers that change the answer or belong to a preflight: Flask handles those requests.
_FLASK_HEADERS = ("HTTP_IF_NONE_MATCH", "HTTP_ACCESS_CONTROL_REQUEST_METHOD",
                  "HTTP_ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK")


class _NotAHit(Exception):
    """Raised inside the rendered-hit cache for a request Flask must answer (so nothing is cached)."""


class HitPath:
    """``app.wsgi_app = HitPath(app.wsgi_app, services, cors_headers)``.

    ``cors_headers(origin)``: the CORS response headers for a request's Origin (None when absent),
    or None when the app has no CORS. ``answered`` / ``passed`` count requests each way.

    A precomputed answer never changes within a snapshot but for its age, so the first hit on a URL
    renders everything else once -- the JSON up to ``age_s``, the ETag, the request-log row -- and
    keeps it in an LRU of ``serving.hit_cache_entries`` URLs (cleared when a new snapshot is
    swapped in; misses are never kept). Every hit still checks its snapshot's freshness, completes
    the JSON with its own age and Cache-Control, counts its metrics and writes its log row.
    """

    def __init__(self, wsgi_app: Callable, services, cors_headers: Callable[[str | None], tuple] | None):
        self.wsgi_app, self.svc = wsgi_app, services
        self.engine = services.engine
        self.k_limit = services.settings["serving.k_limit"]
        self.session_max = services.settings["serving.session_max_items"]
        self.max_url = services.settings["serving.max_url_bytes"]
        self.cors_headers = cors_headers
        self.answered = self.passed = 0
        entries = services.settings["serving.hit_cache_entries"]
        # functools.lru_cache: a C LRU, thread-safe, that does not keep what the function raises.
        self._rendered = functools.lru_cache(maxsize=entries)(self._render) if entries else self._render
        self._cache_clear = getattr(self._rendered, "cache_clear", None)
        self._sid: str | None = None

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        t0 = time.perf_counter()
        found = self._hit(environ)
        if found is None:
            self.passed += 1
            return self.wsgi_app(environ, start_response)
        (endpoint, head, etag, computed_at, log, _), remaining, now = found
        data = head + api.render_age(computed_at, now)
        headers = [_JSON, ("Content-Length", str(len(data))), api.cache_control(remaining), etag]
        if self.cors_headers is not None:
            headers += self.cors_headers(environ.get("HTTP_ORIGIN"))
        start_response("200 OK", headers)
        self.answered += 1
        api.record(self.svc, endpoint, PRECOMPUTED, 200, time.perf_counter() - t0, log)
        return [data]

    def _hit(self, environ: dict):
        """(rendered hit, freshness left, now) for a plain precomputed hit; None for anything else."""
        if environ.get("REQUEST_METHOD") != "GET" or any(h in environ for h in _FLASK_HEADERS):
            return None
        path, query = environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        if len(path) + len(query) > self.max_url:
            return None
        snap = self.engine.snapshot
        if snap is None:
            return None
        if snap.id != self._sid:  # a new snapshot: the old one's renderings go (they hold no snapshot)
            if self._cache_clear is not None:
                self._cache_clear()
            self._sid = snap.id
        if path == "/v1/recommendations":  # sessions are seldom asked twice: rendered each time, never kept
            hit = self._session(snap.id, query)
            if hit is None:
                return None
        else:
            try:
                hit = self._rendered(snap.id, path, query)
            except _NotAHit:
                return None
        now = self.engine.clock()
        remaining = hit[5] - (now - hit[3])  # as Engine._fresh decides, on every request
        if remaining <= 0:
            return None  # too old to serve: Flask's route computes it live and counts it stale
        return hit, remaining, now

    def _render(self, sid: str, path: str, query: str) -> tuple:
        """(endpoint, JSON head, ETag header, computed_at, log row, max age) of the hit at path?query,
        rendered from snapshot ``sid``; raises _NotAHit for anything else. The max age is the engine's,
        or a registered model's own ``max_age_s``."""
        found = self._answer(path, query)
        if found is None or found[3].snapshot != sid:  # not a hit, or a swap in between: not kept
            raise _NotAHit
        endpoint, body, etag, ans, log, max_age = found
        return endpoint, api.render_head(body, ans), ("ETag", quote_etag(etag)), ans.computed_at, log, max_age

    def _answer(self, path: str, query: str):
        """(endpoint, body, etag, answer, log row, max age) for a plain precomputed hit; None for anything else."""
        route = _PATH.fullmatch(path)
        if route is None:
            model = _MODEL.fullmatch(path)
            return None if model is None else self._model_hit(model.group(1), query)
        item, user = route.group(1), route.group(2)
        if item is not None or user is not None:
            k = _K.fullmatch(query)
            if k is None:
                return None
            key, k = int(item or user), int(k.group(1))
            if key > api.INT64_MAX or not 1 <= k <= self.k_limit:
                return None
            endpoint = "similar_items" if item is not None else "user_recs"
            ans = self.engine.peek(endpoint, key, k)
            if ans is None:
                return None
            if item is not None:
                return (endpoint, api.list_body("item_id", key, k, ans), api.etag_of(ans, "similar", f"{key}.{k}"),
                        ans, (endpoint, key, None, k), self.engine.max_age_s)
            return (endpoint, api.list_body("user_id", key, k, ans), api.etag_of(ans, "recs", f"{key}.{k}"),
                    ans, (endpoint, None, key, k), self.engine.max_age_s)
        pair = _PAIR.fullmatch(query)
        if pair is None:
            return None
        uid, iid = (int(pair.group(1)), int(pair.group(2))) if pair.group(1) else (int(pair.group(4)),
                                                                                    int(pair.group(3)))
        if uid > api.INT64_MAX or iid > api.INT64_MAX:
            return None
        ans = self.engine.peek("prediction", uid, iid)
        if ans is None:
            return None
        served = self.engine.snapshot.models.get(RATING)
        max_age = self.engine.max_age(served) if served is not None else self.engine.max_age_s
        return ("prediction", api.prediction_body(uid, iid, ans), api.etag_of(ans, "pred", f"{uid}.{iid}"),
                ans, api.model_log(RATING, (uid, iid), canonical_key((uid, iid))), max_age)

    def _session(self, sid: str, query: str):
        """A session answer the snapshot's lists prove (Engine.peek_session), rendered as _render does;
        None for anything else, an unusual query among it (Flask parses and answers that)."""
        m = _SESSION.fullmatch(query)
        if m is None:
            return None
        items, k = tuple(int(i) for i in m.group(1).split(",")), int(m.group(2))
        if (len(items) > self.session_max or len(set(items)) != len(items) or max(items) > api.INT64_MAX
                or not 1 <= k <= self.k_limit):
            return None
        ans = self.engine.peek_session(items, k)
        if ans is None or ans.snapshot != sid:
            return None
        etag = api.etag_of(ans, "session", api.session_key(items, k))
        return ("session", api.render_head(api.session_body(items, k, ans), ans), ("ETag", quote_etag(etag)),
                ans.computed_at, ("session", None, None, k), self.engine.max_age_s)

    def _model_hit(self, name: str, query: str):
        """A registered model's precomputed prediction, parsed and keyed by the same functions as the view."""
        snap = self.engine.snapshot
        served = snap.models.get(name) if snap is not None else None
        if served is None:
            return None
        spec = served.spec
        try:
            values = spec.parse_query(parse_qsl(query, keep_blank_values=True, errors="replace"))
        except HybridServeError:
            return None
        key = canonical_key(values)
        ans = self.engine.peek_model(name, values, key)
        if ans is None:
            return None
        return ("prediction" if name == RATING else "model", api.model_body(name, spec.input_names, values, ans),
                api.model_etag(ans, name, key), ans, api.model_log(name, values, key), self.engine.max_age(served))


def cors_headers_for(app, options: dict) -> Callable[[str | None], tuple]:
    """The headers flask-cors adds to a simple GET from ``origin``, computed by flask-cors itself
    once per distinct Origin (bounded: the header is the client's to choose)."""
    from flask_cors.core import get_cors_headers, get_cors_options

    resolved = get_cors_options(app, options)

    @functools.lru_cache(maxsize=256)
    def headers(origin: str | None) -> tuple:
        request_headers = {} if origin is None else {"Origin": origin}
        return tuple((k, str(v)) for k, v in get_cors_headers(resolved, request_headers, "GET").items(multi=True))

    return headers
