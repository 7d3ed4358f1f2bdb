"""What the command lines share (serving/cli.py): one table from exception to exit code, and one rule
for which config wins (--config, then $HYBRIDSERVE_CONFIG, then the defaults; config/default.toml
for make targets), said in one line by each command."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serving.cli import config_line, exit_code
from serving.errors import (Abandoned, ConfigError, HybridServeError, InputError, PortTaken, StoreLockedError,
                            ValidationFailed)
from serving.settings import load_settings

REPO = Path(__file__).resolve().parent.parent


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without our variables, nor an outer make's (make test)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HYBRIDSERVE_") and k not in ("CONFIG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(extra)
    return env


@pytest.fixture
def no_config_env(monkeypatch):
    for name in [v for v in os.environ if v.startswith("HYBRIDSERVE_")]:
        monkeypatch.delenv(name)


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


def test_the_config_line_says_which_file_and_why(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    assert config_line(str(cfg), load_settings(cfg, env={}), env={}) == f"config: {cfg} (--config)"
    env = {"HYBRIDSERVE_CONFIG": str(cfg), "HYBRIDSERVE_BATCH_K_MAX": "20", "PATH": "/bin"}
    assert config_line(None, load_settings(None, env=env), env) == (
        f"config: {cfg} ($HYBRIDSERVE_CONFIG); overridden by HYBRIDSERVE_BATCH_K_MAX")
    assert config_line(None, load_settings(None, env={}), env={}) == (
        "config: built-in defaults (no --config, $HYBRIDSERVE_CONFIG unset)")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_targets_pass_a_config_only_when_one_is_asked_for():
    """HYBRIDSERVE_CONFIG=models/price.toml make serve must serve models/price.toml (issue 20.5): make
    passes --config only for CONFIG=..., and config/default.toml only when neither is set."""
    def commands(target: str, *args: str, **env: str) -> list[str]:
        out = subprocess.run(["make", "-n", target, *args], cwd=REPO, env=_clean_env(**env), capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return [line for line in out.splitlines() if " -m batch " in line or " -m serving.server" in line]

    for target, module in (("serve", "serving.server"), ("batch", "batch"), ("schedule", "batch"),
                           ("demo", "batch"), ("train", "batch"), ("sample", "batch")):
        plain = commands(target)
        assert plain and all(f"-m {module} --config config/default.toml" in c for c in plain), plain
        from_env = commands(target, HYBRIDSERVE_CONFIG="models/price.toml")
        assert from_env and all("--config" not in c for c in from_env), from_env
        given = commands(target, "CONFIG=my.toml", HYBRIDSERVE_CONFIG="models/price.toml")
        assert given and all(f"-m {module} --config my.toml" in c for c in given), given


def _held_port_config(path: Path, holder: socket.socket) -> Path:
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    path.write_text(f'[serving]\nhost = "127.0.0.1"\nport = {holder.getsockname()[1]}\n')
    return path


def test_the_server_reads_hybridserve_config_and_a_flag_wins_over_it(tmp_path):
    """Which config the server took, seen without starting it: each config names a port another socket
    holds, and the server refuses the one it read (exit 2, one line naming the port)."""
    with socket.socket() as a, socket.socket() as b:
        env_cfg, flag_cfg = _held_port_config(tmp_path / "env.toml", a), _held_port_config(tmp_path / "flag.toml", b)
        env = _clean_env(HYBRIDSERVE_CONFIG=str(env_cfg))
        for args, holder in (([], a), (["--config", str(flag_cfg)], b)):
            proc = subprocess.run([sys.executable, "-m", "serving.server", *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.startswith(f"hybridserve: cannot listen on 127.0.0.1:{holder.getsockname()[1]}: ")


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


def test_the_three_commands_share_one_config_option_and_help_flags(capsys):
    """python -m batch, python -m serving.server and python -m serving: -h and --help, the same --config."""
    import batch.__main__
    import serving.__main__
    import serving.server

    helps = []
    for main in (batch.__main__.main, serving.server.main, serving.__main__.main):
        for flag in ("-h", "--help"):
            assert main([flag]) == 0
            out = capsys.readouterr().out
            helps.append(" ".join(out.split()))
    for text in helps:
        assert "--config FILE Config file (TOML); default $HYBRIDSERVE_CONFIG, else the built-in defaults." in text
        assert "-h, --help Show this message and exit." in text
    assert "--workers INTEGER Overrides serving.workers." in helps[2] and "--app" not in helps[2]


def test_a_batch_run_says_first_which_config_it_uses(tmp_path, monkeypatch, capsys, no_config_env):
    """Printed before any work, so a failing run says it too (here: no inputs, exit 1)."""
    from batch.__main__ import main
    monkeypatch.chdir(tmp_path)  # the defaults' relative paths: nothing there
    env_cfg, flag_cfg = tmp_path / "env.toml", tmp_path / "flag.toml"
    for cfg in (env_cfg, flag_cfg):
        cfg.write_text(f'[paths]\ninputs = "{tmp_path / cfg.stem}"\nstore = "{tmp_path / "store"}"\n')
    assert main(["run"]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "config: built-in defaults (no --config, $HYBRIDSERVE_CONFIG unset)"
    monkeypatch.setenv("HYBRIDSERVE_CONFIG", str(env_cfg))
    assert main(["run"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"config: {env_cfg} ($HYBRIDSERVE_CONFIG)" and str(tmp_path / "env") in err
    monkeypatch.setenv("HYBRIDSERVE_BATCH_K_MAX", "20")
    assert main(["--config", str(flag_cfg), "run"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"config: {flag_cfg} (--config); overridden by HYBRIDSERVE_BATCH_K_MAX"
    assert str(tmp_path / "flag") in err


def test_the_scheduler_logs_which_config_it_uses(tmp_path, monkeypatch, caplog, no_config_env):
    import batch.schedule
    from batch.__main__ import main
    served = []

    class Daemon:
        def __init__(self, settings):
            self.settings = settings

        def serve(self):
            served.append(self.settings.source)

    monkeypatch.setattr(batch.schedule, "Daemon", Daemon)
    caplog.set_level(logging.INFO)  # and back afterwards (the command lowers the root level to INFO)
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    monkeypatch.setenv("HYBRIDSERVE_CONFIG", str(cfg))
    assert main(["schedule"]) == 0
    assert served == [str(cfg)]
    assert f"config: {cfg} ($HYBRIDSERVE_CONFIG)" in [r.getMessage() for r in caplog.records if r.name == "batch"]
