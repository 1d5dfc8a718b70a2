"""Login at the hub: passwords checked off the event loop, failed-login lockout and rate
limit per username and per client address, and an expired login form.

A real hub (tests/hub_harness.py) whose authenticator is MedZone's with one addition: each
password check and hash writes a line (which thread ran it) to a file in MEDZONE_HOME, so
the tests can count bcrypt calls and see where they ran. The tests talk to the hub on its
socket (see :class:`_Client`), setting ``X-Forwarded-For`` as the proxy does, so each can
come from addresses of its own. Lock times are seconds, set in the test config.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import re
import socket
import time
import urllib.parse

import pytest

from ..hub_harness import PASSWORD, require_hub_tools, running_hub, wait_for, xsrf_from

require_hub_tools()

from medzone_hub.accounts import set_password  # noqa: E402
from medzone_hub.authenticator import LOGIN_FORM_EXPIRED  # noqa: E402

RECORD = "password-work.log"
USER_FAILURES = 3
ADDRESS_FAILURES = 4
LOCK_S = 3
USER_RATE = 5
ADDRESS_RATE = 6

EXTRA_CONFIG = f"""
import os, threading
from medzone_hub.authenticator import MedZoneAuthenticator
_RECORD = os.path.join(os.environ["MEDZONE_HOME"], {RECORD!r})

class RecordingAuthenticator(MedZoneAuthenticator):
    def _record(self, what):
        t = threading.current_thread()
        with open(_RECORD, "a") as f:
            f.write(f"{{what}} {{t.name}} {{t is threading.main_thread()}}\\n")

    def _check_password(self, password, hashed):
        self._record("check")
        return super()._check_password(password, hashed)

    def _hash_password(self, password):
        self._record("hash")
        return super()._hash_password(password)

