"""What every registered model is: a declared input schema, a version, and one vectorised answer.

A prediction is keyed by (model, version, canonical input): the inputs in schema order, each cast
to its declared type and written as JSON (``canonical_key``). The same functions build the
snapshot's keys, the serving lookup and the request log's ``input`` column.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Iterable, Protocol, Sequence

import numpy as np
import orjson
import pyarrow as pa

from serving.errors import BadRequest, ConfigError

TYPES = ("int", "float", "string", "bool")
FORMATS = ("skops", "joblib", "mlflow")
OUTPUTS = ("predict", "predict_proba")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_INT = re.compile(r"-?[0-9]{1,19}")
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_BOOL = {"true": True, "false": False, "1": True, "0": False}
_SHOW_VALUES = 12


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class Input:
    """One declared input: name, type, required; for a finite one its values, for a number a range."""

    name: str
    type: str
    required: bool = True
    values: tuple | None = None
    min: float | int | None = None
    max: float | int | None = None
    default: Any = None

    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        if self.values is not None:
            shown = ", ".join(json_text(v) for v in self.values[:_SHOW_VALUES])
            more = f", ... ({len(self.values)} values)" if len(self.values) > _SHOW_VALUES else ""
            return f"one of {shown}{more}"
        noun = {"int": "an integer", "float": "a number", "string": "a string", "bool": "true or false"}[self.type]
        if self.min is not None and self.max is not None:
            return f"{noun} from {self.min} to {self.max}"
        if self.min is not None:
            return f"{noun} >= {self.min}"
        if self.max is not None:
            return f"{noun} <= {self.max}"
        return noun

    def parse(self, raw: str) -> Any:
        """A query-string value -> the canonical value; BadRequest naming the input otherwise."""
        if self.type == "int":
            value = int(raw) if _INT.fullmatch(raw) else None
            if value is not None and not INT64_MIN <= value <= INT64_MAX:
                value = None
        elif self.type == "float":
            value = float(raw) if _FLOAT.fullmatch(raw) else None
            if value is not None and not math.isfinite(value):
                value = None
        elif self.type == "bool":
            value = _BOOL.get(raw.lower())
        else:
            value = raw
        if value is None:
            raise BadRequest(f"input {self.name!r} must be {self.expected()}, got {_show(raw)}")
        return self._in_domain(value, lambda: _show(raw))

    def cast(self, value: Any) -> Any:
        """A value from JSON, Parquet or the config -> the canonical value; ValueError otherwise."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if self.required:
                raise ValueError(f"input {self.name!r} is required")
            return self.default
        if isinstance(value, np.generic):
            value = value.item()
        t = self.type
        if t == "bool":
            ok = isinstance(value, bool)
        elif t == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            ok = isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX
        elif t == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"input {self.name!r} must be {self.expected()}, got {value!r}")
        return self._in_domain(value, lambda: repr(value), error=ValueError)

    def _in_domain(self, value: Any, show, error=BadRequest) -> Any:
        if self.type == "float":
            value = value + 0.0  # -0.0 and 0.0 are one key
        if self.values is not None:
            if value not in self._value_set:
                raise error(f"input {self.name!r} must be {self.expected()}, got {show()}")
        elif ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)):
            raise error(f"input {self.name!r} must be {self.expected()}, got {show()}")
        return value

    @functools.cached_property
    def _value_set(self) -> frozenset:  # cached in the instance's __dict__ (allowed on a frozen dataclass)
        return frozenset(self.values or ())

    def domain(self) -> tuple | None:
        """Every canonical value this input can take, when finite (absent counts as its default)."""
        if self.values is not None:
            dom = tuple(self.values)
        elif self.type == "bool":
            dom = (False, True)
        elif self.type == "int" and self.min is not None and self.max is not None:
            dom = range(int(self.min), int(self.max) + 1)  # type: ignore[assignment]
        elif not self.required:
            return (self.default,)  # an open optional input: the grid takes its default
        else:
            return None
        if not self.required and self.default not in dom:
            dom = tuple(dom) + (self.default,)
        return dom

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        if self.values is not None:
            out["values"] = list(self.values)
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if not self.required:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A registered model as the config declares it (``[models.<name>]``)."""

    name: str
    inputs: tuple[Input, ...]
    kind: str = "sklearn"
    artifact: str | None = None
    format: str = "skops"
    trusted: bool = False
    trusted_types: tuple[str, ...] = ()
    output: str = "predict"
    output_class: Any = None
    version: str | None = None       # None: derived from the artifact's checksum
    max_age_s: float | None = None   # None: serving.max_age_s
    deadline_ms: float | None = None  # None: serving.live_deadline_ms
    grid_max_rows: int = 100_000
    max_log_rows: int = 100_000
    candidates: str | None = None
    source: str = "<defaults>"       # the config file that declared it (for error messages)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def key(self, name: str) -> str:
        """The config key of one of this model's settings, for error messages."""
        return f"models.{self.name}.{name}"

    def schema_hash(self) -> str:
        """sha256 of the schema and the output: what the canonical keys and their meaning depend on."""
        body = {"inputs": [i.describe() for i in self.inputs], "output": self.output,
                "class": self.output_class}
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = [asdict(i) for i in self.inputs]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        data["inputs"] = tuple(Input(**{**i, "values": None if i.get("values") is None else tuple(i["values"])})
                               for i in data["inputs"])
        data["trusted_types"] = tuple(data.get("trusted_types") or ())
        return cls(**data)

    # --- the one canonicalisation ------------------------------------------------------
    def parse_query(self, pairs: Iterable[tuple[str, str]]) -> tuple:
        """Query parameters -> the canonical input tuple (schema order). BadRequest names the input
        for an unknown, repeated, missing, mistyped or out-of-domain one."""
        by_name = self._by_name
        given: dict[str, str] = {}
        for name, raw in pairs:
            if name not in by_name:
                raise BadRequest(f"unknown input {_show(name)} for model {self.name!r} "
                                 f"(inputs: {', '.join(self.input_names)})")
            if name in given:
                raise BadRequest(f"input {name!r} given more than once")
            given[name] = raw
        out = []
        for inp in self.inputs:
            raw = given.get(inp.name)
            if raw is None:
                if inp.required:
                    raise BadRequest(f"input {inp.name!r} is required: {inp.expected()}")
                out.append(inp.default)
            else:
                out.append(inp.parse(raw))
        return tuple(out)

    def cast_row(self, row: Sequence[Any]) -> tuple:
        """Values in schema order (from JSON, Parquet) -> the canonical tuple; ValueError otherwise."""
        if len(row) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} values, got {len(row)}")
        return tuple(inp.cast(v) for inp, v in zip(self.inputs, row))

    @functools.cached_property
    def _by_name(self) -> dict[str, Input]:
        return {i.name: i for i in self.inputs}

    def grid_size(self) -> int | None:
        """Rows in the full grid of the inputs' finite domains; None when an input is open."""
        size = 1
        for inp in self.inputs:
            dom = inp.domain()
            if dom is None:
                return None
            size *= len(dom)
        return size

    def grid(self) -> list[np.ndarray]:
        """Every combination of the inputs' domains, as one column per input (C order: last fastest)."""
        doms = [list(inp.domain() or ()) for inp in self.inputs]
        if not doms:
            return []
        idx = np.indices([len(d) for d in doms]).reshape(len(doms), -1)
        return [column(inp, [d[j] for j in range(len(d))], ix) for inp, d, ix in zip(self.inputs, doms, idx)]


