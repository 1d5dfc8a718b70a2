"""The audit page: the log, searchable, newest first, with the chain's verification."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, or_, select

from .. import audit
from ..models import AuditEvent
from . import roles
from .base import Page, PortalHandler, requires


def search_events(session, text: str, number: int, size: int) -> Page:
    """Rows whose actor, action or subject contains *text* (all rows if empty), newest
    first, one page of them (counted and fetched in SQL: the log only grows)."""
    query = select(AuditEvent)
    count = select(func.count()).select_from(AuditEvent)
    if text:
        like = f"%{text}%"
        match = or_(AuditEvent.actor.ilike(like), AuditEvent.action.ilike(like),
                    AuditEvent.subject.ilike(like))
        query, count = query.where(match), count.where(match)
    total = session.scalar(count) or 0
    pages = max(1, -(-total // size))
    number = min(number, pages)
    rows = list(session.scalars(query.order_by(AuditEvent.seq.desc())
                                .offset((number - 1) * size).limit(size)))
    return Page(rows, number, pages, total)


class AuditHandler(PortalHandler):
    @requires(roles.AUDIT)
    async def get(self):
        text = self.get_query_argument("q", "").strip()
        # Verifying reads the whole chain: off the event loop.
        check, page = await asyncio.to_thread(self._read, text, self.page_number())
        self.render_page("audit.html", check=check, page=page, q=text)

    def _read(self, text: str, number: int):
        with self.store.session() as session:
            check = audit.verify(session)
            page = search_events(session, text, number, self.portal.page_size)
            page.items = [{"seq": e.seq, "time": e.time.strftime("%Y-%m-%d %H:%M:%S"),
                           "actor": e.actor, "action": e.action, "subject": e.subject,
                           "detail": e.detail_json} for e in page.items]
        return check, page


ROUTES = [(r"audit", AuditHandler)]
