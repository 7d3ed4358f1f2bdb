"""Typed settings: every setting declared once, read from a TOML file and the environment.

A typo in a config file is an error that names the file and the key.
"""
from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from serving.errors import ConfigError

ENV_FILE = "HYBRIDSERVE_CONFIG"
DEFAULTS_SOURCE = "<defaults>"  # Settings.source when no config file was read
ENV_PREFIX = "HYBRIDSERVE_"
# Variables under the prefix that are not HYBRIDSERVE_<SECTION>_<NAME> settings; any other
# HYBRIDSERVE_* variable is a typo and refused, like an unknown key in a config file.
ENV_NOT_SETTINGS = frozenset({
    ENV_FILE,               # the config file to read
})


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None  # a string setting must match this regex in full

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def type(self) -> type:
        return type(self.default)


SETTINGS: tuple[Setting, ...] = (
    # paths
    Setting("paths", "store", "data/store", "Store root: snapshots/, requests/, catalog.duckdb (relative to the working directory)"),
    Setting("paths", "inputs", "data/sample", "Folder holding interactions.parquet and items.parquet"),
    # sample generator
    Setting("sample", "users", 5000, "Users in the generated sample", minimum=10),
    Setting("sample", "items", 3000, "Items in the generated sample", minimum=20),
    Setting("sample", "interactions", 300_000, "Interactions in the generated sample", minimum=100),
    Setting("sample", "genres", 18, "Genres (latent clusters) in the generated sample", minimum=1, maximum=64),
    Setting("sample", "days", 180, "Days of history the sample's timestamps span", minimum=1),
    Setting("sample", "seed", 42, "Random seed of the sample generator"),
    # training
    Setting("train", "method", "auto", "How recommendation vectors are trained: ease (dense EASE item-item model, factored to "
            "train.dim for FAISS; catalogues up to train.ease_max_items), svd (PureSVD), or auto (chosen with its "
            "ease_lambda and history_half_life on a validation split cut from the training data; docs/recommender.md)",
            choices=("auto", "ease", "svd")),
    Setting("train", "ease_max_items", 5_000, "Largest catalogue EASE is trained for (its item x item matrix is dense: "
            "memory and time grow as items^2 and items^3); above it auto uses svd and method = 'ease' is refused",
            minimum=2),
    Setting("train", "revalidate_change", 0.25, "auto: the method chosen on validation is reused by later trainings "
            "until the items, users or interactions differ from those it was chosen on by more than this share "
            "(or a setting it depends on changes, or run --retrain); 0 = choose again at every training",
            minimum=0.0),
    Setting("train", "ease_lambda", 250.0, "EASE ridge penalty when train.method = 'ease' (auto chooses it on validation)",
            minimum=0.0),
    Setting("train", "history_half_life", 0.0, "With a pinned method: a user's interaction weighs half as much in their "
            "vector per this many newer interactions of theirs (0 = all alike; auto chooses it on validation)",
            minimum=0.0),
    Setting("train", "dim", 64, "Retrieval vector dimension (PureSVD components, or the rank EASE is factored to; capped by the data's size)", minimum=2, maximum=1024),
    Setting("train", "popularity_damping", 0.25, "PureSVD: each item's column is scaled by its count ** -this before the SVD "
            "(0 = plain PureSVD; larger lifts less popular items)", minimum=0.0, maximum=1.0),
    Setting("train", "holdout_share", 0.2, "Share of each user's newest interactions held out for evaluation "
            "(users with fewer than 5 interactions stay in training)", minimum=0.01, maximum=0.5),
    Setting("train", "index", "auto", "FAISS index: 'auto', 'Flat', 'HNSW<M>' or 'IVF<nlist>,Flat' (inner product; cosine via unit vectors)",
            pattern=r"auto|Flat|HNSW\d+|IVF\d+,Flat"),
    Setting("train", "flat_max_items", 20_000, "With index='auto': exact Flat up to this many items, IVF (about 4 sqrt(n) lists) above", minimum=1),
    Setting("train", "flat_max_items_ip", 20_000, "With index='auto' and inner-product vectors (trained PureSVD, or "
            "metric = 'ip'): exact Flat up to this many items, an HNSW32 graph built with the inner product above "
            "(why, measured: docs/performance.md)", minimum=1),
    Setting("train", "hnsw_ef_search", 128, "HNSW efSearch: candidates kept per search; more is higher recall and "
            "slower queries (the default's recall, measured: docs/performance.md)", minimum=1),
    Setting("train", "ivf_nprobe", 32, "IVF nprobe: lists searched per query; more is higher recall and slower "
            "queries (the default's recall, measured: docs/performance.md)", minimum=1),
    Setting("train", "similar_min_support", 5, "Items with fewer interactions than this never appear as similar items, "
            "in user recommendations or in sessions "
            "(rare items' vectors are noise); 0 keeps every item", minimum=0),
    Setting("train", "rating_dim", 32, "Factors of the rating model (biased matrix factorisation by ALS)", minimum=1, maximum=512),
    Setting("train", "rating_reg", 0.1, "Rating model: ridge penalty per rating on each factor vector (ALS-WR)", minimum=0.0),
    Setting("train", "bias_reg", 10.0, "Pseudo-ratings that shrink each user and item bias towards zero", minimum=0.0),
    Setting("train", "rating_iterations", 10, "ALS sweeps of the rating model", minimum=1),
    Setting("train", "eval_users", 2000, "Users sampled for recall@10 on the hold-out", minimum=1),
    Setting("train", "rating_min", 0.5, "Lowest valid rating in the inputs"),
    Setting("train", "rating_max", 5.0, "Highest valid rating in the inputs"),
    Setting("train", "seed", 0, "Random seed of training"),
    # your own embeddings (docs/recommender.md)
    Setting("embeddings", "item_vectors", "", "Item vectors to serve instead of training them: Parquet (item_id int64, "
            "vector fixed_size_list<float32>) or .npy (m, d) beside <name>.ids.npy; empty = train"),
    Setting("embeddings", "user_vectors", "", "User vectors in the same formats (optional; users without one get their "
            "history folded in); empty = fold in every user"),
    Setting("embeddings", "metric", "ip", "How supplied vectors are compared: ip (inner product) or cosine", choices=("ip", "cosine")),
    # batch job
    Setting("batch", "k_max", 50, "Entries kept per precomputed list; any k <= k_max is a slice", minimum=1, maximum=1000),
    Setting("batch", "coverage", 0.95, "Share of traffic the precomputed keys should cover", minimum=0.0, maximum=1.0),
    Setting("batch", "max_items", 200_000, "Most items to precompute similar items for", minimum=0),
    Setting("batch", "similar_all_items", True, "Similar items for every item of a catalogue of at most max_items, not "
            "only the popular ones (a list per item: linear in the catalogue); sessions of any items are then answered "
            "from the snapshot when the lists prove it (docs/recommender.md)"),
    Setting("batch", "max_users", 200_000, "Most users to precompute recommendations for", minimum=0),
    Setting("batch", "max_pairs", 1_000_000, "Most (user, item) pairs to precompute predictions for", minimum=0),
    Setting("batch", "pairs_per_user", 10, "Before any request log: predictions for each popular user's top-N recommended items", minimum=0),
    Setting("batch", "window_days", 30, "Popularity window over interactions (when there is no request log), in days back from "
            "the newest interaction in the inputs, not from today; 0 = all history (for historical data sets)", minimum=0),
    Setting("batch", "backend", "local", "Where the precompute's partitions run: local (this process, FAISS on "
            "batch.threads cores) or dask (a distributed cluster: docs/batch.md#on-a-dask-cluster)",
            choices=("local", "dask")),
    Setting("batch", "dask_scheduler", "", "backend = dask: address of an existing scheduler (tcp://host:8786), whose "
            "workers must read paths.store; empty starts a LocalCluster on this machine for the run"),
    Setting("batch", "dask_workers", 2, "backend = dask, no scheduler given: LocalCluster worker processes "
            "(0 = one per core)", minimum=0),
    Setting("batch", "dask_threads_per_worker", 1, "backend = dask, no scheduler given: threads (partitions at once) "
            "per LocalCluster worker", minimum=1),
    Setting("batch", "dask_omp_threads", 1, "backend = dask: OpenMP threads of FAISS in each partition a worker thread "
            "answers (1: one per worker thread, so workers x threads cores in all)", minimum=1),
    Setting("batch", "dask_retries", 2, "backend = dask: times Dask retries a partition that raised (a partition on a "
            "worker that died is rescheduled by Dask on another, up to distributed.scheduler.allowed-failures)",
            minimum=0),
    Setting("batch", "dask_timeout_s", 30.0, "backend = dask: seconds to reach the scheduler and see a worker there, "
            "else the run fails before training", minimum=0.1),
    Setting("batch", "dask_dashboard", ":8787", "backend = dask, no scheduler given: the LocalCluster's dashboard "
            "address (':0' any free port; empty for none; needs bokeh); the address is logged"),
    Setting("batch", "batch_size", 4096, "Queries per vectorised call when precomputing", minimum=1),
    Setting("batch", "keep", 5, "Snapshots retained (CURRENT and its predecessor are always kept)", minimum=2),
    Setting("batch", "decay_half_life_hours", 168.0, "Request-log traffic loses half its weight per this many hours (0 = no decay)", minimum=0.0),
    Setting("batch", "validate_sample", 200, "Precomputed answers per table recomputed live before publish", minimum=1),
    Setting("batch", "min_recall", 0.95, "Refuse a snapshot whose ANN recall@10 against exact search is below this", minimum=0.0, maximum=1.0),
    Setting("batch", "max_row_drop", 0.5, "Refuse a snapshot whose row counts fall by more than this share (unless --force)", minimum=0.0, maximum=1.0),
    Setting("batch", "threads", 0, "FAISS/OpenMP threads for the batch job (0 = all cores)", minimum=0),
    Setting("batch", "schedule", "*/15 * * * *", "When `python -m batch schedule` runs the job: crontab (UTC) or 'every <N>s'",
            pattern=r"(\S+\s+){4}\S+|every\s+\d+(\.\d+)?\s*s"),
    Setting("batch", "misfire_grace_s", 300, "A run later than this past its time (e.g. after a suspend) is skipped", minimum=1),
    Setting("batch", "sql_time_limit_ms", 30_000, "`python -m batch sql`: a query still running after this many milliseconds is interrupted", minimum=1),
    Setting("batch", "sql_max_rows", 1000, "`python -m batch sql`: rows fetched and printed at most (the rest is never computed when it can be avoided)", minimum=1),
    # serving
    Setting("serving", "host", "127.0.0.1", "Address the API listens on"),
    Setting("serving", "port", 8000, "Port the API listens on", minimum=1, maximum=65535),
    Setting("serving", "workers", 2, "Server worker processes (granian; make serve); one per core for a CPU-bound app", minimum=1),
    Setting("serving", "blocking_threads", 8, "Python threads per worker that run the app: a request waiting for a "
            "live answer (up to its deadline) holds one, and the others keep answering hits and other models "
            "(the GIL still runs one at a time)", minimum=1),
    Setting("serving", "runtime_threads", 1, "Rust I/O threads per worker (parse HTTP, keep connections, write answers)", minimum=1),
    Setting("serving", "backpressure", 512, "Connections a worker serves at once; further ones wait in the listen backlog "
            "(each idle, slow or stalled client holds one, never a Python thread)", minimum=1),
    Setting("serving", "header_read_timeout_s", 10.0, "A client is disconnected when its request head is not complete this "
            "many seconds after its first byte, or after its previous answer (so also an idle keep-alive connection)",
            minimum=0.001, maximum=60.0),
    Setting("serving", "max_head_bytes", 65_536, "Largest request head (request line and headers) a worker buffers: "
            "a head not complete once its buffer holds this much, or more than 100 headers, gets 431 from the server "
            "before the app (a head that arrives in one read may pass up to about twice this)", minimum=8192),
    Setting("serving", "keepalive", True, "Keep client connections open across requests (HTTP/1.1 keep-alive)"),
    Setting("serving", "shutdown_timeout_s", 30, "On SIGTERM/SIGINT a worker finishes its requests and flushes its request log; "
            "one still running after this many seconds is killed (its unflushed rows are lost)", minimum=1),
    Setting("serving", "mode", "hybrid", "hybrid: snapshot, then cache, then live; ttl-cache: cache then live (no snapshot answers); live-only: every request computed live",
            choices=("hybrid", "ttl-cache", "live-only")),
    Setting("serving", "max_age_s", 86400.0, "Precomputed answers older than this are computed live instead", minimum=0.0),
    Setting("serving", "max_age_cap_s", 0, "Longest Cache-Control max-age an answer gets, in seconds (0: none, its whole "
            "freshness left); a cache in front asks again after at most this long (If-None-Match: 304 while the "
            "snapshot is the same), so a new snapshot shows through it within this time", minimum=0),
    Setting("serving", "cache_ttl_s", 300.0, "Seconds a live result is cached (per process)", minimum=0.0),
    Setting("serving", "cache_size", 100_000, "Live results cached at most (per process)", minimum=1),
    Setting("serving", "cache_max_mb", 256.0, "Memory the cached live results may take at most (per process, in MB; "
            "each entry estimated with its key and the cache's own structures), beside cache_size", minimum=0.01),
    Setting("serving", "live_deadline_ms", 2000.0, "A live answer not computed within this many milliseconds gets 503 "
            "naming the model (or its precomputed answer marked stale, if only its freshness bound had passed); the "
            "computation goes on and may still fill the cache. A model's own: deadline_ms in its [models.<name>] "
            "table", minimum=1.0),
    Setting("serving", "live_threads", 2, "Threads per model (per worker) that compute its live answers, so a slow "
            "model holds its own threads, never the app's", minimum=1),
    Setting("serving", "live_max_waiting", 6, "Requests of a worker waiting for live answers at once, at most; "
            "past that one gets 503 (or its stale answer) at once, so some app threads (blocking_threads) always "
            "stay free for hits and health however many slow misses arrive", minimum=1),
    Setting("serving", "error_log_interval_s", 60.0, "A model that keeps failing is logged with its traceback once "
            "per this many seconds, with how often it failed meanwhile (a client cannot flood the log)", minimum=0.0),
    Setting("serving", "live_queue", 32, "Live computations of one model waiting for its threads at most (per "
            "worker); past that a request gets 503 at once", minimum=0),
    Setting("serving", "shared_cache", "", "The fleet's shared tier of live results, between each worker's cache and "
            "live compute: redis://[:password@]host:port/db, rediss://... (TLS) or unix://path; empty = the local "
            "tiers only (docs/server.md)", pattern=r"|(redis|rediss|unix)://\S+"),
    Setting("serving", "shared_cache_timeout_ms", 50.0, "Every call to the shared cache gives up after this many "
            "milliseconds (the answer then comes from the local tiers and live)", minimum=1.0),
    Setting("serving", "shared_cache_retry_s", 5.0, "After 3 failed calls in a row the shared cache is skipped this "
            "many seconds, then tried again", minimum=0.01),
    Setting("serving", "k_limit", 1000, "Hard limit on k; above the snapshot's k_max answers are computed live", minimum=1),
    Setting("serving", "session_max_items", 50, "Most item ids in a session query", minimum=1),
    Setting("serving", "cors_origins", "*", "Comma-separated origins allowed by CORS ('*' for any, empty for no CORS headers at all)"),
    Setting("serving", "reload_interval_s", 2.0, "How often each worker checks CURRENT for a new snapshot", minimum=0.05),
    Setting("serving", "verify_checksums", True, "Verify sha256 of every snapshot file before swapping it in"),
    Setting("serving", "log_flush_rows", 5000, "Request-log rows buffered before a flush", minimum=1),
    Setting("serving", "log_flush_interval_s", 5.0, "Request-log flush interval in seconds (0 = only on size and exit)", minimum=0.0),
    Setting("serving", "log_max_buffer", 200_000, "Request-log rows kept in memory at most (older are dropped and counted)", minimum=1),
    Setting("serving", "max_url_bytes", 2048, "Longer request URLs get 414", minimum=64),
    Setting("serving", "fast_path", True, "Answer plain precomputed hits below Flask's routing (same bytes and headers, a fraction of the CPU); false sends every request through Flask"),
    Setting("serving", "page", True, "Serve the page at / (search items, similar items, recommendations, sessions, "
            "the models' forms, the hit rate); false for an API-only deployment (/ answers 404)"),
    Setting("serving", "hit_cache_entries", 10000, "Hit-path URLs whose rendered answer each worker keeps (about 1 KB each; only the age and Cache-Control are redone per request); 0 renders every hit", minimum=0),
)

