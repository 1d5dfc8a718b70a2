"""Sandboxes: the escape suite (real bubblewrap, attempts made from inside) and the argv logic.

Every escape attempt runs ``tests/sandbox_probe.py`` inside a real sandbox through
``medzone sandbox exec``. Each property is also shown to be *detectable*: the same probe,
run where the property is deliberately broken (the bubblewrap argv minus one flag, a
policy with an extra dataset, or the host itself under the sandbox uid), sees the
opposite. Network attempts only ever aim at 127.0.0.1, where this test listens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest

from medzone_hub import access, accounts
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.errors import Conflict, NotFound, RuleViolation
from medzone_hub.models import utcnow
from medzone_hub.sandbox import (
    GpuDevice,
    GpuRegistry,
    SandboxConfig,
    SandboxError,
    bwrap_argv,
    cgroup_limits_unavailable_reason,
    check_reachable,
    choose_gpu,
    create_cgroup,
    detect_gpus,
    ensure_home,
    kill_sandbox,
    nvidia_support_nodes,
    python_paths,
    remove_cgroup,
    reserve_gpu,
    sandbox_cgroup,
    start_sandboxed,
)
from medzone_hub.sessions import policy_for

from .fixtures import add_tiny_dataset

PROBE = Path(__file__).with_name("sandbox_probe.py").read_text()
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="checks host uids: run as root")
UID_BASE = SandboxConfig().uid_base


# --- the zone ----------------------------------------------------------------------------

@dataclasses.dataclass
class SandboxZone:
    base: Path
    home: MedZoneHome
    store: object
    uids: dict

    def exec(self, user: str, *cmd, timeout: float = 60,
             options: tuple = ()) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        return subprocess.run(
            [sys.executable, "-m", "medzone_hub.cli", "sandbox", "exec", "--user", user,
             *options, "--", *map(str, cmd)],
            env=env, capture_output=True, text=True, timeout=timeout, cwd="/")

    def probe(self, user: str, plan: dict) -> dict:
        done = self.exec(user, "python3", "-c", PROBE, json.dumps(plan))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def policy(self, user: str, config=None, *, gpus=None, gpu_support_nodes=None,
               gpu_registry=None, gpu_key=None):
        """The policy the spawner builds: the service's, with a GPU reserved when allowed."""
        with self.store.session() as session:
            policy = policy_for(self.home, session, user, config)
        return reserve_gpu(policy, gpu_key, gpus=gpus, support_nodes=gpu_support_nodes,
                           registry=gpu_registry)

    def host(self, *parts) -> str:
        return str(self.home.root.joinpath(*parts))


