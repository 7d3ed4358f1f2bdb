"""Where the precompute's parts run: ``map(fn, staged, parts)`` -> each part's result, in order.

``local`` runs them in this process, one after another (FAISS uses every core inside each). A
backend of another engine is one more class with the same ``map`` (docs/batch.md).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from tqdm import tqdm

from batch.precompute import Part, Staged

LOG = logging.getLogger(__name__)


class LocalBackend:
    """The parts in this process, in order, with a progress bar in a terminal."""

    name = "local"

    def map(self, fn: Callable[[Staged, Part], Any], staged: Staged, parts: Sequence[Part], desc: str = "") -> list:
        return [fn(staged, part) for part in tqdm(parts, desc=desc, unit="part", disable=None, leave=False)]

    def close(self) -> None:
        pass


BACKENDS: dict[str, Callable[..., Any]] = {"local": lambda settings: LocalBackend()}


def backend(settings) -> Any:
    """The backend ``batch.backend`` names."""
    return BACKENDS[settings["batch.backend"]](settings)
