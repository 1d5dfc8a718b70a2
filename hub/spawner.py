"""``SafeZoneSpawner``: each person's JupyterLab in a bubblewrap sandbox with exactly their grants.

The sandbox comes from :mod:`medzone_hub.sandbox` — the same policy builder and bubblewrap
command line as ``medzone sandbox exec`` — so a server, its kernels and ``exec`` see the
same mounts, uid and namespaces:

* an unprivileged uid per user (``uid_base + user id``, no system account), no
  capabilities, a new session, its own pid/ipc/uts namespaces, no nested user namespaces;
* ``/home/<user>`` private and persistent, ``/tmp`` private, ``/data/<id>`` read-only for
  exactly the user's live grants when the server starts;
* **no network**: the server listens on a unix socket that the spawner binds itself in
  the hub's own state folder (``MEDZONE_HOME/hub/servers/<hash>.sock``, outside every
  home) and hands to the server as an inherited descriptor; the proxy reaches it from the
  host as ``http+unix://…``. Nothing of the route lives in the home, so no link a user
  plants there can redirect the proxy or make the hub chown or write anything. The
  server's secrets (its API token) arrive on an inherited pipe, never in a file. The hub
  API is reached through the hub's own unix socket, whose folder is bound read-only;
* GPUs and memory/CPU limits as the sandbox policy decides (limits through cgroup v2
  where the machine allows it; where it does not, the spawn log says so).

Only accounts the MedZone store lists as approved get a server, whichever authenticator
logged them in.

Servers outlive hub restarts: the sandbox is started under a small keeper shell in its own
session (bubblewrap's ``--die-with-parent`` then watches the keeper, not the hub), and
the state JupyterHub persists (:meth:`get_state`) holds the sandbox's pid and socket, so a
restarted hub polls it and routes to it again. :meth:`stop` kills the sandbox's pid 1,
which takes down the whole pid namespace, kernels included.

When a grant the server mounted ends (expiry or revocation), the next :meth:`poll`
(every :attr:`poll_interval` seconds) stops the server and records it in the audit log;
the next start mounts only what is live then.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import socket
import sys
import time
from pathlib import Path

from jupyterhub.spawner import Spawner
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Tuple, Unicode, default

from medzone_kernel import contract

from . import access, audit, onboarding, sandbox, sessions, spawn_profiles, usage
from .config import MedZoneHome, resolve_home
from .culling import IdleCuller
from .db import open_store
from .errors import Conflict, InvalidInput, MedZoneError, NotFound, RuleViolation
from .homefs import UserHome
from .hubapp import MAX_SOCKET_PATH, HubPaths, unix_url
from .sandbox.resources import GPU_REGISTRY_NAME, nvidia_support_nodes

#: The path the server's socket has inside the sandbox: a name only (the server is handed
#: the socket already bound, as a descriptor; no such file exists inside).
SOCKET_INSIDE = contract.JUPYTER_SOCKET_INSIDE
#: Secrets for the server travel on a pipe the sandbox inherits rather than on the command
#: line (bubblewrap's ``--setenv`` arguments are visible in the host's process list) or in
#: a file (the home is the user's).
#: Where the hub's socket folder appears inside a sandbox. Not its host path: binding it at
#: the same path would make MEDZONE_HOME (as empty parent folders) visible inside.
HUB_SOCKET_DIR_INSIDE = contract.HUB_SOCKET_DIR_INSIDE
SECRET_ENV_KEYS = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")

def server_socket_path(home: MedZoneHome, user: str, server_name: str = "") -> Path:
    """The host path of *user*'s server socket (a short hashed name: unix socket paths are
    limited to 107 bytes)."""
    digest = hashlib.sha256(f"{user}\0{server_name}".encode()).hexdigest()[:24]
    return HubPaths(home).server_socket_dir / f"{digest}.sock"


def bind_server_socket(path: Path) -> socket.socket:
    """Bind and listen on *path* in the hub's own socket folder (made 0700 if missing); the
    listening socket, mode 0600. A stale socket of an earlier server is replaced."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise MedZoneError(f"socket path {path} is too long for a unix socket: "
                           "use a shorter MEDZONE_HOME")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def secret_pipe(values: dict) -> int:
    """A pipe's read end already holding *values* as JSON (the write end is closed)."""
    data = json.dumps(values).encode()
    read_end, write_end = os.pipe()
    try:
        view = memoryview(data)
        while view:  # a few hundred bytes: well under a pipe's buffer
            view = view[os.write(write_end, view):]
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