@pytest.fixture(scope="module")
def zone():
    from medzone_hub.db import connect
    from medzone_hub.ingest import screening_index_key

    # pytest's tmp_path sits under a 0700 folder the sandbox uid cannot traverse.
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="medzone-sandbox-"))
    os.chmod(base, 0o755)
    saved = os.environ.pop(ENV_DB_URL, None)
    home = MedZoneHome(base / "home").ensure()
    store = connect(home.db_url)
    screening_index_key(home)  # secrets/screening-index.key, as after a first ingest
    with store.session() as session:
        for name in ("alice", "bob"):
            accounts.add_user(session, name, actor="test")
        accounts.add_user(session, "steward", roles=["data-steward"], actor="test")
        accounts.add_user(session, "pending", approved=False, actor="test")
        add_tiny_dataset(session, home, "ds-a")
        add_tiny_dataset(session, home, "ds-b")
        app = access.apply(session, user="alice", dataset_ids=["ds-a"], purpose="escape suite")
        session.flush()
        access.approve(session, app.id, reviewer="steward")
        uids = {u.name: UID_BASE + u.id for u in accounts.list_users(session)}
    yield SandboxZone(base, home, store, uids)
    store.close()
    if saved is not None:
        os.environ[ENV_DB_URL] = saved
    subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def targets(zone):
    """What the probe aims at on the host: a TCP listener and a UDP socket on 127.0.0.1,
    a host process, and a setuid-root copy of ``id`` in alice's home."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    sleeper = subprocess.Popen(["sleep", "300"])
    # bob's home exists with a file in it, so its absence inside alice's sandbox means something.
    assert zone.exec("bob", "sh", "-c", "echo bob-private > ~/notes.txt").returncode == 0
    ensure_home(zone.home, zone.policy("alice"))
    suid = zone.home.root / "homes" / "alice" / "suid-id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    yield {"tcp": tcp, "udp": udp, "host_pid": sleeper.pid, "suid": suid}
    sleeper.kill()
    sleeper.wait()
    tcp.close()
    udp.close()
    suid.unlink()


def _drain(targets) -> tuple[list[str], int]:
    """UDP datagrams received and TCP connections accepted on the host since the last call."""
    datagrams, accepted = [], 0
    while True:
        try:
            datagrams.append(targets["udp"].recv(4096).decode())
        except BlockingIOError:
            break
    while True:
        try:
            conn, _ = targets["tcp"].accept()
        except BlockingIOError:
            break
        conn.close()
        accepted += 1
    return datagrams, accepted


def _plan(zone, targets, token: str) -> dict:
    h = zone.host
    return {
        "tcp_port": targets["tcp"].getsockname()[1],
        "udp_port": targets["udp"].getsockname()[1],
        "udp_token": token,
        "host_pid": targets["host_pid"],
        "setuid_binary": "/home/alice/suid-id",
        "paths": [
            "/home/bob", h("homes", "bob"), h("homes", "bob", "notes.txt"),
            "/data/ds-b", h("datasets", "ds-b", "data", "tables", "labs.csv"),
            h("datasets", "ds-a", "data"), h("datasets", "ds-a", "index"),
            h("datasets", "ds-b", "index", "identifiers.bin"),
            h("medzone.sqlite"), h("secrets"), h("secrets", "screening-index.key"),
            h(), str(zone.base), f"/proc/{os.getpid()}",
            "/data/ds-a/tables/labs.csv", "/home/alice",
            "/run/medzone/manifests/ds-a.json", "/run/medzone/manifests/ds-b.json",
        ],
        "write": ["/data/ds-a/new.txt", "/data/ds-a/tables/labs.csv", "/data/new.txt",
                  "/usr/probe.txt", "/etc/probe.txt", "/probe.txt",
                  "/run/medzone/manifests/ds-a.json", "/run/medzone/manifests/new.json",
                  "/home/alice/persist.txt", "/tmp/scratch.txt"],
        "listdir": ["/data", "/home", str(Path(sys.prefix).parent), "/run/medzone/manifests"],
        "cat": ["/data/ds-a/tables/labs.csv", "/home/bob/notes.txt",
                "/run/medzone/manifests/ds-a.json", "/run/medzone/manifests/ds-b.json"],
    }


@pytest.fixture(scope="module")
def inside(zone, targets):
    """The probe's results from inside alice's sandbox, plus what reached the host."""
    _drain(targets)
    result = zone.probe("alice", _plan(zone, targets, "from-sandbox"))
    result["udp_received"], result["tcp_accepted"] = _drain(targets)
    return result


def _run_argv(argv: list[str]) -> dict:
    done = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _broken(zone, targets, *, drop: str | None = None, policy=None, token="control") -> dict:
    """The probe in alice's sandbox with one property deliberately broken (and without the
    seccomp filter, a second layer that would hide what the broken flag lets through)."""
    policy = dataclasses.replace(policy or zone.policy("alice"), seccomp_program=None)
    argv = bwrap_argv(policy, ["python3", "-c", PROBE, json.dumps(_plan(zone, targets, token))])
    if drop is not None:
        assert drop in argv
        argv.remove(drop)
    _drain(targets)
    result = _run_argv(argv)
    result["udp_received"], result["tcp_accepted"] = _drain(targets)
    return result


@pytest.fixture(scope="module")
def on_host(zone, targets):
    """Control: the same probe on the host, as alice's sandbox uid but outside any sandbox."""
    if not ROOT:
        pytest.skip("the host control drops to the sandbox uid: run as root")
    uid = zone.uids["alice"]
    plan = _plan(zone, targets, "from-host")
    plan["setuid_binary"] = str(targets["suid"])
    plan["write"] = []
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
            sys.executable, "-c", PROBE, json.dumps(plan)]
    _drain(targets)
    result = _run_argv(argv)
    result["udp_received"], result["tcp_accepted"] = _drain(targets)
    return result


# --- the escape suite --------------------------------------------------------------------

