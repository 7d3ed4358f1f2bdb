"""Shared fixtures: a small seeded sample, a config file pointing into tmp_path, one published run."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from batch.inputs import generate_sample, write_inputs
from serving.settings import load_settings
from serving.store import Store

REPO = Path(__file__).resolve().parent.parent
ML100K = REPO.parent / "shared" / "data" / "ml-100k"

SMALL = {
    "sample": {"users": 300, "items": 400, "interactions": 12_000, "genres": 6, "days": 60, "seed": 7},
    "train": {"dim": 16, "rating_dim": 8, "eval_users": 200},
    "batch": {"k_max": 20, "batch_size": 64, "keep": 3, "validate_sample": 50,
              "pairs_per_user": 5, "threads": 1,
              # the popular items only, so tests have items without lists (test_job covers the default)
              "similar_all_items": False},
}


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, bool)
                         else f"{k} = {'true' if v else 'false'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_settings(root: Path, **overrides):
    """Settings for a store and inputs under ``root``; ``overrides`` as {section: {name: value}}."""
    sections = {s: dict(v) for s, v in SMALL.items()}
    sections["paths"] = {"store": str(root / "store"), "inputs": str(root / "inputs")}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    cfg = write_config(root / "config.toml", sections)
    return load_settings(cfg, env={}), cfg


@pytest.fixture(scope="session")
def sample_frames():
    s = SMALL["sample"]
    return generate_sample(s["users"], s["items"], s["interactions"], s["genres"], s["days"], s["seed"])


@pytest.fixture(scope="session")
def published(tmp_path_factory, sample_frames):
    """One complete batch run on the small sample: (root, settings, result). Do not mutate; copy."""
    from batch.job import run
    root = tmp_path_factory.mktemp("published")
    write_inputs(root / "inputs", *sample_frames)
    settings, _ = make_settings(root)
    result = run(settings)
    return root, settings, result


@pytest.fixture
def workspace(tmp_path, published):
    """A private copy of the published store and inputs, with settings pointing at it."""
    root, _, result = published
    shutil.copytree(root / "inputs", tmp_path / "inputs")
    shutil.copytree(root / "store", tmp_path / "store", symlinks=True)
    settings, cfg = make_settings(tmp_path)
    from batch.catalog import refresh_views
    refresh_views(Store(settings["paths.store"]))  # the copied catalog's views still name the original's files
    return tmp_path, settings, cfg, result
