"""Precomputed hits answered below Flask's routing: WSGI middleware around ``app.wsgi_app``.

A hit is a dictionary lookup and a few microseconds of formatting; Flask's request context,
routing, hooks and response object cost ten times that. This middleware answers the requests
it can prove are plain hits (GET, a known path, a fresh snapshot answer) with the same bytes,
headers, metrics and request-log row the Flask views produce, parsed and rendered by the same
functions (serving.web.parse, serving.web.render). Anything else -- a miss, a stale answer, an error,
``If-None-Match``, a CORS preflight -- goes to Flask, carrying the lookup parsed here. Tests compare
the two paths response by response.
"""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from serving.engine import Answer, remaining_s
from serving.errors import HybridServeError
from serving.web import parse, render
from serving.web.api import record_hit
from serving.web.parse import Lookup

_ID = r"([0-9]{1,19})"
_PATH = re.compile(rf"/v1/(?:items/{_ID}/similar|users/{_ID}/recommendations|predictions|recommendations"
                   r"|models/([A-Za-z][A-Za-z0-9_]{0,62})/predict)")
# The plainest spelling of each lookup's query, the only one the hit path takes (Flask parses the rest:
# escapes, empty or reordered parameters); the parsing itself is serving.web.parse's, as Flask's.
# k may be left out (parse.DEFAULT_K) and item metadata asked for (fields=title,genres): such hits
# stay here too.
_K, _FIELDS = r"k=[0-9]{1,19}", r"fields=[a-z]{1,10}(?:,[a-z]{1,10}){0,3}"
_PLAIN = {"list": re.compile(rf"(?:{_K}(?:&{_FIELDS})?|{_FIELDS}(?:&{_K})?)?"),
          "prediction": re.compile(rf"user_id={_ID}&item_id={_ID}|item_id={_ID}&user_id={_ID}"),
          "session": re.compile(rf"items=[0-9]{{1,19}}(?:,[0-9]{{1,19}})*(?:&{_K})?(?:&{_FIELDS})?")}
_JSON = ("Content-Type", "application/json")
# Request headers that change the answer or belong to a preflight: Flask handles those requests.
_IF_NONE_MATCH, _PREFLIGHT, _PREFLIGHT_PRIVATE = ("HTTP_IF_NONE_MATCH", "HTTP_ACCESS_CONTROL_REQUEST_METHOD",
                                                  "HTTP_ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK")


class _NotAHit(Exception):
    """Raised inside the rendered-hit cache for a request Flask must answer (so nothing is cached)."""

    def __init__(self, lookup: Lookup | None = None):
        self.lookup = lookup


@dataclass(frozen=True, slots=True)
class Rendered:
    """A precomputed hit rendered once: all but its age and Cache-Control, which each request redoes."""

    endpoint: str
    head: bytes            # the JSON up to age_s
    etag: tuple[str, str]  # the ETag header
    computed_at: float
    max_age_s: float
    log: tuple