def test_runs_as_the_users_unprivileged_uid(zone, inside):
    uid = zone.uids["alice"]
    assert (inside["uid"], inside["euid"], inside["gid"]) == (uid, uid, uid)
    assert inside["setuid0"] in ("EINVAL", "EPERM")  # root is not even mapped inside


def test_only_loopback_exists_inside(zone, targets, inside):
    assert inside["interfaces"] == ["lo"]
    assert inside["tcp_loopback_inside"] == "ok"  # the sandbox's own lo works
    shared = _broken(zone, targets, drop="--unshare-net")
    assert shared["interfaces"] == sorted(n for _, n in socket.if_nameindex())


def test_tcp_to_a_host_loopback_listener_fails(zone, targets, inside):
    assert inside["tcp_host"] == "ECONNREFUSED"
    assert inside["tcp_accepted"] == 0
    shared = _broken(zone, targets, drop="--unshare-net")
    assert shared["tcp_host"] == "ok" and shared["tcp_accepted"] == 1


def test_udp_to_a_host_loopback_socket_never_arrives(zone, targets, inside):
    time.sleep(0.2)
    assert inside["udp_received"] + _drain(targets)[0] == []
    shared = _broken(zone, targets, drop="--unshare-net", token="leaked")
    assert shared["udp_received"] == ["leaked"]


def test_other_users_home_is_not_even_visible(zone, inside, on_host):
    for path in ("/home/bob", zone.host("homes", "bob"), zone.host("homes", "bob", "notes.txt")):
        assert inside["exists"][path] is False, path
        assert inside["read"][path] == "ENOENT", path
    # On the host the folder is there (its mode keeps the uid out; here, its absence does).
    assert on_host["exists"][zone.host("homes", "bob")] is True
    assert on_host["read"][zone.host("homes", "bob", "notes.txt")] == "EACCES"
    assert inside["cat"]["/home/bob/notes.txt"] == "ENOENT"
    assert inside["listdir"]["/home"] == ["alice"]


def test_data_lists_exactly_the_granted_dataset(zone, targets, inside):
    assert inside["listdir"]["/data"] == ["ds-a"]
    assert inside["cat"]["/data/ds-a/tables/labs.csv"] == "patient,value\nds-a-p1,7\n"
    # Control: a policy that wrongly mounts ds-b is seen as such.
    policy = zone.policy("alice")
    policy.datasets["ds-b"] = zone.home.dataset_dir("ds-b") / "data"
    leaky = _broken(zone, targets, policy=policy)
    assert leaky["listdir"]["/data"] == ["ds-a", "ds-b"]
    assert leaky["exists"]["/data/ds-b"] is True


def test_only_the_granted_datasets_manifest_is_visible(inside):
    assert inside["listdir"]["/run/medzone/manifests"] == ["ds-a.json"]
    assert json.loads(inside["cat"]["/run/medzone/manifests/ds-a.json"]) == {"dataset": "ds-a"}
    assert inside["exists"]["/run/medzone/manifests/ds-b.json"] is False
    assert inside["cat"]["/run/medzone/manifests/ds-b.json"] == "ENOENT"
    for path in ("/run/medzone/manifests/ds-a.json", "/run/medzone/manifests/new.json"):
        assert inside["write"][path] == "EROFS", path


def test_ungranted_dataset_is_absent_and_its_host_path_unreachable(zone, inside, on_host):
    host_file = zone.host("datasets", "ds-b", "data", "tables", "labs.csv")
    assert inside["exists"]["/data/ds-b"] is False
    assert inside["exists"][host_file] is False
    assert inside["read"][host_file] == "ENOENT"
    # On the host the same uid could read it: only the mount namespace keeps it out.
    assert on_host["read"][host_file] == "ok"


def test_granted_dataset_and_system_folders_are_read_only(inside):
    for path in ("/data/ds-a/new.txt", "/data/ds-a/tables/labs.csv", "/data/new.txt",
                 "/usr/probe.txt", "/etc/probe.txt", "/probe.txt"):
        assert inside["write"][path] == "EROFS", path
    # The same write works where the sandbox may write.
    assert inside["write"]["/home/alice/persist.txt"] == "ok"
    assert inside["write"]["/tmp/scratch.txt"] == "ok"


