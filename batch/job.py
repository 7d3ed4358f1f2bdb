"""The batch job: inputs -> train (or reuse) -> stage the models -> map the precompute over partitions
of their keys -> assemble -> validate -> publish.

Every answer is computed by the model kinds of serving.models, the code the API answers with live;
``batch.precompute`` is the one function the backend maps (``batch.backends``).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa

from batch import catalog, popularity
from batch import models as registered_models
from batch.backends import backend as make_backend
from batch.embeddings import Vectors, ids_path, load_vectors
from batch.inputs import Inputs, fingerprint_files, load_inputs
from batch.precompute import PREDICTIONS_PER_RANKED, Staged, forget, partitions, precompute_part, staged_models
from batch.requestlog import RequestLogFiles, log_files
from batch.evaluate import train_and_evaluate
from batch.train import training_key
from batch.validate import validate
from serving.errors import Abandoned, HybridServeError, InputError, StorageError, StoreLockedError, ValidationFailed
from serving.models.base import Lists, Model
from serving.models.rating import MODEL_FILES as RATING_FILES
from serving.models.rating import RatingModel
from serving.models.recommender import BUNDLE_FILES, ModelBundle
from serving.settings import DEFAULTS_SOURCE, Settings
from serving.store import Store, describe_os_error, layout, naming

LOG = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    status: str
    snapshot_id: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    catalog_updated: bool = False
    catalog_error: str | None = None        # why the catalog was not updated (the record waits in pending-runs)
    warnings: list[str] = field(default_factory=list)  # after publish: what failed without undoing it


STAGES = ("config", "inputs", "train", "models", "select", "precompute", "publish", "validate")


class _Stages:
    """Seconds spent per stage, for the runs table; ``progress(line)`` hears a line as each starts and
    ends (the CLI prints them in a terminal: a run is silent until its summary otherwise)."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        LOG.info("stage %s ...", name)
        step = f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}"
        if self.progress:
            self.progress(f"{step} ...")
        ok = False
        try:
            yield
            ok = True
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            if self.progress:
                self.progress(f"{step} {'done' if ok else 'stopped'} in {self.seconds[name]:.1f} s")


# --- model --------------------------------------------------------------------------
@dataclass
class Trained:
    """The recommender and the rating model for these inputs, and the cache folder holding their files."""

    bundle: ModelBundle
    rating: RatingModel
    folder: Path
    evaluation: dict[str, Any]
    retrained: bool


def obtain_model(store: Store, inputs: Inputs, settings: Settings, retrain: bool = False) -> Trained:
    """The trained models for these inputs and settings: reused from the store's model cache when the
    training key matches, else trained (and cached)."""
    supplied = supplied_vectors(inputs, settings)
    key = training_key(inputs.fingerprint + vectors_fingerprint(supplied), settings)
    folder = store.trained_dir(key)
    live = store.current_id()
    if not retrain and not folder.is_dir() and live is not None:
        # The cache was pruned, but the live snapshot may carry these very models.
        try:
            if ModelBundle.read_meta(store.model_dir(live)).get("training_key") == key:
                folder = store.model_dir(live).parent
        except (OSError, ValueError):
            pass
    if folder.is_dir() and not retrain:
        LOG.info("inputs unchanged: reusing model %s", key)
        bundle = ModelBundle.load(folder / layout.RECOMMENDER)
        rating = RatingModel.load(folder / layout.RATING, layout.RATING, {})
        return Trained(bundle, rating, folder, bundle.meta.get("evaluation", {}), False)
    bundle, rating, evaluation = train_and_evaluate(inputs.interactions, inputs.items, settings, supplied,
                                                    None if retrain else _previous_choice(store, live))
    version = f"{key}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    bundle.meta.update(model_version=version, training_key=key, inputs_fingerprint=inputs.fingerprint,
                       evaluation=evaluation)
    rating.meta["model_version"] = rating.version = version

    def save(tmp: Path) -> None:
        try:
            with naming(tmp):
                bundle.save(tmp / layout.RECOMMENDER)
                rating.save(tmp / layout.RATING)
        except RuntimeError as exc:  # FAISS reports a failed write as a RuntimeError
            raise _faiss_os_error(exc) or exc

    return Trained(bundle, rating, store.save_trained(key, save), evaluation, True)


def _previous_choice(store: Store, live: str | None) -> dict[str, Any] | None:
    """The method choice the live snapshot's recommender carries (reused while the inputs have not
    changed materially), or None."""
    if live is None:
        return None
    try:
        return ModelBundle.read_meta(store.model_dir(live)).get("method") or None
    except (OSError, ValueError):
        return None


