"""What the hub side and code inside a sandbox agree on: the paths a sandbox sees and the
environment variables that name them.

The hub side (the sandbox policy, the runner, the spawner) builds sandboxes from these;
``medzone_kernel`` reads them. Standard library only: the hub imports this module, and it
imports nothing of the hub.
"""

from __future__ import annotations

#: Each granted dataset's read-only stored copy is ``DATA_INSIDE/<id>``.
DATA_INSIDE = "/data"
#: Each granted dataset's manifest is ``MANIFESTS_INSIDE/<id>.json`` (never its index).
MANIFESTS_INSIDE = "/run/medzone/manifests"
#: A template run's hub-written kernel folder (kernel spec, Jupyter configuration, IPython
#: profile, the template and its parameters), bound read-only.
KERNEL_INSIDE = "/run/medzone/kernel"
#: The single-user server's socket (a sandbox has no network).
JUPYTER_SOCKET_INSIDE = "/run/medzone/jupyter.sock"
#: The hub's socket folder, bound read-only: how a sandbox reaches the hub API.
HUB_SOCKET_DIR_INSIDE = "/run/medzone-hub"
#: The user's home inside: ``HOMES_INSIDE/<user>``.
HOMES_INSIDE = "/home"

#: Environment variables set in every sandbox (their defaults are the paths above).
ENV_DATA = "MEDZONE_DATA"
ENV_MANIFESTS = "MEDZONE_MANIFESTS"
#: Set for a template run: its folder, the kernel's working directory.
ENV_RUN_DIR = "MEDZONE_RUN_DIR"


def dataset_inside(dataset_id: str) -> str:
    return f"{DATA_INSIDE}/{dataset_id}"


def manifest_inside(dataset_id: str) -> str:
    return f"{MANIFESTS_INSIDE}/{dataset_id}.json"


def home_inside(user: str) -> str:
    return f"{HOMES_INSIDE}/{user}"