def test_zone_state_is_unreachable(zone, inside, on_host):
    for path in (zone.host("medzone.sqlite"), zone.host("secrets"),
                 zone.host("secrets", "screening-index.key"), zone.host("datasets", "ds-a", "data"),
                 zone.host("datasets", "ds-a", "index"),
                 zone.host("datasets", "ds-b", "index", "identifiers.bin"),
                 zone.host(), str(zone.base)):
        assert inside["exists"][path] is False, path
        assert inside["read"][path] == "ENOENT", path
        assert on_host["read"][path] in ("ok", "EACCES"), path  # there, on the host
    # The store is its owner's alone (0600): not even the same uid on the host reads it.
    assert on_host["read"][zone.host("medzone.sqlite")] == "EACCES"


def test_only_the_python_environment_of_the_checkout_is_bound(inside):
    parent = Path(sys.prefix).parent
    if parent == Path("/"):
        pytest.skip("the environment is not inside a checkout")
    expected = sorted({Path(p).relative_to(parent).parts[0]
                       for p in python_paths() if Path(p).is_relative_to(parent)})
    assert inside["listdir"][str(parent)] == expected
    assert "tests" not in expected and ".medzone" not in expected


def test_no_host_processes_are_visible(zone, targets, inside):
    assert len(inside["pids"]) <= 5
    assert inside["host_pid_visible"] is False
    assert inside["exists"][f"/proc/{os.getpid()}"] is False
    shared = _broken(zone, targets, drop="--unshare-pid")
    assert shared["host_pid_visible"] is True and len(shared["pids"]) > len(inside["pids"])


def test_ptrace_and_signals_cannot_reach_a_host_process(inside, on_host):
    # The seccomp filter refuses ptrace before the pid namespace is consulted; the signal
    # shows the pid namespace: the host process does not exist inside.
    assert inside["ptrace_host"] == "EPERM"
    assert inside["signal_host"] == "ESRCH"
    assert on_host["signal_host"] == "EPERM"  # visible on the host, just not permitted


def test_setuid_root_binaries_do_not_give_root(zone, inside, on_host):
    uid = zone.uids["alice"]
    assert inside["setuid_binary"]["rc"] == 0
    assert f"uid={uid}" in inside["setuid_binary"]["out"]
    assert "euid=0" not in inside["setuid_binary"]["out"]
    assert inside["su"]["rc"] != 0 and inside["mount"]["rc"] != 0
    # The same binary run by the same uid outside the sandbox does become root.
    assert "euid=0" in on_host["setuid_binary"]["out"]


def test_no_nested_user_namespaces(zone, targets, inside):
    assert inside["unshare_user"] in ("ENOSPC", "EPERM", "EUSERS")
    assert inside["unshare_cmd"]["rc"] != 0
    nested = _broken(zone, targets, drop="--disable-userns")
    assert nested["unshare_user"] == "ok"


# --- homes, exit status, grants ----------------------------------------------------------

def test_home_is_private_persistent_and_owned_by_the_sandbox_uid(zone, inside):
    uid = zone.uids["alice"]
    first = zone.exec("alice", "sh", "-c", "echo kept > ~/kept.txt && pwd && echo $HOME")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["/home/alice", "/home/alice"]
    again = zone.exec("alice", "cat", "/home/alice/kept.txt", "/home/alice/persist.txt")
    assert again.stdout == "kept\nprobe\n"
    st = (zone.home.root / "homes" / "alice").stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    if ROOT:
        assert (st.st_uid, st.st_gid) == (uid, uid)
        assert (zone.home.root / "homes" / "alice" / "kept.txt").stat().st_uid == uid
    assert stat.S_IMODE((zone.home.root / "homes").stat().st_mode) == 0o711


def test_exit_status_passes_through(zone):
    assert zone.exec("alice", "python3", "-c", "raise SystemExit(7)").returncode == 7
    assert zone.exec("alice", "true").returncode == 0
    killed = zone.exec("alice", "python3", "-c", "import os; os.kill(os.getpid(), 9)")
    assert killed.returncode == 128 + 9


