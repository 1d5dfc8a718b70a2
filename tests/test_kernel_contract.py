"""The sandbox ↔ kernel contract: the paths and variables the hub gives a sandbox are the
ones medzone_kernel reads, both taken from medzone_kernel.contract."""

from __future__ import annotations

import ast
import inspect

from medzone_hub.config import MedZoneHome
from medzone_hub.sandbox import AccountFacts, SandboxConfig, bwrap_argv, build_policy
from medzone_kernel import contract, datasets


def _zone(tmp_path):
    home = MedZoneHome(tmp_path / "zone")
    data = home.dataset_data_dir("ds-a")
    data.mkdir(parents=True)
    home.dataset_manifest_path("ds-a").write_text("{}")
    return home


def test_the_sandbox_sets_what_the_kernel_reads(tmp_path, monkeypatch):
    home = _zone(tmp_path)
    policy = build_policy(home, AccountFacts(name="alice", id=1), ["ds-a"],
                          config=SandboxConfig())
    assert policy.env[contract.ENV_DATA] == contract.DATA_INSIDE
    assert policy.env[contract.ENV_MANIFESTS] == contract.MANIFESTS_INSIDE
    assert policy.home_inside == contract.home_inside("alice")
    argv = bwrap_argv(policy, ["true"])
    binds = {tuple(argv[i + 1:i + 3]) for i, a in enumerate(argv) if a == "--ro-bind"}
    assert (str(home.dataset_data_dir("ds-a").resolve()), contract.dataset_inside("ds-a")) in binds
    assert (str(home.dataset_manifest_path("ds-a").resolve()),
            contract.manifest_inside("ds-a")) in binds
    # Inside, the kernel finds them through the same variables.
    for name, value in policy.env.items():
        monkeypatch.setenv(name, value)
    assert str(datasets.data_root()) == contract.DATA_INSIDE
    assert str(datasets.manifests_root()) == contract.MANIFESTS_INSIDE
    assert str(datasets.data_root() / "ds-a") == contract.dataset_inside("ds-a")


def test_the_kernel_defaults_are_the_contract(monkeypatch):
    monkeypatch.delenv(contract.ENV_DATA, raising=False)
    monkeypatch.delenv(contract.ENV_MANIFESTS, raising=False)
    assert str(datasets.data_root()) == contract.DATA_INSIDE
    assert str(datasets.manifests_root()) == contract.MANIFESTS_INSIDE


def test_the_contract_imports_only_the_standard_library():
    tree = ast.parse(inspect.getsource(contract))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__"}
