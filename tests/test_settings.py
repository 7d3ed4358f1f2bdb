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
    assert s["batch.k_max"] == 12
    assert s["batch.coverage"] == 1.0 and isinstance(s["batch.coverage"], float)
    with pytest.raises(ConfigError, match="HYBRIDSERVE_BATCH_K_MAX: batch.k_max: expected int"):
        load_settings(cfg, env={"HYBRIDSERVE_BATCH_K_MAX": "many"})


def test_misspelled_environment_variable_is_an_error_naming_it():
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"HYBRIDSERVE_BATCH_KMAX": "20"})
    assert str(err.value) == "HYBRIDSERVE_BATCH_KMAX: unknown setting (did you mean HYBRIDSERVE_BATCH_K_MAX?)"
    with pytest.raises(ConfigError, match=r"^HYBRIDSERVE_SERVNG_PORT: unknown setting \(did you mean "
                                          r"HYBRIDSERVE_SERVING_PORT\?\)$"):
        load_settings(None, env={"HYBRIDSERVE_SERVNG_PORT": "8001", "HYBRIDSERVE_SERVING_HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match=r"^HYBRIDSERVE_ZZZ: unknown setting$"):
        load_settings(None, env={"HYBRIDSERVE_ZZZ": "1"})


def test_every_declared_setting_and_the_allowed_variables_are_accepted_from_the_environment(tmp_path):
    """Derived from the settings table: a setting added later is an accepted variable at once."""
    from serving.settings import ENV_NOT_SETTINGS, _toml_value, env_var
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    env = {env_var(s): (_toml_value(s.default).strip('"').replace("_", "") if not isinstance(s.default, str)
                        else s.default) for s in SETTINGS}
    env.update({name: str(cfg) if name == "HYBRIDSERVE_CONFIG" else "127.0.0.1:1" for name in ENV_NOT_SETTINGS})
    env["PATH"] = "/bin"  # other variables are none of our business
    settings = load_settings(None, env=env)
    assert settings.source == str(cfg)
    for s in SETTINGS:
        assert settings[s.key] == s.default, s.key


def test_misspelled_environment_variable_stops_the_cli_with_one_line(tmp_path, monkeypatch, capsys):
    from batch.__main__ import main
    monkeypatch.setenv("HYBRIDSERVE_BATCH_KMAX", "20")
    assert main(["snapshots"]) == 1
    assert capsys.readouterr().err == ("config error: HYBRIDSERVE_BATCH_KMAX: unknown setting "
                                       "(did you mean HYBRIDSERVE_BATCH_K_MAX?)\n")
