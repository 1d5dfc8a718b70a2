"""Differencing across releases: a table that differs from an already released table on
the same dataset by a small count is a ``differencing`` finding on the later request,
naming the earlier release; unrelated tables and releases on other datasets are not.

Tables are what pandas prints (``_repr_html_``, ``repr``, ``to_csv``) for a cohort of
clinical facts drawn with the demo cohort's generator; requests go through the airlock's
service functions (submit, review, download) with the real screen and real indexes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medzone_hub import access, airlock
from medzone_hub.accounts import ROLE_EXPORT_REVIEWER, add_user
from medzone_hub.screen import ScreenConfig
from medzone_hub.screen.differencing import (check_differencing, counts_by_key, file_tables,
                                             small_differences)

from .screen_corpus import _code, _nb, _result
from .screen_corpus import demo_zone  # noqa: F401 - the ingested cohort (fixture ``zone``)


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    """Clinical facts of 400 synthetic patients, drawn as the demo cohort draws them."""
    from medzone_hub.demodata import _LABEL_CYCLE, make_clinical_facts, make_identities

    rng = np.random.default_rng([11, 0])
    people = make_identities(rng, 400)
    rows = []
    for i, ident in enumerate(people):
        facts = make_clinical_facts(np.random.default_rng([11, 1, i]), ident,
                                    _LABEL_CYCLE[i % len(_LABEL_CYCLE)])
        rows.append({"sex": ident.sex, "age": ident.age, "smoking": facts.smoking,
                     "label": facts.cxr_label})
    return pd.DataFrame(rows)


def _renderings(obj) -> dict[str, bytes]:
    """One table as a notebook shows it (HTML and text), and as a CSV file."""
    frame = obj.to_frame() if isinstance(obj, pd.Series) else obj
    nb = _nb([_code("table", [_result({"text/html": frame._repr_html_(),
                                       "text/plain": repr(obj)})])])
    return {"table.ipynb": nb, "table.csv": frame.to_csv().encode()}


def _keys(name: str, data: bytes) -> list[dict]:
    return [k for k in (counts_by_key(t.table) for t in file_tables(name, data)) if k]


def _differs(new, old) -> bool:
    found = False
    for name in ("table.ipynb", "table.csv"):
        for a in _keys(name, _renderings(new)[name]):
            for b in _keys(name, _renderings(old)[name]):
                found |= small_differences(a, b) > 0
    return found


def _views(df):
    return {
        "crosstab": lambda d: pd.crosstab(d.sex, d.smoking),
        "crosstab with margins": lambda d: pd.crosstab(d.sex, d.smoking, margins=True),
        "value counts": lambda d: d.smoking.value_counts(),
        "grouped size": lambda d: d.groupby("label").size().reset_index(name="n"),
        "two-level crosstab": lambda d: pd.crosstab([d.sex, d.label], d.smoking),
    }


@pytest.mark.parametrize("view", list(_views(None)))
def test_one_patient_excluded_is_found_in_every_rendering(cohort, view):
    make = _views(cohort)[view]
    full, minus_one = make(cohort), make(cohort.iloc[1:])
    for name, data in _renderings(full).items():
        assert _keys(name, data), f"no table of counts read from the {view} {name}"
    assert _differs(minus_one, full)
    assert not _differs(full, full)  # the same table again discloses nothing new


def test_a_total_minus_a_subgroup_and_a_filtered_crosstab_are_found(cohort):
    youngest = cohort.age == cohort.age.min()
    assert 0 < youngest.sum() < 10
    rest = cohort[~youngest]
    # a crosstab with margins, then the same cohort without a small subgroup
    assert _differs(rest.smoking.value_counts(),
                    pd.crosstab(cohort.sex, cohort.smoking, margins=True))
    assert _differs(pd.crosstab(rest.sex, rest.label), pd.crosstab(cohort.sex, cohort.label))


def test_unrelated_tables_and_large_differences_are_not_findings(cohort):
    by_smoking = pd.crosstab(cohort.sex, cohort.smoking)
    assert not _differs(cohort.label.value_counts(), by_smoking)  # no key in common
    men = cohort[cohort.sex == "M"]
    assert not _differs(men.smoking.value_counts(), cohort.smoking.value_counts())
    assert not _differs(cohort.label.value_counts(), cohort.smoking.value_counts())


def test_the_finding_names_the_release_and_never_a_value(cohort):
    full = _renderings(pd.crosstab(cohort.sex, cohort.smoking))["table.ipynb"]
    less = _renderings(pd.crosstab(cohort.sex[2:], cohort.smoking[2:]))["table.ipynb"]
    found = check_differencing({"new.ipynb": file_tables("new.ipynb", less)},
                               [(17, {"old.ipynb": file_tables("old.ipynb", full)})],
                               ScreenConfig())
    (finding, *more) = found["new.ipynb"]
    assert (finding.rule, finding.severity) == ("differencing", "review")
    assert "export request 17" in finding.detail and "old.ipynb" in finding.detail
    assert finding.location.startswith("cell 1 output 1 text/html table 1")
    counts = {str(v) for v in pd.crosstab(cohort.sex, cohort.smoking).to_numpy().ravel()}
    assert not any(c in finding.detail or c in finding.location for c in counts)


@pytest.mark.parametrize("junk", [b"", b"\xff\xfe\x00", b'{"cells": 3}', b"<table><tr><td>1",
                                  b'{"cells": [{"outputs": [{"data": 5}]}]}'])
def test_unreadable_files_have_no_tables(junk):
    assert file_tables("x.ipynb", junk) == [] or all(
        counts_by_key(t.table) == {} for t in file_tables("x.ipynb", junk))


# --- end to end, through the airlock -----------------------------------------------------

@pytest.fixture(scope="module")
def airlock_zone(zone, cohort_dir):
    """Dataset ``demo`` (and ``other``, the same cohort ingested again); alice and dave hold
    grants on demo, bob on other; three reviewers."""
    from medzone_hub.ingest import ingest_dataset

    ingest_dataset(zone.home, zone.store, "other", cohort_dir, deidentify=True,
                   pseudonym_key=b"o" * 32, actor="t", progress=False)
    with zone.store.session() as s:
        add_user(s, "steward", roles=["data-steward"], actor="t")
        for name in ("rev1", "rev2", "rev3"):
            add_user(s, name, roles=[ROLE_EXPORT_REVIEWER], actor="t")
        for name, dataset in (("alice", "demo"), ("dave", "demo"), ("bob", "other")):
            add_user(s, name, actor="t")
            app = access.apply(s, user=name, dataset_ids=[dataset], purpose="study")
            s.flush()
            access.approve(s, app.id, reviewer="steward")
    return zone


def _request(zone, user: str, files: dict[str, bytes]) -> int:
    home = airlock.user_home(zone.home, user)
    for name, data in files.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_bytes(data)
    return airlock.submit_export(zone.store, zone.home, user=user, paths=list(files),
                                 reason="tables for the paper")


def _findings(zone, request_id: int) -> list[dict]:
    with zone.store.session() as s:
        request = airlock.get_request(s, request_id)
        return [dict(f, path=r.path) for r in request.files for f in r.findings or ()]


def test_a_table_one_patient_less_than_a_released_one_is_a_finding_naming_it(airlock_zone,
                                                                                cohort, tmp_path):
    z = airlock_zone
    table = pd.crosstab(cohort.sex, cohort.smoking)
    nb = _renderings(table)["table.ipynb"]
    first = _request(z, "alice", {"a/smoking.ipynb": nb})
    assert _findings(z, first) == []  # large counts, nothing released before: a pass
    assert airlock.decide_export(z.store, first, reviewer="rev1", approve=True).state == "approved"
    airlock.release_export(z.store, z.home, first, user="alice", dest=tmp_path / "out")

    minus_one = _renderings(pd.crosstab(cohort.sex[1:], cohort.smoking[1:]))
    later = _request(z, "alice", {"b/smoking.ipynb": minus_one["table.ipynb"],
                                  "b/smoking.csv": minus_one["table.csv"]})
    found = [f for f in _findings(z, later) if f["rule"] == "differencing"]
    assert {f["path"] for f in found} == {"b/smoking.ipynb", "b/smoking.csv"}
    assert all(f"export request {first} (a/smoking.ipynb" in f["detail"] for f in found)
    assert all(f["severity"] == "review" for f in found)
    with z.store.session() as s:
        request = airlock.get_request(s, later)
        assert request.verdict == "review" and request.approvals_required >= 2
        report = json.loads(request.screen_report)
    assert any(f["rule"] == "differencing" for r in report["files"] for f in r["findings"])

    # anyone's release on the same dataset counts: dave sees the same table
    dave = _request(z, "dave", {"smoking.csv": minus_one["table.csv"]})
    assert [f["rule"] for f in _findings(z, dave)] == ["differencing"]
    # an unrelated table on the same dataset, and the same table re-released: no finding
    labels = _request(z, "alice", {"c/labels.ipynb":
                                   _renderings(cohort.label.value_counts())["table.ipynb"],
                                   "c/again.ipynb": nb})
    assert _findings(z, labels) == []
    # the same table on another dataset: no release to compare it with
    bob = _request(z, "bob", {"smoking.csv": minus_one["table.csv"]})
    assert _findings(z, bob) == []


def test_pending_and_rejected_requests_are_not_releases(airlock_zone, cohort):
    z = airlock_zone
    def table_of(d):  # shares no label with the tables released by the test above
        return pd.crosstab(d.label, d.age >= 60)

    table = table_of(cohort)
    pending = _request(z, "alice", {"d/label.csv": _renderings(table)["table.csv"]})
    rejected = _request(z, "alice", {"e/label.ipynb": _renderings(table)["table.ipynb"]})
    airlock.decide_export(z.store, rejected, reviewer="rev2", approve=False)
    later = _request(z, "alice", {"f/label.csv": _renderings(table_of(cohort[3:]))["table.csv"]})
    assert pending and [f for f in _findings(z, later) if f["rule"] == "differencing"] == []
    # once approved, the same request is a release the next table is compared with
    for reviewer in ("rev1", "rev3"):
        if airlock.decide_export(z.store, pending, reviewer=reviewer,
                                 approve=True).state == "approved":
            break
    again = _request(z, "alice", {"g/label.csv": _renderings(table_of(cohort[3:]))["table.csv"]})
    assert any(f["rule"] == "differencing" and f"export request {pending} " in f["detail"]
               for f in _findings(z, again))
