"""Sandbox sessions as the rules see them: the policy a user's sandbox gets now.

The sandbox package takes a policy and knows no rules; this service decides who gets one
(an approved account) and what it mounts (exactly the live grants at that moment), from
the store, and hands the facts to the pure :func:`medzone_hub.sandbox.build_policy`. It
lives beside :mod:`medzone_hub.access` (the grants) and :mod:`medzone_hub.accounts`
rather than in either: it is where the two meet the sandbox, and what the spawner, the CLI
and template runs all ask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime

from .access import live_grants
from .accounts import get_user, validate_user_name
from .config import MedZoneHome
from .errors import RuleViolation
from .sandbox import AccountFacts, SandboxConfig, SandboxPolicy, build_policy, reserve_gpu, \
    run_sandboxed


def account_facts(session, user: str) -> AccountFacts:
    """What the sandbox policy needs of *user*'s account: :class:`NotFound` if unknown,
    :class:`RuleViolation` if it is not approved."""
    validate_user_name(user)
    account = get_user(session, user)
    if not account.approved:
        raise RuleViolation(f"user {user!r} is not approved: no sandbox until an admin approves")
    return AccountFacts(name=account.name, id=account.id, roles=tuple(account.roles or ()))


def policy_for(home: MedZoneHome, session, user: str, config: SandboxConfig | None = None,
               now: datetime | None = None) -> SandboxPolicy:
    """The sandbox *user* gets at *now*: ``/data`` holds exactly their live grants. Nothing
    is reserved (see :func:`medzone_hub.sandbox.reserve_gpu`)."""
    account = account_facts(session, user)
    return build_policy(home, account, live_grants(session, user, now=now), config=config)


def run_in_sandbox(home: MedZoneHome, store, user: str, command: Sequence[str], *,
                   config: SandboxConfig | None = None,
                   extra_ro_binds: Iterable[tuple[str, str]] = (),
                   extra_env: Mapping[str, str] | None = None,
                   pass_fds: Sequence[int] = (),
                   on_start: Callable[[int], None] | None = None) -> int:
    """Run *command* in *user*'s sandbox (as their kernel would see it, a GPU included when
    they may have one), attached to this process's stdin/stdout/stderr; its exit status
    (128+N if killed by signal N). What ``medzone sandbox exec`` and template runs call.

    *extra_ro_binds* and *extra_env* are as for :func:`medzone_hub.sandbox.bwrap_argv`;
    *pass_fds* stay open in the sandboxed command; *on_start* gets bubblewrap's monitor pid
    once it runs (see :func:`medzone_hub.sandbox.run_sandboxed`)."""
    with store.session() as session:
        policy = policy_for(home, session, user, config)
    reserve_gpu(policy)
    return run_sandboxed(policy, command, home=home, extra_ro_binds=extra_ro_binds,
                         extra_env=extra_env, pass_fds=pass_fds, on_start=on_start)
