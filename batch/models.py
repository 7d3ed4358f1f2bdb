"""Registered models in the batch job: load and check each artifact, choose the inputs to precompute
(the whole grid when it fits, the most requested tuples from the request log, user candidates),
predict them with the model's own vectorised answer, store them, and check them before publish.

Keys and predictions come from serving.models, the code the API answers with.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.popularity import cover, decay_weight_sql
from serving.errors import InputError, ValidationFailed
from serving.models import MODELS_DIR, Served, read_table
from serving.models.base import (DTYPES, Input, ModelSpec, canonical_key, canonical_key_array, canonical_keys,
                                 columns_from_rows, rows_from_keys)
from serving.models.predictor import (RATING, RatingPredictor, SklearnPredictor, artifact_checksum, copy_artifact,
                                      load_estimator, load_predictor, mlflow_inputs, write_spec)
from serving.store import Store

LOG = logging.getLogger(__name__)

PA_TYPES = {"int": pa.int64(), "float": pa.float64(), "string": pa.string(), "bool": pa.bool_()}


@dataclass
class Prepared:
    """One registered model, loaded, checked and precomputed, ready to be written into a snapshot."""

    spec: ModelSpec            # version resolved; artifact = the source path
    predictor: SklearnPredictor
    checksum: str
    table: pa.Table
    report: dict[str, Any] = field(default_factory=dict)


# --- loading and checking --------------------------------------------------------------------
def resolve(spec: ModelSpec) -> tuple[ModelSpec, SklearnPredictor, str]:
    """Load the artifact and check the schema against it. InputError "file: field: problem" for a
    missing, truncated or untrusted artifact or a schema the model does not match."""
    path = Path(spec.artifact or "")
    if spec.format == "mlflow" and path.is_dir():
        signed = mlflow_inputs(spec, path)
        if not spec.inputs:
            if not signed:
                raise InputError(spec.source, spec.key("inputs"), f"none declared and {path} has no input signature")
            spec = replace(spec, inputs=signed)
        elif signed:
            declared = {i.name: i.type for i in spec.inputs}
            for s in signed:
                if declared.get(s.name, s.type) != s.type:
                    raise InputError(spec.source, spec.key(f"inputs.{s.name}.type"),
                                     f"{declared[s.name]} here, {s.type} in the MLflow signature of {path}")
    estimator = load_estimator(spec, path)
    checksum = artifact_checksum(spec, path)
    spec = replace(spec, version=spec.version or f"sha256:{checksum[:12]}")
    try:
        predictor = SklearnPredictor(spec, estimator)
    except ValueError as exc:
        raise InputError(spec.source, spec.key("class"), str(exc)) from None
    problems = predictor.schema_problems()
    if problems:
        key, problem = problems[0]
        raise InputError(spec.source, key, problem)
    return spec, predictor, checksum


def read_model_log(store: Store, now: datetime, half_life_hours: float = 0.0) -> dict[str, tuple[list, np.ndarray]]:
    """Request-log traffic per model: {model: (canonical keys, weights)}; answered requests only,
    older ones weighing less when a half-life is set."""
    if not store.requests_dir.is_dir() or not any(store.requests_dir.rglob("*.parquet")):
        return {}
    weight = decay_weight_sql(now, half_life_hours)
    con = duckdb.connect()
    try:
        frame = con.execute(
            f"SELECT model, input, sum({weight}) AS weight FROM read_parquet(?, union_by_name = true) "
            f"WHERE status < 400 AND model IS NOT NULL AND input IS NOT NULL GROUP BY ALL ORDER BY model, input",
            [store.requests_glob()]).df()
    except duckdb.BinderException:  # only segments from before the model columns existed
        return {}
    finally:
        con.close()
    return {str(m): (list(g["input"]), g["weight"].to_numpy(np.float64)) for m, g in frame.groupby("model")}


def read_candidates(spec: ModelSpec) -> list[tuple]:
    """The user's candidate inputs (Parquet, one column per input; optional ones may be absent)."""
    path = Path(spec.candidates or "")
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise InputError(path, spec.key("candidates"), "no such file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, spec.key("candidates"), f"not a Parquet file: {exc}") from None
    cols = []
    for inp in spec.inputs:
        if inp.name in table.column_names:
            cols.append(table.column(inp.name).to_pylist())
        elif inp.required:
            raise InputError(path, inp.name, f"missing column (the model's required input {inp.type})")
        else:
            cols.append([inp.default] * table.num_rows)
    unknown = [c for c in table.column_names if c not in spec.input_names]
    if unknown:
        raise InputError(path, unknown[0], f"not an input of model {spec.name!r} "
                                           f"(inputs: {', '.join(spec.input_names)})")
    rows = []
    for j, row in enumerate(zip(*cols)):
        try:
            rows.append(spec.cast_row(row))
        except ValueError as exc:
            bad = next(i.name for i, v in zip(spec.inputs, row) if _fails(i, v))
            raise InputError(path, bad, f"row {j}: {exc}") from None
    return rows


def _fails(inp: Input, value: Any) -> bool:
    try:
        inp.cast(value)
    except ValueError:
        return True
    return False


# --- choosing what to precompute ----------------------------------------------------------------
def choose(spec: ModelSpec, log: tuple[list, np.ndarray] | None, coverage: float
           ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The inputs to precompute, one column per input: the full grid when it fits grid_max_rows,
    plus the user's candidates, plus the most requested tuples from the request log until the
    logged traffic is covered to ``coverage`` (at most max_log_rows)."""
    report: dict[str, Any] = {}
    size = spec.grid_size()
    grid_cols: list[np.ndarray] = []
    keys: set[str] = set()
    has_log = log is not None and len(log[0]) > 0
    if size is not None and size <= spec.grid_max_rows:
        grid_cols = spec.grid()
        if spec.candidates or has_log:  # the grid's keys are needed only to leave its rows out of the rest
            keys = set(canonical_keys(grid_cols)) if grid_cols else set()
        report["grid_rows"] = size
    else:
        report["grid_rows"] = 0
        report["grid"] = (f"{size:,} rows, over grid_max_rows" if size is not None
                          else "an input without a finite domain: no grid")
    extra: list[tuple] = []
    if spec.candidates:
        cands = read_candidates(spec)
        for row in cands:
            k = canonical_key(row)
            if k not in keys:
                keys.add(k)
                extra.append(row)
        report["candidates"] = len(cands)
    logged = 0
    if has_log:
        rows, skipped = rows_from_keys(spec, log[0])
        ok = [canonical_key(r) for r in rows]
        weight = dict(zip(log[0], log[1]))
        w = np.array([weight[k] for k in ok], dtype=np.float64)
        covered = np.array([k in keys for k in ok], dtype=bool)
        total = float(w.sum())
        # the share still to cover once the grid and candidates are counted
        need = coverage - (float(w[covered].sum()) / total if total else 0.0)
        rest = np.flatnonzero(~covered)
        if need > 0 and len(rest):
            chosen, _ = cover(rest, w[rest], need * total / float(w[rest].sum()), spec.max_log_rows)
            for i in chosen:
                extra.append(rows[i])
                keys.add(ok[i])
            logged = len(chosen)
        in_set = np.array([k in keys for k in ok], dtype=bool)
        report.update(log_distinct=len(ok), log_skipped=skipped,
                      log_hit_rate=float(w[in_set].sum() / total) if total else 0.0)
    report["from_log"] = logged
    if not grid_cols and not extra:
        if size is None:
            open_inputs = [i.name for i in spec.inputs if i.domain() is None]
            why = (f"input {open_inputs[0]!r} has no finite domain (give values, or min and max for an int), "
                   "so there is no grid")
        else:
            why = f"the grid of the inputs' domains has {size:,} rows, over grid_max_rows = {spec.grid_max_rows:,}"
        raise InputError(spec.source, spec.key("grid_max_rows"),
                         f"{why}, and the request log has no requests for model {spec.name!r} to choose from "
                         "(raise grid_max_rows, narrow the inputs, or give candidates)")
    cols = grid_cols
    if extra:
        more = columns_from_rows(spec, extra)
        cols = [np.concatenate([g, m]) if g.dtype == m.dtype else np.concatenate([g.astype(object), m.astype(object)])
                for g, m in zip(grid_cols, more)] if grid_cols else more
    report["rows"] = int(len(cols[0])) if cols else 0
    return cols, report


# --- precompute ----------------------------------------------------------------------------
def precompute(predictor, columns: list[np.ndarray], batch_size: int = 65_536) -> pa.Table:
    """Predict every row with the model's vectorised answer, in batches: one column per input, the
    canonical ``input`` key, the prediction and the model version."""
    spec = predictor.spec
    n = len(columns[0]) if columns else 0
    parts = []
    for start in range(0, n, batch_size):
        parts.append(predictor.answer([c[start:start + batch_size] for c in columns]))
    pred = np.concatenate(parts) if parts else np.zeros(0)
    arrays = {inp.name: _arrow(inp, col) for inp, col in zip(spec.inputs, columns)}
    arrays["input"] = canonical_key_array(columns) if columns else pa.array([], pa.string())
    arrays["prediction"] = (pa.array(pred.astype(np.float64), pa.float64()) if pred.dtype.kind in "biuf"
                            else pa.array([None if v is None else str(v) for v in pred], pa.string()))
    arrays["model_version"] = pa.array([predictor.version] * n, pa.string())
    return pa.table(arrays)


def _arrow(inp: Input, col: np.ndarray) -> pa.Array:
    if col.dtype == object:
        return pa.array(col.tolist(), PA_TYPES[inp.type])
    return pa.array(col, PA_TYPES[inp.type])


def prepare(settings, store: Store, now: datetime) -> list[Prepared]:
    """Every registered model loaded, checked, its inputs chosen and predicted."""
    if not settings.models:
        return []
    log = read_model_log(store, now, settings["batch.decay_half_life_hours"])
    out = []
    for raw in settings.models:
        spec, predictor, checksum = resolve(raw)
        cols, report = choose(spec, log.get(spec.name), settings["batch.coverage"])
        _sample_predict(predictor, cols, settings["batch.validate_sample"], settings["train.seed"])
        table = precompute(predictor, cols)
        LOG.info("model %s %s: %d rows precomputed (%s)", spec.name, spec.version, table.num_rows, report)
        out.append(Prepared(spec, predictor, checksum, table, report))
    return out


def _sample_predict(predictor, cols: list[np.ndarray], n: int, seed: int) -> None:
    """The model's predict must run on a sample of the rows before the whole set is predicted."""
    spec = predictor.spec
    size = len(cols[0]) if cols else 0
    rows = np.sort(np.random.default_rng(seed).choice(size, size=min(n, size), replace=False))
    try:
        out = predictor.answer([c[rows] for c in cols])
    except Exception as exc:
        raise InputError(spec.artifact, spec.key("artifact"), f"predict failed on a sample of {len(rows)} rows: "
                                                              f"{type(exc).__name__}: {exc}") from None
    if len(out) != len(rows):
        raise InputError(spec.artifact, spec.key("output"), f"predict returned {len(out)} values for {len(rows)} rows")


# --- into the snapshot -----------------------------------------------------------------------
def write(folder: Path, prepared: list[Prepared], bundle, rating_rows: int) -> dict[str, Any]:
    """Write each model under ``models/<name>/`` of an unpublished snapshot folder (artifact copy,
    spec.json, predictions.parquet); returns the manifest's ``models`` entry (the built-in rating
    model included)."""
    rating = RatingPredictor(bundle).spec
    out: dict[str, Any] = {RATING: {"kind": "rating", "version": bundle.model_version,
                                    "inputs": [i.describe() for i in rating.inputs],
                                    "schema_hash": rating.schema_hash(), "table": "predictions.parquet",
                                    "rows": rating_rows}}
    for p in prepared:
        target = Path(folder) / MODELS_DIR / p.spec.name
        target.mkdir(parents=True)
        spec = copy_artifact(p.spec, Path(p.spec.artifact or ""), target)
        write_spec(target, spec)
        pq.write_table(p.table, target / "predictions.parquet", compression="zstd")
        out[p.spec.name] = {"kind": "sklearn", "version": p.spec.version, "format": p.spec.format,
                            "artifact": str(p.spec.artifact), "artifact_sha256": p.checksum,
                            "schema_hash": p.spec.schema_hash(), "inputs": [i.describe() for i in p.spec.inputs],
                            "output": p.spec.output, "class": p.spec.output_class, "max_age_s": p.spec.max_age_s,
                            "rows": p.table.num_rows, "selection": p.report}
    return out


def validate(folder: Path, prepared: list[Prepared], n: int, seed: int) -> dict[str, Any]:
    """Each model loaded back from the unpublished folder, as the API will load it; a sample of its
    stored predictions recomputed one row at a time through the live path must match. Raises
    ValidationFailed; returns per-model mismatch counts."""
    results, problems = {}, []
    rng = np.random.default_rng(seed)
    for p in prepared:
        target = Path(folder) / MODELS_DIR / p.spec.name
        served = Served(load_predictor(target), read_table(target, p.spec))
        t = p.table
        rows = np.sort(rng.choice(t.num_rows, size=min(n, t.num_rows), replace=False))
        keys = t.column("input").take(pa.array(rows)).to_pylist()
        stored = t.column("prediction").take(pa.array(rows)).to_pylist()
        bad = 0
        for key, want in zip(keys, stored):
            values = p.spec.cast_row(json.loads(key))
            got = served.answer_one(values)
            same = (np.isclose(got, want, rtol=1e-6, atol=1e-9) if isinstance(want, float) else got == want)
            bad += int(not same or served.lookup(key, values) != want)
        results[p.spec.name] = {"checked": int(len(rows)), "mismatches": bad}
        if bad:
            problems.append(f"model {p.spec.name}: {bad}/{len(rows)} predictions differ when recomputed live")
    if problems:
        raise ValidationFailed("validation refused the snapshot: " + "; ".join(problems))
    return results


# --- catalog ---------------------------------------------------------------------------------
def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def table_glob(store: Store, name: str) -> str:
    return str(store.snapshots_dir.resolve() / "*" / MODELS_DIR / name / "predictions.parquet")


def catalog_views(store: Store, manifests: dict[str, dict]) -> list[tuple[str, str]]:
    """(view name, SELECT) for every model: ``predictions_<name>`` over the current snapshot,
    ``all_predictions_<name>`` over every retained one (with a ``snapshot`` column)."""
    current = store.current_id()
    views = []
    names = sorted({n for m in manifests.values() for n in (m.get("models") or {}) if n != RATING})
    for name in names:
        views.append((f"all_predictions_{name}",
                      f"SELECT regexp_extract(filename, '/snapshots/([^/]+)/', 1) AS snapshot, * EXCLUDE (filename) "
                      f"FROM read_parquet({_sql_str(table_glob(store, name))}, filename = true, union_by_name = true)"))
    for name in (manifests.get(current, {}).get("models") or {}) if current else ():
        path = (store.snapshot_dir(current) / "predictions.parquet" if name == RATING
                else store.snapshot_dir(current) / MODELS_DIR / name / "predictions.parquet")
        views.append((f"predictions_{name}", f"SELECT * FROM read_parquet({_sql_str(str(path.resolve()))})"))
    return views


__all__ = ["Prepared", "prepare", "write", "validate", "choose", "precompute", "resolve", "read_model_log",
           "catalog_views", "DTYPES"]
