"""One hub config file for every face: the settings built from it are the file's."""

import pytest

from medzone_hub.airlock import ExportLimits
from medzone_hub.errors import InvalidInput
from medzone_hub.hubconfig import (export_limits, hub_config_path, load_hub_config,
                                   sandbox_config, screen_config)
from medzone_hub.hubapp import DEFAULT_CONFIG, ENV_HUB_CONFIG
from medzone_hub.sandbox import SandboxConfig
from medzone_hub.screen import ScreenConfig


def test_the_sandbox_screen_and_export_settings_come_from_one_file(tmp_path):
    path = tmp_path / "jupyterhub_config.py"
    path.write_text("c.SafeZoneSpawner.pids_limit = 64\n"
                    "c.Spawner.mem_limit = 512 * 1024 * 1024\n"
                    "c.ScreenConfig.profile = 'opensafely'\n"
                    "c.ExportLimits.export_max_file_bytes = 1 << 20\n")
    config = load_hub_config(path)
    sandbox = sandbox_config(config)
    assert (sandbox.pids_limit, sandbox.memory_limit_bytes) == (64, 512 << 20)
    assert sandbox.tmp_size_bytes == SandboxConfig().tmp_size_bytes
    assert screen_config(config) == ScreenConfig(profile="opensafely")
    assert export_limits(config) == ExportLimits(export_max_file_bytes=1 << 20)


def test_an_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("")
    config = load_hub_config(path)
    assert sandbox_config(config) == SandboxConfig()
    assert screen_config(config) == ScreenConfig()
    assert export_limits(config) == ExportLimits()


def test_the_default_is_the_file_the_hub_runs_with(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_HUB_CONFIG, raising=False)
    assert hub_config_path() == DEFAULT_CONFIG
    monkeypatch.setenv(ENV_HUB_CONFIG, str(tmp_path / "hub.py"))
    assert hub_config_path() == tmp_path / "hub.py"
    assert hub_config_path(tmp_path / "mine.py") == tmp_path / "mine.py"


def test_a_missing_file_or_an_unknown_setting_is_one_line_error(tmp_path):
    with pytest.raises(InvalidInput, match="no hub config file"):
        load_hub_config(tmp_path / "nope.py")
    path = tmp_path / "typo.py"
    path.write_text("c.ScreenConfig.profil = 'opensafely'\n")
    with pytest.raises(InvalidInput, match="unknown screen setting 'profil'"):
        screen_config(load_hub_config(path))