def supplied_vectors(inputs: Inputs, settings: Settings) -> dict[str, Vectors | None]:
    """The user's own vectors named by [embeddings], read and validated against the inputs (InputError
    naming the file and field on any problem); None where the trainer makes them."""
    out: dict[str, Vectors | None] = {"items": None, "users": None}
    if settings["embeddings.item_vectors"]:
        known = np.sort(inputs.items["item_id"].to_numpy(dtype=np.int64))
        out["items"] = load_vectors(Path(settings["embeddings.item_vectors"]), "item_id", known, "catalogue")
    if settings["embeddings.user_vectors"]:
        known = np.unique(inputs.interactions["user_id"].to_numpy(dtype=np.int64))
        out["users"] = load_vectors(Path(settings["embeddings.user_vectors"]), "user_id", known, "interactions")
    return out


def vectors_fingerprint(supplied: dict[str, Vectors | None]) -> str:
    """Part of the training key: supplied vector files by content, so new vectors mean a new model."""
    paths = []
    for v in supplied.values():
        if v is not None:
            paths.append(v.path)
            if v.path.suffix == ".npy":
                paths.append(ids_path(v.path))
    return fingerprint_files(paths) if paths else ""


_FAISS_WRITE = re.compile(r"write error in (.+?): .*\(([^()]+)\)\s*$")
_ERRNO_BY_TEXT = {os.strerror(code): code for code in errno.errorcode}


def _faiss_os_error(exc: RuntimeError) -> OSError | None:
    """FAISS's "... write error in <path>: 0 != 8 (No space left on device)" as the OSError it was."""
    m = _FAISS_WRITE.search(str(exc))
    if m is None or m.group(2) not in _ERRNO_BY_TEXT:
        return None
    out = OSError(_ERRNO_BY_TEXT[m.group(2)], m.group(2), m.group(1))
    out.__cause__ = exc
    return out


def observed_hit_rate(store: Store, until: datetime, log: RequestLogFiles | None = None) -> float | None:
    """Share of lookups answered from the snapshot since the previous published run (None if no traffic);
    the lookups are the endpoints /metrics' hit rate counts (layout.LOOKUP_ENDPOINTS)."""
    previous = store.current_id()
    if previous is None:
        return None
    log = log_files(store) if log is None else log
    since = store.read_manifest(previous).get("created_at")
    endpoints = ", ".join(f"'{e}'" for e in layout.LOOKUP_ENDPOINTS)
    frame = log.frame(
        "SELECT count(*) FILTER (WHERE source = 'precomputed') AS hits, count(*) AS total "
        f"FROM read_parquet(?, union_by_name = true) WHERE status < 400 AND endpoint IN ({endpoints}) "
        "AND ts >= CAST(? AS TIMESTAMPTZ) AND ts < CAST(? AS TIMESTAMPTZ)", [since, until.isoformat()])
    if frame is None:
        return None
    hits, total = int(frame["hits"].iloc[0]), int(frame["total"].iloc[0])
    return hits / total if total else None


def items_table(items: pd.DataFrame) -> pa.Table:
    return pa.table({"item_id": pa.array(items["item_id"].to_numpy(), pa.int64()),
                     "title": pa.array(items["title"].tolist(), pa.string()),
                     "genres": pa.array([list(g) for g in items["genres"]], pa.list_(pa.string()))})


# --- what to precompute -----------------------------------------------------------------
class JobPlan:
    """What the models' ``keys`` are asked with (serving.models.base.Plan): the popularity selection,
    the request log per model, and the tables precomputed so far in this run."""

    def __init__(self, selection: popularity.Selection, model_log: dict, settings: Settings):
        self.selection, self.model_log, self.settings = selection, model_log, settings
        self.coverage, self.k_max = settings["batch.coverage"], settings["batch.k_max"]
        self.cover = popularity.cover
        self.tables: dict[tuple[str, str], pa.Table] = {}

    def popular(self, what: str) -> np.ndarray:
        if what == "pairs":
            pairs = self.selection.pairs
            return np.zeros((0, 2), np.int64) if pairs is None else pairs[["user_id", "item_id"]].to_numpy(np.int64)
        return {"items": self.selection.items, "users": self.selection.users}[what]

    def logged(self, model: str):
        return self.model_log.get(model)

    def setting(self, key: str) -> Any:
        return self.settings[key]

    def answers(self, model: str, query: str) -> pa.Table | None:
        return self.tables.get((model, query))

    def add(self, what: str, keys: np.ndarray) -> None:
        if what == "pairs":  # the held-out estimate for predictions covers these too
            self.selection.add_pairs(pd.DataFrame(np.asarray(keys).reshape(-1, 2), columns=["user_id", "item_id"]))

    def precomputed(self, model: Model, query: str, table: pa.Table) -> None:
        """Note a query's table (another model's keys may follow its answers)."""
        self.tables[(model.name, query)] = table