def test_exec_gets_the_sandbox_settings_of_the_hub_config_file(zone):
    """`medzone sandbox exec --hub-config F` runs with F's SafeZoneSpawner settings, as the
    user's server under a hub started with F would."""
    config = zone.base / "small_jupyterhub_config.py"
    config.write_text("c.SafeZoneSpawner.tmp_size_bytes = 8 << 20\n"
                      "c.SafeZoneSpawner.shm_size_bytes = 4 << 20\n"
                      "c.SafeZoneSpawner.nproc_limit = 321\n")
    probe = ("import json, os, resource\n"
             "size = lambda p: os.statvfs(p).f_blocks * os.statvfs(p).f_frsize\n"
             "print(json.dumps([size('/tmp'), size('/dev/shm'),"
             " resource.getrlimit(resource.RLIMIT_NPROC)[0]]))")
    cmd = ["python3", "-c", probe]
    default = json.loads(zone.exec("alice", *cmd).stdout)
    done = zone.exec("alice", *cmd, options=("--hub-config", str(config)))
    assert done.returncode == 0, done.stderr
    tmp, shm, nproc = json.loads(done.stdout)
    assert (tmp, shm) == (8 << 20, 4 << 20)
    assert default[:2] == [SandboxConfig().tmp_size_bytes, SandboxConfig().shm_size_bytes]
    if ROOT:  # RLIMIT_NPROC is set where the sandbox drops to its own uid
        assert (nproc, default[2]) == (321, SandboxConfig().nproc_limit)
    missing = zone.exec("alice", "true", options=("--hub-config", str(zone.base / "nope.py")))
    assert missing.returncode != 0 and "no hub config file" in missing.stderr


def test_unknown_or_unapproved_user_is_one_line_error(zone):
    for user, message in (("nobody", "medzone: error: user 'nobody' does not exist"),
                          ("pending", "medzone: error: user 'pending' is not approved")):
        done = zone.exec(user, "true")
        assert done.returncode == 1
        assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
        assert done.stdout == ""


def test_expired_and_revoked_grants_are_not_mounted_at_the_next_exec(zone):
    now = utcnow()
    with zone.store.session() as session:
        old = access.apply(session, user="bob", dataset_ids=["ds-b"], purpose="old",
                           now=now - timedelta(days=3))
        session.flush()
        access.approve(session, old.id, reviewer="steward", days=1, now=now - timedelta(days=3))
        live = access.apply(session, user="bob", dataset_ids=["ds-a"], purpose="live")
        session.flush()
        access.approve(session, live.id, reviewer="steward")
        live_id = live.id
    assert zone.exec("bob", "ls", "/data").stdout.split() == ["ds-a"]  # ds-b expired
    with zone.store.session() as session:
        access.revoke(session, live_id, actor="steward")
    done = zone.exec("bob", "ls", "-A", "/data")
    assert done.returncode == 0 and done.stdout == ""
    assert zone.exec("bob", "ls", "/data/ds-a").returncode != 0


# --- the spawner's helpers ---------------------------------------------------------------

def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_start_sandboxed_reports_pid1_and_kill_tears_down_the_namespace(zone, tmp_path):
    token = f"medzone-kill-{os.getpid()}-{time.monotonic_ns()}"
    policy = zone.policy("alice")
    script = ("import subprocess, sys, time; "
              f"subprocess.Popen(['sleep', '300', '{token}']); print('up', flush=True); "
              "time.sleep(300)")
    sock_dir = Path(tempfile.mkdtemp(dir=zone.base))
    os.chmod(sock_dir, 0o755)
    (sock_dir / "hub.txt").write_text("hub")

    async def scenario():
        box = await start_sandboxed(
            policy, ["python3", "-c", script, token], home=zone.home,
            extra_ro_binds=[(str(sock_dir), str(sock_dir))], extra_env={"MEDZONE_PROBE": "1"},
            stdout=asyncio.subprocess.PIPE)
        assert (await box.process.stdout.readline()).strip() == b"up"
        assert Path(f"/proc/{box.child_pid}").exists()
        assert len(_processes_with(token)) >= 3  # bwrap's monitor and pid 1, python, sleep
        assert kill_sandbox(box.child_pid) is True
        rc = await asyncio.wait_for(box.wait(), 10)
        return box, rc

    box, rc = asyncio.run(scenario())
    assert rc == 128 + 9
    deadline = time.monotonic() + 5
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(token) == []  # the sleep inside went with pid 1
    assert kill_sandbox(box.child_pid) is False