def column(inp: Input, values: list, codes: np.ndarray) -> np.ndarray:
    """``values[codes]`` as an array of the input's dtype (object where None may appear)."""
    base = np.array(values, dtype=object)
    out = base[codes]
    if any(v is None for v in values):
        return out
    return out.astype(DTYPES[inp.type])


DTYPES = {"int": np.int64, "float": np.float64, "bool": np.bool_, "string": object}


def json_text(value: Any) -> str:
    """One canonical value as JSON text (shortest float repr, escaped strings, null)."""
    return orjson.dumps(value).decode()


def canonical_key(values: Sequence[Any]) -> str:
    """The key of one canonical input tuple: its values as a JSON array, no spaces."""
    return "[" + ",".join(map(json_text, values)) + "]"


def canonical_keys(columns: Sequence[np.ndarray]) -> list[str]:
    """``canonical_key`` of every row of the columns (see ``canonical_key_array``)."""
    return canonical_key_array(columns).to_pylist() if columns else []


def canonical_key_array(columns: Sequence[np.ndarray]):
    """``canonical_key`` of every row of the columns, vectorised, as a pyarrow string array: each
    distinct value is written once by ``json_text`` and the rows are joined as ``canonical_key`` joins them."""
    import pyarrow as pa
    import pyarrow.compute as pc
    parts = []
    for col in columns:
        col = np.asarray(col)
        if col.dtype == object:
            uniq, codes = _unique_objects(col)
        else:
            uniq, codes = np.unique(col, return_inverse=True)
            uniq = uniq.tolist()
        text = pa.array([json_text(u) for u in uniq], pa.string())
        parts.append(text.take(pa.array(codes.ravel().astype(np.int64))))
    joined = pc.binary_join_element_wise(*parts, ",") if len(parts) > 1 else parts[0]
    return pc.binary_join_element_wise("[", joined, "]", "")