def _in_order(models: dict[str, Model]) -> list[str]:
    """Model names, each after the models whose answers its keys follow (Model.needs)."""
    done: list[str] = []
    while len(done) < len(models):
        ready = [n for n, m in models.items() if n not in done and all(d in done or d not in models for d in m.needs)]
        if not ready:
            raise ValueError(f"models need each other: {', '.join(n for n in models if n not in done)}")
        done += ready
    return done


def _empty(model: Model, query: str, k_max: int) -> pa.Table:
    """A query's table with no rows (none of its keys was popular)."""
    if model.queries[query].ranked:
        answers: Lists | np.ndarray = Lists(np.zeros((0, k_max), np.int64), np.zeros((0, k_max), np.float32))
        return model.part(query, [np.zeros(0, np.int64)], answers)
    return model.part(query, [np.zeros(0, np.int64) for _ in model.key_columns(query)], np.zeros(0))


def _trial(model: Model, query: str, columns: list[np.ndarray], k: int | None, n: int, seed: int) -> None:
    """The model answers a sample of its keys before all of them are mapped (a broken model stops the
    run with one line naming it, not a traceback from a partition)."""
    size = len(columns[0])
    rows = np.sort(np.random.default_rng(seed).choice(size, size=min(n, size), replace=False))
    try:
        out = model.answer(query, [c[rows] for c in columns], k)
    except HybridServeError:
        raise
    except Exception as exc:
        raise InputError(f"model {model.name}", query, f"answering a sample of {len(rows)} keys failed: "
                                                      f"{type(exc).__name__}: {exc}") from None
    if len(out) != len(rows):
        raise InputError(f"model {model.name}", query, f"answered {len(out)} values for {len(rows)} keys")


def precompute(staged: Staged, writer, plan: JobPlan, backend, settings: Settings
               ) -> tuple[dict[tuple[str, str], pa.Table], dict[str, dict[str, Any]]]:
    """Every model's keys, mapped over partitions by the backend, assembled into its folder.
    Returns each (model, query)'s table and, per model, what was chosen and stored."""
    models = staged_models(staged)
    k_max, size = settings["batch.k_max"], settings["batch.batch_size"]
    reports: dict[str, dict[str, Any]] = {}
    for name in _in_order(models):
        m = models[name]
        for query, q in m.queries.items():
            columns, report = m.keys(query, plan)
            if not columns:  # answered from other queries' answers (a session from similar lists)
                continue
            k = k_max if q.ranked else None
            if len(columns[0]):
                _trial(m, query, columns, k, settings["batch.validate_sample"], settings["train.seed"])
            parts = list(partitions(name, query, columns, size if q.ranked else size * PREDICTIONS_PER_RANKED, k))
            backend.map(precompute_part, staged, parts, desc=f"{name} {query}")
            table = writer.read_parts(name, query)
            table = _empty(m, query, k_max) if table is None else table
            out = reports.setdefault(name, {"selection": {}, "rows": {}})
            out["selection"].update(report)
            out["rows"][query] = m.assemble(query, table, writer.model_folder(name), k_max)["rows"]
            plan.precomputed(m, query, table)
            LOG.info("model %s %s: %d precomputed", name, query, table.num_rows)
    return plan.tables, reports


def _entries(trained: Trained, registered: dict[str, dict[str, Any]], k_max: int) -> dict[str, dict[str, Any]]:
    """The manifest entries of every model in the snapshot, the built-in two first."""
    spec = trained.rating.spec
    return {layout.RECOMMENDER: {"kind": "recommender", "version": trained.bundle.model_version, "k_max": k_max},
            layout.RATING: {"kind": "rating", "version": trained.rating.version,
                            "inputs": [i.describe() for i in spec.inputs], "schema_hash": spec.schema_hash(),
                            "table": layout.table_file("predictions")},
            **registered}