def test_extra_ro_binds_reach_the_sandbox_read_only(zone):
    sock_dir = Path(tempfile.mkdtemp(dir=zone.base))
    os.chmod(sock_dir, 0o755)
    (sock_dir / "hub.txt").write_text("hub")
    policy = zone.policy("alice")
    argv = bwrap_argv(policy, ["sh", "-c", f"cat {sock_dir}/hub.txt; touch {sock_dir}/x"],
                      extra_ro_binds=[(str(sock_dir), str(sock_dir))])
    done = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=30)
    assert done.stdout == "hub" and "Read-only file system" in done.stderr


def test_binds_that_would_expose_the_zone_are_refused(zone):
    policy = zone.policy("alice")
    for source in (str(zone.home.root), str(zone.base), "/tmp"):
        with pytest.raises(RuleViolation, match="contains MEDZONE_HOME"):
            bwrap_argv(policy, ["true"], extra_ro_binds=[(source, "/mnt")])
    with pytest.raises(Exception, match="reserved"):
        bwrap_argv(policy, ["true"], extra_ro_binds=[("/usr/share", "/data/ds-b")])
    config = SandboxConfig(extra_ro_binds=[(str(zone.base), str(zone.base))])
    with pytest.raises(RuleViolation):
        zone.policy("alice", config=config)


@needs_root
def test_unreachable_bind_source_is_a_clear_error(zone):
    hidden = Path(tempfile.mkdtemp(dir=zone.base))  # 0700 root: the sandbox uid cannot enter
    (hidden / "sock").mkdir()
    policy = zone.policy("alice")
    with pytest.raises(SandboxError, match="cannot reach"):
        check_reachable(policy, [(str(hidden / "sock"), "/run/hub")])


def test_policy_refuses_unknown_and_unapproved_users(zone):
    with pytest.raises(NotFound):
        zone.policy("nobody")
    with pytest.raises(RuleViolation):
        zone.policy("pending")


@needs_root
def test_non_root_hub_uses_an_unprivileged_user_namespace(zone, tmp_path):
    """A hub running as an ordinary user: bubblewrap's own user namespace, same view."""
    hub_uid = 65534
    # (the hub's own uid owns MEDZONE_HOME there; this zone's is root's: no seccomp file)
    policy = dataclasses.replace(zone.policy("alice"), drop_to_uid=False, seccomp_program=None)
    policy.home_host = Path(tempfile.mkdtemp(dir=zone.base))
    os.chown(policy.home_host, hub_uid, hub_uid)
    argv = ["setpriv", f"--reuid={hub_uid}", f"--regid={hub_uid}", "--clear-groups", "--",
            *bwrap_argv(policy, ["sh", "-c", "id -u; ls /data; touch ~/f && echo ok; "
                                              "unshare -U true || echo nested-refused"])]
    assert os.path.basename(argv[5]) == "bwrap"  # no setpriv of its own: not root
    done = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == [str(zone.uids["alice"]), "ds-a", "ok", "nested-refused"]
    assert (policy.home_host / "f").stat().st_uid == hub_uid


# --- argv, GPU and cgroup logic (no sandbox started) -------------------------------------

def _flags(argv: list[str]) -> list[str]:
    return argv[: argv.index("--", argv.index(shutil.which("bwrap")))]


