"""The one mapping from domain errors to ``application/problem+json`` (RFC 9457): 400 malformed
input, 404 unknown id or model, 503 nothing to answer from or a model that failed; anything else
unexpected is a 500 with nothing of it shown."""
from __future__ import annotations

import math
from http import HTTPStatus

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from serving.errors import BadRequest, Busy, DeadlineExceeded, ModelFailed, NotFound, Unavailable
from serving.web.render import NO_STORE, json_bytes

STATUS = {BadRequest: 400, NotFound: 404, Unavailable: 503, ModelFailed: 503, DeadlineExceeded: 503, Busy: 503}


def problem(status: int, detail: str) -> Response:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
            "instance": request.path[:200]}
    st = g.get("_hs")
    if st is not None:
        st.source = "error"
    return Response(json_bytes(body), status=status, mimetype="application/problem+json", headers=[NO_STORE])


def register(app: Flask) -> None:
    """Install the handlers: domain errors, HTTP errors (404 route, 405), the unexpected."""

    @app.errorhandler(BadRequest)
    @app.errorhandler(NotFound)
    @app.errorhandler(Unavailable)
    def _domain(exc):
        resp = problem(STATUS[type(exc)], str(exc))
        retry = getattr(exc, "retry_after", None)
        if retry == "reload":  # no snapshot yet: the next look for one
            retry = max(1, math.ceil(current_app.extensions["hybridserve"].settings["serving.reload_interval_s"]))
        if retry is not None:
            resp.headers["Retry-After"] = str(retry)
        return resp

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