def _unique_objects(col: np.ndarray) -> tuple[list, np.ndarray]:
    seen: dict = {}
    codes = np.fromiter((seen.setdefault((type(v), v), len(seen)) for v in col), np.int64, len(col))
    return [k[1] for k in seen], codes


def rows_from_keys(spec: ModelSpec, keys: Iterable[str]) -> tuple[list[tuple], int]:
    """Canonical tuples from request-log keys; keys that no longer fit the schema are skipped
    (the schema changed since they were logged). Returns (tuples, skipped)."""
    out, skipped = [], 0
    for key in keys:
        try:
            values = json.loads(key)
            row = spec.cast_row(values if isinstance(values, list) else [])
        except (ValueError, TypeError):
            skipped += 1
            continue
        if canonical_key(row) != key:  # logged under another canonicalisation: not the same key
            skipped += 1
            continue
        out.append(row)
    return out, skipped


def columns_from_rows(spec: ModelSpec, rows: Sequence[tuple]) -> list[np.ndarray]:
    """Canonical tuples -> one array per input."""
    cols = []
    for j, inp in enumerate(spec.inputs):
        vals = [r[j] for r in rows]
        if any(v is None for v in vals):
            cols.append(np.array(vals, dtype=object))
        else:
            cols.append(np.array(vals, dtype=DTYPES[inp.type]))
    return cols


# --- the protocol every model kind meets -------------------------------------------------
@dataclass(frozen=True)
class Query:
    """One kind of question a model answers: its name, the request log's endpoint for it, and
    whether its answers are ranked lists of (item id, score) cut at ``k`` (else one value)."""

    name: str
    endpoint: str
    ranked: bool = False
    label: str = "answer"      # what one answer is called in messages ("similar-item list")


@dataclass(frozen=True)
class Lists:
    """Ranked answers for n keys: ids (n, k) int64 padded with -1, scores (n, k) float32 padded with nan."""

    ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Row r without its padding: (ids (k',), scores (k',))."""
        ids, scores = self.ids[r], self.scores[r]
        valid = ids >= 0
        return ids[valid], scores[valid]


class Plan(Protocol):
    """What the batch job knows when it asks a model for the keys to precompute (batch.precompute)."""

    coverage: float                                    # share of traffic the keys should cover
    k_max: int                                         # entries kept per ranked answer

    def popular(self, what: str) -> np.ndarray:
        """The keys chosen for ``what``, most wanted first: "items" or "users" (ids), "pairs"
        ((n, 2) user and item ids asked for in the request log)."""

    def setting(self, key: str) -> Any:
        """A batch setting (``batch.pairs_per_user``)."""

    def add(self, what: str, keys: np.ndarray) -> None:
        """Keys a model precomputes beyond the popular ones of ``what`` (they count in the expected hit rate)."""

    def logged(self, model: str) -> tuple[list[str], np.ndarray] | None:
        """A model's canonical keys in the request log and their weights (None: no traffic)."""

    def cover(self, keys: np.ndarray, weights: np.ndarray, share: float, cap: int) -> tuple[np.ndarray, float]:
        """The fewest of ``keys`` (by weight) covering ``share`` of their weight, at most ``cap``."""

    def answers(self, model: str, query: str) -> pa.Table | None:
        """The answers precomputed already for another model's query, as its table (a model's keys
        may follow them: the rating model takes each popular user's top recommendations)."""


