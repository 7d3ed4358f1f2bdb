"""A second, non-recommender model for the generated sample: daily demand per genre and weekday.

``python -m batch generate-sample`` writes it beside the sample's inputs (``demand.skops``), and
config/default.toml registers it as model ``demand``, so `make batch`, `make serve` and `make demo`
show a registered model next to the recommender. Functions from frames to frames; the file
write is the only I/O.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

LOG = logging.getLogger(__name__)

DEMAND_FILE = "demand.skops"
DEMAND_INPUTS = ("genre", "weekday", "discount")


def demand_frame(interactions: pd.DataFrame, items: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Training rows (genre, weekday, discount, demand): interactions per day with items of each
    genre (an item counts for its first genre), with a random discount on half the days that lifts
    demand by up to 60% (the sample has no prices, so the discount effect is drawn here)."""
    first = items.assign(genre=[g[0] if len(g) else "unknown" for g in items["genres"]])[["item_id", "genre"]]
    days = pd.to_datetime(interactions["ts"]).dt.floor("D")
    daily = (interactions.assign(day=days).merge(first, on="item_id")
             .groupby(["day", "genre"]).size().rename("n").reset_index())
    rng = np.random.default_rng(seed)
    discount = np.where(rng.random(len(daily)) < 0.5, np.round(rng.uniform(0.0, 0.5, len(daily)), 2), 0.0)
    demand = daily["n"].to_numpy() * (1.0 + 1.2 * discount) * rng.lognormal(0.0, 0.1, len(daily))
    return pd.DataFrame({"genre": daily["genre"].astype(str).to_numpy(),
                         "weekday": daily["day"].dt.day_of_week.to_numpy(np.int64),
                         "discount": discount.astype(np.float64), "demand": demand})


def train_demand(frame: pd.DataFrame, seed: int = 0):
    """One-hot genre, weekday and discount as numbers, gradient boosting: fit on a DataFrame, so the
    model knows its column names (``feature_names_in_``), which the batch job checks the schema against."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    model = Pipeline([
        ("encode", ColumnTransformer([("genre", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["genre"])],
                                     remainder="passthrough")),
        ("regress", HistGradientBoostingRegressor(max_iter=100, random_state=seed)),
    ])
    return model.fit(frame[list(DEMAND_INPUTS)], frame["demand"])


def ensure_sample_models(settings, interactions: pd.DataFrame, items: pd.DataFrame, seed: int = 0) -> list[Path]:
    """Write the sample's demand model wherever a registered model expects it (an artifact named
    demand.skops that does not exist yet), as the default config does. Returns the files written."""
    written = []
    for spec in settings.models:
        path = Path(spec.artifact or "")
        if path.name == DEMAND_FILE and not path.exists():
            written.append(write_demand_model(path.parent, interactions, items, seed))
    return written


def write_demand_model(folder: Path, interactions: pd.DataFrame, items: pd.DataFrame, seed: int = 0) -> Path:
    """Train the demand model on the sample and save it as skops (written to a temporary name, then renamed)."""
    import os

    import skops.io as sio
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = train_demand(demand_frame(interactions, items, seed), seed)
    path = folder / DEMAND_FILE
    tmp = path.with_name(path.name + ".tmp")
    sio.dump(model, tmp)
    os.replace(tmp, path)
    LOG.info("wrote the demand model to %s", path)
    return path
