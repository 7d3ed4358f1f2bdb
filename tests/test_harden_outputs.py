"""Validation judges what a model really answers: NaN (and None) equal themselves, mixed outputs are
stored and compared by type and value (not stringified), and a real difference is named. OS errors
during a run name their path: EIO on fsync, a full disk during np.save."""
from __future__ import annotations

import errno
import os
import re
import subprocess

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from batch.__main__ import main
from serving.models.predictor import read_table
from serving.store import Store, describe_os_error, os_error_at


class NaNModel(LinearRegression):
    """NaN for x = 3, 10, 17; a float otherwise."""

    def predict(self, X):
        x = np.asarray(X["x"], np.float64)
        return np.where(x % 7 == 3, np.nan, x * 1.5)


class MixedModel(LinearRegression):
    """An int, a string, None, NaN or a bool, by x (an object array, as a pandas-built output is)."""

    def predict(self, X):
        kinds = [lambda x: int(x), lambda x: f"s{x}", lambda x: None, lambda x: float("nan"), lambda x: x % 2 == 0]
        return np.array([kinds[int(x) % 5](int(x)) for x in np.asarray(X["x"])], dtype=object)


class DriftingModel(LinearRegression):
    """Answers something else each time it is asked for x = 5 (a real difference validation must name)."""
    calls = 0

    def predict(self, X):
        DriftingModel.calls += 1
        x = np.asarray(X["x"], np.float64)
        return np.where(x == 5, 1000.0 + DriftingModel.calls, x)


def _register(root, cfg, name: str, cls) -> None:
    X = pd.DataFrame({"x": np.arange(21)})
    est = cls().fit(X, np.arange(21.0))
    path = root / "artifacts" / f"{name}.joblib"
    path.parent.mkdir(exist_ok=True)
    joblib.dump(est, path)
    cfg.write_text(cfg.read_text() + f'\n[models.{name}]\nartifact = "{path}"\nformat = "joblib"\ntrusted = true\n'
                   f'[[models.{name}.inputs]]\nname = "x"\ntype = "int"\nmin = 0\nmax = 20\n')


def test_nan_and_mixed_outputs_pass_validation_and_read_back_as_they_were(workspace, capsys):
    root, settings, cfg, first = workspace
    _register(root, cfg, "nanny", NaNModel)
    _register(root, cfg, "mixed", MixedModel)
    assert main(["--config", str(cfg), "run"]) == 0, capsys.readouterr().err
    store = Store(settings["paths.store"])
    sid = store.current_id()
    validation = store.read_manifest(sid)["validation"]["models"]
    assert validation["nanny"] == {"checked": 21, "mismatches": 0}
    assert validation["mixed"] == {"checked": 21, "mismatches": 0}
    mixed = read_table(store.model_dir(sid, "mixed"))
    want = MixedModel().predict(pd.DataFrame({"x": np.arange(21)}))
    for x in range(21):
        got, expect = mixed[f"[{x}]"], want[x]
        if isinstance(expect, float):
            assert np.isnan(got)
        else:
            assert got == expect and type(got) is type(expect), (x, got, expect)
    nanny = read_table(store.model_dir(sid, "nanny"))
    assert np.isnan(nanny["[3]"]) and nanny["[4]"] == 6.0


def test_a_real_difference_is_named(workspace, capsys):
    root, settings, cfg, first = workspace
    _register(root, cfg, "drift", DriftingModel)
    assert main(["--config", str(cfg), "run"]) == 3
    err = capsys.readouterr().err
    assert re.fullmatch(r"refused: validation refused the snapshot: drift: 1/21 predictions differ when recomputed "
                        r"live \(first: x=5: stored 10\d\d\.0 \(float\), live 10\d\d\.0 \(float\)\)\n", err), err


@pytest.mark.parametrize("what", ["a snapshot file", "a folder"])
def test_eio_on_fsync_names_the_path(workspace, capsys, monkeypatch, what):
    """The publish's own fsyncs (not only those inside a named write) say which file or folder failed."""
    root, settings, cfg, first = workspace
    real_fsync, failed = os.fsync, []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        hit = (os.path.isdir(path) if what == "a folder" else
               "/snapshots/.tmp-" in path and "/parts/" not in path and not path.endswith(".tmp"))
        if hit:
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["--config", str(cfg), "run"]) == 1
    err = capsys.readouterr().err
    assert failed and err == f"error: {failed[0]}: Input/output error (EIO)\n"


def test_a_short_write_is_a_full_disk():
    """numpy's own words for a full disk during np.save."""
    exc = os_error_at(OSError("150000 requested and 109552 written"), "/x/item_vecs.npy")
    assert describe_os_error(exc) == "/x/item_vecs.npy: No space left on device (ENOSPC)"


def test_a_full_disk_during_np_save_names_the_file(workspace, capsys):
    """A real full disk: the trained-model cache on a tmpfs with two pages left."""
    root, settings, cfg, first = workspace
    folder = Store(settings["paths.store"]).models_dir
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        try:
            with open(folder / "filler", "wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        os.truncate(folder / "filler", os.path.getsize(folder / "filler") - 2 * 4096)
        assert main(["--config", str(cfg), "run", "--retrain"]) == 1
        err = capsys.readouterr().err
        assert re.fullmatch(rf"error: {re.escape(str(folder))}/\.tmp-[^/]+/recommender/\w+\.npy: "
                            r"No space left on device \(ENOSPC\)\n", err), err
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
