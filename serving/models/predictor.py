"""The scikit-learn model kind: any estimator with a declared input schema (``[models.<name>]``).

It answers with one vectorised call over columns in schema order; the batch job calls it with the
whole grid, the API with one row. What it precomputes: the grid of its inputs' finite domains when it
fits, the user's candidate inputs and the inputs most asked for in the request log.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import threading
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import pyarrow as pa
import pyarrow.parquet as pq

from serving.errors import InputError
from serving.models.base import (INT64_MAX, INT64_MIN, Input, Model, ModelSpec, Plan, Query, canonical_key,
                                 canonical_key_array, canonical_keys, columns_from_rows, plain, rows_from_keys)
from serving.store import sha256_file

LOG = logging.getLogger(__name__)

MLMODEL = "MLmodel"
# One-row frames are reused only where pandas copies on write (always from pandas 3; an option in 2.x):
# the estimator gets a shallow copy, so nothing it does to its input reaches the reused frame.
_COPY_ON_WRITE = int(pd.__version__.split(".")[0]) >= 3 or pd.get_option("mode.copy_on_write") is True
_ROW_FRAMES_PER_THREAD = 256
# the canonical values' types: a value of one of them sets a kept column without changing its dtype
_KEPT_TYPES = frozenset((str, int, float, bool))
# MLflow column types -> ours (mlflow.types.DataType names)
_MLFLOW_TYPES = {"long": "int", "integer": "int", "double": "float", "float": "float", "string": "string",
                 "boolean": "bool"}


# --- artifacts ----------------------------------------------------------------------------
def artifact_file(spec: ModelSpec, path: Path) -> Path:
    """The file holding the estimator (for MLflow, the pickled model the MLmodel file names)."""
    if spec.format != "mlflow":
        return path
    return path / _mlflow_flavor(spec, path)["pickled_model"]


def _mlflow_meta(spec: ModelSpec, path: Path) -> dict[str, Any]:
    import yaml
    mlmodel = path / MLMODEL
    if not mlmodel.is_file():
        raise InputError(path, spec.key("artifact"), f"not an MLflow model folder (no {MLMODEL} file)")
    try:
        meta = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(mlmodel, spec.key("artifact"), f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise InputError(mlmodel, spec.key("artifact"), "not an MLmodel file")
    return meta


def _mlflow_flavor(spec: ModelSpec, path: Path) -> dict[str, Any]:
    flavor = (_mlflow_meta(spec, path).get("flavors") or {}).get("sklearn")
    if not isinstance(flavor, dict) or not isinstance(flavor.get("pickled_model"), str):
        raise InputError(path / MLMODEL, spec.key("artifact"), "has no sklearn flavor with a pickled_model")
    return flavor


def mlflow_inputs(spec: ModelSpec, path: Path) -> tuple[Input, ...] | None:
    """The input signature of an MLflow model folder, as inputs (None when it has none)."""
    mlmodel = path / MLMODEL
    raw = (_mlflow_meta(spec, path).get("signature") or {}).get("inputs")
    if raw is None:
        return None
    try:
        cols = json.loads(raw) if isinstance(raw, str) else raw
        out = []
        for c in cols:
            t = _MLFLOW_TYPES.get(c.get("type"))
            if t is None or not isinstance(c.get("name"), str):
                raise InputError(mlmodel, "signature.inputs",
                                 f"column {c.get('name')!r}: type {c.get('type')!r} is not one of "
                                 f"{', '.join(sorted(_MLFLOW_TYPES))} (a column-based signature is needed)")
            out.append(Input(c["name"], t, required=bool(c.get("required", True))))
    except (TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise InputError(mlmodel, "signature.inputs", f"not a column signature: {exc}") from None
    return tuple(out)


def load_estimator(spec: ModelSpec, path: Path) -> Any:
    """Load the estimator at ``path`` as ``spec.format`` says; InputError naming the file and the
    config key for a missing, truncated or untrusted artifact."""
    path = Path(path)
    where = spec.key("artifact")
    if not path.exists():
        raise InputError(path, where, "no such file or folder")
    fmt = spec.format
    if fmt == "mlflow":
        check_folder(spec, path)
        flavor = _mlflow_flavor(spec, path)
        fmt = "skops" if flavor.get("serialization_format") == "skops" else "pickle"
        inside = path.resolve()
        path = path / flavor["pickled_model"]
        if not path.resolve().is_relative_to(inside):
            raise InputError(path, where, "the pickled model the MLmodel file names is outside the model folder")
        if not path.is_file():
            raise InputError(path, where, "the pickled model the MLmodel file names is missing")
    if fmt == "skops":
        return _load_skops(spec, path)
    if not spec.trusted:  # parse_models refuses this already; a spec read back from a snapshot is checked too
        raise InputError(path, spec.key("trusted"), f"format {spec.format!r} needs trusted = true")
    try:
        if fmt == "pickle":
            with open(path, "rb") as fh:
                return pickle.load(fh)
        import joblib
        return joblib.load(path)
    except Exception as exc:  # a truncated or foreign file raises anything from EOFError to KeyError
        raise InputError(path, where, f"truncated or not a {fmt} file ({type(exc).__name__}: {exc})") from None


def _load_skops(spec: ModelSpec, path: Path) -> Any:
    import skops.io as sio
    try:
        types = sio.get_untrusted_types(file=path)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise InputError(path, spec.key("artifact"), f"truncated or not a skops file ({type(exc).__name__}: "
                                                     f"{exc})") from None
    untrusted = [t for t in types if t not in spec.trusted_types]
    if untrusted and not spec.trusted:
        raise InputError(path, spec.key("trusted_types"),
                         f"the artifact holds types skops does not trust by default: {', '.join(untrusted)}; "
                         "list them in trusted_types if you trust this file")
    try:
        return sio.load(path, trusted=types)
    except Exception as exc:
        raise InputError(path, spec.key("artifact"), f"does not load ({type(exc).__name__}: {exc})") from None


# --- scikit-learn estimators ---------------------------------------------------------------
class SklearnPredictor:
    """A scikit-learn estimator behind a declared schema; ``answer`` is ``predict`` or the
    ``predict_proba`` column of one class."""

    kind = "sklearn"

    def __init__(self, spec: ModelSpec, estimator: Any):
        self.spec, self.estimator = spec, estimator
        self.version = spec.version or ""
        names = getattr(estimator, "feature_names_in_", None)
        self.feature_names = None if names is None else [str(n) for n in names]
        # schema position of each of the estimator's columns, in the estimator's order
        self._order = (list(range(len(spec.inputs))) if self.feature_names is None
                       else [spec.input_names.index(n) for n in self.feature_names if n in spec.input_names])
        self._class_pos = None
        if spec.output == "predict_proba":
            classes = list(getattr(estimator, "classes_", []))
            if spec.output_class not in classes:
                raise ValueError(f"class {spec.output_class!r} is not one of the model's classes {classes}")
            self._class_pos = classes.index(spec.output_class)
        # one-row frames: the string columns' values pick a reused frame, the other columns are set in it;
        # when the few values of the finite non-string inputs fit in a thread's frames too, they pick it as well
        if self.feature_names is not None:
            sizes = [_few_values(spec.inputs[j]) for j in self._order]
            strings = [spec.inputs[j].type == "string" for j in self._order]
            product = int(np.prod([n for n, is_str in zip(sizes, strings) if not is_str and n]))
            keyed = [is_str or (n is not None and product <= _ROW_FRAMES_PER_THREAD)
                     for n, is_str in zip(sizes, strings)]
            self._row_key = [j for j, is_key in zip(self._order, keyed) if is_key]
            self._row_set = [(k, j) for k, (j, is_key) in enumerate(zip(self._order, keyed)) if not is_key]
        self._local = threading.local()

    def schema_problems(self) -> list[tuple[str, str]]:
        """(config key, problem) for each way the schema and the estimator disagree."""
        spec, est = self.spec, self.estimator
        problems = []
        method = "predict_proba" if spec.output == "predict_proba" else "predict"
        if not callable(getattr(est, method, None)):
            problems.append((spec.key("output"), f"the model has no {method} method"))
        if self.feature_names is not None:
            for inp in spec.inputs:
                if inp.name not in self.feature_names:
                    problems.append((spec.key(f"inputs.{inp.name}"),
                                     f"column {inp.name!r} is not known to the model (it was fit on "
                                     f"{', '.join(self.feature_names)})"))
            for name in self.feature_names:
                if name not in spec.input_names:
                    problems.append((spec.key("inputs"), f"the model needs column {name!r}, which the schema "
                                                         "does not declare"))
        else:
            n = getattr(est, "n_features_in_", None)
            if n is not None and n != len(spec.inputs):
                problems.append((spec.key("inputs"), f"the model takes {n} columns, the schema declares "
                                                     f"{len(spec.inputs)}"))
        if spec.output == "predict_proba":
            classes = list(getattr(est, "classes_", []))
            if spec.output_class not in classes:
                problems.append((spec.key("class"), f"{spec.output_class!r} is not one of the model's classes "
                                                    f"{classes}"))
        return problems

    def frame(self, columns: Sequence[np.ndarray]) -> Any:
        """The estimator's input: a DataFrame in its column order when it was fit on one, else an array."""
        if self.feature_names is not None:
            # an explicit index and no copy: far less than pandas takes to build a one-row frame (docs/performance.md)
            return pd.DataFrame({self.feature_names[k]: _plain(self.spec.inputs[j], columns[j])
                                 for k, j in enumerate(self._order)},
                                index=pd.RangeIndex(len(columns[0]) if len(columns) else 0), copy=False)
        cols = [_plain(self.spec.inputs[j], columns[j]) for j in self._order]
        if all(c.dtype.kind in "biuf" for c in cols):
            return np.column_stack(cols).astype(np.float64)
        return np.column_stack([c.astype(object) for c in cols])

    def frame_one(self, values: Sequence[Any]) -> Any:
        """``frame`` of one canonical row, equal to it in columns, dtypes, index and values, built for less
        than a fresh DataFrame costs (measured: docs/performance.md). Each thread keeps, per (value types,
        values of the string inputs and of the few-valued ones), the frame ``frame`` built for the first such
        row, sets the other columns in place (``DataFrame.iat``) and hands out a shallow copy, which
        copy-on-write keeps apart from the kept frame."""
        if self.feature_names is None:
            return self.frame([_column_of(v) for v in values])
        types = tuple(map(type, values))
        if not _COPY_ON_WRITE or not _KEPT_TYPES.issuperset(types) or any(
                t is int and not INT64_MIN <= v <= INT64_MAX for t, v in zip(types, values)):
            # None (or an int past int64) makes a column of another dtype: a fresh frame says which
            return self.frame([_column_of(v) for v in values])
        key = (types, tuple(values[j] for j in self._row_key))
        frames = getattr(self._local, "frames", None)
        if frames is None:
            frames = self._local.frames = {}
        kept = frames.get(key)
        if kept is None:
            if len(frames) >= _ROW_FRAMES_PER_THREAD:
                frames.clear()
            kept = frames[key] = self.frame([_column_of(v) for v in values])
        else:
            for k, j in self._row_set:
                kept.iat[0, k] = values[j]
        return kept.copy(deep=False)

    def answer(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """(n,) predictions (float64, or the label's own type for a non-numeric ``predict``) for n rows
        given as one array (or list) per input, in schema order."""
        return self._predict(self.frame(columns))

    def answer_one(self, values: Sequence[Any]) -> Any:
        """``answer`` of one canonical row (one value per input, schema order): its one prediction."""
        return self._predict(self.frame_one(values))[0]

    def _predict(self, X: Any) -> np.ndarray:
        if self._class_pos is not None:
            return np.asarray(self.estimator.predict_proba(X), dtype=np.float64)[:, self._class_pos]
        y = np.asarray(self.estimator.predict(X))
        if y.ndim != 1:
            y = y.reshape(len(y), -1)[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
        return y.astype(np.float64) if y.dtype.kind in "biuf" else y

    def check(self, values: tuple) -> None:
        """Any value the schema accepts is the estimator's to answer."""

    def files(self) -> list[str]:
        return [self.spec.artifact or ""]


def _few_values(inp: Input) -> int | None:
    """How many values a non-string input can take, when that is a short, known list; else None."""
    if inp.values is not None:
        return len(inp.values) + (not inp.required)
    if inp.type == "bool":
        return 3
    if inp.type == "int" and inp.min is not None and inp.max is not None and inp.max - inp.min < 1000:
        return int(inp.max - inp.min) + 2
    return None


def _column_of(value: Any) -> np.ndarray:
    """One value as the one-row column ``Served.answer_one`` has always passed to ``answer``."""
    return np.array([value], dtype=object if value is None or isinstance(value, str) else None)


def _plain(inp: Input, col) -> np.ndarray:
    """A column the estimator can take: None becomes NaN in a number column."""
    col = np.asarray(col)
    if col.dtype == object and inp.type in ("int", "float"):
        return np.array([np.nan if v is None else v for v in col], dtype=np.float64)
    return col


# --- a model's folder in a snapshot --------------------------------------------------------
SPEC_FILE = "spec.json"
TABLE_FILE = "predictions.parquet"


def artifact_name(spec: ModelSpec) -> str:
    return {"skops": "model.skops", "joblib": "model.joblib", "mlflow": "mlflow"}[spec.format]


def check_folder(spec: ModelSpec, folder: Path) -> None:
    """Refuse a model folder with a symlink that leaves it, or anything but files, folders and links:
    the folder is copied into the snapshot, link targets as files, and a snapshot is served and
    queried (`batch sql`), so ``notes.txt -> /etc/passwd`` or ``certs -> /etc/ssl`` would publish
    what they point at. A link to a file or folder inside stays fine (copied as what it points at),
    except one to a folder holding it, which would copy for ever."""
    root = Path(folder).resolve()
    for path in sorted(Path(folder).rglob("*")):  # rglob does not descend into linked folders
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise InputError(path, spec.key("artifact"),
                                 f"a symlink to {target}, outside the model folder {folder}: refused (copy the "
                                 f"file into the folder, or remove the link)")
            if target.is_dir() and path.parent.resolve().is_relative_to(target):
                raise InputError(path, spec.key("artifact"), f"a symlink to {target}, a folder holding it: refused")
            if not (target.is_file() or target.is_dir()):
                raise InputError(path, spec.key("artifact"), "a symlink to neither a file nor a folder: refused")
        elif not (path.is_file() or path.is_dir()):
            raise InputError(path, spec.key("artifact"), "neither a file nor a folder (a FIFO, socket or device): "
                                                         "refused")


def copy_artifact(spec: ModelSpec, source: Path, folder: Path) -> ModelSpec:
    """Copy the artifact into a snapshot's model folder; the spec it returns points there. A folder's
    links are checked first (check_folder) and copied as the files they point at."""
    dest = folder / artifact_name(spec)
    if Path(source).is_dir():
        check_folder(spec, Path(source))
        shutil.copytree(source, dest)
    else:
        shutil.copy2(source, dest)
    return replace(spec, artifact=dest.name)


def artifact_checksum(spec: ModelSpec, path: Path) -> str:
    return sha256_file(artifact_file(spec, Path(path)))


def write_spec(folder: Path, spec: ModelSpec) -> None:
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2, default=str))


