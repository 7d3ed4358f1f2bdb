"""What a new user meets: a registered model's mistake before any training, a line per stage, the
registered models' rows in the summary and `snapshots`, `batch sql` output that keeps every cell in a
pipe and streams CSV/JSON, the docs' example folders ignored by git, the docs' SQL run on the demo's store."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

import batch.job
from batch.__main__ import main
from batch.job import STAGES
from batch.tools.demo import demo_store
from serving.settings import load_settings

from conftest import REPO
from test_harden_config import serving_demand  # noqa: F401  (a fixture: a store serving the demand model)


def _register(root: Path, cfg: Path, name: str = "lin", input_name: str = "x") -> None:
    X = pd.DataFrame({"x": np.arange(21)})
    path = root / "artifacts" / f"{name}.joblib"
    path.parent.mkdir(exist_ok=True)
    joblib.dump(LinearRegression().fit(X, 2.0 * np.arange(21)), path)
    cfg.write_text(cfg.read_text() + f'\n[models.{name}]\nartifact = "{path}"\nformat = "joblib"\ntrusted = true\n'
                   f'[[models.{name}.inputs]]\nname = "{input_name}"\ntype = "int"\nmin = 0\nmax = 20\n')


def test_a_registered_models_mistake_is_reported_before_training(workspace, capsys, monkeypatch):
    root, settings, cfg, first = workspace
    _register(root, cfg, "good")
    _register(root, cfg, "bad", input_name="y")

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the config was checked")
    monkeypatch.setattr(batch.job, "obtain_model", no_training)
    monkeypatch.setattr(batch.job, "load_inputs", no_training)
    assert main(["--config", str(cfg), "run", "--progress"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: {cfg}: models.bad.inputs.y: column 'y' is not known to the model "
                                    f"(it was fit on x)")
    assert "[1/8] config ..." in err and "[1/8] config stopped in" in err and "[2/8]" not in err


def test_a_run_prints_a_line_per_stage_and_every_models_rows(workspace, capsys):
    root, settings, cfg, first = workspace
    _register(root, cfg)
    assert main(["--config", str(cfg), "run", "--progress"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if re.match(r"\[\d/8\] ", line)]
    want = []
    for i, name in enumerate(STAGES, 1):
        want += [f"[{i}/8] {name} ...", f"[{i}/8] {name} done in"]
    # validate runs inside publish: its lines come between publish's
    got = [re.sub(r" in [\d.]+ s$", " in", line) for line in lines]
    assert sorted(got) == sorted(want) and got.index("[8/8] validate ...") < got.index("[7/8] publish done in")
    assert "registered models: lin 21 rows\n" in out
    assert main(["--config", str(cfg), "snapshots"]) == 0
    current = [line for line in capsys.readouterr().out.splitlines() if line.startswith("*")]
    assert len(current) == 1 and current[0].endswith(", lin=21")
    assert main(["--config", str(cfg), "run", "--no-progress"]) == 0
    assert not re.search(r"^\[\d/8\]", capsys.readouterr().err, re.M)


def test_sql_keeps_wide_cells_whole_in_a_pipe(workspace, capsys):
    root, settings, cfg, first = workspace
    wide = "x" * 200
    assert main(["--config", str(cfg), "sql", f"SELECT '{wide}' AS w"]) == 0
    assert f"| {wide} |" in capsys.readouterr().out
    assert main(["--config", str(cfg), "sql", "--max-width", "80", f"SELECT '{wide}' AS w"]) == 0
    assert f"| {'x' * 77}... |" in capsys.readouterr().out


def test_sql_csv_and_json_stream_the_result(workspace, capsys):
    root, settings, cfg, first = workspace
    q = "SELECT range AS i, range * 0.5 AS half, [range, range + 1] AS pair, NULL AS nothing FROM range(5000)"
    assert main(["--config", str(cfg), "sql", "--format", "csv", "--max-rows", "5000", q]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["i", "half", "pair", "nothing"] and len(rows) == 5001 and err == ""
    assert rows[1:] == [[str(i), str(i * 0.5), json.dumps([i, i + 1]), ""] for i in range(5000)]
    assert main(["--config", str(cfg), "sql", "--format", "json", "--max-rows", "3000", q]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == [{"i": i, "half": i * 0.5, "pair": [i, i + 1], "nothing": None} for i in range(3000)]
    assert err == "(truncated: the first 3000 rows are shown; --max-rows for more)\n"
    assert main(["--config", str(cfg), "sql", "--format", "json", "SELECT 1 AS a WHERE false"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    # the connection refuses COPY: these formats are written here, not by DuckDB
    assert main(["--config", str(cfg), "sql", "COPY (SELECT 1) TO 'x.csv'"]) == 1


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="not a git checkout (git check-ignore needs one)")
def test_the_docs_example_folders_are_ignored_by_git():
    ignored = ["models/price.skops", "models/price.toml", "data/my-vectors/items.parquet"]
    kept = ["serving/models/base.py", "batch/models.py", "config/default.toml"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *ignored, *kept], cwd=REPO, capture_output=True,
                          text=True)
    assert done.stdout.split() == ignored


def _docs_sql() -> list[tuple[str, str]]:
    out = []
    for doc in ("sql.md", "models.md", "batch.md"):
        text = (REPO / "docs" / doc).read_text()
        for m in re.finditer(r'python -m batch sql (?:--[\w-]+ \S+ )*"([^"]+)"', text):
            out.append((doc, " ".join(m.group(1).split())))
    return out


def test_the_docs_sql_examples_run_on_the_demos_store(serving_demand):  # noqa: F811
    """The docs point at the store `make demo` writes, and every example there runs on such a store
    (here one with the demo's registered model)."""
    store, cfg, with_demand, live = serving_demand
    defaults = load_settings(None, env={})
    assert demo_store(defaults) == Path("data/store-demo")
    for doc in ("sql.md", "models.md"):
        assert "export HYBRIDSERVE_PATHS_STORE=data/store-demo" in (REPO / "docs" / doc).read_text(), doc
    from batch.catalog import query
    examples = _docs_sql()
    assert len(examples) >= 8
    for doc, sql in examples:
        cols, rows, _ = query(store, sql)
        assert cols, (doc, sql)


def test_in_a_terminal_a_run_shows_its_stages_and_bars(workspace):
    """A real pseudo-terminal: the lines and the bars appear by themselves (no --progress)."""
    import os
    import pty
    import sys
    root, settings, cfg, first = workspace
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "batch", "--config", str(cfg), "run", "--retrain"], cwd=REPO,
                            stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(120) == 0
    text = b"".join(chunks).decode(errors="replace")
    for i, name in enumerate(STAGES, 1):
        assert f"[{i}/8] {name} ..." in text and f"[{i}/8] {name} done in" in text, name
    assert "rating model" in text and "sweep" in text  # the training's bar
    assert re.search(r"recommender similar_items: +\d+%\|", text)  # the precompute's bars
