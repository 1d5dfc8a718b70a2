"""MedZone works from a wheel, not only from a checkout: the wheel builds without a packaging
warning, and once installed into a fresh environment outside the checkout it lists the
templates, finds their notebooks, reads their parameters, ships the tutorials and the
portal's pages, and runs a template end to end in a real sandbox, all through the installed
packages.

The fresh environment borrows its dependencies from the test environment through a ``.pth``
file (installing torch and the rest afresh is gigabytes); the run's hub config binds that
folder read-only into the sandbox (``c.SafeZoneSpawner.extra_ro_binds``), as an operator
would for a shared library folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What the build reads (a copy, so that the build's own folders never land in the checkout).
SOURCES = ["pyproject.toml", "README.md", "hub", "medzone_kernel", "templates", "notebooks"]
TEMPLATES = ["ct_nodule_analysis", "ct_nodule_segmentation_training", "cxr_classifier_training",
             "model_inference"]
TUTORIALS = ["01_getting_started", "02_viewing_dicom", "03_first_model",
             "04_preparing_results_for_export"]

PROBE = textwrap.dedent("""
    import json, sys
    from importlib import resources

    import medzone_kernel
    from medzone_hub import runner
    from medzone_hub.portal import HUB_TEMPLATES

    path = runner.find_template("ct_nodule_analysis")
    spec = runner.template_parameters(path)
    values = runner.check_parameters(spec, [("max_patients", "2"), ("figure_patients", "1")])
    tutorials = sorted(p.name for p in resources.files("medzone_tutorials").iterdir()
                       if p.name.endswith(".ipynb"))
    portal = resources.files("medzone_hub.portal")
    print(json.dumps({
        "modules": [runner.__file__, medzone_kernel.__file__],
        "editable_finder": any("__editable__" in name for name in sys.modules),
        "templates": runner.list_templates(),
        "template": str(path),
        "parameters": sorted(spec),
        "values": values,
        "tutorials": tutorials,
        "hub_templates": HUB_TEMPLATES,
        "portal_files": [str(portal / "templates" / "base.html"),
                         str(portal / "static" / "portal.css"),
                         str(portal / "hub_templates" / "home.html")],
        "sys_path": sys.path,
    }))
""")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    tree = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, tree / name)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--disable-pip-version-check",
                           "-w", str(out), str(tree)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("medzone-*.whl")
    return built, done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(wheel) -> Path:
    """A fresh environment outside the checkout holding only the wheel; the dependencies come
    from this environment's site-packages through a ``.pth`` file."""
    # Under a 0755 folder in /tmp: the sandbox uid must reach the environment to run in it
    # (pytest's own temporary folders sit under a 0700 one).
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="medzone-wheel-"))
    os.chmod(base, 0o755)
    venv = base / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "-q", "--target", str(site), str(wheel[0])],
                   check=True, capture_output=True, timeout=300)
    yield python
    subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
    shutil.rmtree(base, ignore_errors=True)


def test_every_package_folder_is_declared():
    """A new subpackage (a folder with ``__init__.py``) must be listed in pyproject.toml, or
    the wheel ships without it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                rel = init.parent.relative_to(ROOT / folder).parts
                found.add(".".join((name, *rel)))
    assert found <= set(setuptools["packages"]), "add to [tool.setuptools] packages: " + \
        ", ".join(sorted(found - set(setuptools["packages"])))


def test_the_wheel_builds_without_a_packaging_warning(wheel):
    _, output = wheel
    assert "BuildBackendWarning" not in output
    assert "SetuptoolsDeprecationWarning" not in output
    assert "is absent from the `packages` configuration" not in output


def test_an_install_outside_the_checkout_finds_templates_tutorials_and_pages(installed,
                                                                             tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(installed), "-c", PROBE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    prefix = str(installed.parent.parent)
    assert all(module.startswith(prefix) for module in found["modules"])
    assert not found["editable_finder"] and str(ROOT) not in found["sys_path"]
    assert found["templates"] == TEMPLATES
    assert found["template"].startswith(prefix)
    assert found["template"].endswith("/medzone_templates/ct_nodule_analysis.ipynb")
    assert Path(found["template"]).is_file()
    assert (Path(found["template"]).read_bytes()
            == (ROOT / "templates" / "ct_nodule_analysis.ipynb").read_bytes())
    assert "dataset" in found["parameters"]
    assert found["values"] == {"max_patients": 2, "figure_patients": 1}
    assert found["tutorials"] == [f"{name}.ipynb" for name in TUTORIALS]
    for path in [found["hub_templates"] + "/home.html", *found["portal_files"]]:
        assert path.startswith(prefix) and Path(path).is_file(), path


def test_a_template_runs_from_the_installed_wheel(installed):
    """The whole path from outside the checkout: demo data, ingest, a grant, and a real
    sandboxed papermill run of the installed ``ct_nodule_analysis``."""
    zone = installed.parent.parent.parent / "zone"
    zone.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDZONE_DB_URL")}
    env["MEDZONE_HOME"] = str(zone / "home")
    site = subprocess.run([str(installed), "-c", "import medzone_hub, sysconfig; "
                           "print(sysconfig.get_path('purelib')); print(medzone_hub.__file__)"],
                          capture_output=True, text=True, check=True, env=env,
                          cwd=zone).stdout.split()
    assert site[1].startswith(site[0]), site
    config = zone / "hub_config.py"
    config.write_text(
        f"load_subconfig({str(Path(site[0]) / 'medzone_hub' / 'jupyterhub_config.py')!r})\n"
        f"c.SafeZoneSpawner.extra_ro_binds = [({sysconfig.get_path('purelib')!r},) * 2]\n")

    def medzone(*args: str) -> str:
        done = subprocess.run([str(installed), "-m", "medzone_hub.cli", *args], cwd=zone,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (args, done.stderr[-3000:])
        return done.stdout.strip()

    medzone("demo-data", str(zone / "cohort"), "--patients", "2", "--seed", "3")
    medzone("dataset", "add", "demo", str(zone / "cohort"), "--deidentify", "--quiet")
    medzone("user", "add", "alice")
    medzone("user", "add", "steward", "--role", "data-steward")
    application = medzone("access", "apply", "alice", "demo", "--purpose", "wheel test")
    medzone("access", "approve", application, "--reviewer", "steward")
    notebook = medzone("run", "ct_nodule_analysis", "--user", "alice", "--hub-config",
                       str(config), "-p", "dataset", "demo", "-p", "figure_patients", "1")
    assert notebook.endswith("/ct_nodule_analysis.ipynb"), notebook
    runs = json.loads(medzone("runs", "list", "--json"))
    assert [(r["user"], r["template"], r["state"]) for r in runs] == \
        [("alice", "ct_nodule_analysis", "done")]
    medzone("audit", "verify")
