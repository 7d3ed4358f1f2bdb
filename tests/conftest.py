"""Shared fixtures: a small seeded sample, a config file pointing into tmp_path, one published run."""
from __future__ import annotations

import shutil
import statistics
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


# --- the browser: Playwright driving Debian's chromium (nothing downloads a browser build) ----------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: make test-tools installs Debian's (Playwright downloads no browser here)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


# The browser's own paint times, in ms after navigation start: when the first title of a list (page.js
# marks it with the Element Timing attribute) and when anything at all was first painted.
_PAINTS = """async (list) => {
  const seen = await new Promise((done) => {
    new PerformanceObserver((entries, obs) => { obs.disconnect(); done(entries.getEntries()); })
      .observe({ type: "element", buffered: true });
    setTimeout(() => done([]), 2000);
  });
  const shown = seen.find((e) => e.identifier === list);
  const first = performance.getEntriesByName("first-paint")[0];
  return { list: shown ? shown.renderTime || shown.loadTime : null, first: first ? first.startTime : null,
           fetched: performance.getEntriesByType("resource").filter((r) => r.name.includes("/similar?")).length };
}"""


def paint_times(page, list_id: str) -> dict:
    """{"list": ms, "first": ms, "fetched": requests for similar items} of a loaded page."""
    return page.evaluate(_PAINTS, list_id)


def first_paints(browser, url: str, list_id: str, loads: int) -> dict:
    """Median paint times (of the list, and of the page's first paint) over ``loads`` fresh loads (a new context each: nothing cached), with a one-line
    page's first paint in the same browser between them (the browser's own floor)."""
    lists, firsts, floors, fetched = [], [], [], 0
    for _ in range(loads):
        for ours in (True, False):
            context = browser.new_context(viewport={"width": 390, "height": 844})
            page = context.new_page()
            page.goto(url if ours else "data:text/html,<!doctype html><link rel=icon href='data:,'><p>floor</p>")
            if ours:
                page.locator(f"#{list_id} li button.title").first.wait_for()
                times = paint_times(page, list_id)
                lists.append(times["list"])
                firsts.append(times["first"])
                fetched += times["fetched"]
            else:
                page.wait_for_function("performance.getEntriesByName('first-paint').length > 0")
                floors.append(page.evaluate("performance.getEntriesByName('first-paint')[0].startTime"))
            context.close()
    return {"median": statistics.median(lists), "max": max(lists), "first": statistics.median(firsts),
            "floor": statistics.median(floors),
            "fetched": fetched, "loads": loads}
