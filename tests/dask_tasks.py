"""Task functions tests/test_dask.py maps on the cluster's workers. The workers import them by name,
as they import ``precompute_part``, so they live in a module that imports little (a test module
would bring pytest and the whole job into every worker)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import faiss

from batch.precompute import Part, Staged, precompute_part


def omp_threads(staged: Staged, part: Part) -> tuple[int, str | None]:
    return faiss.omp_get_max_threads(), os.environ.get("OMP_NUM_THREADS")


def fail_first_attempt(staged: Staged, part: Part) -> int:
    marker = Path(staged.store) / f"attempted-{part.number}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"transient failure of part {part.number}")
    return part.number


def always_fail(staged: Staged, part: Part) -> int:
    raise RuntimeError("the model exploded")


def kill_worker_once(staged: Staged, part: Part) -> int:
    """The worker answering the second similar-items part dies (SIGKILL) the first time it is asked."""
    if part.query == "similar_items" and part.number == 1:
        try:
            fd = os.open(Path(staged.store) / "killed-a-worker", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return precompute_part(staged, part)
