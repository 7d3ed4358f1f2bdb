"""A model kind of one's own, as docs/models.md describes it: a Model subclass, registered, named by
``kind`` in a [models.<name>] table, precomputed by the batch job, validated and served hybrid."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.job import run
from conftest import make_settings
from serving.errors import ConfigError
from serving.models import registry
from serving.models.base import Model, ModelSpec, Query, canonical_key, canonical_key_array
from serving.settings import load_settings
from serving.store import Store
from serving.web.app import create_app


class WeightedSum(Model):
    """Predicts weight * (the sum of its inputs); the weight is its artifact, a text file."""

    kind = "weighted_sum"
    queries = {"predict": Query("predict", "model", label="prediction")}

    def __init__(self, spec: ModelSpec, weight: float, table: dict):
        self.spec, self.weight, self.table = spec, weight, table
        self.name, self.version, self.max_age_s = spec.name, f"w{weight}", spec.max_age_s

    @classmethod
    def stage(cls, spec, folder):
        shutil.copy(spec.artifact, Path(folder) / "weight.txt")
        (Path(folder) / "spec.json").write_text(json.dumps(spec.to_json()))
        return {"kind": cls.kind, "version": f"w{float(Path(spec.artifact).read_text())}", "max_age_s": spec.max_age_s}

    @classmethod
    def load(cls, folder, name, entry):
        folder = Path(folder)
        spec = ModelSpec.from_json(json.loads((folder / "spec.json").read_text()))
        table = {}
        if (folder / "predictions.parquet").is_file():
            t = pq.read_table(folder / "predictions.parquet")
            table = dict(zip(t.column("input").to_pylist(), t.column("prediction").to_pylist()))
        return cls(spec, float((folder / "weight.txt").read_text()), table)

    def answer(self, query, columns, k=None):
        return self.weight * np.sum([np.asarray(c, np.float64) for c in columns], axis=0)

    def stored(self, query, key, k=None):
        return self.table.get(canonical_key(key))

    def cache_key(self, query, key):
        return canonical_key(key)

    def precomputed(self):
        return {"predict": len(self.table)}

    def keys(self, query, plan):
        return self.spec.grid(), {"grid_rows": self.spec.grid_size()}

    def part(self, query, columns, answers):
        cols = {i.name: pa.array(c) for i, c in zip(self.spec.inputs, columns)}
        return pa.table({**cols, "input": canonical_key_array(columns), "prediction": pa.array(answers, pa.float64())})

    def assemble(self, query, table, folder, k_max):
        pq.write_table(table, Path(folder) / "predictions.parquet")
        return {"rows": table.num_rows}

    def key_columns(self, query):
        return list(self.spec.input_names)


MODEL = """
[models.adder]
kind = "weighted_sum"
artifact = "{weight}"
[[models.adder.inputs]]
name = "a"
type = "int"
min = 0
max = 3
[[models.adder.inputs]]
name = "b"
type = "int"
min = 0
max = 2
[[models.adder.inputs]]
name = "c"
type = "float"
required = false
default = 0.0
min = 0.0
max = 1.0
"""


@pytest.fixture
def kind():
    registry.register(WeightedSum.kind, WeightedSum)
    yield WeightedSum
    del registry.KINDS[WeightedSum.kind]


def test_a_model_kind_of_ones_own_is_precomputed_validated_and_served(workspace, kind):
    root, settings, cfg, _ = workspace
    (root / "weight.txt").write_text("2.5")
    cfg.write_text(cfg.read_text() + MODEL.format(weight=root / "weight.txt"))
    settings = load_settings(cfg, env={})
    result = run(settings)
    entry = result.manifest["models"]["adder"]
    assert entry["kind"] == "weighted_sum" and entry["version"] == "w2.5" and entry["rows"] == 4 * 3
    assert result.manifest["validation"]["models"]["adder"] == {"checked": 12, "mismatches": 0}
    stored = Store(settings["paths.store"]).model_table_path(result.snapshot_id, "adder")
    assert pq.read_table(stored).column("prediction").to_pylist() == [2.5 * (a + b) for a in range(4) for b in range(3)]
    app = create_app(settings, background=False)
    try:
        client = app.test_client()
        hit = client.get("/v1/models/adder/predict?a=3&b=1").json
        assert (hit["source"], hit["prediction"], hit["model_version"]) == ("precomputed", 10.0, "w2.5")
        miss = [client.get("/v1/models/adder/predict?a=1&b=1&c=0.5").json for _ in range(2)]
        assert [m["source"] for m in miss] == ["live", "cache"] and miss[0]["prediction"] == 2.5 * 2.5
        listed = {m["name"]: m for m in client.get("/v1/models").json["models"]}
        assert listed["adder"]["kind"] == "weighted_sum" and listed["adder"]["precomputed"] == 12
        bad = client.get("/v1/models/adder/predict?a=9&b=1")
        assert bad.status_code == 400 and "input 'a' must be an integer from 0 to 3" in bad.json["detail"]
    finally:
        app.extensions["hybridserve"].close()


def test_an_unknown_kind_is_a_config_error_naming_the_key(tmp_path):
    _, cfg = make_settings(tmp_path)
    cfg.write_text(cfg.read_text() + MODEL.format(weight=tmp_path / "w.txt").replace("weighted_sum", "nope"))
    with pytest.raises(ConfigError, match=r"models\.adder\.kind: unknown model kind 'nope' \(kinds: .*sklearn"):
        load_settings(cfg, env={})
