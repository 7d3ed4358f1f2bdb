"""What the command lines share (serving/cli.py): one table from exception to exit code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serving.cli import exit_code
from serving.errors import (Abandoned, ConfigError, HybridServeError, InputError, PortTaken, StoreLockedError,
                            ValidationFailed)

REPO = Path(__file__).resolve().parent.parent


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without our variables, nor an outer make's (make test)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HYBRIDSERVE_") and k not in ("CONFIG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(extra)
    return env


def test_one_table_from_exception_to_exit_code():
    assert exit_code(StoreLockedError("held by pid 7")) == (75, "locked: held by pid 7")
    assert exit_code(ValidationFailed("3/21 differ")) == (3, "refused: 3/21 differ")
    assert exit_code(Abandoned("SIGTERM")) == (1, "abandoned: SIGTERM")
    assert exit_code(ConfigError("c.toml: batch.k_mx: unknown setting")) == (
        1, "config error: c.toml: batch.k_mx: unknown setting")
    assert exit_code(PortTaken("cannot listen on 127.0.0.1:8000")) == (2, "hybridserve: cannot listen on 127.0.0.1:8000")
    assert exit_code(InputError("x.parquet", "user_id", "nulls")) == (1, "error: x.parquet: user_id: nulls")
    assert exit_code(HybridServeError("no catalog yet")) == (1, "error: no catalog yet")
    assert exit_code(OSError(28, "No space left on device", "data/store/x")) == (
        1, "error: data/store/x: No space left on device (ENOSPC)")
    assert exit_code(KeyError("a bug")) is None  # not ours to word: raised with its traceback


def test_server_and_dev_server_config_errors_are_one_line_exit_1(tmp_path):
    """The documented code for a config error is the batch CLI's 1 (the server used to say 2)."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[serving]\nport = "x"\n')
    for module in ("serving.server", "serving"):
        proc = subprocess.run([sys.executable, "-m", module, "--config", str(bad)], cwd=tmp_path, env=_clean_env(),
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stderr) == (1, f"config error: {bad}: serving.port: expected int, got str 'x'\n")
    usage = subprocess.run([sys.executable, "-m", "serving.server", "--help"], cwd=tmp_path, env=_clean_env(),
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--workers" in usage.stdout and "--app" not in usage.stdout