def test_argv_isolation_flags(zone):
    policy = zone.policy("alice")
    argv = bwrap_argv(policy, ["python3", "-V"], info_fd=5, extra_env={"JUPYTERHUB_USER": "alice"})
    flags = _flags(argv)
    for flag in ("--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
                 "--unshare-uts", "--unshare-net", "--die-with-parent", "--new-session",
                 "--clearenv"):
        assert flag in flags, flag
    assert flags[flags.index("--cap-drop") + 1] == "ALL"
    assert flags[flags.index("--info-fd") + 1] == "5"
    assert argv[-2:] == ["python3", "-V"]
    setenv = {flags[i + 1]: flags[i + 2] for i, a in enumerate(flags) if a == "--setenv"}
    assert setenv["HOME"] == "/home/alice" and setenv["JUPYTERHUB_USER"] == "alice"
    assert "CUDA_VISIBLE_DEVICES" not in setenv
    binds = [(flags[i], flags[i + 1], flags[i + 2]) for i, a in enumerate(flags)
             if a in ("--bind", "--ro-bind", "--dev-bind")]
    rw = [b for b in binds if b[0] != "--ro-bind"]
    assert rw == [("--bind", str(zone.home.root / "homes" / "alice"), "/home/alice")]
    assert ("--ro-bind", str(zone.home.dataset_dir("ds-a") / "data"), "/data/ds-a") in binds
    zone_binds = [b for b in binds if b[1].startswith(str(zone.home.root))]
    assert ("--ro-bind", str(zone.home.dataset_dir("ds-a") / "manifest.json"),
            "/run/medzone/manifests/ds-a.json") in binds
    assert setenv["MEDZONE_MANIFESTS"] == "/run/medzone/manifests"
    # the home, the one granted dataset and its manifest (never its index)
    assert len(zone_binds) == 3
    if ROOT:
        uid = str(zone.uids["alice"])
        # After the root-side steps (cgroup, seccomp descriptor, RLIMIT_NPROC): setpriv;
        # ds-a was published before datasets had groups: no supplementary group.
        i = argv.index(shutil.which("setpriv"))
        assert argv[i:i + 5] == [shutil.which("setpriv"), f"--reuid={uid}", f"--regid={uid}",
                                 "--clear-groups", "--"]


def test_gpu_is_bound_for_the_gpu_role_only(zone, tmp_path):
    gpus = [GpuDevice(0, "/dev/nvidia0", "GPU-aaaa"), GpuDevice(1, "/dev/nvidia1", None)]
    support = ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    reg = GpuRegistry(tmp_path / "gpus.json")
    with zone.store.session() as session:
        session.get(accounts.User, zone.uids["bob"] - UID_BASE).roles = ["gpu"]
    try:
        kw = dict(gpus=gpus, gpu_support_nodes=support, gpu_registry=reg)
        plain = zone.policy("alice", **kw)
        assert plain.gpu_devices == [] and "CUDA_VISIBLE_DEVICES" not in plain.env
        first = zone.policy("bob", gpu_key="s1", **kw)
        assert first.gpu_devices == ["/dev/nvidia0", *support]
        assert first.env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
        flags = _flags(bwrap_argv(first, ["nvidia-smi"]))
        dev_binds = [flags[i + 1] for i, a in enumerate(flags) if a == "--dev-bind"]
        assert dev_binds == ["/dev/nvidia0", *support]
        second = zone.policy("bob", gpu_key="s2", **kw)  # least used: GPU 1, no UUID known
        assert second.gpu_devices[0] == "/dev/nvidia1"
        assert second.env["CUDA_VISIBLE_DEVICES"] == "1"
        with pytest.raises(Conflict, match="all 2 GPU"):
            zone.policy("bob", gpu_key="s3", **kw)
        assert zone.policy("bob", gpu_key="s1", **kw).gpu.index == 0  # same key, same GPU
        reg.release("s1")
        assert zone.policy("bob", gpu_key="s3", **kw).gpu.index == 0
        off = zone.policy("bob", config=SandboxConfig(gpu_enabled=False), gpu_key="s4", **kw)
        assert off.gpu_devices == []
        anyone = zone.policy("alice", config=SandboxConfig(allow_gpu_role=None,
                                                           gpu_sessions_per_gpu=2),
                             gpu_key="s5", **kw)
        assert anyone.gpu.index == 0  # 1 session on each; lowest index wins the tie
    finally:
        with zone.store.session() as session:
            session.get(accounts.User, zone.uids["bob"] - UID_BASE).roles = []


def test_choose_gpu_picks_the_least_used_and_refuses_when_full():
    gpus = [GpuDevice(i, f"/dev/nvidia{i}") for i in range(3)]
    assert choose_gpu(gpus, {}, 1).index == 0
    assert choose_gpu(gpus, {0: 2, 1: 1, 2: 2}, 3).index == 1
    assert choose_gpu(gpus, {0: 1, 1: 1}, 1).index == 2
    with pytest.raises(Conflict, match="3 GPU"):
        choose_gpu(gpus, {0: 1, 1: 1, 2: 1}, 1)