c.JupyterHub.authenticator_class = RecordingAuthenticator
c.MedZoneAuthenticator.allowed_failed_logins = {USER_FAILURES}
c.MedZoneAuthenticator.allowed_failed_logins_per_address = {ADDRESS_FAILURES}
c.MedZoneAuthenticator.seconds_before_next_try = {LOCK_S}
c.MedZoneAuthenticator.login_attempts_per_minute = {USER_RATE}
c.MedZoneAuthenticator.login_attempts_per_minute_per_address = {ADDRESS_RATE}
"""


@pytest.fixture(scope="module")
def hub():
    with running_hub({}, extra_config=EXTRA_CONFIG) as h:
        yield h


def _person(hub, name: str) -> None:
    hub.add_store_user(name, grant=())
    set_password(hub.home, name, PASSWORD, actor="test")


def _work(hub) -> list[tuple[str, str, str]]:
    path = hub.home.root / RECORD
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines()]


def _checks(hub) -> int:
    return sum(1 for what, _, _ in _work(hub) if what == "check")


class _Response:
    def __init__(self, status_code: int, text: str, cookies: dict[str, str]):
        self.status_code, self.text, self.cookies = status_code, text, cookies


class _Client:
    """One browser talking to the hub on its unix socket, from *address* (what the proxy
    would put in ``X-Forwarded-For``). Not through the proxy: when the hub answers a
    POST within a few milliseconds, as a refused login does (and as a rejected XSRF token
    does without this change), the npm proxy sometimes reports ``write EPIPE`` and
    answers 503 although the hub answered; counting attempts needs every answer."""

    def __init__(self, hub, address: str):
        self.socket_path = str(hub.home.root / "run" / "hub" / "hub.sock")
        self.address = address
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict | None = None) -> _Response:
        conn = http.client.HTTPConnection("localhost", timeout=60)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.settimeout(60)
        conn.sock.connect(self.socket_path)
        headers = {"X-Forwarded-For": self.address}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            text = r.read().decode(errors="replace")
            for name, value in r.getheaders():
                if name.lower() == "set-cookie":
                    key, _, rest = value.partition("=")
                    self.cookies[key] = rest.split(";", 1)[0]
            return _Response(r.status, text, dict(self.cookies))
        finally:
            conn.close()

    def login(self, name: str, password: str) -> _Response:
        page = self.request("GET", "/hub/login")
        return self.request("POST", "/hub/login", {
            "username": name, "password": password, "_xsrf": xsrf_from(page.text)})


def _login(hub, name: str, password: str, address: str) -> _Response:
    return _Client(hub, address).login(name, password)


def _error(r: _Response) -> str:
    found = re.findall(r'(?s)<p class="login_error">\s*(.*?)\s*</p>', r.text)
    return found[0] if found else ""


def test_passwords_are_checked_and_hashed_in_password_threads_not_the_event_loop(hub):
    _person(hub, "tess")
    assert _login(hub, "tess", PASSWORD, "10.1.0.1").status_code == 302, hub.log()
    assert _login(hub, "tess", "wrong-password-1", "10.1.0.1").status_code == 200
    # A sign-up's password is hashed there too.
    anon = _Client(hub, "10.1.0.2")
    page = anon.request("GET", "/hub/signup")
    r = anon.request("POST", "/hub/signup", {
        "username": "sid", "signup_password": PASSWORD,
        "signup_password_confirmation": PASSWORD, "_xsrf": xsrf_from(page.text)})
    assert r.status_code == 200 and "sent to the admin" in r.text, r.text[-2000:]

    work = _work(hub)
    assert {what for what, _, _ in work} == {"check", "hash"}, work
    for what, thread, is_main in work:
        assert thread.startswith("medzone-password") and is_main == "False", work
    assert "Too many" not in hub.log()


def test_changing_a_password_checks_and_hashes_in_password_threads_and_counts_failures(hub):
    _person(hub, "vera")
    client = _Client(hub, "10.8.0.1")
    assert client.login("vera", PASSWORD).status_code == 302
    before = len(_work(hub))
    new = PASSWORD + "-new"

    def change(old: str) -> str:
        page = client.request("GET", "/hub/change-password")
        assert page.status_code == 200, page.text[-1000:]
        r = client.request("POST", "/hub/change-password", {
            "old_password": old, "new_password": new, "new_password_confirmation": new,
            "_xsrf": xsrf_from(page.text)})
        assert r.status_code == 200
        return r.text

    assert "changed successfully" in change(PASSWORD)
    work = _work(hub)[before:]
    assert sorted(what for what, _, _ in work) == ["check", "hash"], work
    assert all(t.startswith("medzone-password") and m == "False" for _, t, m in work), work
    # A wrong current password is a failed login for the account.
    for _ in range(USER_FAILURES):
        assert "current password was incorrect" in change("not-the-password")
    assert "Too many failed logins for this account" in change(new)
    r = _login(hub, "vera", new, "10.8.0.2")
    assert r.status_code == 403 and _error(r).startswith("Too many failed logins"), _error(r)


def test_wrong_passwords_lock_the_account_even_for_the_right_password(hub):
    _person(hub, "lena")
    for i in range(USER_FAILURES):
        r = _login(hub, "lena", f"guess-{i}-password", f"10.2.0.{i + 1}")
        assert r.status_code == 200 and _error(r) == "Invalid username or password."
    before = _checks(hub)
    # Locked: the right password, from another address, is refused with one line …
    r = _login(hub, "lena", PASSWORD, "10.2.1.1")
    assert r.status_code == 403
    assert re.fullmatch(r"Too many failed logins for this account; try again in \d+ s\.",
                        _error(r)), _error(r)
    assert "_xsrf" in r.text and 'name="password"' in r.text  # the login page again
    # … and more guesses are refused the same way: none of them ran bcrypt.
    for i in range(3):
        assert _login(hub, "lena", f"more-{i}-guesses", "10.2.1.2").status_code == 403
    assert _checks(hub) == before
    # Once the lock expires, the right password works (and is checked once).
    ok = wait_for(lambda: _login(hub, "lena", PASSWORD, "10.2.1.3").status_code == 302,
                  timeout=LOCK_S * 10, step=0.5)
    assert ok, hub.log()
    assert _checks(hub) == before + 1


def test_logins_posted_at_once_cannot_slip_past_the_lock(hub):
    _person(hub, "mona")
    before = _checks(hub)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = [r.status_code for r in pool.map(
            lambda i: _login(hub, "mona", f"parallel-guess-{i}", f"10.3.0.{i + 1}"),
            range(10))]
    assert statuses.count(403) == 10 - USER_FAILURES, (statuses, hub.log())
    assert _checks(hub) - before == USER_FAILURES


def test_failures_from_one_address_lock_that_address(hub):
    _person(hub, "nell")
    for i in range(ADDRESS_FAILURES):  # unknown names: guessing accounts, not passwords
        r = _login(hub, f"nobody{i}", "some-password-1", "10.4.0.1")
        assert r.status_code == 200
    before = _checks(hub)
    r = _login(hub, "nell", PASSWORD, "10.4.0.1")
    assert r.status_code == 403
    assert re.fullmatch(r"Too many failed logins from your address; try again in \d+ s\.",
                        _error(r)), _error(r)
    assert _checks(hub) == before
    # Another address is not affected.
    assert _login(hub, "nell", PASSWORD, "10.4.0.2").status_code == 302


def test_login_attempts_are_rate_limited_per_account_and_per_address(hub):
    _person(hub, "olga")
    _person(hub, "pam")
    _person(hub, "rose")
    # Per account: USER_RATE logins a minute, right or wrong, from any addresses.
    for i in range(USER_RATE):
        assert _login(hub, "rose", PASSWORD, f"10.5.0.{i + 1}").status_code == 302
    before = _checks(hub)
    r = _login(hub, "rose", PASSWORD, "10.5.1.1")
    assert r.status_code == 403
    assert re.fullmatch(r"Too many login attempts; try again in \d+ s\.", _error(r)), _error(r)
    # Per address: ADDRESS_RATE logins a minute, all accounts together.
    for i in range(ADDRESS_RATE):
        assert _login(hub, ("olga", "pam")[i % 2], PASSWORD, "10.6.0.1").status_code == 302
    r = _login(hub, "olga", PASSWORD, "10.6.0.1")
    assert r.status_code == 403 and _error(r).startswith("Too many login attempts")
    assert _checks(hub) == before + ADDRESS_RATE


def test_an_expired_login_form_gets_the_login_page_again_with_the_reason(hub):
    _person(hub, "uma")
    client = _Client(hub, "10.7.0.1")
    page = client.request("GET", "/hub/login")
    # The form's XSRF cookie expired: it is gone, and the token the hub makes afresh for
    # this client is signed at a later second than the one in the form.
    client.cookies.clear()
    time.sleep(1.1)
    r = client.request("POST", "/hub/login", {
        "username": "uma", "password": PASSWORD, "_xsrf": xsrf_from(page.text)})
    assert r.status_code == 403
    assert _error(r) == LOGIN_FORM_EXPIRED, r.text[-2000:]
    assert 'name="password"' in r.text
    assert "unexpected keyword argument" not in hub.log()
    # Signing in again from that page works.
    r = client.request("POST", "/hub/login", {
        "username": "uma", "password": PASSWORD, "_xsrf": xsrf_from(r.text)})
    assert r.status_code == 302, (r.status_code, _error(r))


def test_the_address_is_the_proxys_hop_not_what_the_client_claims():
    """Behind the proxy, the address is the hop the proxy appended: a client's own
    ``X-Forwarded-For`` entries and ``X-Real-Ip`` are not believed."""
    from types import SimpleNamespace

    from tornado.httputil import HTTPHeaders

    from medzone_hub.authenticator import client_address

    def address(trusted=(), **headers):
        context = SimpleNamespace(trusted_downstream=set(trusted), _orig_remote_ip="0.0.0.0")
        request = SimpleNamespace(headers=HTTPHeaders(headers), remote_ip="6.6.6.6",
                                  connection=SimpleNamespace(context=context))
        return client_address(SimpleNamespace(request=request))

    assert address(**{"X-Forwarded-For": "1.2.3.4, 10.0.0.7"}) == "10.0.0.7"
    assert address(**{"X-Forwarded-For": "10.0.0.7", "X-Real-Ip": "9.9.9.9"}) == "10.0.0.7"
    assert address(["10.0.0.7"], **{"X-Forwarded-For": "1.2.3.4,10.0.0.7"}) == "1.2.3.4"
    assert address(**{"X-Forwarded-For": "not-an-address"}) == "0.0.0.0"
    assert address() == "0.0.0.0"


def test_the_zone_config_turns_the_lockout_on():
    """The defaults live in hub/jupyterhub_config.py (and in the traitlets)."""
    from medzone_hub.authenticator import MedZoneAuthenticator
    from medzone_hub.hubapp import DEFAULT_CONFIG

    text = DEFAULT_CONFIG.read_text()
    for setting, value in (("allowed_failed_logins", 5),
                           ("allowed_failed_logins_per_address", 20),
                           ("seconds_before_next_try", 300),
                           ("login_attempts_per_minute", 10),
                           ("login_attempts_per_minute_per_address", 60)):
        assert f"c.MedZoneAuthenticator.{setting} = {value}\n" in text
        trait = MedZoneAuthenticator.class_traits()[setting]
        assert trait.default_value == value and trait.help, setting
    assert MedZoneAuthenticator.class_traits()["password_hash_threads"].help
