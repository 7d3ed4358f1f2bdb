"""The batch job: load inputs -> train (or reuse) -> select -> precompute -> validate -> publish.

Every answer is computed by serving.model, the same functions the API calls live.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from batch import catalog, popularity
from batch import models as registered_models
from batch.embeddings import Vectors, ids_path, load_vectors
from batch.inputs import Inputs, fingerprint_files, load_inputs
from batch.evaluate import train_and_evaluate
from batch.train import training_key
from serving.errors import Abandoned, HybridServeError, StoreLockedError, ValidationFailed
from serving.model import ModelBundle
from serving.snapshot import serving_arrays
from serving.settings import Settings
from serving.store import Store, describe_os_error, naming

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


class _Stages:
    """Seconds spent per stage, for the runs table."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        LOG.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)


# --- model --------------------------------------------------------------------------
def obtain_model(store: Store, inputs: Inputs, settings: Settings, retrain: bool = False
                 ) -> tuple[ModelBundle, Path, dict[str, Any], bool]:
    """The trained bundle for these inputs and settings: reused from the store's model cache
    when the training key matches, else trained. Returns (bundle, folder, evaluation, trained)."""
    supplied = supplied_vectors(inputs, settings)
    key = training_key(inputs.fingerprint + vectors_fingerprint(supplied), settings)
    folder = store.models_dir / key
    live = store.current_id()
    if not retrain and not folder.is_dir() and live is not None:
        # The cache was pruned, but the live snapshot may carry this very model.
        try:
            live_model = store.model_dir(live)
            if ModelBundle.read_meta(live_model).get("training_key") == key:
                folder = live_model
        except (OSError, ValueError):
            pass
    if folder.is_dir() and not retrain:
        LOG.info("inputs unchanged: reusing model %s", key)
        bundle = ModelBundle.load(folder)
        return bundle, folder, bundle.meta.get("evaluation", {}), False
    folder = store.models_dir / key
    bundle, evaluation = train_and_evaluate(inputs.interactions, inputs.items, settings, supplied)
    bundle.meta.update(model_version=f"{key}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}", training_key=key,
                       inputs_fingerprint=inputs.fingerprint, evaluation=evaluation)
    tmp = store.models_dir / f".tmp-{key}-{uuid.uuid4().hex[:6]}"
    try:
        with naming(tmp):
            bundle.save(tmp)
    except RuntimeError as exc:  # FAISS reports a failed write as a RuntimeError
        raise _faiss_os_error(exc) or exc
    if folder.exists():  # --retrain: replace the cached bundle (snapshots hold hard links, not this folder)
        trash = store.models_dir / f".trash-{key}-{uuid.uuid4().hex[:6]}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, folder)
    return bundle, folder, evaluation, True


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