def test_gpu_registry_forgets_reservations_of_exited_owners(tmp_path):
    reg = GpuRegistry(tmp_path / "gpus.json")
    gpus = [GpuDevice(0, "/dev/nvidia0")]
    gone = subprocess.Popen(["true"])
    gone.wait()
    reg.acquire("crashed", user="bob", gpus=gpus, per_gpu=1, pid=gone.pid)
    assert reg.usage() == {}
    reg.acquire("live", user="bob", gpus=gpus, per_gpu=1)
    assert reg.usage() == {0: 1}
    with pytest.raises(Conflict):
        reg.acquire("other", user="alice", gpus=gpus, per_gpu=1)


def _fake_cgroup2(tmp_path, controllers: str) -> Path:
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text(controllers)
    (mount / "cgroup.subtree_control").write_text("")
    return mount


def test_cgroup_limits_need_memory_and_cpu_controllers(tmp_path):
    mount = _fake_cgroup2(tmp_path, "hugetlb pids\n")
    reason = cgroup_limits_unavailable_reason(mount=str(mount))
    assert "memory and cpu controllers" in reason and "not applied" in reason
    # On this machine: a reason, or limits that really can be set.
    here = cgroup_limits_unavailable_reason()
    assert here is None or "not applied" in here


def test_cgroup_is_created_with_the_limits_written(tmp_path):
    mount = _fake_cgroup2(tmp_path, "cpu memory io\n")
    assert cgroup_limits_unavailable_reason(mount=str(mount)) is None
    path = create_cgroup(mount / "medzone", "alice-1", memory_limit_bytes=2 << 30,
                         cpu_limit=1.5, mount=str(mount))
    assert (path / "memory.max").read_text() == str(2 << 30)
    assert (path / "cpu.max").read_text() == "150000 100000"
    assert (mount / "cgroup.subtree_control").read_text() == "+memory +cpu"
    assert (mount / "medzone" / "cgroup.subtree_control").read_text() == "+memory +cpu"


def test_argv_joins_the_cgroup_before_dropping_privileges(zone):
    policy = dataclasses.replace(zone.policy("alice"), seccomp_program=None, nproc_limit=None)
    argv = bwrap_argv(policy, ["true"], cgroup="/sys/fs/cgroup/medzone/alice-1")
    assert argv[:5] == ["/bin/sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift 1 && exec "$@"',
                        "medzone-sandbox", "/sys/fs/cgroup/medzone/alice-1"]
    assert os.path.basename(argv[5]) == ("setpriv" if ROOT else "bwrap")


def test_detect_gpus_reads_device_nodes_and_driver_uuids(tmp_path):
    dev, gpus_proc = tmp_path / "dev", tmp_path / "gpus"
    dev.mkdir()
    for name in ("nvidia1", "nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-caps", "null"):
        (dev / name).mkdir() if name == "nvidia-caps" else (dev / name).touch()
    (dev / "nvidia-caps" / "nvidia-cap1").touch()
    (gpus_proc / "0000:17:00.0").mkdir(parents=True)
    (gpus_proc / "0000:17:00.0" / "information").write_text(
        "Model: \t\t NVIDIA H100\nGPU UUID: \t GPU-1234-abcd\nDevice Minor: \t 1\n")
    assert detect_gpus(str(dev), str(gpus_proc)) == [
        GpuDevice(0, str(dev / "nvidia0"), None), GpuDevice(1, str(dev / "nvidia1"), "GPU-1234-abcd")]
    assert nvidia_support_nodes(str(dev)) == [
        str(dev / "nvidiactl"), str(dev / "nvidia-uvm"), str(dev / "nvidia-caps" / "nvidia-cap1")]
    assert detect_gpus(str(tmp_path / "missing")) == []


def test_limits_that_cannot_apply_come_with_the_reason(zone):
    policy = zone.policy("alice", config=SandboxConfig(memory_limit_bytes=1 << 30, cpu_limit=1))
    path, reason = sandbox_cgroup(policy)
    try:
        if reason is None:  # a machine that allows it: a real cgroup with the limits
            limit = "memory.max" if (path / "memory.max").exists() else "memory.limit_in_bytes"
            assert (path / limit).read_text().strip() == str(1 << 30)
        else:
            assert path is None and "not applied" in reason
        none = SandboxConfig(memory_limit_bytes=None, pids_limit=None)
        assert sandbox_cgroup(zone.policy("alice", config=none)) == (None, None)  # none asked
    finally:
        remove_cgroup(path)