class Model:
    """A model kind: loaded from its folder in a snapshot, answering its queries for many keys at
    once (the batch job calls ``answer`` with 100,000 keys, the API with one), with the answers it
    has precomputed (``stored``). A kind is registered in serving.models.registry (docs/models.md).

    Keys are canonical tuples (``canonical_key`` of one is its text); for the vectorised calls they
    travel as columns, one array per element of the tuple."""

    kind: str = ""
    name: str = ""
    version: str = ""
    queries: dict[str, Query] = {}
    max_age_s: float | None = None       # the model's own freshness bound (None: serving.max_age_s)
    k_max: int = 0                       # entries kept per precomputed ranked answer
    needs: tuple[str, ...] = ()          # models whose precomputed answers its keys follow (Plan.answers)

    @classmethod
    def load(cls, folder, name: str, entry: dict[str, Any]) -> "Model":
        """The model ``name`` from its (local) folder in a snapshot; ``entry`` is its manifest entry."""
        raise NotImplementedError

    @classmethod
    def stage(cls, spec: "ModelSpec", folder) -> dict[str, Any]:
        """A registered model (``[models.<name>]`` with ``kind`` naming this class) checked and copied
        into ``folder``, its folder in the snapshot being written; returns its manifest entry (with
        ``"kind"``). Raise a domain error naming the config key for a bad artifact or schema."""
        raise NotImplementedError(f"model kind {cls.kind!r} cannot be registered from a config file")

    # --- answering --------------------------------------------------------------------
    def check(self, query: str, key: tuple) -> None:
        """Raise a domain error (NotFound) for a well-formed key this model has no answer for."""

    def answer(self, query: str, columns: Sequence[np.ndarray], k: int | None = None) -> Lists | np.ndarray:
        """Answers for n keys given as columns: Lists for a ranked query, else (n,) values."""
        raise NotImplementedError

    def answer_one(self, query: str, key: tuple, k: int | None = None) -> Any:
        """One key's answer, live: (ids, scores) or a plain value (a kind may do this faster)."""
        out = self.answer(query, columns_of([key]), k)
        return out.row(0) if isinstance(out, Lists) else plain(out[0])

    def stored(self, query: str, key: tuple, k: int | None = None) -> Any:
        """The precomputed answer for ``key`` in the form ``answer_one`` gives, or None."""
        return None

    def cache_key(self, query: str, key: tuple) -> Hashable:
        """What identifies the answer of ``key`` (equal for keys with equal answers)."""
        return key

    def precomputed(self) -> dict[str, int]:
        """Precomputed answers per query."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Name, kind, version and what it answers (GET /v1/models)."""
        return {"name": self.name, "kind": self.kind, "version": self.version}

    # --- precomputing (batch.precompute) --------------------------------------------------
    def keys(self, query: str, plan: Plan) -> list[np.ndarray]:
        """The keys of ``query`` the batch job should precompute, as columns."""
        return []

    def part(self, query: str, columns: Sequence[np.ndarray], answers: Lists | np.ndarray) -> pa.Table:
        """One partition's keys and answers as the Parquet part the job assembles."""
        raise NotImplementedError

    def assemble(self, query: str, table: pa.Table, folder, k_max: int) -> dict[str, Any]:
        """Write the precomputed answers of ``query`` (every part, in order) into this model's folder
        as the files ``load`` reads; returns what the manifest records of them."""
        raise NotImplementedError

    def key_columns(self, query: str) -> list[str]:
        """The columns of ``query``'s precomputed table that hold its keys, in key order."""
        raise NotImplementedError

    def audit(self, rng: np.random.Generator, n: int) -> dict[str, float]:
        """Quality figures of the model itself for validation (e.g. an index's recall)."""
        return {}