class HitPath:
    """``app.wsgi_app = HitPath(app.wsgi_app, services, cors_headers)``.

    ``cors_headers(origin)``: the CORS response headers for a request's Origin (None when absent),
    or None when the app has no CORS. ``answered`` / ``passed`` count requests each way.

    A precomputed answer never changes within a snapshot but for its age, so the first hit on a URL
    renders everything else once and keeps it in an LRU of ``serving.hit_cache_entries`` URLs (cleared
    when a new snapshot is swapped in; misses are never kept; sessions, seldom asked twice, are
    rendered each time). Every hit still checks its snapshot's freshness, completes the JSON with its
    own age and Cache-Control, counts its metrics and writes its log row.
    """

    def __init__(self, wsgi_app: Callable, services, cors_headers: Callable[[str | None], tuple] | None):
        self.wsgi_app, self.svc = wsgi_app, services
        self.engine = services.engine
        self.limits = services.limits
        self.max_url = services.settings["serving.max_url_bytes"]
        self.max_age_cap = services.settings["serving.max_age_cap_s"]
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
        hit, remaining, now = found
        data = hit.head + render.render_age(hit.computed_at, now)
        headers = [_JSON, ("Content-Length", str(len(data))), render.cache_control(remaining, self.max_age_cap), hit.etag]
        if self.cors_headers is not None:
            headers += self.cors_headers(environ.get("HTTP_ORIGIN"))
        start_response("200 OK", headers)
        self.answered += 1
        record_hit(self.svc, hit.endpoint, time.perf_counter() - t0, hit.log)
        return [data]

    def answer(self, path: str, query: str) -> bytes | None:
        """The body of ``GET path?query`` when it is a plain, fresh precomputed hit, counted and logged
        as one (the page puts its first answer in itself with this); None for anything else."""
        t0 = time.perf_counter()
        found = self._hit({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query})
        if found is None:
            return None
        hit, _, now = found
        record_hit(self.svc, hit.endpoint, time.perf_counter() - t0, hit.log)
        return hit.head + render.render_age(hit.computed_at, now)

    def _hit(self, environ: dict) -> tuple[Rendered, float, float] | None:
        """(rendered hit, freshness left, now) for a plain precomputed hit; None for anything else."""
        if (environ.get("REQUEST_METHOD") != "GET" or _IF_NONE_MATCH in environ or _PREFLIGHT in environ
                or _PREFLIGHT_PRIVATE in environ):
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
        try:
            hit = (self._render(snap.id, path, query) if path == "/v1/recommendations"
                   else self._rendered(snap.id, path, query))
        except _NotAHit as miss:
            if miss.lookup is not None:  # parsed: Flask takes it from here without parsing again
                environ[parse.ENVIRON_KEY] = miss.lookup
            return None
        now = self.engine.clock()
        remaining = remaining_s(hit.max_age_s, hit.computed_at, now)  # on every request
        if remaining <= 0:
            return None  # too old to serve: Flask's route computes it live and counts it stale
        return hit, remaining, now

    def _render(self, sid: str, path: str, query: str) -> Rendered:
        """The hit at path?query rendered from snapshot ``sid``; raises _NotAHit for anything else."""
        lookup = self._parse(path, query)
        if lookup is None:
            raise _NotAHit
        ans: Answer | None = self.engine.lookup(lookup.model, lookup.query, lookup.key, lookup.k, live=False)
        if ans is None or ans.snapshot != sid:  # not a hit, or a swap in between: not kept
            raise _NotAHit(lookup)
        snap, m = self.engine.model(lookup.model)
        if snap.id != sid:  # swapped since: its items table may differ
            raise _NotAHit(lookup)
        return Rendered(lookup.route, render.render_head(render.body(lookup, ans, snap.items), ans),
                        render.etag_header(render.etag(lookup, ans)), ans.computed_at, self.engine.max_age(m),
                        lookup.log)

    def _parse(self, path: str, query: str) -> Lookup | None:
        """The lookup at path?query, parsed as the Flask view parses it; None for a path that is not
        a lookup or a request that does not parse (Flask answers those, with their errors)."""
        route = _PATH.fullmatch(path)
        if route is None:
            return None
        item, user, name = route.groups()
        plain = ("list" if item is not None or user is not None else None if name is not None
                 else "prediction" if path == "/v1/predictions" else "session")
        if plain is not None and _PLAIN[plain].fullmatch(query) is None:
            return None
        try:
            if item is not None:
                return parse.similar_items(item, query, self.limits)
            if user is not None:
                return parse.user_recs(user, query, self.limits)
            if name is not None:
                return parse.model(name, self.engine.model(name, "predict")[1].spec, query)
            if plain == "prediction":
                return parse.prediction(query, self.limits)
            return parse.session(query, self.limits)
        except HybridServeError:
            return None


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
