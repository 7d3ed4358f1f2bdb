"""Predictor kinds: any scikit-learn estimator with a declared input schema, and the built-in rating model.

Both answer with one vectorised call over columns in schema order; the batch job calls it with
the whole grid, the API with one row.
"""
from __future__ import annotations

import json
import logging
import pickle
import shutil
import threading
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from serving.errors import InputError, NotFound
from serving.models.base import INT64_MAX, INT64_MIN, Input, ModelSpec
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
        flavor = _mlflow_flavor(spec, path)
        fmt = "skops" if flavor.get("serialization_format") == "skops" else "pickle"
        path = path / flavor["pickled_model"]
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
            # an explicit index and no copy: a quarter of the time pandas takes to build a one-row frame
            return pd.DataFrame({self.feature_names[k]: _plain(self.spec.inputs[j], columns[j])
                                 for k, j in enumerate(self._order)},
                                index=pd.RangeIndex(len(columns[0]) if len(columns) else 0), copy=False)
        cols = [_plain(self.spec.inputs[j], columns[j]) for j in self._order]
        if all(c.dtype.kind in "biuf" for c in cols):
            return np.column_stack(cols).astype(np.float64)
        return np.column_stack([c.astype(object) for c in cols])

    def frame_one(self, values: Sequence[Any]) -> Any:
        """``frame`` of one canonical row, equal to it in columns, dtypes, index and values, built in a
        quarter of the time: a fresh DataFrame costs ~160 us with pandas 3, and an open string column
        alone ~75 us to set. Each thread keeps, per (value types, values of the string inputs and of the
        few-valued ones), the frame ``frame`` built for the first such row, sets the other columns in
        place (``DataFrame.iat``, ~10 us each) and hands out a shallow copy, which copy-on-write keeps
        apart from the kept frame."""
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


# --- the built-in rating model -------------------------------------------------------------
RATING = "rating"


class RatingPredictor:
    """The recommender's rating regressor as a predictor over (user_id, item_id): one way to serve a
    prediction. Its precomputed pairs live in the snapshot's predictions table."""

    kind = "rating"

    def __init__(self, bundle):
        self.bundle = bundle
        self.version = bundle.model_version
        # the catalogue's id ranges: what /v1/models and the OpenAPI document show a client
        users, items = np.asarray(bundle.user_ids), np.asarray(bundle.item_ids)
        span = lambda ids: {"min": int(ids.min()), "max": int(ids.max())} if len(ids) else {"min": 0}  # noqa: E731
        self.spec = ModelSpec(name=RATING, kind="rating", inputs=(Input("user_id", "int", **span(users)),
                                                                Input("item_id", "int", **span(items))),
                              version=self.version, artifact=None, grid_max_rows=0)

    def check(self, values: tuple) -> None:
        user_id, item_id = values
        if self.bundle.user_index(np.array([user_id]))[0] < 0:
            raise NotFound(f"user {user_id} is unknown")
        if self.bundle.item_index(np.array([item_id]))[0] < 0:
            raise NotFound(f"item {item_id} is not in the catalogue")

    def answer(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        b = self.bundle
        return np.asarray(b.predict(b.user_index(np.asarray(columns[0])), b.item_index(np.asarray(columns[1]))))

    def files(self) -> list[str]:
        return []


# --- a model's folder in a snapshot --------------------------------------------------------
SPEC_FILE = "spec.json"
TABLE_FILE = "predictions.parquet"


def artifact_name(spec: ModelSpec) -> str:
    return {"skops": "model.skops", "joblib": "model.joblib", "mlflow": "mlflow"}[spec.format]


def copy_artifact(spec: ModelSpec, source: Path, folder: Path) -> ModelSpec:
    """Copy the artifact into a snapshot's model folder; the spec it returns points there."""
    dest = folder / artifact_name(spec)
    if Path(source).is_dir():
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