def plain(v: Any) -> Any:
    """A NumPy scalar as the Python value it holds."""
    return v.item() if isinstance(v, np.generic) else v


def columns_of(keys: Sequence[tuple]) -> list[np.ndarray]:
    """Keys (tuples of equal length) as columns: an int or float array where every value is one,
    else an object array (strings, None, tuples of ids)."""
    if not keys:
        return []
    cols = []
    for j in range(len(keys[0])):
        vals = [k[j] for k in keys]
        cols.append(np.array(vals, dtype=object) if any(v is None or isinstance(v, (str, tuple)) for v in vals)
                    else np.array(vals))
    return cols


def _null(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def same_answer(a: Any, b: Any) -> bool:
    """Whether two answers of one key agree: lists id for id; numbers to float32 precision (NaN equals
    NaN: a model may answer NaN, and must then have stored NaN); anything else by type and value."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    if _null(a) and _null(b):  # None and NaN are both served as null
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):  # True is no 1.0: compared by type as well as value
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            return math.isnan(fa) and math.isnan(fb)
        return math.isclose(fa, fb, rel_tol=1e-5, abs_tol=1e-6)
    return a == b and type(a) is type(b)


# --- config parsing ([models.<name>] tables) ---------------------------------------------
_MODEL_KEYS = {"kind", "artifact", "format", "trusted", "trusted_types", "output", "class", "version", "max_age_s",
               "deadline_ms",
               "grid_max_rows", "max_log_rows", "candidates", "inputs"}
_INPUT_KEYS = {"name", "type", "required", "values", "min", "max", "default"}


def parse_models(tables: Any, source: str) -> tuple[ModelSpec, ...]:
    """``[models.<name>]`` tables -> specs; ConfigError "file: models.<name>.<key>: problem"."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: models: expected [models.<name>] tables")
    return tuple(_parse_model(name, table, source) for name, table in tables.items())


