"""The one check before publish: stored answers, recomputed live, must match.

Every model is loaded back from the complete, unpublished snapshot folder as the API will load it;
for a sample of each precomputed query's keys, the answer the API would serve from the snapshot must
equal the answer the model computes live. Besides: each model's own figures (an index's recall) and
row counts that must not collapse.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from serving.errors import ValidationFailed
from serving.models.base import same_answer
from serving.models.registry import load_models


def validate(folder: Path, manifest: dict[str, Any], tables: dict[tuple[str, str], pa.Table], settings,
             live_rows: dict[str, int] | None, row_counts: dict[str, int], force: bool) -> dict[str, Any]:
    """Checks on the unpublished snapshot at ``folder`` (``tables``: each precomputed (model, query)'s
    assembled table). Raises ValidationFailed; returns the results for the manifest."""
    models = load_models(folder, manifest)
    rng = np.random.default_rng(settings["train.seed"])
    n, k_max = settings["batch.validate_sample"], settings["batch.k_max"]
    out: dict[str, Any] = {"models": {}}
    problems = []
    for (name, query), table in tables.items():
        m = models[name]
        rows = np.sort(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False))
        if not len(rows):
            continue
        cols = [table.column(c).take(pa.array(rows)).to_pylist() for c in m.key_columns(query)]
        k = k_max if m.queries[query].ranked else None
        bad, first = 0, ""
        for key in zip(*cols):
            stored = m.stored(query, key, k)
            live = m.answer_one(query, key, k)
            if stored is None or not same_answer(stored, live):
                bad += 1
                first = first or (f"first: {_key(m.key_columns(query), key)}: stored {_show(stored)}, "
                                  f"live {_show(live)}")
        q = m.queries[query]
        out[f"{q.endpoint}_mismatches"] = out.get(f"{q.endpoint}_mismatches", 0) + bad
        if not q.ranked:
            out["models"][name] = {"checked": int(len(rows)), "mismatches": bad}
        if bad:
            problems.append(f"{name}: {bad}/{len(rows)} {q.label}s differ when recomputed live ({first})")
    for name, m in models.items():
        for figure, value in m.audit(rng, n).items():
            out[figure] = value
    recall = out.get("ann_recall_at_10")
    if recall is not None and recall < settings["batch.min_recall"]:
        problems.append(f"ANN recall@10 {recall:.3f} < batch.min_recall {settings['batch.min_recall']}")
    if live_rows:
        for table, before in live_rows.items():
            after = row_counts.get(table, 0)
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


def _key(columns: list[str], key: tuple) -> str:
    return ", ".join(f"{c}={v!r}" for c, v in zip(columns, key))


def _show(answer: Any) -> str:
    """An answer in a refusal: its type with its value (1 and "1" differ), a list by its first ids."""
    if answer is None:
        return "nothing"
    if isinstance(answer, tuple):
        ids = [int(i) for i in np.asarray(answer[0])[:5]]
        return f"ids {ids}{'...' if len(answer[0]) > 5 else ''}"
    return f"{answer!r} ({type(answer).__name__})"
