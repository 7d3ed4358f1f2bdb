"""The least any Python app can do per request on granian, for the server benchmark: a dict lookup
of the same bytes the other servers answer (FLOOR_BODIES: a JSON file of path?query -> body), no
routing, metrics, log or freshness. What granian itself costs per request on this machine."""
import json
import os

with open(os.environ["FLOOR_BODIES"], encoding="utf-8") as f:
    _BODIES = {path: body.encode() for path, body in json.load(f).items()}
_READY = b'{"ready":true}'


def app(environ, start_response):
    query = environ.get("QUERY_STRING", "")
    body = _BODIES.get(environ.get("PATH_INFO", "") + ("?" + query if query else ""))
    if body is None:
        body = _READY if environ.get("PATH_INFO") == "/readyz" else None
    if body is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
