from pathlib import Path

import pytest

from serving.errors import ConfigError
from serving.settings import SETTINGS, load_settings, render_default_toml

REPO = Path(__file__).resolve().parent.parent


def test_default_toml_lists_every_setting_with_its_default():
    path = REPO / "config" / "default.toml"
    assert path.read_text() == render_default_toml(), "regenerate config/default.toml from serving/settings.py"
    settings = load_settings(path, env={})
    for s in SETTINGS:
        assert settings[s.key] == s.default


def test_unknown_key_names_file_and_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[batch]\nk_mx = 10\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(err.value) == f"{cfg}: batch.k_mx: unknown setting"


def test_wrong_type_names_file_and_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[batch]\nk_max = "ten"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(err.value) == f"{cfg}: batch.k_max: expected int, got str 'ten'"


def test_out_of_range_and_bad_toml(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[batch]\nk_max = 0\n")
    with pytest.raises(ConfigError, match=r"batch.k_max: must be >= 1"):
        load_settings(cfg, env={})
    cfg.write_text("[batch\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.toml", env={})


def test_environment_overrides_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[batch]\nk_max = 10\ncoverage = 1\n")
    s = load_settings(cfg, env={"HYBRIDSERVE_BATCH_K_MAX": "12"})
    assert s["batch.k_max"] == 12 and s.batch.k_max == 12
    assert s["batch.coverage"] == 1.0 and isinstance(s["batch.coverage"], float)
    with pytest.raises(ConfigError, match="HYBRIDSERVE_BATCH_K_MAX: batch.k_max: expected int"):
        load_settings(cfg, env={"HYBRIDSERVE_BATCH_K_MAX": "many"})
