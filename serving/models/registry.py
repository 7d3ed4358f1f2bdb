"""Model kinds by name, and the models a snapshot's manifest lists, loaded from their folders.

A kind of one's own: subclass serving.models.base.Model and make it known either by calling
``register("mykind", MyModel)`` or, from an installed package, with an entry point in the group
``hybridserve.model_kinds`` (``mykind = "mypackage.models:MyModel"``); then ``kind = "mykind"`` in a
``[models.<name>]`` table registers a model of it (docs/models.md, "A model kind of your own").
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from serving.errors import ConfigError
from serving.models.base import Model, ModelSpec
from serving.models.base import parse_models as parse_specs
from serving.models.predictor import SklearnModel
from serving.models.rating import RatingModel
from serving.models.recommender import RecommenderModel
from serving.store import layout

LOG = logging.getLogger(__name__)

KINDS: dict[str, type[Model]] = {"recommender": RecommenderModel, "rating": RatingModel, "sklearn": SklearnModel}


def register(kind: str, cls: type[Model]) -> None:
    """Make model kind ``kind`` loadable; ``cls`` implements serving.models.base.Model."""
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise TypeError(f"{cls!r} is not a serving.models.base.Model")
    KINDS[kind] = cls


ENTRY_POINTS = "hybridserve.model_kinds"


def kind_class(kind: str) -> type[Model]:
    """The class of model kind ``kind``: a built-in, a registered one, or an installed entry point.
    KeyError names the kinds there are."""
    cls = KINDS.get(kind)
    if cls is None:
        found = {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}
        if kind in found:
            register(kind, found[kind].load())
            return KINDS[kind]
        raise KeyError(f"unknown model kind {kind!r} (kinds: {', '.join(sorted(set(KINDS) | set(found)))})")
    return cls


def parse_models(tables: Any, source: str) -> tuple[ModelSpec, ...]:
    """``[models.<name>]`` tables -> specs whose kinds exist; ConfigError "file: models.<name>.kind: ..."."""
    specs = parse_specs(tables, source)
    for spec in specs:
        try:
            kind_class(spec.kind)
        except KeyError as exc:
            raise ConfigError(f"{source}: models.{spec.name}.kind: {exc.args[0]}") from None
    return specs


def entries(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every model of a manifest: the recommender (manifest["recommender"]: its lists answer the item,
    user and session routes) and the models that predict (manifest["models"], listed at /v1/models)."""
    out = {}
    if isinstance(manifest.get("recommender"), dict):
        out[layout.RECOMMENDER] = manifest["recommender"]
    elif manifest.get("format_version") == 2:  # format 2 listed no recommender: it was the snapshot itself
        out[layout.RECOMMENDER] = {"kind": "recommender", "version": manifest.get("model_version"),
                                   "k_max": manifest.get("k_max", 0)}
    out.update(manifest.get("models") or {})
    return out


def load_models(folder: Path, manifest: dict[str, Any]) -> dict[str, Model]:
    """Each model the manifest lists, from its folder in the (local) snapshot ``folder``."""
    folder = Path(folder)
    legacy = manifest.get("format_version") == 2
    out: dict[str, Model] = {}
    for name, entry in entries(manifest).items():
        kind = entry.get("kind")
        try:
            cls = kind_class(str(kind))
        except KeyError as exc:
            raise ValueError(f"model {name!r}: {exc.args[0]}") from None
        entry = {"k_max": manifest.get("k_max", 0), **entry}
        if legacy and name == layout.RECOMMENDER:
            model = RecommenderModel.from_folders(folder / layout.LEGACY_MODEL_DIR, folder / layout.LEGACY_SERVING_DIR,
                                                  name, entry)
        elif legacy and name == layout.RATING:
            model = RatingModel.load(folder / layout.LEGACY_MODEL_DIR, name, entry,
                                     stored=folder / layout.LEGACY_SERVING_DIR)
        else:
            model = cls.load(folder / layout.model_folder(name), name, entry)
        out[name] = model
        LOG.info("model %s (%s) %s: %s precomputed", name, kind, model.version, model.precomputed())
    return out