_BY_KEY = {s.key: s for s in SETTINGS}

# The models config/default.toml registers besides the built-in rating model (docs/models.md):
# a demand model trained on the generated sample by `python -m batch generate-sample`.
DEFAULT_MODELS_TOML = """
# Registered models (docs/models.md). Each [models.<name>] table: an artifact (skops by default;
# joblib or an MLflow folder only with trusted = true), its inputs, output, version, freshness.
# Served at GET /v1/models/<name>/predict?<input>=<value>&...; listed at GET /v1/models.
[models.demand]
# Daily interactions per genre and weekday, with an optional discount (made by generate-sample)
artifact = "data/sample/demand.skops"
format = "skops"
# skops refuses types it does not trust by default; this file is made by generate-sample, so its
# gradient-boosting trees are trusted here by name (never list types you have not reviewed)
trusted_types = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]
output = "predict"
version = "demand-1"
# a demand forecast may be served for a day before it is computed again
max_age_s = 86400.0
# the genre x weekday grid (18 x 7 rows) is precomputed whole; discounts asked for come from the request log
grid_max_rows = 100_000

[[models.demand.inputs]]
name = "genre"
type = "string"
values = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]

[[models.demand.inputs]]
name = "weekday"
type = "int"
min = 0
max = 6

[[models.demand.inputs]]
name = "discount"
type = "float"
required = false
default = 0.0
min = 0.0
max = 0.5
"""


