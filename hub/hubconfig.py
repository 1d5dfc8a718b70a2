"""The hub config file every face reads, and the settings built from it.

The hub, the portal, the hub API and the CLI all read the same ``jupyterhub_config.py``
(``--hub-config``; default: the file the hub runs with, ``$MEDZONE_HUB_CONFIG``, else the
package's ``hub/jupyterhub_config.py``), so ``medzone sandbox exec`` gets exactly the
sandbox of that user's kernel, and a request from the CLI the export limits and screen of
one from the portal, whatever the configuration:

* :func:`sandbox_config` — the ``SafeZoneSpawner`` traits (``c.SafeZoneSpawner.pids_limit``,
  ``c.Spawner.mem_limit``…) as a :class:`~medzone_hub.sandbox.SandboxConfig`;
* :func:`screen_config` — the ``ScreenConfig`` section (``c.ScreenConfig.profile``…);
* :func:`export_limits` — the ``ExportLimits`` section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from .airlock import ExportLimits
from .config import ENV_HOME, MedZoneHome
from .errors import InvalidInput
from .hubapp import DEFAULT_CONFIG, ENV_HUB_CONFIG
from .sandbox import SandboxConfig
from .screen import ScreenConfig


def hub_config_path(explicit: str | os.PathLike | None = None) -> Path:
    """*explicit*, else the file the hub runs with (``$MEDZONE_HUB_CONFIG``), else the
    package's default config."""
    return Path(explicit or os.environ.get(ENV_HUB_CONFIG) or DEFAULT_CONFIG).expanduser()


def load_hub_config(path: str | os.PathLike | None = None,
                    home: MedZoneHome | None = None) -> Config:
    """The hub config file at *path* (see :func:`hub_config_path`) as JupyterHub reads it.

    The file reads ``MEDZONE_HOME`` from the environment: with *home*, it reads that zone's
    (what ``medzone --home`` names) while it loads. :class:`InvalidInput` when the file is
    missing or fails."""
    path = hub_config_path(path)
    if not path.is_file():
        raise InvalidInput(f"no hub config file at {path}")
    with _environment(ENV_HOME, str(home.root) if home is not None else None):
        loader = PyFileConfigLoader(path.name, path=str(path.parent.resolve()))
        try:
            return loader.load_config()
        except Exception as err:  # the file is Python: any error it raises
            raise InvalidInput(f"cannot load the hub config file {path}: {err}") from None


@contextlib.contextmanager
def _environment(name: str, value: str | None):
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def sandbox_config(config: Config) -> SandboxConfig:
    """The :class:`SandboxConfig` the hub's spawner uses (its ``SafeZoneSpawner`` traits)."""
    from .spawner import SafeZoneSpawner  # JupyterHub's spawner machinery: only when asked

    return SafeZoneSpawner(config=config).sandbox_config()


def screen_config(config: Config | None) -> ScreenConfig:
    """The screen settings of the ``ScreenConfig`` section, e.g.
    ``c.ScreenConfig.profile = "opensafely"``; defaults for the rest."""
    section = dict(config["ScreenConfig"]) if config is not None and "ScreenConfig" in config \
        else {}
    known = {f.name for f in dataclasses.fields(ScreenConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise InvalidInput(f"unknown screen setting {unknown[0]!r} "
                           f"(one of {', '.join(sorted(known))})")
    return ScreenConfig(**section)


def export_limits(config: Config) -> ExportLimits:
    """The export size limits of the ``ExportLimits`` section."""
    return ExportLimits.from_config(config)


__all__ = ["export_limits", "hub_config_path", "load_hub_config", "sandbox_config",
           "screen_config"]
