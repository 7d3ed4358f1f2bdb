"""The OpenAPI 3 document served at /openapi.json (every endpoint, parameter and error)."""
from __future__ import annotations

from typing import Any

from serving.web.parse import (DEFAULT_K, FIELDS, SEARCH_DEFAULT_LIMIT, SEARCH_MAX_CHARS,
                                SEARCH_MAX_LIMIT)


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _unavailable(description: str) -> dict[str, Any]:
    """A 503 problem with its Retry-After (serving.web.errors)."""
    return {**_problem(description), "headers": {"Retry-After": {
        "description": "Seconds to wait: 1 past a deadline or with a queue full, the reload interval with no "
                       "snapshot; absent when the model raised", "schema": {"type": "integer"}}}}


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "headers": {"Cache-Control": {"schema": {"type": "string"},
                                          "description": "max-age = whole seconds this answer stays fresh, less one "
                                                         "(0: no cache may keep it)"},
                        "ETag": {"schema": {"type": "string"},
                                 "description": "on precomputed answers: weak, names the snapshot"}},
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


INT64_MAX = 2**63 - 1


def _id_param(name: str, where: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": where, "required": True, "description": description,
            "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": INT64_MAX}}


def _model_param(inp) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": {"int": "integer", "float": "number", "string": "string",
                                       "bool": "boolean"}[inp.type]}
    if inp.type == "int":
        schema["format"] = "int64"
    if inp.values is not None:
        schema["enum"] = list(inp.values)
    if inp.min is not None:
        schema["minimum"] = inp.min
    if inp.max is not None:
        schema["maximum"] = inp.max
    if not inp.required:
        schema["default"] = inp.default
    return {"name": inp.name, "in": "query", "required": inp.required, "schema": schema,
            "description": f"{inp.type} input of the model" + ("" if inp.required else " (optional)")}


def _model_paths(specs, errors, ok) -> dict[str, Any]:
    """One path per registered model: its inputs are that operation's query parameters."""
    paths = {}
    for spec in specs:
        paths[f"/v1/models/{spec.name}/predict"] = {"get": {
            "summary": f"Prediction of model {spec.name!r}"
                       + (f" (probability of class {spec.output_class!r})" if spec.output_class is not None else ""),
            "operationId": f"predict_{spec.name}",
            "parameters": [_model_param(i) for i in spec.inputs],
            "responses": {"200": ok("ModelPrediction", "The prediction, with its model version and provenance"),
                          "304": {"description": "Not modified"},
                          "400": _problem("An unknown, repeated, missing, mistyped or out-of-domain input: the "
                                          "detail names it and what was expected"),
                          "404": errors["404"], "405": errors["405"], "414": errors["414"],
                          "503": _unavailable("No snapshot loaded, or the model failed, missed its deadline or "
                                          "is busy (the detail names it and the deadline)")}}}
    return paths


