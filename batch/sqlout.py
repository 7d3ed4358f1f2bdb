"""`batch sql --format csv|json`: rows written as DuckDB streams them (the read-only connection refuses
COPY, and a large result is never held whole)."""
from __future__ import annotations

import csv
import json
import math
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, TextIO


def _plain(v: Any) -> Any:
    """A value as JSON has it: NaN as null, times as ISO 8601, decimals as numbers, bytes as hex."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(_plain(v))
    return _plain(v)


class StreamWriter:
    """CSV (a header row, then one row per result row) or a JSON array of objects, to ``out``."""

    def __init__(self, fmt: str, out: TextIO):
        if fmt not in ("csv", "json"):
            raise ValueError(f"format {fmt!r}: csv or json")
        self.fmt, self.out = fmt, out
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        self._started = False

    def _start(self, cols: list[str]) -> None:
        if self._started:
            return
        self._started = True
        if self._csv is not None:
            self._csv.writerow(cols)
        else:
            self.out.write("[")

    def rows(self, cols: list[str], rows: list[tuple]) -> None:
        """One streamed batch."""
        first = not self._started
        self._start(cols)
        if self._csv is not None:
            self._csv.writerows([_csv_cell(v) for v in row] for row in rows)
            return
        for i, row in enumerate(rows):
            sep = "\n" if first and i == 0 else ",\n"
            self.out.write(sep + json.dumps(dict(zip(cols, (_plain(v) for v in row))), allow_nan=False))

    def close(self, cols: list[str]) -> None:
        self._start(cols)
        if self._csv is None:
            self.out.write("\n]\n")
        self.out.flush()