def load_predictor(folder: Path) -> SklearnPredictor:
    """``load(folder)`` of the protocol: a registered model from its snapshot folder."""
    spec = ModelSpec.from_json(json.loads((Path(folder) / SPEC_FILE).read_text()))
    return SklearnPredictor(spec, load_estimator(spec, Path(folder) / (spec.artifact or "")))


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


def read_table(folder: Path) -> dict[str, Any]:
    """A model's precomputed Parquet as a dict keyed by the canonical input."""
    t = pq.read_table(Path(folder) / TABLE_FILE, columns=["input", "prediction"])
    values = t.column("prediction").to_pylist()
    if (t.schema.field("prediction").metadata or {}).get(_ENCODING) == b"json":
        values = [json.loads(v) for v in values]
    return dict(zip(t.column("input").to_pylist(), values))


_ENCODING = b"hybridserve.encoding"
_MISSING = object()


def _prediction_array(pred: np.ndarray) -> tuple[pa.Array, dict[bytes, bytes] | None]:
    """The stored predictions and their field's metadata: numbers as float64 (NaN kept), a string array
    (class labels) as strings; an object array -- mixed types, such as 1, "a" and NaN from one model --
    as JSON text marked so in the field's metadata, so the value read back has the type and value the
    model answered (str(1) is "1", not 1)."""
    if pred.dtype.kind in "biuf":
        return pa.array(pred.astype(np.float64), pa.float64()), None
    if pred.dtype.kind in "US":
        return pa.array(pred.astype(str).tolist(), pa.string()), None
    return pa.array([json.dumps(plain(v)) for v in pred], pa.string()), {_ENCODING: b"json"}


