"""A run with another config than the one the live snapshot was made with: refused before any work when
it would drop a registered model the API serves, unless --force; every run says which config it uses."""
from __future__ import annotations

import re

import pytest

from batch.__main__ import main
from batch.sample_models import write_demand_model
from serving.settings import DEFAULT_MODELS_TOML
from serving.store import Store


@pytest.fixture
def serving_demand(workspace, sample_frames):
    """The workspace's store after a run with a config registering the demand model: (store, plain
    config, config with demand, the snapshot serving demand)."""
    root, settings, cfg, first = workspace
    artifact = write_demand_model(root / "artifacts", *sample_frames)
    with_demand = root / "with-demand.toml"
    with_demand.write_text(cfg.read_text() + DEFAULT_MODELS_TOML.replace("data/sample/demand.skops", str(artifact)))
    assert main(["--config", str(with_demand), "run"]) == 0
    store = Store(settings["paths.store"])
    live = store.current_id()
    assert "demand" in store.read_manifest(live)["models"]
    return store, cfg, with_demand, live


def test_a_run_dropping_a_served_model_is_refused_in_one_line(serving_demand, capsys):
    store, cfg, with_demand, live = serving_demand
    capsys.readouterr()
    assert main(["--config", str(cfg), "run"]) == 3
    out, err = capsys.readouterr()
    assert out == f"config: {cfg} (--config)\n"
    assert re.fullmatch(rf"refused: the live snapshot {live} serves registered model demand, which {re.escape(str(cfg))} "
                        rf"does not register: publishing would drop it; run with the config that registers it "
                        rf"\(--config\), or --force to drop it\n", err), err
    assert store.current_id() == live and store.snapshot_ids()[-1] == live  # nothing trained, nothing written
    assert main(["--config", str(cfg), "run", "--force"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"config: {cfg} (--config)\n")
    assert store.current_id() != live and "demand" not in store.read_manifest(store.current_id())["models"]


def test_the_same_config_publishes(serving_demand, capsys):
    store, cfg, with_demand, live = serving_demand
    capsys.readouterr()
    assert main(["--config", str(with_demand), "run"]) == 0
    assert capsys.readouterr().out.startswith(f"config: {with_demand} (--config)\n")
    assert "demand" in store.read_manifest(store.current_id())["models"]
