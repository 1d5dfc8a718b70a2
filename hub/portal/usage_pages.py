"""Usage pages: what runs and server sessions used, for data stewards (everything) and for
data providers (the datasets bound to them, and nothing else).

Every page and the JSON endpoints ask :func:`medzone_hub.usage.visible_datasets` (the one
rule for who sees what): a person without the steward or provider role, or a provider
asking for a dataset that is not theirs, gets 403. ``medzone usage`` prints the same
report (:func:`medzone_hub.usage.usage_report`).

* ``usage`` (stewards, admins): totals by user, dataset, template or month, since a date;
  the newest records.
* ``provider`` (data providers): their datasets' totals by dataset, user and month, and
  the runs on those datasets.
* ``api/usage?by=…&since=…&dataset=…`` and ``api/usage/runs`` (JSON, the same rule).
"""

from __future__ import annotations

import asyncio
import json

from tornado import web

from .. import usage
from ..metering import show
from . import roles
from .base import PortalHandler, paginate, requires

#: Columns of the measured quantities: (key, heading, unit, scale, digits).
COLUMNS = [("wall_s", "Wall", "s", 1, 1), ("cpu_s", "CPU", "s", 1, 1),
           ("mem_peak_bytes", "Memory peak", "MB", 1e6, 0), ("gpu_s", "GPU", "s", 1, 1),
           ("gpu_mem_peak_bytes", "GPU memory peak", "MB", 1e6, 0),
           ("energy_j", "Energy", "J", 1, 1)]


def cells(row: dict) -> list[str]:
    """A row's measured quantities as the pages show them (``—``: not measured)."""
    out = []
    for key, _heading, unit, scale, digits in COLUMNS:
        value = row.get(key)
        out.append(show(None if value is None else float(value) / scale, unit, digits))
    return out


class _UsageHandler(PortalHandler):
    def _since(self):
        text = self.get_query_argument("since", "").strip()
        return text, usage.parse_since(text)

    def _by(self, default: str | None) -> str | None:
        by = self.get_query_argument("by", default or "") or None
        if by is not None and by not in usage.GROUPINGS:
            raise web.HTTPError(400, f"by must be one of {', '.join(usage.GROUPINGS)}")
        return by


class StewardUsageHandler(_UsageHandler):
    """Totals by a grouping, and the newest records."""

    @requires(roles.STEWARD)
    async def get(self):
        by = self._by("user")
        text, since = self._since()
        totals, records = await asyncio.to_thread(self._read, by, since)
        page = paginate(records, self.page_number(), self.portal.page_size)
        self.render_page("usage.html", by=by, since=text, totals=totals, records=page,
                         columns=COLUMNS, cells=cells, groupings=usage.GROUPINGS)

    def _read(self, by, since):
        with self.store.session() as session:
            return (usage.usage_report(session, by=by, since=since, viewer=self.user_name),
                    usage.usage_report(session, since=since, viewer=self.user_name))


class ProviderHandler(_UsageHandler):
    """A data provider's datasets: totals by dataset, user and month; the runs on them."""

    @requires(roles.PROVIDER)
    async def get(self):
        text, since = self._since()
        found = await asyncio.to_thread(self._read, since)
        page = paginate(found["runs"], self.page_number(), self.portal.page_size)
        self.render_page("provider.html", since=text, columns=COLUMNS, cells=cells,
                         runs=page, **{k: v for k, v in found.items() if k != "runs"})

    def _read(self, since):
        with self.store.session() as session:
            viewer = self.user_name
            return {
                "datasets": usage.provider_datasets(session, viewer),
                "by_dataset": usage.usage_report(session, by="dataset", since=since,
                                                 viewer=viewer),
                "by_user": usage.usage_report(session, by="user", since=since, viewer=viewer),
                "by_month": usage.usage_report(session, by="month", since=since,
                                               viewer=viewer),
                "runs": usage.runs_on_datasets(session, viewer=viewer, since=since),
            }


class UsageAPIHandler(_UsageHandler):
    """``api/usage``: the report as JSON (``dataset``: only that dataset's rows)."""

    @requires()
    async def get(self):
        by = self._by(None)
        _, since = self._since()
        dataset = self.get_query_argument("dataset", "").strip() or None
        rows = await asyncio.to_thread(self._read, by, since, dataset)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(rows))

    def _read(self, by, since, dataset):
        with self.store.session() as session:
            if dataset is not None:
                usage.check_dataset_visible(session, self.user_name, dataset)
            rows = usage.usage_report(session, by=by, since=since, viewer=self.user_name)
        if dataset is not None:
            if by == "dataset":
                rows = [r for r in rows if r["dataset"] == dataset]
            elif by is None:
                rows = [r for r in rows if dataset in r["datasets"]]
            else:
                raise web.HTTPError(400, "dataset= goes with by=dataset or no grouping")
        return rows


class UsageRunsAPIHandler(_UsageHandler):
    """``api/usage/runs``: the runs on the datasets the person may see, as JSON."""

    @requires()
    async def get(self):
        _, since = self._since()
        rows = await asyncio.to_thread(self._read, since)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(rows))

    def _read(self, since):
        with self.store.session() as session:
            return usage.runs_on_datasets(session, viewer=self.user_name, since=since)


ROUTES = [
    (r"usage", StewardUsageHandler),
    (r"provider", ProviderHandler),
    (r"api/usage", UsageAPIHandler),
    (r"api/usage/runs", UsageRunsAPIHandler),
]