PREDICT = "predict"
PA_TYPES = {"int": pa.int64(), "float": pa.float64(), "string": pa.string(), "bool": pa.bool_()}


class SklearnModel(Model):
    """A registered scikit-learn model with its precomputed predictions (canonical key -> prediction)."""

    kind = "sklearn"
    queries = {PREDICT: Query(PREDICT, "model", label="prediction")}

    def __init__(self, predictor: SklearnPredictor, table: dict[str, Any] | None = None):
        self.predictor, self.spec = predictor, predictor.spec
        self.name, self.version, self.max_age_s = self.spec.name, predictor.version, self.spec.max_age_s
        self.table = table or {}

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """The config's table checked before a run does any work: the artifact loads (its folder's
        links checked) and matches the declared schema; the candidates file reads."""
        spec, _, _ = resolve(spec)
        if spec.candidates:
            read_candidates(spec)

    @classmethod
    def stage(cls, spec: ModelSpec, folder: Path) -> dict[str, Any]:
        """The artifact loaded and its schema checked (``resolve``), copied with spec.json into ``folder``."""
        spec, predictor, checksum = resolve(spec)
        write_spec(folder, copy_artifact(spec, Path(spec.artifact or ""), folder))
        return {"kind": cls.kind, "version": spec.version, "format": spec.format, "artifact": str(spec.artifact),
                "artifact_sha256": checksum, "schema_hash": spec.schema_hash(),
                "inputs": [i.describe() for i in spec.inputs], "output": spec.output, "class": spec.output_class,
                "max_age_s": spec.max_age_s}

    @classmethod
    def load(cls, folder: Path, name: str, entry: dict[str, Any]) -> "SklearnModel":
        """``load(folder)`` of the protocol: the spec, the artifact and the precomputed table."""
        predictor = load_predictor(folder)
        return cls(predictor, read_table(folder) if (Path(folder) / TABLE_FILE).is_file() else {})

    def answer(self, query: str, columns: Sequence[np.ndarray], k: int | None = None) -> np.ndarray:
        return self.predictor.answer(columns)

    def answer_one(self, query: str, key: tuple, k: int | None = None) -> Any:
        return plain(self.predictor.answer_one(key))

    def stored(self, query: str, key: tuple, k: int | None = None) -> Any:
        value = self.table.get(canonical_key(key), _MISSING)
        if value is _MISSING:
            return None
        # A stored null (the model answered None) is precomputed all the same: NaN, which is served as
        # null too; None would read as "not precomputed".
        return math.nan if value is None else value

    def cache_key(self, query: str, key: tuple) -> str:
        return canonical_key(key)

    def precomputed(self) -> dict[str, int]:
        return {PREDICT: len(self.table)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "version": self.version,
                "inputs": [i.describe() for i in self.spec.inputs], "output": self.spec.output}

    # --- precomputing -----------------------------------------------------------------
    def keys(self, query: str, plan: Plan) -> tuple[list[np.ndarray], dict[str, Any]]:
        return choose(self.spec, plan.logged(self.name), plan.coverage, plan.cover)

    def part(self, query: str, columns: Sequence[np.ndarray], answers: np.ndarray) -> pa.Table:
        """One column per input, the canonical ``input`` key, the prediction and the model version."""
        spec, n = self.spec, len(columns[0]) if len(columns) else 0
        pred = np.asarray(answers)
        arrays = {inp.name: _arrow(inp, col) for inp, col in zip(spec.inputs, columns)}
        arrays["input"] = canonical_key_array(columns) if len(columns) else pa.array([], pa.string())
        arrays["prediction"], encoding = _prediction_array(pred)
        arrays["model_version"] = pa.array([self.version] * n, pa.string())
        table = pa.table(arrays)
        if encoding:
            i = table.schema.get_field_index("prediction")
            table = table.cast(table.schema.set(i, table.schema.field(i).with_metadata(encoding)))
        return table

    def assemble(self, query: str, table: pa.Table, folder: Path, k_max: int) -> dict[str, Any]:
        pq.write_table(table, Path(folder) / TABLE_FILE, compression="zstd")
        return {"rows": int(table.num_rows)}

    def key_columns(self, query: str) -> list[str]:
        return list(self.spec.input_names)


def _arrow(inp: Input, col: np.ndarray) -> pa.Array:
    if col.dtype == object:
        return pa.array(col.tolist(), PA_TYPES[inp.type])
    return pa.array(col, PA_TYPES[inp.type])


# --- choosing what to precompute ----------------------------------------------------------------
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


def choose(spec: ModelSpec, log: tuple[list, np.ndarray] | None, coverage: float, cover=None
           ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The inputs to precompute, one column per input: the full grid when it fits grid_max_rows,
    plus the user's candidates, plus the most requested tuples from the request log until the
    logged traffic is covered to ``coverage`` (at most max_log_rows; ``cover`` picks them:
    batch.popularity.cover). Returns (columns, what was chosen from where)."""
    report: dict[str, Any] = {}
    size = spec.grid_size()
    grid_cols: list[np.ndarray] = []
    keys: set[str] = set()
    has_log = log is not None and len(log[0]) > 0
    if has_log and cover is None:
        raise ValueError("choose: a request log needs the cover function that picks from it")
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
