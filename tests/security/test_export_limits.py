"""Export sizes: checked before a byte is copied, and a quota per person.

A request used to copy every named file into quarantine before the screen looked at its
size, so a 300 MB sparse file (no disk to make, 300 MB to copy) requested again and again
filled ``MEDZONE_HOME``: the store and the audit log with it. Files are made from inside a
real sandbox; each refusal must name the limit in one line and leave nothing in staging or
quarantine, and the audit chain must still verify.
"""

from __future__ import annotations

import dataclasses

import pytest

from medzone_hub import airlock
from medzone_hub.airlock import ExportLimits
from medzone_hub.homefs import FileTooLarge

from .home_zone import drop_zone, make_zone, needs_root

pytestmark = needs_root


@pytest.fixture(scope="module")
def zone():
    z = make_zone("medzone-exportlimits-")
    yield z
    drop_zone(z)


def _export(zone, *paths, user="alice", limits=None):
    return airlock.submit_export(zone.store, zone.home, user=user, paths=list(paths),
                                 reason="results", limits=limits)


def _nothing_left(zone, folders_before) -> None:
    assert zone.quarantine_folders() == folders_before
    assert zone.staging_entries() == []
    assert zone.audit_ok()


def test_a_sparse_300_mb_file_is_refused_before_it_is_copied(zone):
    done = zone.sh("alice", "truncate -s 300M ~/model.pt && du -k ~/model.pt")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) < 1024  # sparse: no disk behind it
    before = zone.quarantine_folders()
    with pytest.raises(FileTooLarge) as err:
        _export(zone, "model.pt")
    assert str(err.value) == ("refusing model.pt: 300 MB is over the per-file limit of 16 MB "
                              "(export_max_file_bytes)")
    _nothing_left(zone, before)
    # The same through the CLI: one line on stderr, nothing on stdout.
    result = zone.cli("export", "request", "--user", "alice", "model.pt", "--reason", "weights")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "per-file limit of 16 MB (export_max_file_bytes)" in result.stderr
    _nothing_left(zone, before)
    assert zone.sh("alice", "rm ~/model.pt").returncode == 0


def test_the_per_request_limit_counts_every_file(zone):
    done = zone.sh("alice", (
        "mkdir -p ~/many && for i in 1 2 3; do "
        "head -c 3000 /dev/zero | tr '\\0' 'a' > ~/many/part$i.txt; done"))
    assert done.returncode == 0, done.stderr
    limits = ExportLimits(export_max_file_bytes=4000, export_max_request_bytes=8000)
    before = zone.quarantine_folders()
    with pytest.raises(FileTooLarge, match=r"over the per-request limit of 8000 bytes "
                                           r"\(export_max_request_bytes\)"):
        _export(zone, "many", limits=limits)
    _nothing_left(zone, before)
    with pytest.raises(FileTooLarge, match=r"many/part1.txt: 3000 bytes is over the per-file "
                                           r"limit of 2000 bytes \(export_max_file_bytes\)"):
        _export(zone, "many/part1.txt", limits=dataclasses.replace(
            limits, export_max_file_bytes=2000))
    _nothing_left(zone, before)
    rid = _export(zone, "many/part1.txt", "many/part2.txt", limits=limits)
    assert zone.quarantine_folders() == sorted([*before, str(rid)])


def test_repeated_requests_stop_at_the_quarantine_quota(zone):
    done = zone.sh("bob", "head -c 3000 /dev/zero | tr '\\0' 'b' > ~/table.txt")
    assert done.returncode == 0, done.stderr
    limits = ExportLimits(export_quarantine_quota_bytes=10_000)
    accepted = []
    with pytest.raises(FileTooLarge) as err:
        for _ in range(10):  # bounded: the fourth must fail
            accepted.append(_export(zone, "table.txt", user="bob", limits=limits))
    assert len(accepted) == 3
    assert "quota of" in str(err.value) and "(export_quarantine_quota_bytes)" in str(err.value)
    with zone.store.session() as s:
        assert airlock.quarantine_bytes(s, "bob") == 9000
    before = zone.quarantine_folders()
    with pytest.raises(FileTooLarge, match="export_quarantine_quota_bytes"):
        _export(zone, "table.txt", user="bob", limits=limits)
    _nothing_left(zone, before)
    # Another person's quota is their own.
    assert zone.sh("alice", "echo 'group,n' > ~/mine.csv").returncode == 0
    _export(zone, "mine.csv", limits=limits)


def test_limits_are_settings_with_defaults_on():
    limits = ExportLimits()
    assert limits.export_max_file_bytes == 16 << 20
    assert limits.export_max_request_bytes == 64 << 20
    assert limits.export_quarantine_quota_bytes == 1 << 30
    with pytest.raises(ValueError, match="export_max_file_bytes"):
        ExportLimits(export_max_file_bytes=0)


def test_limits_come_from_the_hub_config_file():
    from traitlets.config import Config

    c = Config()
    c.ExportLimits.export_max_file_bytes = 1 << 20
    limits = ExportLimits.from_config(c)
    assert limits.export_max_file_bytes == 1 << 20
    assert limits.export_max_request_bytes == ExportLimits().export_max_request_bytes
    assert ExportLimits.from_config(Config()) == ExportLimits()
    c.ExportLimits.max_file = 3
    with pytest.raises(ValueError, match="unknown export limit 'max_file'"):
        ExportLimits.from_config(c)


def test_a_file_growing_while_requested_never_passes_the_limit(zone):
    """A sandbox process appends to a file (up to 10 MB, bounded) while it is requested over
    and over with a 1 MB per-file limit: whichever check sees it (the size of the opened
    descriptor, or the copy that stops at the limit), nothing over 1 MB is quarantined."""
    import subprocess
    import time

    cap = 1 << 20
    limits = ExportLimits(export_max_file_bytes=cap)
    assert zone.sh("alice", "rm -f ~/grow.txt ~/grow-started ~/stop-grow").returncode == 0
    script = ("cd ~ && printf 'n\\n' > grow.txt && touch grow-started && i=0 && "
              "while [ $i -lt 160 ] && [ ! -e stop-grow ]; do "
              "head -c 65536 /dev/zero | tr '\\0' '7' >> grow.txt; i=$((i+1)); done; "
              "rm -f stop-grow")
    started = zone.home_of("alice") / "grow-started"
    writer = subprocess.Popen(zone.sh_argv("alice", script), env=zone.env(), cwd="/",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    accepted, refused = [], 0
    try:
        while not started.exists():
            assert writer.poll() is None, writer.communicate()
            time.sleep(0.05)
        for _ in range(20):
            try:
                accepted.append(_export(zone, "grow.txt", limits=limits))
            except FileTooLarge as err:
                assert "(export_max_file_bytes)" in str(err) and "\n" not in str(err)
                refused += 1
    finally:
        (zone.home_of("alice") / "stop-grow").touch()
        writer.communicate(timeout=120)
    with zone.store.session() as s:
        for rid in accepted:
            (f,) = airlock.get_request(s, rid).files
            assert f.size <= cap
            copy = airlock.quarantine_dir(zone.home, rid) / "files" / "grow.txt"
            assert copy.stat().st_size == f.size
    assert refused > 0
    assert zone.staging_entries() == []
    assert zone.audit_ok()