def document(k_limit: int, session_max_items: int, models=()) -> dict[str, Any]:
    """The document for these limits; every status a route can answer is listed on that route.
    ``models``: the registered models' specs (each gets its own predict path)."""
    k = {"name": "k", "in": "query", "required": False,
         "description": f"How many results ({min(DEFAULT_K, k_limit)} when left out); up to the snapshot's k_max "
                        "is served precomputed, more is computed live",
         "schema": {"type": "integer", "minimum": 1, "maximum": k_limit, "default": min(DEFAULT_K, k_limit)}}
    fields = {"name": "fields", "in": "query", "required": False, "style": "form", "explode": False,
              "description": "Item metadata to add to each listed item (from the snapshot's items table): "
                             "title, genres or both, comma-separated",
              "schema": {"type": "array", "minItems": 1, "maxItems": len(FIELDS), "uniqueItems": True,
                         "items": {"type": "string", "enum": list(FIELDS)}}}
    search_q = {"name": "q", "in": "query", "required": True,
                "description": "Text of a title: case and accents are ignored; titles starting with it come first, "
                               "then titles containing it, each most popular first",
                "schema": {"type": "string", "minLength": 1, "maxLength": SEARCH_MAX_CHARS, "pattern": r"\S"}}
    search_limit = {"name": "limit", "in": "query", "required": False,
                    "description": f"Most items in the answer ({SEARCH_DEFAULT_LIMIT} when left out)",
                    "schema": {"type": "integer", "minimum": 1, "maximum": SEARCH_MAX_LIMIT,
                               "default": SEARCH_DEFAULT_LIMIT}}
    inm = {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
           "description": "An ETag from an earlier precomputed answer; 304 if unchanged"}
    items = {"name": "items", "in": "query", "required": True, "style": "form", "explode": False,
             "description": f"Comma-separated ids of the items just viewed: 1 to {session_max_items}, no duplicates",
             "schema": {"type": "array", "minItems": 1, "maxItems": session_max_items, "uniqueItems": True,
                        "items": {"type": "integer", "format": "int64", "minimum": 0, "maximum": INT64_MAX}}}
    errors = {"400": _problem("Malformed request (a parameter missing, repeated, unknown or out of range): "
                              "the detail says which"),
              "404": _problem("Unknown user or item"), "405": _problem("Only GET is allowed (see Allow)"),
              "414": _problem("URL longer than serving.max_url_bytes"),
              "503": _unavailable("No snapshot or model loaded yet, or the live answer failed, missed its "
                              "model's deadline or found its queue full (the detail names the model)")}
    lookup_errors = ("400", "404", "405", "414", "503")
    provenance = {
        "source": {"type": "string", "enum": ["precomputed", "cache", "live"]},
        "snapshot": {"type": "string", "description": "id of the snapshot (and model) that answered"},
        "computed_at": {"type": "string", "format": "date-time"},
        "age_s": {"type": "number", "description": "seconds since computed_at"},
        "stale": {"type": "boolean", "description": "present (true) only on a precomputed answer past its "
                                                    "freshness bound, served because the live answer failed or "
                                                    "missed its deadline (Cache-Control: max-age=0)"},
    }
    meta = {"title": {"type": "string", "nullable": True, "description": "null for an item without one"},
            "genres": {"type": "array", "items": {"type": "string"}}}
    scored = {"type": "array", "items": {"type": "object", "required": ["item_id", "score"], "properties": {
        "item_id": {"type": "integer"}, "score": {"type": "number"}, **meta}}}

    def get(summary, op_id, params, schema, codes=lookup_errors, etag=True):
        responses = {"200": _ok(schema, summary)}
        if etag:  # only precomputed answers carry an ETag to revalidate against
            responses["304"] = {"description": "Not modified (If-None-Match matched the ETag)"}
        return {"get": {"summary": summary, "operationId": op_id, "parameters": params,
                        "responses": {**responses, **{c: errors[c] for c in codes}}}}

    def plain(summary, op_id, responses):
        # no query parameters are read here; only the method and the URL's length are refused
        return {"get": {"summary": summary, "operationId": op_id, "parameters": [],
                        "responses": {**responses, "405": errors["405"], "414": errors["414"]}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "hybridserve", "version": "1",
                 "description": "Precomputed answers from the live snapshot, live FAISS search and model inference "
                                "for the rest. Every answer says where it came from and how old it is."},
        "paths": {
            "/v1/items/{item_id}/similar": get(
                "Items most similar to an item (cosine)", "similarItems",
                [_id_param("item_id", "path", "Item id"), k, fields, inm], "SimilarItems"),
            "/v1/users/{user_id}/recommendations": get(
                "Recommendations for a user: unseen items ranked by predicted rating", "userRecommendations",
                [_id_param("user_id", "path", "User id"), k, fields, inm], "UserRecommendations"),
            "/v1/items/{item_id}": get("An item's title and genres (from the snapshot's items table)", "item",
                                       [_id_param("item_id", "path", "Item id")], "Item", etag=False),
            "/v1/items": get("Items whose title contains q", "searchItems", [search_q, search_limit], "ItemSearch",
                             codes=("400", "405", "414", "503"), etag=False),
            "/": {"get": {"summary": "The page: a browser view of the API (serving.page)", "operationId": "page",
                          "parameters": [
                              {"name": "item", "in": "query", "required": False, "schema": {"type": "string"},
                               "description": "An item whose similar items the page opens with: when they are "
                                              "precomputed, the page carries them (as GET /v1/items/{item_id}/"
                                              "similar?k=10&fields=title,genres answers them); otherwise the page "
                                              "asks for them. The page's other parameters (q, user, session, "
                                              "model) are read by its script only"},
                              {**inm, "description": "The ETag of the page as last received; 304 if unchanged"}],
                          "responses": {"200": {"description": "The page", "content": {"text/html": {}}},
                                        "304": {"description": "Not modified (If-None-Match matched the ETag)"},
                                        "404": _problem("serving.page is off (an API-only deployment)"),
                                        "405": errors["405"], "414": errors["414"]}}},
            "/v1/predictions": get(
                "Predicted rating of an item by a user", "prediction",
                [_id_param("user_id", "query", "User id"), _id_param("item_id", "query", "Item id"), inm],
                "Prediction"),
            "/v1/recommendations": get(
                "Session recommendations from items just viewed (from the snapshot when the items' similar-item lists prove them, else live, then cached)", "sessionRecommendations",
                [items, k, fields], "SessionRecommendations", etag=False),
            "/v1/models": get("The registered models: name, version, inputs, output (400 for any query parameter)",
                              "models", [], "Models", codes=("400", "405", "414", "503"), etag=False),
            "/v1/models/{name}": get("One registered model", "model",
                                     [{"name": "name", "in": "path", "required": True,
                                       "schema": {"type": "string", "enum": [m.name for m in models] or ["rating"]}}],
                                     "Model", codes=("400", "404", "405", "414", "503"), etag=False),
            # /v1/models/<name>/predict: one path per model below, its inputs as typed query parameters
            **_model_paths(models, errors, _ok),
            "/v1/snapshot": get("The live snapshot's manifest (400 for any query parameter)", "snapshot", [],
                                "Snapshot", codes=("400", "405", "414", "503"), etag=False),
            "/healthz": plain("Liveness", "healthz", {"200": {"description": "The process is up"}}),
            "/readyz": plain("Readiness: a valid snapshot is loaded", "readyz", {
                "200": {"description": "Ready; what CURRENT names, the last refusal and the refusal count",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                "503": {"description": "Not ready; says why",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}}}),
            "/metrics": plain("Prometheus metrics", "metrics", {"200": {"description": "Prometheus text format",
                                                                       "content": {"text/plain": {}}}}),
            "/openapi.json": plain("This document", "openapi", {"200": {"description": "OpenAPI 3",
                                                                        "content": {"application/json": {}}}}),
        },
        "components": {"schemas": {
            "Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "detail": {"type": "string"}, "instance": {"type": "string"}}},
            "SimilarItems": {"type": "object", "properties": {"item_id": {"type": "integer"}, "k": {"type": "integer"},
                                                              "items": scored, **provenance}},
            "UserRecommendations": {"type": "object", "properties": {
                "user_id": {"type": "integer"}, "k": {"type": "integer"}, "items": scored, **provenance}},
            "Prediction": {"type": "object", "properties": {
                "user_id": {"type": "integer"}, "item_id": {"type": "integer"}, "prediction": {"type": "number"},
                **provenance}},
            "SessionRecommendations": {"type": "object", "properties": {
                "viewed": {"type": "array", "items": {"type": "integer"}}, "k": {"type": "integer"},
                "items": scored, **provenance}},
            "Item": {"type": "object", "required": ["item_id", "title", "genres"], "properties": {
                "item_id": {"type": "integer"}, **meta, **provenance}},
            "ItemSearch": {"type": "object", "required": ["q", "limit", "items"], "properties": {
                "q": {"type": "string"}, "limit": {"type": "integer"},
                "items": {"type": "array", "items": {"type": "object", "required": ["item_id", "title", "genres"],
                                                     "properties": {"item_id": {"type": "integer"}, **meta}}},
                **provenance}},
            "Snapshot": {"type": "object", "description": "The manifest plus age_s"},
            "Models": {"type": "object", "properties": {"models": {"type": "array", "items": {
                "type": "object", "required": ["name", "version", "inputs"], "properties": {
                    "name": {"type": "string"}, "version": {"type": "string"}, "kind": {"type": "string"},
                    "output": {"type": "string"}, "class": {}, "max_age_s": {"type": "number"},
                    "precomputed": {"type": "integer"}, "predict": {"type": "string"},
                    "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "type", "required"],
                                                          "properties": {
                        "name": {"type": "string"}, "type": {"type": "string", "enum": ["int", "float", "string",
                                                                                        "bool"]},
                        "required": {"type": "boolean"}, "values": {"type": "array"}, "min": {"type": "number"},
                        "max": {"type": "number"}, "default": {}}}}}}}}},
            "Model": {"type": "object", "description": "One entry of Models.models"},
            "ModelPrediction": {"type": "object", "properties": {
                "model": {"type": "string"}, "model_version": {"type": "string"},
                "inputs": {"type": "object", "description": "The canonical inputs (cast, defaults filled in)"},
                "prediction": {"description": "A number, or the class label of a classifier's predict"},
                **provenance}},
            "Readiness": {"type": "object", "required": ["ready", "mode"], "properties": {
                "ready": {"type": "boolean"}, "mode": {"type": "string"},
                "snapshot": {"type": "string", "nullable": True, "description": "the snapshot being served"},
                "current": {"type": "string", "nullable": True, "description": "what CURRENT names (null: missing or empty)"},
                "error": {"type": "string", "nullable": True,
                          "description": "why the snapshot CURRENT names is not served, or what is wrong with CURRENT"},
                "refused": {"type": "integer", "description": "snapshots this worker refused"},
                "live_only_model": {"type": "string", "nullable": True},
                "age_s": {"type": "number"}, "fresh": {"type": "boolean"},
                "cache_entries": {"type": "integer"}}},
        }},
    }