def prune_models(store: Store, keep: int) -> list[str]:
    """Keep the newest ``keep`` cached models (snapshots hold their own hard links, so none breaks)."""
    if not store.models_dir.is_dir():
        return []
    folders = sorted((p for p in store.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for p in folders[keep:]:
        trash = store.models_dir / f".trash-{p.name}-{uuid.uuid4().hex[:6]}"
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p.name)
    return removed


def observed_hit_rate(store: Store, until: datetime) -> float | None:
    """Share of lookups answered from the snapshot since the previous published run (None if no traffic)."""
    import duckdb
    previous = store.current_id()
    if previous is None or not store.requests_dir.is_dir():
        return None
    since = store.read_manifest(previous).get("created_at")
    con = duckdb.connect()
    try:
        hits, total = con.execute(
            "SELECT count(*) FILTER (WHERE source = 'precomputed'), count(*) FROM read_parquet(?, union_by_name = true) "
            "WHERE status < 400 AND endpoint IN ('similar_items', 'user_recs', 'prediction', 'session') "
            "AND ts >= CAST(? AS TIMESTAMPTZ) AND ts < CAST(? AS TIMESTAMPTZ)",
            [store.requests_glob(), since, until.isoformat()]).fetchall()[0]
    finally:
        con.close()
    return hits / total if total else None


# --- precompute ---------------------------------------------------------------------
def _batched(n: int, size: int, desc: str) -> Iterator[slice]:
    for start in tqdm(range(0, n, size), desc=desc, unit="batch", disable=None, leave=False):
        yield slice(start, min(n, start + size))


def list_table(key_name: str, keys: np.ndarray, ids_name: str, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """(n,) keys and (n, k) ids/scores padded with -1 -> a table with list columns (padding dropped)."""
    valid = ids >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
    return pa.table({key_name: pa.array(keys, pa.int64()),
                     ids_name: pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[valid], pa.int64())),
                     "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[valid], pa.float32()))})


def precompute_similar(bundle: ModelBundle, item_ids: np.ndarray, k: int, batch_size: int
                       ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Top-k neighbours of each item: (table, ids (n, k), scores (n, k))."""
    iidx = bundle.item_index(item_ids)
    ids = np.full((len(iidx), k), -1, dtype=np.int64)
    scores = np.full((len(iidx), k), np.nan, dtype=np.float32)
    for sl in _batched(len(iidx), batch_size, "similar items"):
        ids[sl], scores[sl] = bundle.similar_items(iidx[sl], k)
    return list_table("item_id", item_ids, "neighbor_ids", ids, scores), ids, scores


def precompute_recs(bundle: ModelBundle, user_ids: np.ndarray, k: int, batch_size: int
                    ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Recommendations for each user: (table, ids (n, k), scores (n, k))."""
    uidx = bundle.user_index(user_ids)
    ids = np.full((len(uidx), k), -1, dtype=np.int64)
    scores = np.full((len(uidx), k), np.nan, dtype=np.float32)
    for sl in _batched(len(uidx), batch_size, "user recommendations"):
        ids[sl], scores[sl] = bundle.recommend(uidx[sl], k)
    return list_table("user_id", user_ids, "item_ids", ids, scores), ids, scores


def precompute_predictions(bundle: ModelBundle, pairs: pd.DataFrame, batch_size: int) -> pa.Table:
    uidx = bundle.user_index(pairs["user_id"].to_numpy())
    iidx = bundle.item_index(pairs["item_id"].to_numpy())
    pred = np.empty(len(pairs), dtype=np.float32)
    for sl in _batched(len(pairs), batch_size * 16, "predictions"):
        pred[sl] = bundle.predict(uidx[sl], iidx[sl])
    return pa.table({"user_id": pa.array(pairs["user_id"].to_numpy(), pa.int64()),
                     "item_id": pa.array(pairs["item_id"].to_numpy(), pa.int64()),
                     "prediction": pa.array(pred, pa.float32())})


def pairs_from_recs(user_ids: np.ndarray, rec_ids: np.ndarray, per_user: int, cap: int) -> pd.DataFrame:
    """Before any request log: each popular user against their own top recommended items."""
    top = rec_ids[:, :per_user]
    users = np.repeat(user_ids, top.shape[1])
    items = top.ravel()
    ok = items >= 0
    frame = pd.DataFrame({"user_id": users[ok], "item_id": items[ok]}).iloc[:cap]
    return frame.sort_values(["user_id", "item_id"], ignore_index=True)


def items_table(items: pd.DataFrame) -> pa.Table:
    return pa.table({"item_id": pa.array(items["item_id"].to_numpy(), pa.int64()),
                     "title": pa.array(items["title"].tolist(), pa.string()),
                     "genres": pa.array([list(g) for g in items["genres"]], pa.list_(pa.string()))})


# --- validation ---------------------------------------------------------------------
def validate(model_folder: Path, tables: dict[str, pa.Table], settings: Settings, live_rows: dict[str, int] | None,
             force: bool) -> dict[str, Any]:
    """Checks on the unpublished snapshot, with the bundle loaded back from its folder.

    - a sample of precomputed answers recomputed live must match;
    - ANN recall@10 against exact search on a sample of items must reach batch.min_recall;
    - row counts must not fall by more than batch.max_row_drop from the live snapshot (unless force).
    Raises ValidationFailed; returns the results for the manifest.
    """
    bundle = ModelBundle.load(model_folder)
    rng = np.random.default_rng(settings["train.seed"])
    n = settings["batch.validate_sample"]
    k_max = settings["batch.k_max"]
    out: dict[str, Any] = {}
    problems = []

    def sample(table):
        return np.sort(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False))

    lists = (("similar_items", "item_id", "neighbor_ids", bundle.item_index, bundle.similar_items, "similar-item"),
             ("user_recs", "user_id", "item_ids", bundle.user_index, bundle.recommend, "user recommendation"))
    for name, key, column, index, query, label in lists:
        table = tables[name]
        rows = sample(table)
        if not len(rows):
            continue
        ids, _ = query(index(table.column(key).to_numpy()[rows]), k_max)
        want = table.column(column).take(pa.array(rows)).to_pylist()
        bad = sum(got[got >= 0].tolist() != w for got, w in zip(ids, want))
        out[f"{name}_mismatches"] = int(bad)
        if bad:
            problems.append(f"{bad}/{len(rows)} {label} lists differ when recomputed live")
    preds = tables["predictions"]
    rows = sample(preds)
    if len(rows):
        u = preds.column("user_id").to_numpy()[rows]
        i = preds.column("item_id").to_numpy()[rows]
        got = bundle.predict(bundle.user_index(u), bundle.item_index(i))
        bad = int((~np.isclose(got, preds.column("prediction").to_numpy()[rows], rtol=1e-5, atol=1e-5)).sum())
        out["prediction_mismatches"] = bad
        if bad:
            problems.append(f"{bad}/{len(rows)} predictions differ when recomputed live")

    out["ann_recall_at_10"] = ann_recall(bundle, rng.choice(bundle.n_items, size=min(n, bundle.n_items),
                                                           replace=False), 10)
    if out["ann_recall_at_10"] < settings["batch.min_recall"]:
        problems.append(f"ANN recall@10 {out['ann_recall_at_10']:.3f} < batch.min_recall "
                        f"{settings['batch.min_recall']}")
    if live_rows:
        for table, before in live_rows.items():
            after = tables[table].num_rows if table in tables else 0
            if before and after < before * (1 - settings["batch.max_row_drop"]):
                msg = f"{table} rows fell from {before} to {after} (more than batch.max_row_drop)"
                if force:
                    out.setdefault("forced", []).append(msg)
                else:
                    problems.append(msg + "; --force publishes anyway")
    out["passed"] = not problems
    out["problems"] = problems
    if problems:
        raise ValidationFailed("validation refused the snapshot: " + "; ".join(problems))
    return out


def ann_recall(bundle: ModelBundle, iidx: np.ndarray, k: int) -> float:
    """Recall@k of the bundle's index against exact inner-product search over the same (one per tie
    group) vectors, for the given query items. An answer counts as found when its exact score
    reaches the exact k-th score: among tied scores (every candidate of a zero-vector item, an
    item without interactions) which ids exact search keeps is arbitrary, and counting ids read
    HNSW's 0.995 as 0.885 on the 100K-item benchmark."""
    q = np.ascontiguousarray(bundle.item_vecs[np.asarray(iidx)])
    groups = bundle.group_vecs()
    k = min(k, len(groups))
    if len(q) == 0 or k == 0:
        return 1.0
    _, approx = bundle.search_groups(q, k)
    exact, _ = faiss.knn(q, groups, k, faiss.METRIC_INNER_PRODUCT)
    approx = np.asarray(approx, np.int64)
    got = np.einsum("nd,nkd->nk", q.astype(np.float64), groups[np.maximum(approx, 0)])
    got[approx < 0] = -np.inf
    # float32 rounding of a score is relative to |q| |g|, not to the score (which may cancel to ~0)
    tol = 1e-5 * np.linalg.norm(q, axis=1, keepdims=True) * np.sqrt(np.einsum("ij,ij->i", groups, groups).max())
    return float((got >= exact[:, -1:] - tol).sum() / exact.size)


# --- the run ------------------------------------------------------------------------
def run(settings: Settings, retrain: bool = False, force: bool = False, crash_at: str | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        should_stop: Callable[[], bool] = lambda: False) -> RunResult:
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
    try:
        return _run_locked(store, settings, retrain, force, crash_at, now, should_stop)
    finally:
        lock.release()


def _run_locked(store, settings, retrain, force, crash_at, now, should_stop) -> RunResult:
    started = now()
    run_id = f"run-{started:%Y%m%d-%H%M%S-%f}"
    stages = _Stages()
    record: dict[str, Any] = {"run_id": run_id, "started_at": started.isoformat(), "status": "failed",
                              "retrained": False}
    result = RunResult(run_id=run_id, status="failed")
    writer = None
    threads = settings["batch.threads"] or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    def checkpoint(stage: str) -> None:
        if should_stop():
            raise Abandoned(f"stop requested; abandoned before {stage}, CURRENT unchanged")

    try:
        store.ensure_layout()
        store.clean_temp()
        record["observed_hit_rate"] = observed_hit_rate(store, started)
        with stages("inputs"):
            inputs = load_inputs(Path(settings["paths.inputs"]), settings["train.rating_min"],
                                 settings["train.rating_max"])
        with stages("train"):
            bundle, model_folder, evaluation, trained = obtain_model(store, inputs, settings, retrain)
        record.update(model_version=bundle.model_version, retrained=trained)
        with stages("models"):  # registered models: a bad artifact or schema stops the run here
            prepared = registered_models.prepare(settings, store, started)
        checkpoint("select")
        with stages("select"):
            log = popularity.read_request_counts(store, started, settings["batch.decay_half_life_hours"])
            sel = popularity.select(inputs.interactions, log, bundle.item_ids, bundle.user_ids, settings)
            hint = popularity.historical_window_warning(sel.report["window"], started)
            if hint:
                LOG.warning("%s", hint)
        k_max, bs = settings["batch.k_max"], settings["batch.batch_size"]
        checkpoint("precompute")
        with stages("precompute"):
            tables = {}
            tables["similar_items"], sim_ids, sim_scores = precompute_similar(bundle, sel.items, k_max, bs)
            tables["user_recs"], rec_ids, rec_scores = precompute_recs(bundle, sel.users, k_max, bs)
            # The pairs a frontend is likely to show (each user's top recs) plus those actually asked for.
            pairs = pairs_from_recs(sel.users, rec_ids, settings["batch.pairs_per_user"], settings["batch.max_pairs"])
            sel.add_pairs(pairs)
            if sel.pairs is not None:
                pairs = (pd.concat([sel.pairs, pairs]).drop_duplicates().iloc[:settings["batch.max_pairs"]]
                         .sort_values(["user_id", "item_id"], ignore_index=True))
            tables["predictions"] = precompute_predictions(bundle, pairs, bs)
            record["expected_hit_rate"] = sel.report["expected_hit_rate"]
            tables["items"] = items_table(inputs.items)
            preds = tables["predictions"]
            arrays = serving_arrays(bundle, sel.items, sim_ids, sim_scores, sel.users, rec_ids, rec_scores,
                                    preds.column("user_id").to_numpy(), preds.column("item_id").to_numpy(),
                                    preds.column("prediction").to_numpy())
        checkpoint("publish")
        with stages("publish"):
            writer = store.begin(started, crash_at=crash_at)
            snapshot_id = writer.id
            for name, table in tables.items():
                writer.write_table(name, table)
            writer.write_arrays(arrays)
            writer.link_model(model_folder)
            models_manifest = registered_models.write(writer.tmp, prepared, bundle, tables["predictions"].num_rows)
            live = store.current_id()
            live_rows = store.read_manifest(live).get("row_counts") if live else None
            manifest = {
                "created_at": started.isoformat(), "model_version": bundle.model_version,
                "inputs_fingerprint": inputs.fingerprint, "inputs": str(inputs.folder),
                "settings": settings.as_dict(), "evaluation": evaluation, "popularity": sel.report,
                "k_max": k_max, "run_id": run_id, "retrained": trained,
                "observed_hit_rate_since_previous": record["observed_hit_rate"], "models": models_manifest,
            }
            with stages("validate"):
                # On the complete, unpublished folder, with the bundle read back from disk.
                manifest["validation"] = validate(writer.model_dir, tables, settings, live_rows, force)
                manifest["validation"]["models"] = registered_models.validate(
                    writer.tmp, prepared, settings["batch.validate_sample"], settings["train.seed"])
            checkpoint("CURRENT moves")  # the last point at which a stop leaves no trace
            manifest = writer.publish(manifest)
            writer = None
            # The snapshot is live: nothing after this may report the run as failed.
            record.update(status="published", snapshot_id=snapshot_id, row_counts=manifest["row_counts"])
            result = RunResult(run_id=run_id, status="published", snapshot_id=snapshot_id, manifest=manifest)
            for what, tidy in (("retention", lambda: store.apply_retention(settings["batch.keep"])),
                               ("model cache pruning", lambda: prune_models(store, settings["batch.keep"]))):
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
        if writer is not None:
            writer.abort()
        record.update(ended_at=now().isoformat(), stage_seconds=stages.seconds)
        result.catalog_error = catalog.record_run(store, record)
        result.catalog_updated = result.catalog_error is None