# --- the run ------------------------------------------------------------------------
def _keeps_served_models(store: Store, settings: Settings, force: bool) -> None:
    """Refuse, before any work, a run whose config does not register a model the live snapshot serves:
    publishing would drop it and the API would answer 404 for it (a run with the wrong config, or none).
    ``force`` publishes without them, as for a table losing most of its rows."""
    live = store.current_id()
    if live is None:
        return
    try:
        served = store.read_manifest(live).get("models") or {}
    except Exception:  # a damaged live manifest is the reloader's and verify's business, not this check's
        return
    registered = {spec.name for spec in settings.models}
    config = "the built-in defaults" if settings.source == DEFAULTS_SOURCE else settings.source
    dropped = sorted(n for n in served if n not in registered and n not in (layout.RECOMMENDER, layout.RATING))
    if not dropped:
        return
    msg = (f"the live snapshot {live} serves registered model{'s' if len(dropped) > 1 else ''} "
           f"{', '.join(dropped)}, which {config} does not register: publishing would drop "
           f"{'them' if len(dropped) > 1 else 'it'}")
    if force:
        LOG.warning("%s (--force: publishing without %s)", msg, ", ".join(dropped))
        return
    raise ValidationFailed(f"{msg}; run with the config that registers {'them' if len(dropped) > 1 else 'it'} "
                           f"(--config), or --force to drop {'them' if len(dropped) > 1 else 'it'}")


def run(settings: Settings, retrain: bool = False, force: bool = False, crash_at: str | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[str], None] | None = None) -> RunResult:
    """One whole batch run under the store lock. Raises HybridServeError subclasses on failure;
    a run record reaches the catalog whatever the outcome (a run that finds the lock taken leaves
    its record for the running one to add). ``should_stop`` is checked between stages and last
    before CURRENT moves: a stop request abandons the run with the live snapshot untouched."""
    store = Store(settings["paths.store"])
    try:
        lock = store.lock()
    except StoreLockedError as exc:
        started = now()
        try:
            catalog.record_pending(store, {"run_id": f"run-{started:%Y%m%d-%H%M%S-%f}", "status": "locked",
                                           "started_at": started.isoformat(), "ended_at": now().isoformat(),
                                           "error": str(exc), "retrained": False})
        except OSError as write_error:
            LOG.warning("record of the locked run not kept: %s: %s", write_error.filename, write_error.strerror)
        raise
    except StorageError as exc:  # the store unreachable or refusing: the catalog (a local file) records it
        started = now()
        catalog.record_run(store, {"run_id": f"run-{started:%Y%m%d-%H%M%S-%f}", "status": "failed",
                                   "started_at": started.isoformat(), "ended_at": now().isoformat(),
                                   "error": str(exc), "retrained": False})
        raise
    try:
        return _run_locked(store, settings, retrain, force, crash_at, now, should_stop, progress)
    finally:
        lock.release()


