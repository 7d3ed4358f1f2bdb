"""CPU time a server spends per request: a view of its cost that the machine's load barely moves.

Requests per second on a shared 2-core machine fall with whatever else runs (the load average moved
them 2x between rounds); the CPU seconds the server's processes burn per answered request mostly do
not, since time spent waiting for a core is not counted. ``utime + stime`` of every process of the
server (its main process and all descendants, e.g. granian's or nginx's workers, Redis for the
FastAPI design) is read from /proc before and after a load-generator run.
"""
from __future__ import annotations

import os
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
    return out


def cpu_s(pids: list[int]) -> float:
    """user + system CPU seconds of ``pids`` so far (ended ones count 0)."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total * _TICK_S


def measured(measure, roots: list[int]):
    """``measure`` (a loadgen function) that also reports ``cpu_us_per_request``: the CPU time of the
    process trees under ``roots`` during the run, over the requests answered."""
    def run(*args, **kwargs) -> dict:
        pids = [p for r in roots for p in tree(r)]
        before = cpu_s(pids)
        res = measure(*args, **kwargs)
        spent = cpu_s(pids) - before
        res["server_cpu_s"] = spent
        res["cpu_us_per_request"] = spent / max(res["requests"], 1) * 1e6
        return res
    return run