class Settings:
    """Read-only view of resolved settings: ``settings["batch.k_max"]``."""

    def __init__(self, values: dict[str, Any], source: str = DEFAULTS_SOURCE, models: tuple = ()):
        self._values = dict(values)
        self.source = source
        # Registered models ([models.<name>] tables), serving.models.base.ModelSpec each. Only the
        # config file lists them: there are no default models to merge with.
        self.models = tuple(models)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, value in self._values.items():
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        return out

    def replace(self, **overrides: Any) -> "Settings":
        """A copy with ``section__name=value`` overrides (validated)."""
        values = dict(self._values)
        for dunder, value in overrides.items():
            key = dunder.replace("__", ".", 1)
            values[key] = _check(_lookup(key, "<override>"), value, "<override>")
        return Settings(values, self.source, self.models)

    def with_models(self, models) -> "Settings":
        """A copy registering ``models`` (ModelSpec each) instead."""
        return Settings(self._values, self.source, tuple(models))


def _lookup(key: str, source: str) -> Setting:
    try:
        return _BY_KEY[key]
    except KeyError:
        raise ConfigError(f"{source}: {key}: unknown setting") from None


def _check(setting: Setting, value: Any, source: str) -> Any:
    want = setting.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not want:
        raise ConfigError(
            f"{source}: {setting.key}: expected {want.__name__}, got {type(value).__name__} {value!r}"
        )
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(f"{source}: {setting.key}: must be one of {', '.join(map(str, setting.choices))}")
    if setting.pattern is not None and not re.fullmatch(setting.pattern, value):
        raise ConfigError(f"{source}: {setting.key}: {value!r} does not match {setting.pattern!r}")
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(f"{source}: {setting.key}: must be >= {setting.minimum}, got {value!r}")
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(f"{source}: {setting.key}: must be <= {setting.maximum}, got {value!r}")
    return value


