"""Hot reload against hostile stores: wrongly shaped manifests, CURRENT moved back, emptied or deleted."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from serving.web.app import create_app
from serving.store import Store

from test_api import _precomputed_item

BAD_ID = "20990101-000000-000001"

# (what is wrong, how the manifest is changed, a word the refusal names)
BAD_MANIFESTS = [
    ("files is a list", lambda m: m.update(files=sorted(m["files"])), "files"),
    ("files is null", lambda m: m.update(files=None), "files"),
    ("a file entry is a string", lambda m: m["files"].update({"models/recommender/items.parquet": "abc"}), "files.models/recommender/items.parquet"),
    ("bytes is a string", lambda m: m["files"]["models/recommender/items.parquet"].update(bytes="12"), "files.models/recommender/items.parquet"),
    ("a file outside the snapshot", lambda m: m["files"].update({"../../CURRENT": {"sha256": "0", "bytes": 1}}),
     "paths inside the snapshot"),
    ("created_at is a number", lambda m: m.update(created_at=1700000000), "created_at"),
    ("created_at is not a date", lambda m: m.update(created_at="yesterday"), "created_at"),
    ("k_max is a string", lambda m: m.update(k_max="20"), "k_max"),
    ("k_max is missing", lambda m: m.pop("k_max"), "k_max"),
    ("format_version is a list", lambda m: m.update(format_version=[2]), "format_version"),
]


def _bad_snapshot(store: Store, source_id: str, change) -> str:
    """A copy of a good snapshot under a new id with its manifest changed (checksums still right)."""
    shutil.copytree(store.snapshot_dir(source_id), store.snapshot_dir(BAD_ID))
    path = store.snapshot_dir(BAD_ID) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["id"] = BAD_ID
    change(manifest)
    path.write_text(json.dumps(manifest))
    return BAD_ID


@pytest.fixture
def served(workspace):
    root, settings, _, first = workspace
    app = create_app(settings, background=False)
    yield app, app.test_client(), Store(settings["paths.store"]), first
    app.extensions["hybridserve"].close()


@pytest.mark.parametrize("what,change,names", BAD_MANIFESTS, ids=[b[0] for b in BAD_MANIFESTS])
def test_wrongly_shaped_manifest_is_refused_through_the_one_path(served, caplog, what, change, names):
    app, client, store, first = served
    engine = app.extensions["hybridserve"].engine
    bad = _bad_snapshot(store, first.snapshot_id, change)
    store.current_path.write_text(bad + "\n")
    with caplog.at_level(logging.ERROR, logger="serving.reloader"):
        for _ in range(5):  # the reload loop's ticks: refused once, not an exception every tick
            assert engine.reload() is False
    assert engine.snapshot.id == first.snapshot_id
    assert engine.counts["reload_failures"] == 1
    assert len([r for r in caplog.records if r.name == "serving.reloader"]) == 1
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["current"] == bad and ready.json["refused"] == 1
    assert ready.json["error"].startswith(f"snapshot {bad} refused: ") and names in ready.json["error"]
    assert "hybridserve_snapshot_reload_failures_total 1.0" in client.get("/metrics").text
    item = _precomputed_item(store, first.snapshot_id)
    assert client.get(f"/v1/items/{item}/similar?k=2").json["snapshot"] == first.snapshot_id


def test_any_exception_while_loading_is_a_refusal(served, monkeypatch):
    """Not only the errors foreseen: whatever loading raises refuses the snapshot once."""
    app, client, store, first = served
    engine = app.extensions["hybridserve"].engine
    bad = _bad_snapshot(store, first.snapshot_id, lambda m: None)
    from serving import snapshot as snapshot_module

    def explode(*args, **kwargs):
        raise AttributeError("'list' object has no attribute 'items'")
    monkeypatch.setattr(snapshot_module.LoadedSnapshot, "load", explode)
    store.current_path.write_text(bad + "\n")
    assert engine.reload() is False and engine.reload() is False
    assert engine.counts["reload_failures"] == 1
    assert client.get("/readyz").json["error"] == \
        f"snapshot {bad} refused: AttributeError: 'list' object has no attribute 'items'"


def test_readyz_clears_the_refusal_when_current_moves_back(served):
    app, client, store, first = served
    engine = app.extensions["hybridserve"].engine
    bad = _bad_snapshot(store, first.snapshot_id, lambda m: m.update(created_at=5))
    store.current_path.write_text(bad + "\n")
    engine.reload()
    assert "refused" in client.get("/readyz").json["error"]
    store.current_path.write_text(first.snapshot_id + "\n")  # the operator rolls back
    assert engine.reload() is False  # nothing to swap: it is being served
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["error"] is None
    assert ready.json["current"] == ready.json["snapshot"] == first.snapshot_id
    # pointed at the bad one again, it is refused (and counted) again
    store.current_path.write_text(bad + "\n")
    engine.reload()
    assert client.get("/readyz").json["refused"] == 2


@pytest.mark.parametrize("how", ["deleted", "emptied", "blank line"])
def test_readyz_reports_a_deleted_or_empty_current(served, caplog, how):
    app, client, store, first = served
    engine = app.extensions["hybridserve"].engine
    if how == "deleted":
        store.current_path.unlink()
    else:
        store.current_path.write_text("" if how == "emptied" else "\n")
    problem = "CURRENT missing" if how == "deleted" else "CURRENT empty"
    with caplog.at_level(logging.ERROR, logger="serving.reloader"):
        for _ in range(3):
            assert engine.reload() is False
    ready = client.get("/readyz")
    assert ready.status_code == 200  # the snapshot already loaded keeps serving
    assert ready.json["snapshot"] == first.snapshot_id and ready.json["current"] is None
    assert ready.json["error"] == f"{problem} in {store.root}; still serving {first.snapshot_id}"
    assert len([r for r in caplog.records if r.name == "serving.reloader"]) == 1  # said once, not every tick
    store.current_path.write_text(first.snapshot_id + "\n")
    engine.reload()
    assert client.get("/readyz").json["error"] is None
