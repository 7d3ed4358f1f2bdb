"""An MLflow model folder is copied into the snapshot: a symlink leaving it (`notes.txt -> /etc/passwd`,
`certs -> /etc/ssl`) is refused with one line naming the link, before the model's code runs; links
inside the folder are copied as the files they point at."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LinearRegression

from batch.__main__ import main
from serving.store import Store


def _mlflow_folder(folder: Path) -> LinearRegression:
    folder.mkdir(parents=True)
    x = pd.DataFrame({"size": np.arange(20, dtype=np.float64)})
    est = LinearRegression().fit(x, 3 * x["size"] + 1)
    with open(folder / "model.pkl", "wb") as fh:
        pickle.dump(est, fh)
    sig = json.dumps([{"type": "double", "name": "size", "required": True}])
    (folder / "MLmodel").write_text(
        "artifact_path: model\nflavors:\n  sklearn:\n    pickled_model: model.pkl\n"
        f"    serialization_format: cloudpickle\nsignature:\n  inputs: '{sig}'\n  outputs: null\n")
    return est


@pytest.fixture
def mlflow_cfg(workspace):
    root, settings, cfg, first = workspace
    folder = root / "artifacts" / "mlsize"
    est = _mlflow_folder(folder)
    pq.write_table(pa.table({"size": [1.0, 2.5]}), root / "artifacts" / "candidates.parquet")
    cfg.write_text(cfg.read_text() + f'\n[models.mlsize]\nartifact = "{folder}"\nformat = "mlflow"\ntrusted = true\n'
                   f'candidates = "{root / "artifacts" / "candidates.parquet"}"\n')
    return Store(settings["paths.store"]), cfg, folder, est, first


@pytest.mark.parametrize("name, target", [("notes.txt", "/etc/passwd"), ("certs", "/etc/ssl")])
def test_a_link_leaving_the_folder_is_refused_in_one_line(mlflow_cfg, capsys, name, target):
    store, cfg, folder, est, first = mlflow_cfg
    os.symlink(target, folder / name)
    capsys.readouterr()
    assert main(["--config", str(cfg), "run"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {folder / name}: models.mlsize.artifact: a symlink to {Path(target).resolve()}, outside the "
                   f"model folder {folder}: refused (copy the file into the folder, or remove the link)\n")
    assert store.current_id() == first.snapshot_id and store.snapshot_ids() == [first.snapshot_id]


def test_a_link_one_level_down_leaving_the_folder_is_refused(mlflow_cfg, capsys):
    store, cfg, folder, est, first = mlflow_cfg
    (folder / "extra").mkdir()
    os.symlink("../../../../../../../../etc/hostname", folder / "extra" / "host")
    assert main(["--config", str(cfg), "run"]) == 1
    assert f"error: {folder / 'extra' / 'host'}: models.mlsize.artifact: a symlink to " in capsys.readouterr().err


def test_links_inside_the_folder_are_copied_as_files(mlflow_cfg):
    store, cfg, folder, est, first = mlflow_cfg
    (folder / "docs").mkdir()
    (folder / "docs" / "README").write_text("the model\n")
    os.symlink("docs/README", folder / "README")
    os.symlink("docs", folder / "more-docs")
    assert main(["--config", str(cfg), "run"]) == 0
    copied = store.model_dir(store.current_id(), "mlsize") / "mlflow"
    for rel in ("README", "more-docs/README", "docs/README"):
        assert not (copied / rel).is_symlink() and not (copied / rel).parent.is_symlink()
        assert (copied / rel).read_text() == "the model\n"
    manifest = store.read_manifest(store.current_id())
    assert "models/mlsize/mlflow/more-docs/README" in manifest["files"]
