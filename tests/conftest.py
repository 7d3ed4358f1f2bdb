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


# --- S3: moto's server mode, one per session; each test its own bucket -------------------------
@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on a free port of this machine (no Docker, no network), for the session."""
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
          "/nonexistent"}


def s3_env(monkeypatch, endpoint: str, cache: Path) -> None:
    """The standard AWS variables pointing at the emulator (child processes inherit them), and a
    private local cache folder."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))


def new_bucket(prefix: str = "hs") -> str:
    """A fresh bucket on the emulator (the AWS variables must be set)."""
    import uuid

    import s3fs
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture
def s3(monkeypatch, moto_endpoint, tmp_path):
    """The AWS variables set for the emulator, a private cache folder; returns the endpoint URL."""
    s3_env(monkeypatch, moto_endpoint, tmp_path / "cache")
    return moto_endpoint


@pytest.fixture(scope="session")
def s3_published(tmp_path_factory, moto_endpoint, published):
    """One complete batch run on the small sample into a bucket: (root, settings, result). Copy the
    bucket (``copy_bucket``) before changing it."""
    from batch.job import run
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("s3pub")
    s3_env(mp, moto_endpoint, root / "cache")
    try:
        shutil.copytree(published[0] / "inputs", root / "inputs")
        bucket = new_bucket("pub")
        settings, _ = make_settings(root, paths={"store": f"s3://{bucket}/store"})
        result = run(settings)
    finally:
        mp.undo()
    return root, settings, result


def copy_bucket(url: str, root: Path, **overrides):
    """A private copy of the store at ``url`` in a new bucket (server-side copies), with the inputs
    under ``root``; returns (settings, config path)."""
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    src = url.removeprefix("s3://")
    bucket = new_bucket("cp")
    keys = fs.find(src)
    fs.copy(keys, [f"{bucket}/store/{k[len(src) + 1:]}" for k in keys])  # concurrent server-side copies
    return make_settings(root, paths={"store": f"s3://{bucket}/store"}, **overrides)
