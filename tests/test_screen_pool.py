"""The hub API and the portal screen in a pool of processes started once with the service:
a screen called from a worker thread checks its images in the pool's processes (other
pids, the same ones call after call) and gives the findings of a screen in one process."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from medzone_hub import access, airlock
from medzone_hub.accounts import add_user
from medzone_hub.screen import ScreenConfig, screen_bytes, screen_paths
from medzone_hub.screen.pool import ScreenPool

from .screen_corpus import dataset_facts
from .screen_corpus import demo_indexes, demo_zone  # noqa: F401 - the ingested zone (fixtures)
from .test_screen_parallel import _mixed_notebook

#: Any file with two images or more goes to the pool (the default waits for 2 MB of them).
EAGER = ScreenConfig(parallel_min_bytes=1)


@pytest.fixture(scope="module")
def facts(zone):
    return dataset_facts(zone.home.dataset_dir("demo"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] not in ("Z", "X")
    except OSError:
        return False


def test_a_screen_from_a_thread_checks_images_in_the_pool(indexes, facts):
    data = _mixed_notebook(facts, 24)
    serial = screen_bytes("mixed.ipynb", data, indexes=indexes, config=ScreenConfig(workers=1))
    with ScreenPool(2) as pool, ThreadPoolExecutor(2) as threads:
        assert pool.worker_pids() == []  # nothing starts before a screen needs it
        first = threads.submit(screen_bytes, "mixed.ipynb", data, indexes=indexes,
                               config=EAGER, pool=pool).result()
        used = set(pool.batches_by_pid)
        assert used and os.getpid() not in used
        assert used <= set(pool.worker_pids())
        # two screens at once, from two threads: the same processes serve both
        again = [threads.submit(screen_bytes, "mixed.ipynb", data, indexes=indexes,
                                config=EAGER, pool=pool) for _ in range(2)]
        verdicts = [f.result() for f in again]
        assert set(pool.batches_by_pid) <= set(pool.worker_pids())
        assert len(pool.worker_pids()) == 2
        workers = pool.worker_pids()
    assert first.to_dict() == serial.to_dict()
    assert all(v.to_dict() == serial.to_dict() for v in verdicts)
    assert "dataset-image" in {f.rule for f in first.findings}
    assert not any(_alive(pid) for pid in workers)  # shut down with its owner


def test_a_worker_killed_fails_its_screen_closed_and_later_screens_get_new_ones(indexes,
                                                                                facts):
    import signal
    import time

    data = _mixed_notebook(facts, 8)
    serial = screen_bytes("mixed.ipynb", data, indexes=indexes, config=ScreenConfig(workers=1))
    with ScreenPool(2) as pool:
        assert screen_bytes("mixed.ipynb", data, indexes=indexes, config=EAGER,
                            pool=pool).to_dict() == serial.to_dict()
        killed = pool.worker_pids()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not getattr(pool._executor, "_broken", False) and time.monotonic() < deadline:
            time.sleep(0.05)  # the executor notices its dead worker
        again = screen_bytes("mixed.ipynb", data, indexes=indexes, config=EAGER, pool=pool)
        assert again.to_dict() == serial.to_dict()
        assert pool.worker_pids() and not set(pool.worker_pids()) & set(killed)


def test_a_pool_that_was_shut_down_leaves_screens_in_one_process(indexes, facts):
    data = _mixed_notebook(facts, 8)
    pool = ScreenPool(2)
    pool.shutdown()
    verdict = screen_bytes("mixed.ipynb", data, indexes=indexes, config=EAGER, pool=pool)
    assert verdict.to_dict() == screen_bytes("mixed.ipynb", data, indexes=indexes,
                                             config=ScreenConfig(workers=1)).to_dict()
    assert not pool.batches_by_pid


def test_the_hub_api_and_the_portal_screen_exports_in_their_pool(zone, indexes, facts):
    from medzone_hub.hub_api import api_handlers
    from medzone_hub.portal.app import PortalApp

    with zone.store.session() as s:
        add_user(s, "steward", roles=["data-steward"], actor="t")
        add_user(s, "alice", actor="t")
        app = access.apply(s, user="alice", dataset_ids=["demo"], purpose="study")
        s.flush()
        access.approve(s, app.id, reviewer="steward")
    home = airlock.user_home(zone.home, "alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "mixed.ipynb").write_bytes(_mixed_notebook(facts, 24))
    (home / "other.ipynb").write_bytes(_mixed_notebook(facts, 9))
    expected = {os.path.basename(v.path): v.to_dict()["findings"] for v in screen_paths(
        [home / "mixed.ipynb", home / "other.ipynb"], indexes=indexes,
        config=ScreenConfig(workers=1, parallel_min_bytes=1))}

    portal_app = PortalApp()
    portal_app.initialize([f"--home={zone.home.root}"])
    portal = portal_app.make_app().settings["portal"]
    hub_pool = api_handlers(zone.home)[0][2]["screen_pool"]
    for service_pool in (hub_pool, portal.screen_pool):
        assert isinstance(service_pool, ScreenPool)
        try:
            # as the handlers call it: the airlock's service function in a worker thread
            request_id = asyncio.run(asyncio.to_thread(
                airlock.submit_export, zone.store, zone.home, user="alice",
                paths=["mixed.ipynb", "other.ipynb"], reason="figures", screen_config=EAGER,
                screen_pool=service_pool))
            used = set(service_pool.batches_by_pid)
            assert used and os.getpid() not in used
            with zone.store.session() as s:
                request = airlock.get_request(s, request_id)
                got = {f.path: f.findings for f in request.files}
            assert got == expected
        finally:
            service_pool.shutdown()
