"""A scikit-learn-style regressor whose predictions a test holds back or breaks from outside the server
process, through files in a folder (saved with joblib, so the server imports this module: the tests put
tests/ on its PYTHONPATH). Used by tests/test_deadline.py.

    <gate>/block     one value of input y per line: a row with such a y waits while it is listed
    <gate>/raise     exists: predict raises
    <gate>/entered-<y>  written when a row with that y starts waiting (the test's event)
    <gate>/released-<y> written when it stops waiting
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class GatedRegressor:
    """predict([x, y]) = 10 x + y, held back or failing as the gate folder says."""

    n_features_in_ = 2

    def __init__(self, gate: str):
        self.gate = gate

    def fit(self, X, y=None):
        return self

    def predict(self, X):
        X = np.asarray(X, dtype=np.float64)
        gate = Path(self.gate)
        if (gate / "raise").exists():
            raise RuntimeError("the gate says raise")
        started = time.monotonic()
        for y in set(X[:, 1].tolist()):
            if y not in blocked(gate):
                continue
            while y in blocked(gate) and time.monotonic() - started < 120:
                (gate / f"entered-{y:g}").touch()
                time.sleep(0.01)
            (gate / f"released-{y:g}").touch()
        return 10 * X[:, 0] + X[:, 1]


def blocked(gate: Path) -> set[float]:
    try:
        return {float(v) for v in (gate / "block").read_text().split()}
    except FileNotFoundError:
        return set()
