"""Template runs (``medzone run``, the portal's run form) against a hostile home.

Everything the attacker does happens from inside their real sandbox (``medzone sandbox
exec``): a ``~/runs`` symbolic link into a root-only host folder, and code or configuration
planted wherever Python, Jupyter, IPython or matplotlib would read it (IPython start-up
files and config, a ``python3`` kernel spec, ``~/.jupyter``, user site-packages with
``usercustomize``/``.pth``, ``~/.config/matplotlib``, modules in the home and, while the run
is starting, modules, a ``matplotlibrc`` and a forged ``template.ipynb`` in the run folder
itself). The run must refuse the link in one line and create nothing where it points, and
an executed notebook recorded against the template's sha256 must carry no injected output,
with none of the planted code having run; the audit row records the environment the run had.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from medzone_hub import accounts
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome

from ..fixtures import sandbox_base

PY = f"python3.{sys.version_info.minor}"


def _template(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell("wait_for_plant = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Isolation probe"),
        params,
        nbformat.v4.new_code_cell(
            "import json, os, site, sys, time\n"
            "if wait_for_plant:  # let the attacker's watcher plant into this run folder first\n"
            "    flag = os.path.join(os.environ['MEDZONE_RUN_DIR'], 'planted')\n"
            "    deadline = time.time() + 30\n"
            "    while not os.path.exists(flag) and time.time() < deadline:\n"
            "        time.sleep(0.05)\n"
            "    assert os.path.exists(flag), 'the watcher never planted'\n"
            "import numpy, matplotlib\n"
            "report = {\n"
            "    'numpy': numpy.__file__,\n"
            "    'dpi': matplotlib.rcParams['figure.dpi'],\n"
            "    'injected': sorted(k for k in list(globals()) + dir(__builtins__)\n"
            "                       if k.startswith('INJECTED')),\n"
            "    'user_site': site.ENABLE_USER_SITE,\n"
            "    'cwd': os.getcwd(),\n"
            "    'run_dir': os.environ['MEDZONE_RUN_DIR'],\n"
            "    'path_has_cwd': '' in sys.path or os.getcwd() in sys.path,\n"
            "}\n"
            "print(json.dumps(report))"),
    ]
    nbformat.write(nb, str(path))
    return path


# What the attacker plants in their home, from inside their sandbox. Every planted piece
# of code writes a marker into ~/markers/ and announces itself with INJECTED.
PLANT = r"""
import json, os, sys
home = os.environ["HOME"]
py, python = sys.argv[1], sys.argv[2]
def put(rel, text):
    path = os.path.join(home, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
def code(kind):
    return (f"import os as _o\nopen(_o.path.join({home!r}, 'markers', {kind!r}), 'w').close()\n"
            f"print('INJECTED by {kind}')\nINJECTED_{kind.replace('-', '_').upper()} = 1\n")
os.makedirs(os.path.join(home, "markers"), exist_ok=True)
put(".ipython/profile_default/startup/00-evil.py", code("ipython-startup"))
put(".ipython/profile_default/ipython_kernel_config.py",
    f"c.IPKernelApp.exec_lines = [{code('ipython-config')!r}]\n")
put(".ipython/profile_default/ipython_config.py",
    f"c.InteractiveShellApp.exec_lines = [{code('ipython-config2')!r}]\n")
put(".jupyter/ipython_kernel_config.py", f"c.IPKernelApp.exec_lines = [{code('jupyter-config')!r}]\n")
put(".jupyter/jupyter_config.json", json.dumps({"IPKernelApp": {"exec_lines": [code("jupyter-json")]}}))
put(".local/share/jupyter/kernels/python3/kernel.json", json.dumps({
    "argv": ["/bin/sh", "-c", f"touch {home}/markers/kernelspec; exec {python} -m ipykernel_launcher -f \"$0\"",
             "{connection_file}"],
    "display_name": "Python 3", "language": "python"}))
site = f".local/lib/{py}/site-packages"
put(f"{site}/usercustomize.py", code("usercustomize") + "import builtins\nbuiltins.INJECTED_USERSITE = 1\n")
put(f"{site}/evil.pth", f"import os; open(os.path.join({home!r}, 'markers', 'pth'), 'w').close()\n")
put(f"{site}/numpy.py", code("usersite-numpy"))
put(".config/matplotlib/matplotlibrc", "figure.dpi: 17\n")
for name in ("numpy", "papermill", "json", "ipykernel_launcher", "nbclient", "traitlets"):
    put(f"{name}.py", code(f"home-{name}"))
put("plant/numpy.py", code("run-folder-numpy"))
put("plant/sitecustomize.py", code("run-folder-sitecustomize"))
put("plant/matplotlibrc", "figure.dpi: 19\n")
put("plant/template.ipynb", json.dumps({  # swapped for the run folder's template copy
    "nbformat": 4, "nbformat_minor": 5,
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "cells": [{"cell_type": "code", "id": "forged", "metadata": {}, "execution_count": None,
               "outputs": [], "source": code("forged-template")}]}))
print("planted")
"""

# Watches ~/runs from inside the sandbox and plants into each new run folder (bounded).
WATCH = r"""
for i in $(seq 1 600); do
  for d in "$HOME"/runs/*/; do
    [ -d "$d" ] || continue
    [ -e "$d/planted" ] && continue
    cp "$HOME/plant/numpy.py" "$HOME/plant/sitecustomize.py" "$HOME/plant/matplotlibrc" \
      "$HOME/plant/template.ipynb" "$d" && touch "$d/planted"
  done
  sleep 0.05
done
"""


class Zone:
    def __init__(self, base: Path):
        from medzone_hub.db import connect

        self.base = base
        self.home = MedZoneHome(base / "home").ensure()
        self.store = connect(self.home.db_url)
        self.template = _template(base / "isolation_probe.ipynb")

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        return env

    def cli(self, *args, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *map(str, args)],
                              env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd="/")

    def exec(self, user: str, *cmd) -> subprocess.CompletedProcess:
        return self.cli("sandbox", "exec", "--user", user, "--", *cmd, timeout=60)

    def audit(self, action: str) -> list:
        from sqlalchemy import select

        from medzone_hub.models import AuditEvent

        with self.store.session() as session:
            rows = session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                   .order_by(AuditEvent.seq))
            return [(r.actor, r.detail) for r in rows]

    def user_home(self, user: str) -> Path:
        return self.home.root / "homes" / user


@pytest.fixture(scope="module")
def zone():
    with sandbox_base("medzone-secruns-") as base:
        z = Zone(base)
        with z.store.session() as session:
            for name in ("mallory", "eve", "trent"):
                accounts.add_user(session, name, actor="test")
        yield z
        z.store.close()


# --- ~/runs is a link ---------------------------------------------------------------------

@pytest.mark.parametrize("user, target", [
    ("eve", "rootonly"),           # an existing root-only host folder
    ("trent", "rootonly/new"),     # a folder root would have to create
])
def test_runs_link_is_refused_and_nothing_is_created_where_it_points(zone, user, target):
    if os.geteuid() != 0:
        pytest.skip("the hub runs as root only in a root test run")
    victim = zone.base / "rootonly"
    victim.mkdir(mode=0o700, exist_ok=True)
    before = sorted(p.name for p in victim.rglob("*"))
    planted = zone.exec(user, "ln", "-s", str(zone.base / target), f"/home/{user}/runs")
    assert planted.returncode == 0, planted.stderr
    assert (zone.user_home(user) / "runs").is_symlink()

    done = zone.cli("run", str(zone.template), "--user", user)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("medzone: error: refusing 'runs'"), lines[0]
    assert "symbolic link" in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert sorted(p.name for p in victim.rglob("*")) == before
    assert not (zone.base / "rootonly" / "new").exists()
    assert not any(d["output"].startswith(f"/home/{user}/") for _, d in zone.audit("run.execute"))
    assert zone.cli("audit", "verify").returncode == 0


# --- planted code and configuration -------------------------------------------------------

@pytest.fixture(scope="module")
def attacked_run(zone):
    user = "mallory"
    planted = zone.exec(user, "python3", "-c", PLANT, f"python3.{sys.version_info.minor}",
                        sys.executable)
    assert planted.returncode == 0, planted.stderr
    # The plants are live, not inert files: a plain python in the sandbox (working folder:
    # the home) runs the planted module.
    probe = zone.exec(user, "python3", "-c", "import nbclient")
    assert (zone.user_home(user) / "markers" / "home-nbclient").exists(), probe.stderr
    for marker in (zone.user_home(user) / "markers").iterdir():
        marker.unlink()

    watcher = subprocess.Popen(
        [sys.executable, "-m", "medzone_hub.cli", "sandbox", "exec", "--user", user, "--",
         "/bin/sh", "-c", WATCH],
        env=zone.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    try:
        done = zone.cli("run", str(zone.template), "--user", user, "-p", "wait_for_plant", "true")
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    notebook = Path(done.stdout.strip())
    return zone, user, notebook


def _report(notebook: Path) -> dict:
    nb = nbformat.read(str(notebook), as_version=4)
    texts = [o.get("text", "") for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    line = next(t for t in texts if t.lstrip().startswith("{"))
    return json.loads(line)


def _outputs(notebook: Path) -> str:
    nb = nbformat.read(str(notebook), as_version=4)
    return json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])


@pytest.mark.parametrize("marker", [
    "ipython-startup", "ipython-config", "ipython-config2", "jupyter-config", "jupyter-json",
    "kernelspec", "usercustomize", "pth", "usersite-numpy", "home-numpy", "home-papermill",
    "home-json", "home-ipykernel_launcher", "home-nbclient", "home-traitlets",
    "run-folder-numpy", "run-folder-sitecustomize", "forged-template",
])
def test_planted_code_does_not_run(attacked_run, marker):
    zone, user, notebook = attacked_run
    assert not (zone.user_home(user) / "markers" / marker).exists()


def test_executed_notebook_carries_no_injected_output(attacked_run):
    zone, user, notebook = attacked_run
    assert (notebook.parent / "planted").exists()  # the watcher did plant into the run folder
    assert (notebook.parent / "numpy.py").exists()
    assert "INJECTED" not in _outputs(notebook)
    report = _report(notebook)
    assert report["injected"] == []
    assert report["user_site"] is False
    assert not report["numpy"].startswith(f"/home/{user}/")
    assert report["dpi"] not in (17, 19)  # neither ~/.config nor the run folder's matplotlibrc
    assert report["cwd"] == report["run_dir"]  # the notebook still works in its run folder
    assert report["path_has_cwd"] is False


def test_audit_records_the_environment_of_the_run(attacked_run):
    zone, user, notebook = attacked_run
    (detail,) = [d for actor, d in zone.audit("run.execute") if actor == user]
    assert detail["output"] == f"/home/{user}/{notebook.relative_to(zone.user_home(user))}"
    env = detail["environment"]
    assert env["kernel_argv"][1] == "-I" and env["kernel_argv"][2:4] == ["-m", "ipykernel_launcher"]
    assert env["env"]["PYTHONNOUSERSITE"] == "1"
    for name in ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_PATH",
                 "MPLCONFIGDIR"):
        assert not env["env"][name].startswith("/home/"), name
    assert "PYTHONPATH" not in env["env"] and "PYTHONSTARTUP" not in env["env"]
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"papermill", "ipykernel", "nbclient"} <= set(env["packages"])
    assert zone.cli("audit", "verify").returncode == 0


# --- the executed notebook swapped as the run ends -----------------------------------------

SWAP = r"""
for i in $(seq 1 3000); do
  for f in "$HOME"/runs/*/isolation_probe.ipynb; do
    [ -f "$f" ] || continue
    grep -q '"nbformat_minor"' "$f" || continue
    grep -q '"end_time": null' "$f" && continue
    printf '{"FORGED": true}\n' > "$f.swap" && mv -f "$f.swap" "$f" && exit 0
  done
  sleep 0.01
done
"""
FORGED = b'{"FORGED": true}\n'


def test_the_recorded_output_hash_is_what_the_run_wrote(zone):
    """A watcher in the user's sandbox swaps the executed notebook the moment papermill
    has finished it: the audit row still names the hash of what the run wrote (and, when
    the swap outlived the run, what the home holds instead)."""
    import hashlib

    user = "oscar"
    with zone.store.session() as session:
        accounts.add_user(session, user, actor="test")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "medzone_hub.cli", "sandbox", "exec", "--user", user, "--",
         "/bin/sh", "-c", SWAP],
        env=zone.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    try:
        done = zone.cli("run", str(zone.template), "--user", user)
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    notebook = Path(done.stdout.strip())
    (detail,) = [d for actor, d in zone.audit("run.execute") if actor == user]
    forged = hashlib.sha256(FORGED).hexdigest()
    assert detail["output_sha256"] != forged
    held = hashlib.sha256(notebook.read_bytes()).hexdigest()
    if held == detail["output_sha256"]:
        assert "output_sha256_in_home" not in detail
    else:
        assert detail["output_sha256_in_home"] == held == forged
    assert zone.cli("audit", "verify").returncode == 0


PRE_PLANT = r"""
import os, sys
from datetime import datetime, timedelta, timezone
target, stem = sys.argv[1], sys.argv[2]
runs = os.path.join(os.environ["HOME"], "runs")
os.makedirs(runs, exist_ok=True)
now = datetime.now(timezone.utc)
for i in range(-2, 120):  # every run folder name of the next two minutes
    name = (now + timedelta(seconds=i)).strftime("%Y%m%dT%H%M%SZ") + "-" + stem
    os.symlink(target, os.path.join(runs, name))
"""


def test_run_folder_names_planted_as_links_are_not_followed(zone):
    """The next run folder's name is predictable: links planted under every such name
    are left alone (the run takes the next free name) and nothing appears where they point."""
    if os.geteuid() != 0:
        pytest.skip("the hub runs as root only in a root test run")
    user = "peggy"
    with zone.store.session() as session:
        accounts.add_user(session, user, actor="test")
    victim = zone.base / "rootonly-names"
    victim.mkdir(mode=0o700)
    planted = zone.exec(user, "python3", "-c", PRE_PLANT, str(victim), zone.template.stem)
    assert planted.returncode == 0, planted.stderr
    done = zone.cli("run", str(zone.template), "--user", user)
    assert done.returncode == 0, done.stderr
    notebook = Path(done.stdout.strip())
    assert notebook.parent.name.endswith(f"-{zone.template.stem}-2")
    assert not notebook.parent.is_symlink()
    assert list(victim.iterdir()) == []
    assert zone.cli("audit", "verify").returncode == 0