def _parse_env(setting: Setting, raw: str, source: str) -> Any:
    want = setting.type
    try:
        if want is bool:
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes"}
        return want(raw)
    except ValueError:
        raise ConfigError(f"{source}: {setting.key}: expected {want.__name__}, got {raw!r}") from None


def load_settings(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file (``path`` or $HYBRIDSERVE_CONFIG), then HYBRIDSERVE_<SECTION>_<NAME>."""
    env = os.environ if env is None else env
    values = {s.key: s.default for s in SETTINGS}
    path = path or env.get(ENV_FILE) or None
    source = DEFAULTS_SOURCE
    models: tuple = ()
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        for section, table in data.items():
            if section == "models":
                from serving.models.registry import parse_models
                models = parse_models(table, source)
                continue
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: {section}: expected a [{section}] table")
            for name, value in table.items():
                key = f"{section}.{name}"
                values[key] = _check(_lookup(key, source), value, source)
    by_var = {env_var(setting): setting for setting in SETTINGS}
    for var in sorted(v for v in env if v.startswith(ENV_PREFIX)):
        setting = by_var.get(var)
        if setting is not None:
            values[setting.key] = _check(setting, _parse_env(setting, env[var], var), var)
        elif var not in ENV_NOT_SETTINGS:
            # Compared without the shared prefix, which would make every name look close.
            near = difflib.get_close_matches(var.removeprefix(ENV_PREFIX),
                                             [v.removeprefix(ENV_PREFIX) for v in (*by_var, *ENV_NOT_SETTINGS)], n=1)
            raise ConfigError(f"{var}: unknown setting"
                              + (f" (did you mean {ENV_PREFIX}{near[0]}?)" if near else ""))
    return Settings(values, source, models)


def env_var(setting: Setting) -> str:
    """The environment variable that overrides ``setting``: HYBRIDSERVE_<SECTION>_<NAME>."""
    return f"{ENV_PREFIX}{setting.section}_{setting.name}".upper()


def render_default_toml() -> str:
    """The commented default config, derived from the table above (config/default.toml)."""
    lines = ["# hybridserve settings: every setting, with its default.",
             "# Generated from serving/settings.py; environment overrides: HYBRIDSERVE_<SECTION>_<NAME>.", ""]
    section = None
    for s in SETTINGS:
        if s.section != section:
            if section is not None:
                lines.append("")
            lines.append(f"[{s.section}]")
            section = s.section
        lines.append(f"# {s.help}")
        lines.append(f"{s.name} = {_toml_value(s.default)}")
    return "\n".join(lines) + "\n" + DEFAULT_MODELS_TOML


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    return repr(value)

