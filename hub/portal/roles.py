"""Which portal pages a person may open: read from the store's roles, nowhere else.

The store is the one place roles live: ``medzone user add --role`` sets them, and
:func:`medzone_hub.access.approve` and :func:`medzone_hub.airlock.decide_export` check them
on every decision. Mirroring them into JupyterHub roles/scopes would make a second copy
that can disagree (a role withdrawn in the store would still open the pages until the hub
copy changed too), so pages ask the store on every request. The service functions still
decide every action: a page opened here only shows what they would allow.
"""

from __future__ import annotations

from ..accounts import ROLE_DATA_PROVIDER, ROLE_DATA_STEWARD, ROLE_EXPORT_REVIEWER
from ..models import User

#: Pages for the people who decide access applications.
STEWARD = ROLE_DATA_STEWARD
#: Pages for the people who review export requests.
REVIEWER = ROLE_EXPORT_REVIEWER
#: The audit log: either role (both decide things that are recorded there).
AUDIT = "audit"
#: The usage of the datasets one supplied (the datasets bound by ``medzone dataset provider
#: add``; :func:`medzone_hub.usage.visible_datasets` decides what the pages show).
PROVIDER = ROLE_DATA_PROVIDER


def holds(user: User | None, role: str) -> bool:
    """Whether the approved account *user* may open the pages of *role*.

    Admins may open every page, as the service functions let admins decide everything.
    """
    if user is None or not user.approved:
        return False
    if user.admin:
        return True
    if role == AUDIT:
        return user.has_role(STEWARD) or user.has_role(REVIEWER)
    return user.has_role(role)


def page_roles(user: User | None) -> dict[str, bool]:
    """For the navigation: which role-gated pages *user* may open."""
    return {"steward": holds(user, STEWARD), "review": holds(user, REVIEWER),
            "audit": holds(user, AUDIT), "usage": holds(user, STEWARD),
            "provider": holds(user, PROVIDER)}
