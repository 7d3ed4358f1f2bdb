"""/openapi.json against the behaviour: schemathesis generates requests for every documented route
(valid ones, and invalid ones) and checks each answer's status, content type, headers and body
against the document. In-process on the WSGI app, no network.

Driven through schemathesis' Hypothesis strategies rather than its pytest plugin, whose
fixture-based loader reaches into a pytest private that pytest 9 removed.
"""
from __future__ import annotations

import shutil
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from serving.web.app import create_app
from conftest import make_settings

EXAMPLES = 40


@pytest.fixture(scope="module")
def api(published, tmp_path_factory):
    root, _, _ = published
    work = tmp_path_factory.mktemp("openapi")
    shutil.copytree(root / "inputs", work / "inputs")
    shutil.copytree(root / "store", work / "store", symlinks=True)
    cfg, _ = make_settings(work, serving={"log_flush_interval_s": 0.0, "session_max_items": 5, "k_limit": 200})
    app = create_app(cfg, background=False)
    # A request is rejected with one of these; 414 is the rejection of an over-long URL, which
    # schemathesis' default list (built around 400/422) does not name.
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "404", "405", "414"]}}})
    yield app, schemathesis.openapi.from_wsgi("/openapi.json", app, config=config)
    app.extensions["hybridserve"].close()


def _operations(schema):
    return {op.ok().label: op.ok() for op in schema.get_all_operations()}


def test_the_document_covers_every_route(api):
    app, schema = api
    routes = {r.rule for r in app.url_map.iter_rules() if r.endpoint != "static"}
    documented = set(app.test_client().get("/openapi.json").json["paths"])
    as_documented = {r.replace("<item_id>", "{item_id}").replace("<user_id>", "{user_id}").replace("<name>", "{name}")
                     for r in routes}
    # a registered model's predictions: one path per model, its inputs as typed query parameters
    per_model = {p for p in documented if p.startswith("/v1/models/") and p.endswith("/predict")}
    assert per_model == {"/v1/models/rating/predict"}
    assert as_documented == (documented - per_model) | {"/v1/models/{name}/predict"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_documented_route_answers_as_documented(api, mode):
    app, schema = api
    paths = app.test_client().get("/openapi.json").json["paths"]
    failures, seen = {}, {}
    for label, op in sorted(_operations(schema).items()):
        if mode == GenerationMode.NEGATIVE and not paths[op.path]["get"]["parameters"]:
            continue  # nothing to send wrong but the method and the URL's length (tested in test_api)
        statuses = seen[label] = Counter()

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case):
            statuses[case.call_and_validate().status_code] += 1

        try:
            check()
        except Exception as exc:  # collect every route's failure, then report them all
            failures[label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
    if mode == GenerationMode.POSITIVE:  # the answers' bodies were checked, not only the errors'
        assert all(200 in statuses for statuses in seen.values()), seen
