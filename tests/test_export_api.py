"""Export requests through the hub API, and ``medzone_kernel.export`` from a sandboxed kernel.

One real hub for this file (``tests/hub_harness.py``), the real proxy and real bubblewrap
sandboxes. Its users hold no dataset grants: the airlock then screens without dataset
indexes, which these tests do not need.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket

import pytest

from medzone_hub import airlock, audit
from medzone_hub.hubapp import HubPaths, unix_url

from .hub_harness import Hub, require_hub_tools, run_code, running_hub

require_hub_tools()

ENDPOINT = "/hub/api/medzone/exports"
COUNTS = b"group,patients\ntreated,1200\ncontrol,1350\n"


@pytest.fixture(scope="module")
def hub():
    with running_hub({}) as h:
        yield h


class _Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status_code, self.headers, self.text = status, headers, body.decode()

    def json(self):
        return json.loads(self.text)


def _call(hub: Hub, method: str, path: str, token: str | None, body: dict | None = None):
    """Straight to the hub's unix socket, as a sandbox reaches it (not through the proxy)."""
    conn = http.client.HTTPConnection("localhost", timeout=120)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(HubPaths(hub.home).hub_socket))
    headers = {"Authorization": f"token {token}"} if token else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    try:
        conn.request(method, ENDPOINT + path, body=data, headers=headers)
        response = conn.getresponse()
        return _Response(response.status, response.headers, response.read())
    finally:
        conn.close()


def _post(hub: Hub, token: str | None, body: dict) -> _Response:
    return _call(hub, "POST", "", token, body)


def _get(hub: Hub, token: str, request_id: int) -> _Response:
    return _call(hub, "GET", f"/{request_id}", token)


def _request(hub: Hub, request_id: int):
    with hub.store.session() as session:
        return airlock.get_request(session, request_id)


def test_the_endpoint_requests_from_the_token_owners_home_only(hub):
    for name in ("ada", "ben"):
        hub.add_store_user(name, grant=())
        hub.api("POST", f"/users/{name}")
    home = airlock.user_home(hub.home, "ada")
    (home / "results").mkdir(parents=True)
    (home / "results" / "counts.csv").write_bytes(COUNTS)
    ben_home = airlock.user_home(hub.home, "ben")
    ben_home.mkdir(parents=True)
    (ben_home / "mine.csv").write_bytes(COUNTS)
    ada, ben = hub.user_token("ada"), hub.user_token("ben")

    r = _post(hub, ada, {"paths": ["/home/ada/results/counts.csv"], "reason": "paper"})
    assert r.status_code == 201, r.text
    answer = r.json()
    assert (answer["user"], answer["state"], answer["verdict"]) == ("ada", "pending", "pass")
    assert [(f["path"], f["verdict"], f["findings"]) for f in answer["files"]] == [
        ("results/counts.csv", "pass", [])]
    quarantined = airlock.quarantine_dir(hub.home, answer["id"]) / "files" / "results/counts.csv"
    assert quarantined.read_bytes() == COUNTS
    assert _request(hub, answer["id"]).files[0].sha256 == hashlib.sha256(COUNTS).hexdigest()
    assert r.headers["Location"].endswith(f"{ENDPOINT}/{answer['id']}")
    assert _get(hub, ada, answer["id"]).json()["files"] == answer["files"]

    # The requester is the token's owner: ben can neither reach ada's home nor name her.
    refused = _post(hub, ben, {"paths": ["/home/ada/results/counts.csv"], "reason": "x"})
    assert refused.status_code == 403
    assert "only files in ben's home" in refused.json()["message"]
    refused = _post(hub, ben, {"paths": ["../ada/results/counts.csv"], "reason": "x"})
    assert refused.status_code == 403 and "'..' is not allowed" in refused.json()["message"]
    refused = _post(hub, ben, {"user": "ada", "paths": ["mine.csv"], "reason": "x"})
    assert refused.status_code == 400 and "token's owner" in refused.json()["message"]
    assert _get(hub, ben, answer["id"]).status_code == 404  # not even its status
    # Paths escaping the home are refused, symlinks included; so are bad credentials.
    (home / "elsewhere").symlink_to(ben_home)
    for path in ("/etc/passwd", "elsewhere/mine.csv"):
        refused = _post(hub, ada, {"paths": [path], "reason": "x"})
        assert refused.status_code == 403, (path, refused.text)
    assert _post(hub, None, {"paths": ["mine.csv"], "reason": "x"}).status_code == 403
    narrow = hub.api("POST", "/users/ben/tokens", json={"scopes": ["read:users:activity!user"]})
    assert narrow.status_code == 201, narrow.text
    refused = _post(hub, narrow.json()["token"], {"paths": ["mine.csv"], "reason": "x"})
    assert refused.status_code == 403 and "may not request exports" in refused.json()["message"]

    with hub.store.session() as session:
        requests_made = [e for e in audit.events(session) if e.action == "export.request"]
        assert [e.actor for e in requests_made] == ["ada"]
        assert audit.verify(session).ok


def test_medzone_kernel_requests_an_export_from_a_sandboxed_kernel(hub):
    hub.add_store_user("kim", grant=())
    assert hub.spawn("kim").status_code in (201, 202), hub.log()
    token = hub.user_token("kim")
    out = run_code(hub, "kim", token, (
        "import json, os\n"
        "from medzone_kernel import export\n"
        "os.makedirs('results', exist_ok=True)\n"
        f"open('results/counts.csv', 'wb').write({COUNTS!r})\n"
        "print(os.environ['JUPYTERHUB_API_URL'])\n"
        "r = export.request(['results/counts.csv'], reason='from a notebook')\n"
        "print(json.dumps(r))\n"
        "print(export.status(r['id'])['state'])\n"
        "for call in (lambda: export.request(['/etc/passwd'], reason='x'),\n"
        "             lambda: export.request(['results/counts.csv'], reason=' ')):\n"
        "    try:\n"
        "        call()\n"
        "    except export.ExportRefused as err:\n"
        "        print('refused:', err)\n"
        "try:\n"
        "    export.status(r['id'] + 1000)\n"
        "except export.ExportNotFound as err:\n"
        "    print('not found:', err)\n"
    ))
    api_url, answer, state, refused_path, refused_reason, not_found = out.splitlines()
    assert api_url.startswith("http+unix://")  # the hub's socket, the only way out
    answer = json.loads(answer)
    assert (answer["user"], answer["state"], state) == ("kim", "pending", "pending")
    assert [(f["path"], f["verdict"]) for f in answer["files"]] == [
        ("results/counts.csv", "pass")]
    assert refused_path == ("refused: refusing '/etc/passwd': only files in kim's home can be "
                            "exported")
    assert refused_reason == ("refused: the reason for the export is empty: say why these "
                              "files must leave")
    assert not_found.startswith("not found:") and "does not exist" in not_found

    request = _request(hub, answer["id"])
    assert (request.user.name, request.reason) == ("kim", "from a notebook")
    quarantined = airlock.quarantine_dir(hub.home, request.id) / "files" / "results/counts.csv"
    assert quarantined.read_bytes() == COUNTS
    hub.api("DELETE", "/users/kim/server")


def test_without_a_hub_the_kernel_side_says_so(monkeypatch, tmp_path):
    from medzone_kernel import export

    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    with pytest.raises(export.HubUnavailable, match="are not set"):
        export.request(["results/counts.csv"], reason="r")
    monkeypatch.setenv("JUPYTERHUB_API_URL", unix_url(tmp_path / "hub.sock") + "/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "token")
    with pytest.raises(export.HubUnavailable, match="cannot reach the hub"):
        export.status(1)
