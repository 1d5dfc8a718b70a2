"""``medzone``: the command-line face of the service functions (contracts in DESIGN.md).

Each subcommand parses arguments, opens the store, calls one service function and prints
the result. Rules live in the service modules, never here. A refusal is one line on stderr
and a non-zero exit; ``--json`` output goes to stdout alone.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from .access import (application_state, apply, approve, expire_due, list_applications, reject,
                     revoke)
from .accounts import add_user, list_users, set_password
from .airlock import (decide_export, get_request, model_weight_paths, notebook_views,
                      release_export, risk_report_file, risk_report_text, screen_report, status,
                      submit_export)
from .audit import verify
from .config import MedZoneHome, resolve_home
from .db import open_store
from .demodata import generate_cohort
from .errors import IngestRefused, InvalidInput, MedZoneError
from .executors.slurm import execute_job, job_sandbox_config
from .hubapp import run_hub
from .hubconfig import export_limits, load_hub_config, sandbox_config, screen_config
from .indexes import load_indexes
from .ingest import ingest_dataset, read_pseudonym_key
from .logs import log_to_stderr
from .pacs import import_from_pacs, parse_move_destination, read_pacs_credentials
from .models import utcnow
from .registry import list_datasets
from .runner import get_run, list_runs, run_progress
from .runqueue import Worker, cancel as cancel_queued_run, describe, enqueue, outcome, \
    queue_settings, run_here, wait as wait_for_run, worker_pid
from .screen import ScreenConfig, screen_paths
from .sessions import run_in_sandbox
from .metering import show as show_measured
from .usage import (bind_provider, list_providers, parse_since, unbind_provider,
                    usage_report)

#: How many refusal findings are printed before "… and N more".
MAX_FINDINGS_SHOWN = 40


def default_actor() -> str:
    """Who a CLI decision is recorded as when no ``--by``/``--reviewer`` names a person."""
    return os.environ.get("MEDZONE_ACTOR") or f"cli:{getpass.getuser()}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def _print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(row.get(c, "") if row.get(c) is not None else "-") for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


# --- demo-data -------------------------------------------------------------------------

def cmd_demo_data(args, home: MedZoneHome) -> int:
    summary = generate_cohort(Path(args.dir), patients=args.patients, seed=args.seed,
                              progress=not args.quiet)
    print(f"wrote {summary.patients} synthetic patients ({summary.files} files, "
          f"{summary.bytes / 1e6:.1f} MB) to {summary.out_dir} in {summary.seconds:.1f} s; "
          "identities are fake but shaped like real ones")
    return 0


# --- dataset ---------------------------------------------------------------------------

def _dataset_row(ds) -> dict:
    return {
        "id": ds.id,
        "title": ds.title,
        "deidentified": ds.deidentified,
        "patients": ds.n_patients,
        "files": ds.n_files,
        "bytes": ds.n_bytes,
        "modalities": list(ds.modalities or []),
        "manifest_sha256": ds.manifest_sha256,
        "created_at": _iso(ds.created_at),
    }


def cmd_dataset_add(args, home: MedZoneHome) -> int:
    key = read_pseudonym_key(home, args.key_file) if args.deidentify else None
    if key is None and args.key_file and not args.deidentify:
        raise InvalidInput("--key-file only applies with --deidentify")
    if args.from_pacs:
        return _dataset_add_from_pacs(args, home, key)
    if not args.source:
        raise InvalidInput("give a SOURCE folder, or --from-pacs URL-or-AET@host:port")
    store = open_store(home)
    report = ingest_dataset(home, store, args.id, Path(args.source), title=args.title,
                            deidentify=args.deidentify, pseudonym_key=key,
                            actor=args.by or default_actor(), progress=not args.quiet)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.summary_line())
    return 0


def _dataset_add_from_pacs(args, home: MedZoneHome, key: bytes | None) -> int:
    if args.source:
        raise InvalidInput("give a SOURCE folder or --from-pacs, not both")
    query = {}
    for item in args.pacs_query or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"--pacs-query takes KEY=VALUE, not {item!r}")
        query[name.strip()] = value.strip()
    split = lambda values: [v for item in values or [] for v in item.split(",")]  # noqa: E731
    report = import_from_pacs(
        home, open_store(home), args.id, source=args.from_pacs,
        accessions=split(args.accession), study_uids=split(args.study_uid), query=query,
        credentials=read_pacs_credentials(home, args.pacs_credentials),
        calling_aet=args.calling_aet, move_to=parse_move_destination(args.pacs_move_to),
        download_root=args.download_dir, title=args.title, deidentify=args.deidentify,
        pseudonym_key=key, actor=args.by or default_actor(), progress=not args.quiet)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.summary_line())
    return 0


def cmd_dataset_list(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        rows = [_dataset_row(ds) for ds in list_datasets(session)]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            r["size"] = f"{r['bytes'] / 1e6:.1f} MB"
            r["modalities"] = ",".join(r["modalities"])
        _print_table(rows, ["id", "title", "patients", "files", "size", "modalities", "deidentified"])
    return 0


# --- user ------------------------------------------------------------------------------

def cmd_user_add(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        user = add_user(session, args.name, admin=args.admin, roles=args.role or (),
                        approved=True, actor=args.by or default_actor())
        name = user.name
    print(name)
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise InvalidInput("no terminal to ask for the password: pipe it in with --stdin")
    first = getpass.getpass("new password: ")
    if getpass.getpass("again: ") != first:
        raise InvalidInput("the two passwords differ")
    return first


def cmd_user_password(args, home: MedZoneHome) -> int:
    set_password(home, args.name, _read_password(args.stdin), actor=args.by or default_actor())
    print(f"password set for {args.name}")
    return 0


def cmd_user_list(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        rows = [{"name": u.name, "admin": bool(u.admin), "roles": list(u.roles or []),
                 "approved": bool(u.approved)} for u in list_users(session)]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            r["roles"] = ",".join(r["roles"])
        _print_table(rows, ["name", "admin", "roles", "approved"])
    return 0


# --- access ----------------------------------------------------------------------------

def _application_row(app, now: datetime) -> dict:
    return {
        "id": app.id,
        "user": app.user.name,
        "datasets": sorted(ds.id for ds in app.datasets),
        "purpose": app.purpose,
        "state": application_state(app, now),
        "requested_days": app.requested_days,
        "created_at": _iso(app.created_at),
        "decided_by": app.decided_by,
        "decided_at": _iso(app.decided_at),
        "reason": app.decision_reason,
        "expires_at": _iso(app.expires_at),
        "revoked_by": app.revoked_by,
        "revoked_at": _iso(app.revoked_at),
    }


def cmd_access_apply(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        app = apply(session, user=args.user, dataset_ids=args.datasets, purpose=args.purpose,
                    days=args.days)
        session.flush()
        app_id = app.id
    print(app_id)
    return 0


def cmd_access_decide(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        if args.action == "approve":
            app = approve(session, args.id, reviewer=args.reviewer, days=args.days,
                           reason=args.reason)
        elif args.action == "reject":
            app = reject(session, args.id, reviewer=args.reviewer, reason=args.reason)
        else:
            app = revoke(session, args.id, actor=args.by or default_actor(),
                          reason=args.reason)
        state = application_state(app)
        expires = _iso(app.expires_at)
    print(f"application {args.id}: {state}" + (f" until {expires}" if state == "approved" else ""))
    return 0


def cmd_access_list(args, home: MedZoneHome) -> int:
    now = utcnow()
    with open_store(home).session() as session:
        expire_due(session, now=now)
        rows = [_application_row(a, now) for a in list_applications(session, user=args.user, now=now)]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            r["datasets"] = ",".join(r["datasets"])
        _print_table(rows, ["id", "user", "datasets", "state", "expires_at", "decided_by", "purpose"])
    return 0


# --- sandbox ---------------------------------------------------------------------------

def cmd_sandbox_exec(args, home: MedZoneHome) -> int:
    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise InvalidInput("name the command to run after --, e.g. medzone sandbox exec "
                           "--user USER -- python3")
    config = sandbox_config(load_hub_config(args.hub_config, home))
    return run_in_sandbox(home, open_store(home), args.user, command, config=config)


# --- run -------------------------------------------------------------------------------

def cmd_run(args, home: MedZoneHome) -> int:
    hub_config = load_hub_config(args.hub_config, home)
    config, settings = sandbox_config(hub_config), queue_settings(hub_config)
    store = open_store(home)
    run = enqueue(home, store, args.user, args.template, [tuple(p) for p in args.param or ()],
                  settings=settings, config=config)
    if args.detach:
        print(run.id)
        if worker_pid(home) is None:
            print(f"run {run.id}: queued; no worker runs for this zone: it starts when one "
                  "does (the hub starts one, or `medzone worker`)", file=sys.stderr)
        return 0

    def say(info: dict) -> None:
        if info["state"] == "queued":
            where = f" (position {info['position']})" if info.get("position") else ""
            print(f"run {run.id}: queued{where}", file=sys.stderr, flush=True)
        elif info.get("cells_total"):
            at = info.get("current_cell") or info.get("cells_done")
            print(f"run {run.id}: cell {at}/{info['cells_total']}", file=sys.stderr, flush=True)

    try:
        # No worker: this process takes its run when its turn comes and executes it, as
        # before the queue existed. A worker's run: wait for it, printing its progress.
        result = run_here(home, store, run.id, settings=settings, config=config,
                          hub_config=hub_config, on_wait=say)
        if result is None:
            notebook = outcome(home, wait_for_run(home, store, run.id, on_progress=say,
                                                  poll_interval=settings.poll_interval))
        else:
            notebook = result.notebook
    except KeyboardInterrupt:
        with contextlib.suppress(MedZoneError):
            cancel_queued_run(home, store, run.id, default_actor(), hub_config=hub_config)
        raise
    print(notebook)
    return 0


def cmd_worker(args, home: MedZoneHome) -> int:
    hub_config = load_hub_config(args.hub_config, home)
    worker = Worker(home, open_store(home), settings=queue_settings(hub_config),
                    config=sandbox_config(hub_config), hub_config=hub_config)
    print(f"medzone worker: {worker.executor.name} executor, {worker.settings.slots} slot(s), "
          f"{worker.settings.per_user_limit} per user", file=sys.stderr, flush=True)
    worker.run()
    return 0


def _run_id(text: str) -> int:
    if not text.isdigit():
        raise InvalidInput(f"a run id is a number, not {text!r}")
    return int(text)


def cmd_runs_list(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        runs = describe(home, session, list_runs(session, user=args.user, state=args.state))
    if args.json:
        _print_json(runs)
        return 0
    for r in runs:
        r["progress"] = (f"#{r['position']} in line" if r["position"] else
                         f"cell {r['cells']}" if r["cells"] else None)
    _print_table(runs, ["id", "user", "template", "state", "progress", "created", "error"])
    return 0


def cmd_runs_show(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        run = get_run(session, _run_id(args.id))
        info = describe(home, session, [run])[0]
    info["progress"] = run_progress(home, run)
    if args.json:
        _print_json(info)
        return 0
    progress = info["progress"]
    print(f"run {info['id']} of {info['template']} by {info['user']}: {info['state']}")
    if info["position"]:
        print(f"position in the queue: {info['position']}")
    if info["error"]:
        print(f"error: {info['error']}")
    print(f"cells: {progress['cells_done']} of {progress['cells_total']} done")
    print(f"parameters: {json.dumps(info['parameters'], ensure_ascii=False)}")
    print(f"notebook: ~/{info['output']}")
    for key in ("template_sha256", "output_sha256", "created", "started", "finished"):
        print(f"{key.replace('_', ' ')}: {info[key] or '-'}")
    return 0


def cmd_runs_cancel(args, home: MedZoneHome) -> int:
    run = cancel_queued_run(home, open_store(home), _run_id(args.id), default_actor())
    print(f"run {run.id} of {run.template} by {run.user.name}: cancelled")
    return 0


def cmd_runs_execute(args, home: MedZoneHome) -> int:
    # A Slurm job's command (not for people): execute the job's queued run on this node,
    # with the sandbox settings the submitter gave it (else the hub config file's).
    config = job_sandbox_config() or sandbox_config(load_hub_config(args.hub_config, home))
    print(execute_job(home, open_store(home), _run_id(args.id), config=config).notebook)
    return 0


# --- export ----------------------------------------------------------------------------

def cmd_export_screen(args, home: MedZoneHome) -> int:
    missing = [p for p in args.paths if not os.path.lexists(p)]
    if missing:
        raise InvalidInput(f"no such file: {missing[0]}")
    try:
        config = ScreenConfig(profile=args.profile)
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    indexes = load_indexes(home, args.dataset or [])
    verdicts = screen_paths([Path(p) for p in args.paths], indexes=indexes, config=config)
    if args.json:
        _print_json({"files": [v.to_dict() for v in verdicts]})
        return 0
    for v in verdicts:
        print(f"{v.verdict:6}  {v.path}")
        for f in v.findings:
            print(f"        {f.severity}: {f.rule} at {f.location}: {f.detail}")
    return 0


def cmd_export_request(args, home: MedZoneHome) -> int:
    config = load_hub_config(args.hub_config, home)
    store = open_store(home)
    request_id = submit_export(store, home, user=args.user, paths=args.paths,
                               reason=args.reason, risk_report=args.risk_report,
                               limits=export_limits(config), screen_config=screen_config(config))
    print(request_id)
    with store.session() as session:
        request = get_request(session, request_id)
        weights = model_weight_paths(request) if risk_report_file(request) is None else []
    if weights:
        print(f"medzone: note: request {request_id} holds model weights ({weights[0]}) and "
              "no disclosure-risk report: it cannot be approved; request again with "
              "--risk-report FILE", file=sys.stderr)
    return 0


def cmd_export_review(args, home: MedZoneHome) -> int:
    request = decide_export(open_store(home), args.id, reviewer=args.reviewer,
                            approve=args.decision == "approve", comment=args.comment)
    print(f"export request {request.id}: {request.state} "
          f"({sum(r.approve for r in request.reviews)} of {request.approvals_required} "
          "approvals)")
    return 0


def cmd_export_show(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        request = get_request(session, args.id)
        info = status(request)
        report = screen_report(request)
        diffs = notebook_views(home, request, session)
        risk_text = risk_report_text(home, request)
    print(f"export request {info['id']} by {info['user']}: {info['state']}, screen verdict "
          f"{info['verdict']}, {info['approvals']} of {info['approvals_required']} approvals")
    print(f"reason: {info['reason']}")
    print(f"datasets screened against: {', '.join(info['datasets']) or '(none)'}")
    print(f"screen report sha256: {info['screen_report_sha256']}")
    for f in report["files"]:
        print(f"\n{f['verdict'].upper():6}  {f['path']}")
        for finding in f["findings"]:
            print(f"  [{finding['severity']}] {finding['rule']} at {finding['location']}: "
                  f"{finding['detail']}")
    risk = info["risk_report"]
    if info["model_weights"] and not risk:
        print(f"\nmodel weights ({', '.join(info['model_weights'])}) and no disclosure-risk "
              "report: this request cannot be approved")
    if risk:
        print(f"\n--- disclosure-risk report {risk['path']} (sha256 {risk['sha256']}) ---")
        # Shown as text, without terminal control sequences.
        sys.stdout.write("".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd"
                                 for ch in risk_text or "").rstrip("\n") + "\n")
    for review in info["reviews"]:
        print(f"\nreview: {review['reviewer']} {review['decision']} at {review['time']}"
              + (f": {review['comment']}" if review["comment"] else ""))
    for path, kind, text in diffs:
        if kind == "diff":
            print(f"\n--- nbdime diff of {path} against its template ---")
            text = text if text.strip() else "(no changes)\n"
        else:
            print(f"\n--- {path}, shown whole ---")
        # The requester wrote it: shown as text, without terminal control sequences.
        sys.stdout.write("".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd"
                                 for ch in text).rstrip("\n") + "\n")
    return 0


def cmd_export_status(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        info = status(get_request(session, args.id))
    if args.json:
        _print_json(info)
    else:
        print(f"export request {info['id']}: {info['state']} (screen {info['verdict']}, "
              f"{info['approvals']} of {info['approvals_required']} approvals)")
        _print_table(info["files"], ["path", "verdict", "sha256"])
    return 0


def cmd_export_download(args, home: MedZoneHome) -> int:
    _record, written = release_export(open_store(home), home, args.id, user=args.user,
                                      dest=Path(args.to))
    for path in written:
        print(path)
    return 0


# --- hub -------------------------------------------------------------------------------

def cmd_hub(args, home: MedZoneHome) -> int:
    return run_hub(home.ensure(), ip=args.ip, port=args.port, config_file=args.config)


# --- audit -----------------------------------------------------------------------------

def cmd_audit_verify(args, home: MedZoneHome) -> int:
    with open_store(home).session() as session:
        result = verify(session)
    if args.json:
        _print_json({"ok": result.ok, "rows": result.rows, "first_bad": result.first_bad,
                     "reason": result.reason})
    elif result.ok:
        print(f"audit chain intact: {result.rows} rows")
    else:
        print(f"medzone: audit chain broken: {result.reason}", file=sys.stderr)
    return 0 if result.ok else 1


# --- usage -----------------------------------------------------------------------------

#: ``medzone usage`` columns: (key, heading, unit, digits).
_USAGE_COLUMNS = [("wall_s", "wall", "s", 1), ("cpu_s", "cpu", "s", 1),
                  ("mem_peak_bytes", "mem_peak", "MB", 0), ("gpu_s", "gpu", "s", 1),
                  ("gpu_mem_peak_bytes", "gpu_mem_peak", "MB", 0),
                  ("energy_j", "energy", "J", 1)]


def _usage_cells(row: dict) -> dict:
    cells = dict(row)
    for key, heading, unit, digits in _USAGE_COLUMNS:
        value = row.get(key)
        if unit == "MB" and value is not None:
            value = value / 1e6
        cells[heading] = show_measured(None if value is None else float(value), unit, digits)
    return cells


def cmd_usage(args, home: MedZoneHome) -> int:
    since = parse_since(args.since)
    with open_store(home).session() as session:
        rows = usage_report(session, by=args.by, since=since)
    if args.json:
        _print_json(rows)
        return 0
    cells = [_usage_cells(r) for r in rows]
    measured = [heading for _, heading, _, _ in _USAGE_COLUMNS]
    if args.by:
        _print_table(cells, [args.by, "runs", "sessions", *measured])
    else:
        for c in cells:
            c["what"] = c["template"] if c["kind"] == "run" else f"server {c['server'] or '-'}"
            c["datasets"] = ",".join(c["datasets"]) or "-"
        _print_table(cells, ["id", "kind", "user", "what", "datasets", "started", *measured])
    return 0


def cmd_dataset_provider(args, home: MedZoneHome) -> int:
    actor = args.by or default_actor()
    with open_store(home).session() as session:
        if args.provider_command == "add":
            bind_provider(session, args.id, args.user, actor=actor)
        elif args.provider_command == "remove":
            unbind_provider(session, args.id, args.user, actor=actor)
        else:
            rows = [{"dataset": b.dataset_id, "user": b.user.name, "added_by": b.added_by,
                     "added": _iso(b.added_at)} for b in list_providers(session, args.id)]
    if args.provider_command == "list":
        if args.json:
            _print_json(rows)
        else:
            _print_table(rows, ["dataset", "user", "added_by", "added"])
    return 0


# --- parser ----------------------------------------------------------------------------

def _add_hub_config(parser) -> None:
    parser.add_argument(
        "--hub-config", metavar="FILE",
        help="the jupyterhub_config.py whose sandbox, screen and export settings apply "
             "(default: the hub's, $MEDZONE_HUB_CONFIG, else MedZone's own)")


def _export_parser(sub) -> argparse._SubParsersAction:
    """The ``export`` command group (created once; each export command adds itself)."""
    existing = sub.choices.get("export")
    if existing is not None:
        return existing._medzone_actions
    parser = sub.add_parser("export", help="the export airlock: screen, request, review, release")
    actions = parser.add_subparsers(dest="export_command", required=True, metavar="ACTION")
    parser._medzone_actions = actions
    return actions


def _add_export_screen(sub) -> None:
    export = _export_parser(sub)
    scr = export.add_parser("screen", help="screen files (no request): a verdict per file")
    scr.add_argument("paths", nargs="+", metavar="PATH")
    scr.add_argument("--dataset", action="append", metavar="ID",
                     help="screen against this dataset's index (repeatable)")
    scr.add_argument("--profile", default="acro-default", choices=("acro-default", "opensafely"),
                     help="small-count rules (default: acro-default)")
    scr.add_argument("--json", action="store_true")
    scr.set_defaults(func=cmd_export_screen)


def _add_export_workflow(sub) -> None:
    export = _export_parser(sub)
    req = export.add_parser("request", help="quarantine and screen files from USER's home; "
                            "prints the request id")
    req.add_argument("--user", required=True)
    req.add_argument("paths", nargs="+", metavar="PATH",
                     help="files or folders, relative to the home (or absolute inside it)")
    req.add_argument("--reason", required=True)
    req.add_argument("--risk-report", metavar="FILE",
                     help="disclosure-risk report (.md or .json, in the home; required before "
                     "model weights can be approved, see docs/airlock.md)")
    _add_hub_config(req)
    req.set_defaults(func=cmd_export_request)
    rev = export.add_parser("review", help="approve or reject an export request")
    rev.add_argument("id", type=int)
    rev.add_argument("--reviewer", required=True)
    decision = rev.add_mutually_exclusive_group(required=True)
    decision.add_argument("--approve", dest="decision", action="store_const", const="approve")
    decision.add_argument("--reject", dest="decision", action="store_const", const="reject")
    rev.add_argument("--comment")
    rev.set_defaults(func=cmd_export_review)
    show = export.add_parser("show", help="the screen report and nbdime diffs against templates")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_export_show)
    st = export.add_parser("status", help="state, files and reviews of an export request")
    st.add_argument("id", type=int)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_export_status)
    dl = export.add_parser("download", help="write an approved request's files and release "
                           "record into DIR (requester only)")
    dl.add_argument("id", type=int)
    dl.add_argument("--user", required=True)
    dl.add_argument("--to", required=True, metavar="DIR")
    dl.set_defaults(func=cmd_export_download)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medzone", description="MedZone medical data safe zone.")
    p.add_argument("--home", help="state directory (default: $MEDZONE_HOME or ~/.medzone)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write a synthetic cohort with fake identities")
    demo.add_argument("dir", help="output folder (must not exist or be empty)")
    demo.add_argument("--patients", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo_data)

    dataset = sub.add_parser("dataset", help="governed datasets").add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION")
    add = dataset.add_parser("add", help="validate, (de-identify,) and store a source folder")
    add.add_argument("id", help="dataset id: lowercase letters, digits and hyphens")
    add.add_argument("source", nargs="?",
                     help="folder of DICOM files, CSV tables and NIfTI masks")
    pacs = add.add_argument_group("import from a PACS (instead of SOURCE)")
    pacs.add_argument("--from-pacs", metavar="URL-or-AET@HOST:PORT",
                      help="a DICOMweb service (http(s)://host:port/dicom-web) or a DICOM node")
    pacs.add_argument("--accession", action="append", metavar="NUMBER",
                      help="a study's accession number (repeat, or comma-separate)")
    pacs.add_argument("--study-uid", action="append", metavar="UID",
                      help="a study instance UID (repeat, or comma-separate)")
    pacs.add_argument("--pacs-query", action="append", metavar="KEY=VALUE",
                      help="study-level matching key, e.g. StudyDate=20240101-20241231 (repeat)")
    pacs.add_argument("--pacs-credentials", metavar="FILE",
                      help='JSON {"username": …, "password": …} (default: '
                      "$MEDZONE_PACS_CREDENTIALS, else $MEDZONE_PACS_USERNAME/PASSWORD)")
    pacs.add_argument("--calling-aet", help="MedZone's AE title towards a DICOM node "
                      "(default: $MEDZONE_PACS_CALLING_AET or MEDZONE)")
    pacs.add_argument("--pacs-move-to", metavar="[HOST:]PORT",
                      help="retrieve by C-MOVE to this address (default: C-GET)")
    pacs.add_argument("--download-dir", metavar="DIR", help="where downloads wait for ingest, "
                      "outside MEDZONE_HOME (default: $MEDZONE_PACS_DOWNLOAD_DIR or "
                      "~/.cache/medzone/pacs)")
    add.add_argument("--title")
    add.add_argument("--deidentify", action="store_true",
                     help="apply the DICOM PS3.15 basic profile and pseudonymize tables")
    add.add_argument("--key-file", help="the data provider's pseudonymization key "
                     "(default: $MEDZONE_PSEUDONYM_KEY_FILE, else a one-off key: not re-identifiable)")
    add.add_argument("--by", help="who adds it (recorded in the audit log)")
    add.add_argument("--json", action="store_true")
    add.add_argument("--quiet", action="store_true", help="no progress bar")
    add.set_defaults(func=cmd_dataset_add)
    ls = dataset.add_parser("list", help="list datasets")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_dataset_list)
    prov = dataset.add_parser("provider", help="data providers bound to the datasets they "
                              "supplied (they see those datasets' usage and runs)"
                              ).add_subparsers(dest="provider_command", required=True,
                                               metavar="ACTION")
    for action, helptext in (("add", "bind USER as a provider of dataset ID (gives the "
                                     "data-provider role)"),
                             ("remove", "unbind USER from dataset ID")):
        pa = prov.add_parser(action, help=helptext)
        pa.add_argument("id", metavar="ID")
        pa.add_argument("user", metavar="USER")
        pa.add_argument("--by", help="who binds (an admin or data steward; recorded in the "
                        "audit log)")
        pa.set_defaults(func=cmd_dataset_provider)
    pl = prov.add_parser("list", help="providers, per dataset")
    pl.add_argument("id", nargs="?", metavar="ID", help="only this dataset's")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_dataset_provider, by=None)

    user = sub.add_parser("user", help="hub accounts").add_subparsers(
        dest="user_command", required=True, metavar="ACTION")
    uadd = user.add_parser("add", help="create an approved account")
    uadd.add_argument("name")
    uadd.add_argument("--admin", action="store_true")
    uadd.add_argument("--role", action="append", help="e.g. data-steward, export-reviewer (repeatable)")
    uadd.add_argument("--by", help="who creates it (recorded in the audit log)")
    uadd.set_defaults(func=cmd_user_add)
    upw = user.add_parser("password", help="set the hub login password of an approved account")
    upw.add_argument("name")
    upw.add_argument("--stdin", action="store_true", help="read it from standard input")
    upw.add_argument("--by", help="who sets it (recorded in the audit log)")
    upw.set_defaults(func=cmd_user_password)
    ulist = user.add_parser("list", help="list accounts")
    ulist.add_argument("--json", action="store_true")
    ulist.set_defaults(func=cmd_user_list)

    access = sub.add_parser("access", help="dataset access applications and grants").add_subparsers(
        dest="access_command", required=True, metavar="ACTION")
    ap = access.add_parser("apply", help="apply for datasets; prints the application id")
    ap.add_argument("user")
    ap.add_argument("datasets", nargs="+", metavar="DATASET")
    ap.add_argument("--purpose", required=True)
    ap.add_argument("--days", type=int, default=90, help="requested duration (default 90)")
    ap.set_defaults(func=cmd_access_apply)
    for action, helptext in (("approve", "approve a pending application"),
                             ("reject", "reject a pending application"),
                             ("revoke", "revoke a live grant")):
        d = access.add_parser(action, help=helptext)
        d.add_argument("id", type=int)
        if action == "revoke":
            d.add_argument("--by", help="who revokes (recorded in the audit log)")
        else:
            d.add_argument("--reviewer", required=True)
        if action == "approve":
            d.add_argument("--days", type=int, help="grant duration (default: as requested)")
        d.add_argument("--reason", help="why (recorded with the decision)")
        d.set_defaults(func=cmd_access_decide, action=action)
    al = access.add_parser("list", help="list applications and grants")
    al.add_argument("--user")
    al.add_argument("--json", action="store_true")
    al.set_defaults(func=cmd_access_list)

    sandbox = sub.add_parser("sandbox", help="users' sandboxes").add_subparsers(
        dest="sandbox_command", required=True, metavar="ACTION")
    sx = sandbox.add_parser("exec", help="run CMD exactly as inside USER's kernel (same mounts, "
                            "uid, namespaces, no network); exit status passes through")
    sx.add_argument("--user", required=True)
    _add_hub_config(sx)
    sx.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    sx.set_defaults(func=cmd_sandbox_exec)

    run = sub.add_parser("run", help="run a papermill template with parameters in USER's "
                         "sandbox; prints the executed notebook's path")
    run.add_argument("template", help="a template name (see templates/) or an .ipynb path")
    run.add_argument("--user", required=True)
    run.add_argument("-p", "--parameter", dest="param", nargs=2, action="append",
                     metavar=("NAME", "VALUE"), help="set a parameter (repeatable)")
    run.add_argument("--detach", action="store_true",
                     help="queue the run, print its id and return at once")
    _add_hub_config(run)
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="start queued template runs as slots allow "
                            "(the hub starts one; one per zone)")
    _add_hub_config(worker)
    worker.set_defaults(func=cmd_worker)

    runs = sub.add_parser("runs", help="template runs: list, show, cancel").add_subparsers(
        dest="runs_command", required=True, metavar="ACTION")
    rl = runs.add_parser("list", help="runs, newest first")
    rl.add_argument("--user", help="only this user's runs")
    rl.add_argument("--state", help="only runs in this state "
                    "(queued, running, done, failed, cancelled)")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=cmd_runs_list)
    rs = runs.add_parser("show", help="a run: state, progress, parameters, hashes")
    rs.add_argument("id")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_runs_show)
    rc = runs.add_parser("cancel", help="stop a queued or running run")
    rc.add_argument("id")
    rc.set_defaults(func=cmd_runs_cancel)
    # Hidden (no help): what a Slurm job runs.
    rx = runs.add_parser("execute")
    rx.add_argument("id")
    _add_hub_config(rx)
    rx.set_defaults(func=cmd_runs_execute)

    hub = sub.add_parser("hub", help="run JupyterHub with MedZone's config (foreground)")
    hub.add_argument("--ip", default="127.0.0.1")
    hub.add_argument("--port", type=int, default=8000)
    hub.add_argument("--config", help="a jupyterhub_config.py to use instead of MedZone's")
    hub.set_defaults(func=cmd_hub)

    _add_export_screen(sub)
    _add_export_workflow(sub)

    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION")
    av = audit.add_parser("verify", help="exit 0 if the hash chain is intact, 1 naming the first bad row")
    av.add_argument("--json", action="store_true")
    av.set_defaults(func=cmd_audit_verify)

    use = sub.add_parser("usage", help="what runs and server sessions used (CPU, memory, GPU, "
                         "energy), per record or grouped")
    use.add_argument("--by", choices=("user", "dataset", "template", "month"),
                     help="group and total by this")
    use.add_argument("--since", metavar="DATE", help="only usage started on or after DATE "
                     "(YYYY-MM-DD, UTC)")
    use.add_argument("--json", action="store_true")
    use.set_defaults(func=cmd_usage)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_to_stderr()
    try:
        home = resolve_home(args.home)
        return args.func(args, home)
    except IngestRefused as err:
        print(f"medzone: error: {err}", file=sys.stderr)
        for line in err.findings[:MAX_FINDINGS_SHOWN]:
            print(f"  {line}", file=sys.stderr)
        if len(err.findings) > MAX_FINDINGS_SHOWN:
            print(f"  … and {len(err.findings) - MAX_FINDINGS_SHOWN} more", file=sys.stderr)
        return err.exit_code
    except MedZoneError as err:
        print(f"medzone: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("medzone: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("MEDZONE_DEBUG"):
            raise
        print(f"medzone: internal error: {type(err).__name__}: {err} "
              "(set MEDZONE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