def _run_locked(store, settings, retrain, force, crash_at, now, should_stop, progress=None) -> RunResult:
    started = now()
    run_id = f"run-{started:%Y%m%d-%H%M%S-%f}"
    stages = _Stages(progress)
    record: dict[str, Any] = {"run_id": run_id, "started_at": started.isoformat(), "status": "failed",
                              "retrained": False}
    result = RunResult(run_id=run_id, status="failed")
    writer = staged = backend = None
    faiss.omp_set_num_threads(settings["batch.threads"] or os.cpu_count() or 1)
    k_max = settings["batch.k_max"]

    def checkpoint(stage: str) -> None:
        if should_stop():
            raise Abandoned(f"stop requested; abandoned before {stage}, CURRENT unchanged")

    try:
        store.ensure_layout()
        store.clean_temp()
        with stages("config"):  # before any work: a run with the wrong config, a registered model's mistake
            _keeps_served_models(store, settings, force)
            registered_models.check(settings.models)
        backend = make_backend(settings)  # before training: an unreachable cluster fails the run at once
        # Read once, damaged segments moved to requests/quarantine/ (this run holds the lock).
        request_log = log_files(store, quarantine=True)
        record["observed_hit_rate"] = observed_hit_rate(store, started, request_log)
        with stages("inputs"):
            inputs = load_inputs(Path(settings["paths.inputs"]), settings["train.rating_min"],
                                 settings["train.rating_max"])
        with stages("train"):
            trained = obtain_model(store, inputs, settings, retrain)
        bundle = trained.bundle
        record.update(model_version=bundle.model_version, retrained=trained.retrained)
        writer = store.begin(started, crash_at=crash_at)
        with stages("models"):  # every model staged in the new snapshot; a bad artifact or schema stops here
            writer.link_files(trained.folder / layout.RECOMMENDER, layout.RECOMMENDER, BUNDLE_FILES)
            writer.link_files(trained.folder / layout.RATING, layout.RATING, RATING_FILES)
            registered = registered_models.stage(writer.model_folder, settings.models)
            entries = _entries(trained, registered, k_max)
            staged = Staged(store.url, writer.id, entries)
            writer.send_written()  # on object storage the models go up while the keys are chosen and answered
            backend.prepare(writer)  # the workers load them from the store, wherever they run
        checkpoint("select")
        with stages("select"):
            log = popularity.read_request_counts(store, started, settings["batch.decay_half_life_hours"],
                                                 request_log)
            sel = popularity.select(inputs.interactions, log, bundle.item_ids, bundle.user_ids, settings)
            hint = popularity.historical_window_warning(sel.report["window"], started)
            if hint:
                LOG.warning("%s", hint)
            model_log = registered_models.read_model_log(store, started, settings["batch.decay_half_life_hours"],
                                                         request_log)
        checkpoint("precompute")
        with stages("precompute"):
            tables, reports = precompute(staged, writer, JobPlan(sel, model_log, settings), backend, settings)
            record["expected_hit_rate"] = sel.report["expected_hit_rate"]
        checkpoint("publish")
        with stages("publish"):
            writer.write_table("similar_items", tables[(layout.RECOMMENDER, "similar_items")])
            writer.write_table("user_recs", tables[(layout.RECOMMENDER, "user_recs")])
            writer.write_table("predictions", tables[(layout.RATING, "predict")])
            writer.write_table("items", items_table(inputs.items))
            snapshot_id = writer.id
            live = store.current_id()
            live_rows = store.read_manifest(live).get("row_counts") if live else None
            models_manifest = {}
            for name, entry in entries.items():
                if name == layout.RECOMMENDER:
                    continue
                done = reports.get(name, {"selection": {}, "rows": {}})
                models_manifest[name] = {**entry, "rows": done["rows"].get("predict", 0),
                                         **({"selection": done["selection"]} if done["selection"] else {})}
            recommender = {**entries[layout.RECOMMENDER], "rows": reports[layout.RECOMMENDER]["rows"]}
            manifest = {
                "created_at": started.isoformat(), "model_version": bundle.model_version,
                "inputs_fingerprint": inputs.fingerprint, "inputs": str(inputs.folder),
                "settings": settings.as_dict(), "evaluation": trained.evaluation, "popularity": sel.report,
                "k_max": k_max, "run_id": run_id, "retrained": trained.retrained,
                "observed_hit_rate_since_previous": record["observed_hit_rate"],
                "recommender": recommender, "models": models_manifest, "format_version": layout.FORMAT_VERSION,
                "request_log": request_log.summary(),
            }
            with stages("validate"):
                # On the complete, unpublished folder, with every model read back from disk.
                manifest["validation"] = validate(writer.tmp, manifest, tables, settings, live_rows,
                                                  writer.row_counts, force)
            checkpoint("CURRENT moves")  # the last point at which a stop leaves no trace
            manifest = writer.publish(manifest)
            writer = None
            # The snapshot is live: nothing after this may report the run as failed.
            record.update(status="published", snapshot_id=snapshot_id, row_counts=manifest["row_counts"])
            result = RunResult(run_id=run_id, status="published", snapshot_id=snapshot_id, manifest=manifest)
            for what, tidy in (("retention", lambda: store.apply_retention(settings["batch.keep"])),
                               ("model cache pruning", lambda: store.prune_trained(settings["batch.keep"]))):
                try:
                    tidy()
                except OSError as exc:
                    result.warnings.append(f"{what} not done: {exc.filename}: {exc.strerror}; the next run retries")
                    LOG.warning("%s", result.warnings[-1])
        return result
    except ValidationFailed as exc:
        record.update(status="refused", error=str(exc))
        raise
    except Abandoned as exc:
        record.update(status="abandoned", error=str(exc))
        raise
    except HybridServeError as exc:
        record["error"] = str(exc)
        raise
    except OSError as exc:
        record["error"] = describe_os_error(exc)
        raise
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if staged is not None:
            forget(staged)
        if backend is not None:
            backend.close()
        if writer is not None:
            writer.abort()
        record.update(ended_at=now().isoformat(), stage_seconds=stages.seconds)
        result.catalog_error = catalog.record_run(store, record)
        result.catalog_updated = result.catalog_error is None