def _parse_model(name: str, t: Any, source: str) -> ModelSpec:
    where = f"models.{name}"

    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {where}.{key}: {problem}" if key else f"{source}: {where}: {problem}")

    if not NAME.fullmatch(name):
        raise bad("", "a model name is a letter then letters, digits or _ (it names a URL and a SQL view)")
    if name == "rating":
        raise bad("", "'rating' is the built-in rating model's name")
    if not isinstance(t, dict):
        raise bad("", f"expected a [{where}] table")
    for key in t:
        if key not in _MODEL_KEYS:
            raise bad(key, f"unknown key (allowed: {', '.join(sorted(_MODEL_KEYS))})")

    def get(key, kind, default):
        v = t.get(key, default)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if v is not None and not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise bad(key, f"expected {kind.__name__}, got {type(v).__name__} {v!r}")
        return v

    kind = get("kind", str, "sklearn")  # a known kind? serving.models.registry.parse_models checks it
    artifact = get("artifact", str, None)
    if not artifact:
        raise bad("artifact", "required: the path of the model file (or MLflow model folder)")
    fmt = get("format", str, "skops")
    if fmt not in FORMATS:
        raise bad("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    trusted = get("trusted", bool, False)
    if fmt in ("joblib", "mlflow") and not trusted:
        raise bad("trusted", f"format {fmt!r} loads with pickle, which runs code from the file: set "
                             "trusted = true only for an artifact you made (or use format = \"skops\")")
    trusted_types = t.get("trusted_types", [])
    if not isinstance(trusted_types, list) or not all(isinstance(x, str) for x in trusted_types):
        raise bad("trusted_types", "expected a list of type names (as skops.io.get_untrusted_types prints them)")
    output = get("output", str, "predict")
    if output not in OUTPUTS:
        raise bad("output", f"must be one of {', '.join(OUTPUTS)}, got {output!r}")
    klass = t.get("class")
    if output == "predict_proba" and klass is None:
        raise bad("class", "required with output = \"predict_proba\": the class whose probability is served")
    if output == "predict" and klass is not None:
        raise bad("class", "only with output = \"predict_proba\"")
    max_age = get("max_age_s", float, None)
    if max_age is not None and max_age < 0:
        raise bad("max_age_s", f"must be >= 0, got {max_age}")
    deadline = get("deadline_ms", float, None)
    if deadline is not None and deadline < 1:
        raise bad("deadline_ms", f"must be >= 1, got {deadline}")
    grid_max = get("grid_max_rows", int, 100_000)
    if grid_max < 0:
        raise bad("grid_max_rows", f"must be >= 0, got {grid_max}")
    max_log = get("max_log_rows", int, 100_000)
    if max_log < 0:
        raise bad("max_log_rows", f"must be >= 0, got {max_log}")
    raw_inputs = t.get("inputs", [])
    if not isinstance(raw_inputs, list) or not all(isinstance(x, dict) for x in raw_inputs):
        raise bad("inputs", "expected an array of tables ([[models.<name>.inputs]] with name, type, ...)")
    if not raw_inputs and fmt != "mlflow":
        raise bad("inputs", "required: at least one input (name, type)")
    inputs = tuple(_parse_input(i, j, where, source) for j, i in enumerate(raw_inputs))
    names = [i.name for i in inputs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise bad("inputs", f"input {dup[0]!r} declared more than once")
    return ModelSpec(name=name, inputs=inputs, kind=kind, artifact=artifact, format=fmt, trusted=trusted,
                     trusted_types=tuple(trusted_types), output=output, output_class=klass,
                     version=get("version", str, None), max_age_s=max_age, deadline_ms=deadline, grid_max_rows=grid_max,
                     max_log_rows=max_log, candidates=get("candidates", str, None), source=source)


def _parse_input(t: dict, j: int, where: str, source: str) -> Input:
    label = t.get("name") if isinstance(t.get("name"), str) else f"[{j}]"
    at = f"{where}.inputs.{label}"

    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {at}.{key}: {problem}")

    for key in t:
        if key not in _INPUT_KEYS:
            raise bad(key, f"unknown key (allowed: {', '.join(sorted(_INPUT_KEYS))})")
    name = t.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{source}: {where}.inputs[{j}].name: required: a letter then letters, digits or _")
    typ = t.get("type")
    if typ not in TYPES:
        raise bad("type", f"must be one of {', '.join(TYPES)}, got {typ!r}")
    required = t.get("required", True)
    if not isinstance(required, bool):
        raise bad("required", f"expected bool, got {required!r}")
    probe = Input(name, typ, required=True)
    values = t.get("values")
    if values is not None:
        if not isinstance(values, list) or not values:
            raise bad("values", "expected a non-empty list")
        try:
            values = tuple(probe.cast(v) for v in values)
        except ValueError as exc:
            raise bad("values", str(exc)) from None
        if len(set(values)) != len(values):
            raise bad("values", "lists a value more than once")
    bounds = {}
    for key in ("min", "max"):
        v = t.get(key)
        if v is None:
            continue
        if typ not in ("int", "float"):
            raise bad(key, f"only for int and float inputs, not {typ}")
        if values is not None:
            raise bad(key, "give values or a range, not both")
        try:
            bounds[key] = probe.cast(v)
        except ValueError as exc:
            raise bad(key, str(exc)) from None
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        raise bad("max", f"is below min ({bounds['max']} < {bounds['min']})")
    default = t.get("default")
    if default is not None:
        if required:
            raise bad("default", "only for an input with required = false")
        try:
            default = Input(name, typ, True, values, bounds.get("min"), bounds.get("max")).cast(default)
        except ValueError as exc:
            raise bad("default", str(exc)) from None
    return Input(name, typ, required, values, bounds.get("min"), bounds.get("max"), default)