async def _server_answers(path: str, base_url: str, alive, interval: float) -> bool:
    """Wait until the server behind the (already listening) socket *path* answers an HTTP
    request; ``False`` once *alive()* says it is gone. The spawner bound the socket, so a
    connection succeeds before the server runs: only an answer tells it is up."""
    request = (f"HEAD {base_url}api HTTP/1.1\r\nHost: localhost\r\n"
               "Connection: close\r\n\r\n").encode()
    while alive():
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError:
            await asyncio.sleep(interval)
            continue
        try:
            writer.write(request)
            await writer.drain()
            while alive():
                try:
                    if await asyncio.wait_for(reader.read(1), interval):
                        return True
                    break  # closed without an answer: connect again
                except asyncio.TimeoutError:
                    continue
        except OSError:
            await asyncio.sleep(interval)
        finally:
            writer.close()
    return False


class SpawnAdmission:
    """First come, first served admission of server starts: at most *limit* sandboxes
    start at once (a start is CPU-bound: a burst of logins would otherwise all start
    together and all run into ``start_timeout``); the others wait in arrival order. The
    wait happens before :meth:`SafeZoneSpawner.start` is called (in the pre-spawn hook),
    so it does not count against ``start_timeout``."""

    def __init__(self):
        self.active = 0
        self.waiters: list[asyncio.Future] = []
        self.durations: list[float] = []  # the last starts' seconds, for estimates

    def position(self, ticket: asyncio.Future) -> int:
        """How many starts wait before *ticket* (0: next)."""
        try:
            return self.waiters.index(ticket)
        except ValueError:
            return 0

    def estimate(self, ahead: int, limit: int) -> float:
        """About how many seconds until a start with *ahead* others before it begins."""
        recent = self.durations[-20:]
        each = sorted(recent)[len(recent) // 2] if recent else 3.0
        return each * (ahead // max(1, limit) + 1)

    def ticket(self, limit: int) -> asyncio.Future | None:
        """``None``: admitted at once; else a future that is set when admitted."""
        if self.active < limit and not self.waiters:
            self.active += 1
            return None
        ticket = asyncio.get_running_loop().create_future()
        self.waiters.append(ticket)
        return ticket

    def withdraw(self, ticket: asyncio.Future) -> None:
        """A waiting start gave up (cancelled): its place goes, or its slot if it had one."""
        if ticket in self.waiters:
            self.waiters.remove(ticket)
        elif ticket.done() and not ticket.cancelled():
            self.release(None)

    def release(self, duration: float | None) -> None:
        if duration is not None:
            self.durations = [*self.durations[-19:], duration]
        while self.waiters:
            ticket = self.waiters.pop(0)
            if not ticket.done():
                ticket.set_result(None)  # the slot passes on: active stays the same
                return
        self.active = max(0, self.active - 1)


#: One per hub process: every SafeZoneSpawner shares it.
ADMISSION = SpawnAdmission()


class SafeZoneSpawner(Spawner):
    """Starts each user's single-user server in a MedZone sandbox (see the module doc)."""

    # --- configuration ------------------------------------------------------------------

    medzone_home = Unicode(
        "",
        config=True,
        help="MEDZONE_HOME (store, datasets, homes). Default: $MEDZONE_HOME or ~/.medzone.",
    )
    uid_base = Integer(
        200000,
        config=True,
        help="Sandbox uid/gid is uid_base + the user's id in MedZone's store. Pick a range "
             "no host account uses.",
    )
    gpu_enabled = Bool(
        True, config=True,
        help="Pass NVIDIA GPUs (/dev/nvidia*) through to sandboxes whose user may have one.",
    )
    allow_gpu_role = Unicode(
        "gpu", allow_none=True, config=True,
        help="Only users with this role in MedZone's store get a GPU; None: every user.",
    )
    gpu_sessions_per_gpu = Integer(
        1, config=True,
        help="How many servers may share one GPU; when all are full, a spawn that would get "
             "a GPU fails with a clear message.",
    )
    cgroup_parent = Unicode(
        "", config=True,
        help="A delegated cgroup v2 folder to create sandbox cgroups in for mem_limit and "
             "cpu_limit (default: <cgroup2 mount>/medzone). Where limits cannot be applied, "
             "the spawn log says why and the server runs without them.",
    )
    extra_ro_binds = List(
        Tuple(Unicode(), Unicode()), config=True,
        help="(host path, path inside) pairs every sandbox also gets, read-only. Paths that "
             "contain MEDZONE_HOME are refused.",
    )
    python_prefix = Unicode(
        "", config=True,
        help="The Python environment servers and kernels run from, bound read-only "
             "(default: the hub's own sys.prefix). It must hold jupyterhub, jupyterlab, "
             "ipykernel, medzone_kernel, torch, MONAI and pydicom.",
    )
    terminals = Bool(
        False, config=True,
        help="Offer terminals in JupyterLab. Off by default: a terminal is a direct line to "
             "the browser, and results are meant to leave only through the export airlock.",
    )
    stop_on_grant_end = Bool(
        True, config=True,
        help="At each poll, stop the server if a dataset it mounted is no longer granted "
             "(expired or revoked); audited as sandbox.stop.",
    )
    connect_timeout = Float(
        0.05, config=True,
        help="Seconds between checks of the server's socket while start() waits for it.",
    )
    pids_limit = Integer(
        2048, allow_none=True, config=True,
        help="Processes and threads one server may have (its cgroup's pids.max, cgroup v2 "
             "or v1). None: no limit.",
    )
    nproc_limit = Integer(
        4096, allow_none=True, config=True,
        help="RLIMIT_NPROC of the sandbox uid (ulimit -u inside): processes one user may "
             "have over all of their sandboxes. Applied when the hub runs as root. None: "
             "no limit.",
    )
    tmp_size_bytes = Integer(
        2 << 30, allow_none=True, config=True,
        help="Size of the sandbox's private /tmp tmpfs (counted in mem_limit). None: "
             "the kernel's default, half of the machine's memory.",
    )
    shm_size_bytes = Integer(
        512 << 20, allow_none=True, config=True,
        help="Size of the sandbox's /dev/shm tmpfs (PyTorch data loaders share batches "
             "there; counted in mem_limit). None: half of the machine's memory.",
    )
    seccomp = Bool(
        True, config=True,
        help="Install MedZone's seccomp filter in every sandbox (mount, ptrace, keyctl, bpf, "
             "perf_event_open, userfaultfd, kexec, module loading, namespaces… fail with "
             "EPERM). On a machine it has no table for (not x86_64/aarch64), servers do not "
             "start unless this is off.",
    )
    home_quota_bytes = Integer(
        20 << 30, allow_none=True, config=True,
        help="Most disk space a user's home may take (allocated blocks, as du counts; links "
             "not followed). Over it, the user gets no new server or template run, with a "
             "message saying how much the home uses, until files are deleted. Checked at "
             "each start by walking the home. None: no limit.",
    )
    gpu_device_dir = Unicode(
        "/dev", config=True,
        help="Where the GPU device nodes (nvidiaN, nvidiactl, nvidia-uvm, nvidia-caps/) "
             "are looked for. Nodes found outside /dev appear in the sandbox as "
             "/dev/<name> (a folder of stand-in nodes, for tests on machines without GPUs).",
    )
    max_concurrent_starts = Integer(
        0, config=True,
        help="Most servers that start at the same time; later ones wait in arrival order "
             "(the spawn page says how many start before theirs and about how long it "
             "takes) and their wait does not count against start_timeout. 0: the "
             "machine's CPU count, at least 2.",
    )
    spawn_profiles = Bool(
        True, config=True,
        help="Offer a spawn form with the resource profiles the user's roles allow (CPU "
             "only; one whole GPU; a MIG slice; a shared GPU with a memory share), each "
             "full one saying who holds it and when it frees up. Users without the GPU "
             "role get no form (CPU only). A spawn without a profile (the REST API without "
             "one) gets any whole GPU the user may have, as before.",
    )
    shared_gpu_indices = List(
        Integer(), config=True,
        help="GPUs (by index) shared by several servers, offered as 'a shared GPU'; the "
             "others go whole to one server. A MIG-partitioned GPU is offered only as its "
             "slices.",
    )
    shared_gpu_sessions = Integer(
        2, config=True,
        help="How many servers share one of the shared_gpu_indices GPUs (at least 2); each "
             "is told its memory share in MEDZONE_GPU_MEMORY_FRACTION (advisory: CUDA has "
             "no hard per-process memory cap outside MIG).",
    )
    mig_slices = List(
        Dict(), config=True,
        help="MIG slices to offer, as {'parent': GPU index, 'uuid': 'MIG-…', 'name': "
             "'1g.10gb', 'slot': n}. Empty: found through NVML where the driver answers.",
    )
    onboard_tutorials = Bool(
        True, config=True,
        help="Copy the tutorials and the lab guide into tutorials/ in the home at the first "
             "spawn (never overwriting the student's copies; a newer release is offered in "
             "tutorials/updates/<release>/). See medzone_hub.onboarding.",
    )
    datasets_link = Bool(
        True, config=True,
        help="Give the home a 'datasets' link to /data (the granted datasets, read-only) "
             "so the lab's file browser reaches them, when no entry of that name exists.",
    )
    lab_guide_url = Unicode(
        "", config=True,
        help="What the lab's Help > MedZone guide opens: a URL (e.g. the zone's own "
             "documentation). Empty: the guide in the student's tutorials/GUIDE.md.",
    )
    dataset_gid_base = Integer(
        sandbox.DATASET_GID_BASE, config=True,
        help="Dataset folders' host groups lie from here on (given once per dataset at "
             "publish); a server gets the groups of its live grants only, and only from "
             "this range.",
    )

    @default("mem_limit")
    def _mem_limit_default(self):
        # On by default: half of the machine's memory, at most 8 GiB (0 turns it off).
        return sandbox.default_memory_limit()

    @default("poll_interval")
    def _poll_interval_default(self):
        # A grant that ends stops the server within poll_interval (+ jitter): well under 60 s.
        return 15

    @default("disable_user_config")
    def _disable_user_config_default(self):
        # ~/.jupyter config could switch the download channels back on.
        return True

    @default("cmd")
    def _cmd_default(self):
        return ["python", "-m", "medzone_hub.singleuser"]

    # --- state ----------------------------------------------------------------------------

    child_pid = Integer(None, allow_none=True, help="Host pid of the sandbox's pid 1.")
    child_start = Integer(None, allow_none=True)
    keeper_pid = Integer(None, allow_none=True)
    socket_path = Unicode("", help="Host path of the server's unix socket.")
    mounted = List(Unicode(), help="Dataset ids mounted at start.")
    gpu_key = Unicode("")
    gpu_registry = Unicode("")
    cgroup = Unicode("")

    def load_state(self, state):
        super().load_state(state)
        self.child_pid = state.get("child_pid")
        self.child_start = state.get("child_start")
        self.keeper_pid = state.get("keeper_pid")
        self.socket_path = state.get("socket_path", "")
        self.mounted = state.get("mounted", [])
        self.gpu_key = state.get("gpu_key", "")
        self.gpu_registry = state.get("gpu_registry", "")
        self.cgroup = state.get("cgroup", "")

    def get_state(self):
        state = super().get_state()
        if self.child_pid:
            state.update(
                child_pid=self.child_pid,
                child_start=self.child_start,
                keeper_pid=self.keeper_pid,
                socket_path=self.socket_path,
                mounted=list(self.mounted),
                gpu_key=self.gpu_key,
                gpu_registry=self.gpu_registry,
                cgroup=self.cgroup,
            )
        return state

    def clear_state(self):
        super().clear_state()
        self.child_pid = None
        self.child_start = None
        self.keeper_pid = None
        self.socket_path = ""
        self.mounted = []
        self.gpu_key = ""
        self.gpu_registry = ""
        self.cgroup = ""

    # The route must point at the socket, not at "<socket>:80" (what JupyterHub records
    # from an http+unix URL): connect_url is not persisted, so derive it from the state.
    @property
    def server(self):
        server = Spawner.server.fget(self)
        if server is not None and self.socket_path and not server.connect_url:
            server.connect_url = unix_url(self.socket_path)
        return server

    @server.setter
    def server(self, server):
        Spawner.server.fset(self, server)

    # --- helpers --------------------------------------------------------------------------

    @property
    def home(self) -> MedZoneHome:
        return resolve_home(self.medzone_home or None)

    def sandbox_config(self) -> sandbox.SandboxConfig:
        return sandbox.SandboxConfig(
            uid_base=self.uid_base,
            gpu_enabled=self.gpu_enabled,
            allow_gpu_role=self.allow_gpu_role,
            gpu_sessions_per_gpu=self.gpu_sessions_per_gpu,
            memory_limit_bytes=self.mem_limit or None,
            cpu_limit=self.cpu_limit or None,
            cgroup_parent=self.cgroup_parent or None,
            extra_ro_binds=[tuple(b) for b in self.extra_ro_binds],
            python_prefix=self.python_prefix or None,
            pids_limit=self.pids_limit,
            nproc_limit=self.nproc_limit,
            tmp_size_bytes=self.tmp_size_bytes,
            shm_size_bytes=self.shm_size_bytes,
            seccomp=self.seccomp,
            dataset_gid_base=self.dataset_gid_base,
            home_quota_bytes=self.home_quota_bytes,
        )

    def _audit(self, action: str, detail: dict) -> None:
        with open_store(self.home).session() as session:
            audit.append(session, actor="hub", action=action, subject=f"user:{self.user.name}",
                         detail=detail)

    def _sandbox_process(self) -> sandbox.SandboxProcess | None:
        """The running sandbox: the one this hub started, or rebuilt from the persisted
        state (a restarted hub)."""
        box = getattr(self, "_box", None)
        if box is None and self.child_pid:
            box = sandbox.SandboxProcess.from_state({
                "child_pid": self.child_pid, "child_start": self.child_start,
                "monitor_pid": self.keeper_pid, "cgroup": self.cgroup,
                "gpu_registry": self.gpu_registry, "gpu_key": self.gpu_key})
        return box

    def _alive(self) -> bool:
        box = self._sandbox_process() if self.child_pid else None
        return box is not None and box.alive()

    # --- start ----------------------------------------------------------------------------

    def _prepare(self):
        """Build the policy, reserve its GPU and make the host-side folders (runs in a
        thread: it uses the store)."""
        home = self.home
        config = self.sandbox_config()
        key = f"hub:{self.user.name}:{self.name or ''}"
        with open_store(home).session() as session:
            policy = sessions.policy_for(home, session, self.user.name, config)
        self._reserve_gpu(policy, key)
        try:
            sandbox.ensure_home(home, policy)
            self._onboard(policy)
            # The socket is bound here, by the hub, in its own folder: nothing in the home.
            host_sock = server_socket_path(home, self.user.name, self.name or "")
            listener = bind_server_socket(host_sock)
        except BaseException:
            sandbox.release_resources(policy)
            raise
        return home, policy, host_sock, listener

    def _gpu_nodes(self) -> dict:
        """The GPUs and NVIDIA support nodes of :attr:`gpu_device_dir` (the defaults of
        :func:`~medzone_hub.sandbox.reserve_gpu` for /dev)."""
        if self.gpu_device_dir in ("", "/dev"):
            return {}
        return {"gpus": sandbox.detect_gpus(self.gpu_device_dir),
                "support_nodes": nvidia_support_nodes(self.gpu_device_dir)}

    # --- admission (a class logging in at once) ---------------------------------------

    @property
    def start_limit(self) -> int:
        return self.max_concurrent_starts or max(2, os.cpu_count() or 2)

    async def run_pre_spawn_hook(self):
        """Wait for a start slot (:class:`SpawnAdmission`), then the configured hook."""
        self._admitted_at = None
        self._ticket = ADMISSION.ticket(self.start_limit)
        if self._ticket is not None:
            ahead = ADMISSION.position(self._ticket)
            self.log.info("%s: the zone is busy: %d start(s) before this one",
                          self._log_name, ahead)
            try:
                await self._ticket
            except BaseException:
                ADMISSION.withdraw(self._ticket)
                raise
        self._admitted_at = time.monotonic()
        try:
            result = super().run_pre_spawn_hook()
            return (await result) if inspect.isawaitable(result) else result
        except BaseException:
            self._leave_admission(ok=False)
            raise

    def _leave_admission(self, ok: bool) -> None:
        admitted = getattr(self, "_admitted_at", None)
        if admitted is None:
            return
        self._admitted_at = None
        ADMISSION.release(time.monotonic() - admitted if ok else None)

    async def progress(self):
        """The spawn page's messages: while waiting for a slot, how many starts are ahead
        and about how long until this one begins."""
        ticket = getattr(self, "_ticket", None)
        while ticket is not None and not ticket.done():
            ahead = ADMISSION.position(ticket)
            wait = ADMISSION.estimate(ahead, self.start_limit)
            yield {"progress": 5, "message":
                   f"The zone is busy: {ahead + ADMISSION.active} server(s) start before "
                   f"yours; yours starts in about {max(1, round(wait))} s."}
            await asyncio.sleep(1)
        yield {"progress": 50, "message": "Starting your sandbox"}

    # --- resource profiles (medzone_hub.spawn_profiles) ---------------------------------

    def _inventory(self) -> spawn_profiles.Inventory:
        nodes = self._gpu_nodes()
        gpus = nodes.get("gpus")
        gpus = sandbox.detect_gpus() if gpus is None else gpus
        if not gpus:
            slices = []
        elif self.mig_slices:
            try:
                slices = [spawn_profiles.MigSlice(**d) for d in self.mig_slices]
            except TypeError as err:
                raise InvalidInput(f"c.SafeZoneSpawner.mig_slices: {err} (each slice is "
                                   "{'parent': N, 'uuid': 'MIG-…', 'name': …, 'slot': N})") from None
        else:
            slices = spawn_profiles.detect_mig_slices()
        return spawn_profiles.Inventory.build(gpus, slices, self.shared_gpu_indices,
                                              self.shared_gpu_sessions)

    def _profile_choices(self, policy) -> list:
        culler = IdleCuller(config=self.config)
        registry = (policy.state_dir / GPU_REGISTRY_NAME
                    if policy.state_dir else None)
        return spawn_profiles.choices(
            self._inventory(), gpu_allowed=policy.gpu_allowed,
            entries=spawn_profiles.registry_entries(registry),
            idle_timeout=culler.timeout if culler.enabled else None,
            max_age=culler.max_age if culler.enabled else None)

    def _reserve_gpu(self, policy, key: str) -> None:
        """Reserve what the chosen profile (``user_options['profile']``) names; without
        one, any whole GPU the user may have."""
        profile = (self.user_options or {}).get(spawn_profiles.OPTION)
        nodes = self._gpu_nodes()
        if not profile:
            inv = self._inventory()
            if inv.shared or inv.slices:
                nodes["gpus"] = inv.whole
            sandbox.reserve_gpu(policy, key, **nodes)
            return
        choice = spawn_profiles.pick(self._profile_choices(policy), str(profile))
        if choice.key == spawn_profiles.CPU:
            policy.gpu_allowed = False
            return
        policy.gpu_sessions_per_gpu = choice.per_gpu
        sandbox.reserve_gpu(policy, key, gpus=choice.devices,
                            support_nodes=nodes.get("support_nodes"))
        if choice.key == spawn_profiles.SHARED:
            policy.env[spawn_profiles.ENV_MEMORY_FRACTION] = f"{1 / choice.per_gpu:.3f}"

    def _profiles_form_sync(self) -> str:
        config = self.sandbox_config()
        with open_store(self.home).session() as session:
            policy = sessions.policy_for(self.home, session, self.user.name, config)
        found = self._profile_choices(policy)
        if len(found) < 2:
            return ""  # CPU only: nothing to choose
        return spawn_profiles.form_html(found)

    async def _profiles_form(self, spawner=None) -> str:
        if not self.spawn_profiles:
            return ""
        try:
            return await asyncio.to_thread(self._profiles_form_sync)
        except MedZoneError as err:
            self.log.warning("%s: no spawn form: %s", self._log_name, err)
            return ""

    @default("options_form")
    def _options_form_default(self):
        return self._profiles_form

    def options_from_form(self, formdata):
        values = formdata.get(spawn_profiles.OPTION) or []
        return {spawn_profiles.OPTION: values[0]} if values else {}

    def _onboard(self, policy) -> None:
        """Tutorials and the datasets link in the home (medzone_hub.onboarding); a failure
        is logged, never fatal: the lab works without them."""
        if not (self.onboard_tutorials or self.datasets_link):
            return
        try:
            done = onboarding.onboard(UserHome.for_policy(policy),
                                      tutorials=self.onboard_tutorials,
                                      datasets_link=self.datasets_link)
        except (MedZoneError, OSError) as err:
            self.log.warning("%s: onboarding skipped: %s", self._log_name, err)
        else:
            self.log.info("%s: onboarding %s", self._log_name, done)

    @staticmethod
    def _secret_fd(env: dict) -> int:
        """Move the secrets out of *env* onto a pipe; its read end."""
        return secret_pipe({k: env.pop(k) for k in SECRET_ENV_KEYS if k in env})

    async def start(self):
        try:
            return await self._start()
        finally:
            self._leave_admission(ok=True)

    async def _start(self):
        t0 = time.monotonic()
        try:
            home, policy, host_sock, listener = await asyncio.to_thread(self._prepare)
        except (NotFound, RuleViolation) as err:
            self.log.warning("refusing a server for %s: %s", self.user.name, err)
            raise web.HTTPError(403, str(err)) from None
        except InvalidInput as err:
            raise web.HTTPError(400, str(err)) from None
        except Conflict as err:  # the chosen profile is full: who holds it, when it frees
            self.log.warning("no server for %s now: %s", self.user.name, err)
            raise web.HTTPError(409, str(err)) from None
        except MedZoneError as err:
            raise web.HTTPError(500, str(err)) from None

        for note in policy.notes:
            self.log.warning("%s: %s", self._log_name, note)
        if policy.memory_limit_bytes is None and policy.cpu_limit is None:
            self.log.info("%s: no memory/CPU limits configured (mem_limit, cpu_limit)",
                          self._log_name)
        if policy.gpu:
            self.log.info("%s: GPU %s (CUDA_VISIBLE_DEVICES=%s)", self._log_name,
                          policy.gpu.path, policy.gpu.cuda_id)

        inside_sock = SOCKET_INSIDE
        paths = HubPaths(home)
        hub_bind = (str(paths.hub_socket_dir), HUB_SOCKET_DIR_INSIDE)
        hub_url_inside = unix_url(f"{HUB_SOCKET_DIR_INSIDE}/{paths.hub_socket.name}")
        env = {name: value.replace(paths.hub_url, hub_url_inside)
               for name, value in self.get_env().items()}
        env.update({
            # No port: jupyter_server refuses a port together with a socket.
            "JUPYTERHUB_SERVICE_URL": unix_url(inside_sock) + self.server.base_url,
            "JUPYTERHUB_ROOT_DIR": policy.home_inside,
            "MEDZONE_SERVER_SOCKET": inside_sock,
            "MEDZONE_SERVER_FD": str(listener.fileno()),
            "MEDZONE_TERMINALS": "1" if self.terminals else "0",
            "MEDZONE_GUIDE_URL": self.lab_guide_url,
        })
        for name in ("HOME", "USER", "LOGNAME", "PATH", "SHELL", "LANG"):
            env.pop(name, None)  # the policy sets these
        try:
            secret_fd = self._secret_fd(env)
        except BaseException:
            listener.close()
            raise
        env["MEDZONE_SECRET_FD"] = str(secret_fd)

        cmd = [*self.cmd, *self.get_args()]
        if cmd[0] == "python":
            cmd[0] = os.path.join(self.python_prefix or sys.prefix, "bin", "python")
        try:
            # Under the keeper shell the server survives a hub restart. The listening
            # socket and the secrets' pipe are inherited by the server.
            box = await sandbox.start_sandboxed(
                policy, cmd, extra_ro_binds=[hub_bind], extra_env=env,
                pass_fds=(listener.fileno(), secret_fd), keeper=True,
                stdin=asyncio.subprocess.DEVNULL)
        except sandbox.SandboxError as err:
            raise web.HTTPError(500, str(err)) from None
        finally:
            os.close(secret_fd)
            listener.close()  # the server holds it now
        if box.cgroup_unavailable_reason:
            self.log.warning("%s: %s", self._log_name, box.cgroup_unavailable_reason)
        child, proc, cgroup = box.child_pid, box.process, box.cgroup

        self._box = box
        self._policy = policy
        self.child_pid = child
        self.child_start = box.child_start
        self.keeper_pid = proc.pid
        self.socket_path = str(host_sock)
        self.mounted = sorted(policy.datasets)
        self.gpu_key = policy.gpu_key or ""
        self.gpu_registry = str(policy.gpu_registry or "")
        self.cgroup = str(cgroup or "")

        # Wait until the server answers on its socket: the hub then finds it up at once
        # instead of backing off.
        if not await _server_answers(str(host_sock), self.server.base_url,
                                     lambda: proc.returncode is None and self._alive(),
                                     self.connect_timeout):
            await self._cleanup()
            raise web.HTTPError(500, f"the server for {self.user.name} exited while "
                                     "starting; see the hub log")
        url = unix_url(host_sock)
        self.server.connect_url = url
        self.log.info("%s: sandbox uid %s, pid %s, datasets %s, up in %.2f s",
                      self._log_name, policy.uid, child, self.mounted or "none",
                      time.monotonic() - t0)
        await asyncio.to_thread(self._audit, "sandbox.start", {
            "server": self.name or "", "uid": policy.uid, "datasets": list(self.mounted),
            "gpu": policy.gpu.path if policy.gpu else None,
        })
        return url

    # --- poll / stop --------------------------------------------------------------------

    def _grants_ended(self) -> list[str]:
        """Datasets mounted at start that are no longer live grants (expiry recorded)."""
        with open_store(self.home).session() as session:
            access.expire_due(session)
            live = set(access.live_grants(session, self.user.name))
        return sorted(set(self.mounted) - live)

    async def poll(self):
        if not self.child_pid:
            return 0
        if not self._alive():
            return 0
        if self.stop_on_grant_end and self.mounted:
            try:
                ended = await asyncio.to_thread(self._grants_ended)
            except Exception:
                self.log.exception("%s: could not check grants", self._log_name)
                ended = []
            if ended:
                self.log.warning("%s: grant ended for %s: stopping the server",
                                 self._log_name, ", ".join(ended))
                await self._kill()
                await asyncio.to_thread(self._audit, "sandbox.stop", {
                    "server": self.name or "", "reason": "grant ended", "datasets": ended})
                await self._cleanup()
                return 1
        return None

    async def _kill(self, timeout: float = 10) -> None:
        box = self._sandbox_process()
        if box is not None:
            # What the session used, measured before the sandbox goes (recorded once).
            await asyncio.to_thread(usage.record_server_usage, self)
            await box.stop(timeout)

    async def _cleanup(self) -> None:
        box = self._sandbox_process()
        if box is not None:
            await box.finish()  # reaps the keeper (started here) and frees GPU and cgroup
        self._box = None
        if self.socket_path:
            sock = Path(self.socket_path)
            # Only a socket in the hub's own folder: never a path in a home (servers started
            # by an older version kept theirs there; the user owns that folder).
            if sock.parent == HubPaths(self.home).server_socket_dir:
                try:
                    sock.unlink()
                except OSError:
                    pass

    async def stop(self, now=False):
        was_running = self._alive()
        await self._kill()
        await self._cleanup()
        if was_running:
            await asyncio.to_thread(self._audit, "sandbox.stop",
                                    {"server": self.name or "", "reason": "stopped"})
        self.child_pid = None
