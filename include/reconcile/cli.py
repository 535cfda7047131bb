"""The `reconcile` command: thin over the runner and stages. Progress goes to stderr, results to stdout.

Exit codes (the CLI's alone; a run's status comes from reconcile.report): 0 success or dry run, 1 error (a
failed run), 2 bad usage or config, 3 blocked or awaiting approval (writes held back; nothing unsafe written),
4 incomplete (changes failed at a target or were left unattempted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

from . import __version__, report, runner
from .config import json_schema, load_config
from .errors import ConfigError, ReconcileError

DEFAULT_CONFIG_ENV = "RECONCILE_CONFIG"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BLOCKED, EXIT_INCOMPLETE = 0, 1, 2, 3, 4
EXIT_OF_STATUS = {"success": EXIT_OK, "dry_run": EXIT_OK, "blocked": EXIT_BLOCKED,
                  "awaiting_approval": EXIT_BLOCKED, "incomplete": EXIT_INCOMPLETE, "failed": EXIT_ERROR}


def exit_code(status: str) -> int:
    """A run's status as the process exit code (an unknown status is an error)."""
    return EXIT_OF_STATUS.get(status, EXIT_ERROR)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=os.environ.get(DEFAULT_CONFIG_ENV, "reconcile.yaml"),
                   help=f"config file (default: ${DEFAULT_CONFIG_ENV} or ./reconcile.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconcile",
        description="Nightly reconciliation of business systems (CRM, marketing, ERP) into a DuckDB warehouse.",
        epilog="Docs: README.md and docs/ (configuration.md, warehouse.md, operations.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="demo systems to try reconcile on")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="SUBCOMMAND")
    init = demo_sub.add_parser("init", help="write a demo config, three SQLite systems and an answer key into DIR")
    init.add_argument("directory", metavar="DIR", help="folder to write into (created if missing)")
    init.add_argument("--people", type=int, default=200, help="number of real people behind the records (default 200)")
    init.add_argument("--seed", type=int, default=7, help="random seed; same seed, same data (default 7)")
    init.add_argument("--force", action="store_true", help="replace an existing demo in DIR")
    init.add_argument("--json", action="store_true", help="print what was written as one JSON object on stdout")
    init.add_argument("--api", action="store_true",
                      help="reach marketing through a local HubSpot-like API (serve it with "
                           "`python -m reconcile.demo.hubspot_server DIR/systems/marketing.db`; make demo does)")
    init.add_argument("--api-port", type=int, default=None,
                      help="the API's port on 127.0.0.1 (default 18777; implies --api)")

    check = sub.add_parser("check-config", help="validate a config; exit 2 listing every problem (schema and "
                                                "cross-field rules, in one pass)")
    _config_arg(check)
    check.add_argument("config_path", metavar="CONFIG", nargs="?", default=None,
                       help="the config file (same as --config; kept for compatibility)")
    check.add_argument("--connect", action="store_true",
                       help="also connect to every system and check tables and columns exist")
    check.add_argument("--json", action="store_true",
                       help='print {"config", "ok", "problems": [{path, line, message}], ...} on stdout')

    for name, help_ in (("run", "run every stage for an entity (or all entities)"),
                        ("extract", "extract sources into the warehouse's staging tables")):
        p = sub.add_parser(name, help=help_)
        _config_arg(p)
        p.add_argument("--entity", "-e", help="one entity (default: every entity in the config)")
        p.add_argument("--full", action="store_true", help="force a full snapshot instead of incremental extraction")
        p.add_argument("--run-id", help="run id (default: generated from the current time)")
        p.add_argument("--json", action="store_true", help="print the run summary as one JSON object on stdout")
        if name == "run":
            p.add_argument("--dry-run", action="store_true",
                           help="plan everything, write nothing into any system (overrides load.mode)")
            p.add_argument("--apply", action="store_true", help="load even if the config's load.mode is dry_run")
            p.add_argument("--approve", action="store_true",
                           help="pre-approve loads whose change counts are over a threshold")

    status = sub.add_parser("status", help="list recent runs with their status and counts")
    _config_arg(status)
    status.add_argument("--limit", type=int, default=10, help="how many runs (default 10)")
    status.add_argument("--entity", "-e", help="only runs of this entity")
    status.add_argument("--json", action="store_true", help="print the runs as a JSON list on stdout")

    ch = sub.add_parser("changes", help="show the changes a run planned and what became of them")
    _config_arg(ch)
    ch.add_argument("--run", dest="run_id", help="run id (default: the latest run)")
    ch.add_argument("--target", "-t", help="only changes into this system")
    ch.add_argument("--status", help="only changes with this status (planned, held, applied, failed, ...)")
    ch.add_argument("--csv", metavar="FILE", help="write every matching change to a CSV file")
    ch.add_argument("--operation", help="only this operation (create, update, link, archive, erase)")
    ch.add_argument("--limit", type=int, default=50, help="rows to print (default 50)")
    ch.add_argument("--json", action="store_true", help="print every matching change as a JSON list on stdout")

    ap = sub.add_parser("approve", help="approve (or --reject) a run's loads that wait for approval, then load them")
    _config_arg(ap)
    ap.add_argument("--run", dest="run_id", required=True, help="the run whose loads wait for approval")
    ap.add_argument("--entity", "-e", help="the entity (needed when the config has several)")
    ap.add_argument("--target", "-t", action="append", help="only this target (repeatable)")
    ap.add_argument("--by", required=True, help="who approves (kept with the approval)")
    ap.add_argument("--note", help="a note kept with the approval")
    ap.add_argument("--reject", action="store_true", help="reject: nothing is written")
    ap.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")

    ld = sub.add_parser("load", help="(re)load a run's approved changes; resumes an interrupted load")
    _config_arg(ld)
    ld.add_argument("--run", dest="run_id", required=True, help="the run whose changes to load")
    ld.add_argument("--entity", "-e", help="the entity (needed when the config has several)")
    ld.add_argument("--target", "-t", action="append", help="only this target (repeatable)")
    ld.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")

    rb = sub.add_parser("rollback", help="revert a run's applied changes from their before-images")
    _config_arg(rb)
    rb.add_argument("--run", dest="run_id", required=True, help="the run whose applied changes to revert")
    rb.add_argument("--entity", "-e", help="the entity (needed when the config has several)")
    rb.add_argument("--target", "-t", help="only this target (default: every target)")
    rb.add_argument("--json", action="store_true", help="print the outcome per target as JSON on stdout")

    gates = sub.add_parser("gates", help="show quality gate outcomes of a run (default: the latest run)")
    _config_arg(gates)
    gates.add_argument("--run", dest="run_id", help="run id (default: the latest run)")
    gates.add_argument("--entity", "-e", help="only this entity")
    gates.add_argument("--failed", action="store_true", help="only expectations that were not met")
    gates.add_argument("--json", action="store_true", help="print the outcomes as one JSON object on stdout")

    lineage = sub.add_parser("lineage", help="everything held about one person: linked records, golden values with "
                                             "source and history, consent, changes (answers a DSAR)")
    _config_arg(lineage)
    who = lineage.add_mutually_exclusive_group(required=True)
    who.add_argument("--email", help="any email of the person, in any system (normalised like staging)")
    who.add_argument("--xid", help="the person's cross-system id")
    who.add_argument("--record", metavar="SYSTEM:KEY", help="one of the person's records, e.g. crm:0031x00000AbCd")
    lineage.add_argument("--entity", "-e", help="only this entity (default: every entity)")
    lineage.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")

    erase = sub.add_parser("erase", help="record an erasure request: the person is suppressed from golden records "
                                         "from now on, and never re-created by later extracts")
    _config_arg(erase)
    who = erase.add_mutually_exclusive_group(required=True)
    who.add_argument("--email", help="an email of the person (must name exactly one person)")
    who.add_argument("--xid", help="the person's cross-system id")
    erase.add_argument("--reason", required=True, help="why (e.g. the DSAR ticket); kept with the request")
    erase.add_argument("--by", help="who asked for it (default: the current user)")
    erase.add_argument("--entity", "-e", help="only this entity (default: every entity)")
    erase.add_argument("--json", action="store_true", help="print the erasure as one JSON object on stdout")

    review = sub.add_parser("review", help="the review queue: list, show and decide items")
    review_sub = review.add_subparsers(dest="review_command", required=True, metavar="SUBCOMMAND")
    rl = review_sub.add_parser("list", help="list review items (default: open ones)")
    _config_arg(rl)
    rl.add_argument("--kind", help="collision | candidate | orphan | duplicate | conflict")
    rl.add_argument("--status", default="open", help="open (default) | decided | ignored | resolved | all")
    rl.add_argument("--entity", "-e", help="only items of this entity")
    rl.add_argument("--system", "-s", help="only items about this system")
    rl.add_argument("--limit", type=int, default=50, help="how many items (default 50), highest priority first")
    rl.add_argument("--json", action="store_true", help="print the items as a JSON list on stdout")
    rs = review_sub.add_parser("show", help="show one item with every side and its decisions")
    _config_arg(rs)
    rs.add_argument("item_id", metavar="ITEM", help="the item id (from `review list`)")
    rs.add_argument("--json", action="store_true", help="print the item, its details and decisions as JSON")
    rd = review_sub.add_parser("decide", help="decide an item; applied on the next run, wins over every rule")
    _config_arg(rd)
    rd.add_argument("item_id", metavar="ITEM", nargs="?", help="the item (optional for split/merge by id)")
    rd.add_argument("--action", required=True, choices=["link", "split", "merge", "distinct", "ignore"],
                    help="link a record to an xid, split it off, merge two xids, keep apart, or ignore the item")
    rd.add_argument("--xid", help="link: the target xid; merge: the xid merged away; distinct: the other side")
    rd.add_argument("--into", help="merge: the surviving xid")
    rd.add_argument("--record", help="SYSTEM:KEY of the record concerned (default: the item's record)")
    rd.add_argument("--entity", "-e", help="the entity (needed without an item when the config has several)")
    rd.add_argument("--by", required=True, help="who decides (kept with the decision)")
    rd.add_argument("--reason", required=True, help="why (kept with the decision)")
    rd.add_argument("--json", action="store_true", help="print the decision rows written as JSON")

    rep = sub.add_parser("report", help="a run's report (status and why, stages, gates, trend plots) as one "
                                        "self-contained HTML file")
    _config_arg(rep)
    rep.add_argument("--run", dest="run_id", help="run id (default: the latest run)")
    rep.add_argument("--entity", "-e", help="the entity (default: the run's first)")
    rep.add_argument("--html", metavar="FILE", required=True, help="write the report here (no external URLs)")

    flow = sub.add_parser("flow", help="the data-flow map from the config: ownership matrix, what flows where, "
                                       "problems (writes into an owner, write cycles)")
    _config_arg(flow)
    flow.add_argument("--format", choices=["mermaid", "svg", "html", "json"], default="mermaid",
                      help="mermaid (default), svg, html (a self-contained page) or json")
    flow.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")

    sub.add_parser("schema", help="print the config's JSON schema (for editors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ReconcileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `reconcile changes | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as e:  # an internal error: say so plainly; the traceback only on request
        if os.environ.get("RECONCILE_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e}\n(set RECONCILE_DEBUG=1 for the traceback; "
              f"please report it)", file=sys.stderr)
        return EXIT_ERROR


def _dispatch(args) -> int:
    if args.command == "demo":
        return _demo_init(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command in ("run", "extract"):
        return _run(args)
    if args.command == "status":
        return _status(args)
    if args.command == "gates":
        return _gates(args)
    if args.command == "review":
        return _review(args)
    if args.command == "changes":
        return _changes(args)
    if args.command in ("approve", "load", "rollback"):
        return _after_run(args)
    if args.command == "lineage":
        return _lineage(args)
    if args.command == "erase":
        return _erase(args)
    if args.command == "report":
        return _report(args)
    if args.command == "flow":
        return _flow(args)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    raise AssertionError(args.command)


def _demo_init(args) -> int:
    from .demo import init_demo
    from .demo.hubspot_server import DEFAULT_DEMO_PORT

    port = args.api_port or (DEFAULT_DEMO_PORT if args.api else None)
    try:
        result = init_demo(args.directory, people=args.people, seed=args.seed, force=args.force, api_port=port)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"demo written to {args.directory}:")
    print(f"  config      {result['config']}")
    for system, path in result["systems"].items():
        print(f"  {system:<11} {path} ({result['records'][system]} records)")
    print(f"  answer key  {result['answer_key']}")
    if port:
        print(f"  marketing is read and written through http://127.0.0.1:{port} (HubSpot-like API); serve it with")
        print(f"    export RECONCILE_DEMO_HUBSPOT_TOKEN=<any token>")
        print(f"    python -m reconcile.demo.hubspot_server {result['systems']['marketing']} --port {port}")
    print(f"next: reconcile run --config {result['config']}")
    return 0


def _check_config(args) -> int:
    path = args.config_path or args.config
    try:
        cfg = load_config(path)
    except ConfigError as e:
        if not args.json:
            raise
        print(json.dumps({"config": str(path), "ok": False, "problems": [
            {"path": p.path, "line": p.line, "message": p.message} for p in e.problems]}, indent=2))
        return EXIT_USAGE
    problems = _connect_checks(cfg) if args.connect else []
    n_sources = sum(len(e.sources) for e in cfg.entities.values())
    if args.json:
        print(json.dumps({"config": str(path), "ok": not problems,
                          "problems": [{"path": None, "line": None, "message": p} for p in problems],
                          "systems": len(cfg.systems), "entities": len(cfg.entities), "sources": n_sources,
                          "connected": bool(args.connect)}, indent=2))
        return EXIT_USAGE if problems else 0
    if problems:
        print(f"error: {path}: {len(problems)} problem(s) against the live systems:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: ok ({len(cfg.systems)} systems, {len(cfg.entities)} entities, {n_sources} sources"
          f"{', all reachable' if args.connect else ''})")
    from .stages.identity_model import describe

    for entity in sorted(cfg.entities):
        lines, warnings = describe(cfg, entity)
        for line in lines:
            print(f"  {line}")
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    return 0


def _connect_checks(cfg) -> list[str]:
    from .config import resolve_url
    from .connectors import connect
    from .stages.extract import source_columns

    problems = []
    for ename, entity in sorted(cfg.entities.items()):
        for system, source in sorted(entity.sources.items()):
            path = f"entities.{ename}.sources.{system}"
            try:
                conn = connect(system, resolve_url(cfg, system), cfg.systems[system])
                try:
                    have = set(conn.columns(source))
                finally:
                    conn.close()
            except ReconcileError as e:
                problems.append(f"{path}: {e}")
                continue
            for col in source_columns(source, cfg.systems[system].xid_column):
                if col not in have:
                    problems.append(f"{path}: column {col!r} does not exist in "
                                    f"{'table ' + repr(source.table) if source.table else 'the query'}")
    return problems


def _run(args) -> int:
    cfg = load_config(args.config)
    entities = [args.entity] if args.entity else sorted(cfg.entities)
    unknown = [e for e in entities if e not in cfg.entities]
    if unknown:
        print(f"error: unknown entity {unknown[0]!r}; configured: {', '.join(sorted(cfg.entities))}", file=sys.stderr)
        return EXIT_USAGE
    progress = runner.stderr_progress
    run_at = datetime.now(timezone.utc)
    run_id = args.run_id or runner.new_run_id(run_at)
    summaries = {}
    failed = False
    for e in entities:
        try:
            extra = {}
            if args.command == "run":
                extra = {"dry_run": True if args.dry_run else (False if args.apply else None), "approve": args.approve}
            summaries[e] = runner.run_entity(cfg, e, run_id=run_id, run_at=run_at, full=args.full or None,
                                             progress=progress, through="load" if args.command == "run" else "extract",
                                             **extra)
        except Exception as err:  # recorded as a failed run by the runner; reported here per entity
            if os.environ.get("RECONCILE_DEBUG"):
                raise
            print(f"error: entity {e}: {err}", file=sys.stderr)
            summaries[e] = {"run_id": run_id, "status": "failed", "entity": e, "error": str(err)}
            failed = True
    out = summaries[entities[0]] if len(entities) == 1 else {
        "run_id": run_id, "status": report.worst(s["status"] for s in summaries.values()), "entities": summaries}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        for s in summaries.values():
            _print_summary(s)
    return EXIT_ERROR if failed else exit_code(out["status"])


def _print_summary(s: dict) -> None:
    print(f"run {s['run_id']} [{s['entity']}]: {s['status']}")
    for system in sorted(s.get("extracted", {})):
        print(f"  {system:<12} extracted {s['extracted'][system]:>8}  quarantined {s['quarantined'][system]:>6}  "
              f"staged {s['staged'][system]:>8}  ({s['extract_mode'][system]})")
    if "gates" in s:
        g = s["gates"]
        print(f"  gates: {g['passed']} passed, {g['warned']} warned, {g['failed']} failed; held {g.get('held') or 'none'}")
    if "identity" in s:
        i = s["identity"]
        print(f"  identity: {i['linked']} links ({i.get('auto_links', 0)} by the match model), "
              f"{i['new_xids']} new xids, {i['review']} open review items")
    if "golden" in s:
        print(f"  golden: {s['golden'].get('records')} records, {s['golden'].get('changed')} changed")
    for target, c in sorted(s.get("changes", {}).items()):
        print(f"  changes {target:<10} planned {c['planned']}, applied {c['applied']}, failed {c['failed']}, "
              f"held {c['held']}, conflicts {c['skipped_conflict']}"
              f"{', not attempted ' + str(c['unattempted']) if c.get('unattempted') else ''}")
    for r in s.get("recovered", []):
        print(f"  recovered run {r['run_id']} (abandoned by its process): {r['status']}")
    for reason in s.get("reasons", []):
        print(f"  why: {reason}")
    for note in s.get("notes", []):
        print(f"  note: {note}")
    if "warehouse" in s:
        print(f"  warehouse: {s['warehouse']}")


def _status(args) -> int:
    from .queries import list_runs

    cfg = load_config(args.config)
    runs = list_runs(cfg, limit=args.limit, entity=args.entity)
    if args.json:
        print(json.dumps(runs, indent=2, default=str))
        return 0
    if not runs:
        print("no runs yet")
        return 0
    w = max(len("run_id"), *(len(r["run_id"]) for r in runs))
    print(f"{'run_id':<{w}} {'entity':<10} {'status':<17} {'finished (UTC)':<20} extracted / quarantined")
    for r in runs:
        s = r["summary"] or {}
        counts = ", ".join(f"{k} {v}/{s.get('quarantined', {}).get(k, 0)}" for k, v in sorted(s.get("extracted", {}).items()))
        fin = r["finished_at"].strftime("%Y-%m-%d %H:%M:%S") if r["finished_at"] else "-"
        note = (f"  (recovered by {s['recovered_by']})" if s.get("recovered_by")
                else f"  (owned by {r['owner']})" if r.get("owner") else "")
        print(f"{r['run_id']:<{w}} {r['entity']:<10} {r['status']:<17} {fin:<20} {counts}{note}")
    return 0


def _review(args) -> int:
    from . import queries, review

    cfg = load_config(args.config)
    if args.review_command == "list":
        found = queries.review_queue(cfg, kind=args.kind, status=None if args.status == "all" else args.status,
                                     entity=args.entity, system=args.system, limit=args.limit)
        items = found["items"]
        if args.json:
            print(json.dumps(items, indent=2, default=str))
        elif not items:
            print("no review items match")
        else:
            for i in items:
                priority = "" if i["priority"] is None else f"{i['priority']:.3f}"
                print(f"{i['item_id']:<22} {i['kind']:<10} {i['status']:<8} {priority:>5}  {i['title']}")
            if found["total"] > len(items):
                print(f"... {found['total'] - len(items)} more (--limit)")
        return 0
    if args.review_command == "show":
        item = queries.review_item(cfg, args.item_id)
        if args.json:
            print(json.dumps(item, indent=2, default=str))
        else:
            _print_item(item)
        return 0
    rows = review.decide(cfg, args.action, args.by, args.reason, item_id=args.item_id, entity=args.entity,
                         xid=args.xid, into=args.into, record=args.record)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        for r in rows:
            print(f"recorded {r['decision_id']}: {r['action']}"
                  f"{' ' + r['system'] + ':' + r['record_key'] if r.get('record_key') else ''}"
                  f"{' xid ' + r['xid'] if r.get('xid') else ''}{' into ' + r['other_xid'] if r.get('other_xid') else ''}"
                  f"; applied on the next run")
    return 0


def _print_item(item: dict) -> None:
    """A review item for a person: the records side by side (one column each), then the rest of its details."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=False)
    console.print(f"{item['item_id']} [{item['kind']}, {item['status']}] {item['title']}", markup=False)
    console.print(f"seen in runs {item['first_seen_run']} .. {item['last_seen_run']}", markup=False)
    records = item["records"]
    if records:
        table = Table(show_lines=False, header_style="bold")
        table.add_column("field")
        for r in records:
            table.add_column(f"{r['system']}:{r['record_key']}" + ("" if r["staged"] else "\n(not in staging)"),
                             overflow="fold")
        table.add_row("xid", *[_show(r["xid"]) for r in records])
        disagree = False
        for field in records[0]["values"]:
            vals = [_show(r["values"].get(field)) for r in records]
            differ = len({v for v in vals if v != "-"}) > 1
            disagree |= differ
            table.add_row(field + (" *" if differ else ""), *vals)
        console.print(table)
        if disagree:
            console.print("(* the records disagree on this field)")
    rest = {k: v for k, v in item["details"].items() if k not in ("records", "sides")}
    for key, value in rest.items():
        if key == "candidates" and isinstance(value, list):
            for c in value:
                ev = c.get("evidence") if isinstance(c, dict) else None
                head = ", ".join(f"{k} {_show(v)}" for k, v in c.items() if k != "evidence") if isinstance(c, dict) \
                    else _show(c)
                console.print(f"candidate: {head}", markup=False)
                if isinstance(ev, dict):
                    for f, e in ev.items():
                        console.print(f"    {f:<14} {json.dumps(e, default=str, ensure_ascii=False)}", markup=False)
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
            console.print(f"{key}: {text}", markup=False)
    console.print("what each decision would do:")
    for action, effect in item["effects"].items():
        console.print(f"  {action:<9} {effect}", markup=False)
    for d in item["decisions"]:
        console.print(f"decision {d['decision_id']}: {d['action']} by {d['decided_by']} at {d['decided_at']} "
                      f"({d['reason']}); applied in run {d['applied_run_id'] or '(next run)'}", markup=False)


def _entity_of(cfg, args) -> str:
    if getattr(args, "entity", None):
        cfg.entity(args.entity)
        return args.entity
    if len(cfg.entities) == 1:
        return next(iter(cfg.entities))
    raise ReconcileError("--entity is required: the config has several entities")


def _changes(args) -> int:
    import csv

    from .queries import CHANGE_COLUMNS, list_changes

    cfg = load_config(args.config)
    found = list_changes(cfg, run_id=args.run_id, target=args.target, status=args.status, operation=args.operation)
    run_id, rows = found["run_id"], found["rows"]
    if run_id is None:
        print("no changes planned yet")
        return 0
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(CHANGE_COLUMNS), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {len(rows)} changes of run {run_id} to {args.csv}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"changes of run {run_id}")
    for target, ops in sorted(found["counts"].items()):
        for op, st in sorted(ops.items()):
            print(f"  {target:<12} {op:<8} " + ", ".join(f"{k} {v}" for k, v in sorted(st.items())))
    if not args.csv:
        for r in rows[: args.limit]:
            if r["record"] is not None:  # a create: the record to be created, not a before/after pair
                change = "new record: " + ", ".join(f"{k}={_show(v)}" for k, v in r["record"].items())
            else:
                change = f"{str(r['before_value'])[:24]!s:<24} -> {str(r['after_value'])[:24]!s:<24}"
            print(f"  {r['target']:<10} {r['operation']:<7} {str(r['record_key'] or r['xid'] or '(new)'):<38} "
                  f"{str(r['field'] or ''):<12} {change} {r['status']}")
        if len(rows) > args.limit:
            print(f"  ... {len(rows) - args.limit} more (use --csv FILE or --json for all)")
    return 0


def _after_run(args) -> int:
    cfg = load_config(args.config)
    entity = _entity_of(cfg, args)
    progress = runner.stderr_progress
    if args.command == "rollback":
        out = runner.rollback(cfg, entity, args.run_id, args.target, progress=progress)
        print(json.dumps(out, indent=2, default=str) if args.json else
              "\n".join(f"{r['target']}: {r['restored']} restored, {len(r['skipped'])} skipped (edited since), "
                        f"{len(r['not_reversible'])} not reversible" for r in out))
        return 0
    if args.command == "approve":
        summary = runner.decide_load(cfg, entity, args.run_id, args.by, args.target, reject=args.reject,
                                     note=args.note, progress=progress)
        print(f"{'rejected' if args.reject else 'approved'}: {', '.join(summary['decided'])}", file=sys.stderr)
    else:
        summary = runner.reload(cfg, entity, args.run_id, args.target, progress=progress)
        if summary["waiting"]:
            print(f"waiting for approval, not loaded: {', '.join(summary['waiting'])}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary)
    return exit_code(summary["status"])


def _gates(args) -> int:
    from .queries import gate_outcomes

    cfg = load_config(args.config)
    found = gate_outcomes(cfg, run_id=args.run_id, entity=args.entity, failed=args.failed)
    run_id, outcomes = found["run_id"], found["outcomes"]
    if run_id is None:
        print("no gate results yet")
        return 0
    if not outcomes and not args.failed:
        raise ReconcileError(f"no gate results for run {run_id!r}")
    if args.json:
        for o in outcomes:
            o.pop("sample", None)
            o.pop("system", None)
        print(json.dumps(found, indent=2, default=str))
        return 0
    print(f"gates of run {run_id}")
    print(f"{'table':<28} {'expectation':<32} {'severity':<8} {'outcome':<7} {'observed':<14} threshold")
    for o in outcomes:
        th = ", ".join(f"{k}={v}" for k, v in (o["threshold"] or {}).items() if v is not None and k != "regex")
        print(f"{o['table']:<28} {o['expectation']:<32} {o['severity']:<8} {o['outcome']:<7} "
              f"{str(o['observed'])[:14]:<14} {th}")
    for target, n in found["held"].items():
        print(f"held: {n} identities are not written to {target} (see review.items)")
    for b in found["blocked"]:
        print(f"blocked: writes into {b['target']}{'' if b['field'] == '*' else ' of ' + b['field']}: {b['reason']}")
    return 0


def _report(args) -> int:
    from .html.report import report_html

    cfg = load_config(args.config)
    _write(args.html, report_html(cfg, args.run_id, args.entity))
    print(f"wrote the run report to {args.html}", file=sys.stderr)
    return 0


def _flow(args) -> int:
    from .flow import flow_map, mermaid
    from .html import flow_body, flow_svg, page

    cfg = load_config(args.config)
    fm = flow_map(cfg)
    if args.format == "mermaid":
        text = mermaid(fm)
    elif args.format == "svg":
        text = flow_svg(fm, standalone=True)
    elif args.format == "json":
        text = json.dumps(fm.as_dict(), indent=2) + "\n"
    else:
        text = page("reconcile data-flow map", flow_body(fm, str(cfg.path)))
    if args.output:
        _write(args.output, text)
        print(f"wrote the data-flow map ({args.format}) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for p in fm.problems:
        print(f"{p['severity']}: {p['message']}", file=sys.stderr)
    return 0


def _write(path: str, text: str) -> None:
    """Write a file atomically (a reader never sees half a report)."""
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _person_query(args, cfg) -> tuple[dict, list[str]] | int:
    """The person named by --email / --xid / --record, and the entities to look in; or an exit code."""
    if args.entity and args.entity not in cfg.entities:
        return _usage(f"unknown entity {args.entity!r}; configured: {', '.join(sorted(cfg.entities))}")
    entities = [args.entity] if args.entity else sorted(cfg.entities)
    record = getattr(args, "record", None)
    if record is not None:
        system, sep, key = record.partition(":")
        if not sep or not system or not key:
            return _usage(f"--record takes SYSTEM:KEY (e.g. crm:c1), got {record!r}")
        if system not in cfg.systems:
            return _usage(f"--record names system {system!r}, which is not configured "
                          f"(configured: {', '.join(sorted(cfg.systems))})")
        return {"record": (system, key)}, entities
    if args.email is not None:
        if not args.email.strip():
            return _usage("--email is empty")
        return {"email": args.email}, entities
    return {"xid": args.xid}, entities


def _show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _lineage(args) -> int:
    from .people import person_lineage

    cfg = load_config(args.config)
    parsed = _person_query(args, cfg)
    if isinstance(parsed, int):
        return parsed
    query, entities = parsed
    found = person_lineage(cfg, entities, **query)
    persons, unlinked = found["persons"], found["unlinked"]
    asked = next(f"{k} {v if k != 'record' else ':'.join(v)!s}" for k, v in query.items())
    if not persons:
        hint = (f"; {len(unlinked)} record(s) carry it but are linked to no xid yet (has identity resolution run?)"
                if unlinked else "")
        print(f"error: no person found with {asked} in {cfg.warehouse_path}{hint}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"query": {k: (':'.join(v) if k == "record" else v) for k, v in query.items()},
                          "persons": persons, "unlinked": unlinked}, indent=2, default=str))
        return 0
    for p in persons:
        _print_person(p)
    for u in unlinked:
        print(f"unlinked record carrying this email (no xid yet): {u['entity']} {u['record']}")
    return 0


def _print_person(p: dict) -> None:
    state = (p["identity"] or {}).get("status", "unknown")
    print(f"{p['entity']} {p['xid']} ({state})")
    if p["erasure"]:
        e = p["erasure"]
        print(f"  ERASURE requested {e['requested_at']} by {e['requested_by']}: {e['reason']} "
              f"(request {e['request_id']}, {e['status']}); suppressed from golden records")
    print(f"  records ({len(p['records'])}):")
    for r in p["records"]:
        where = f"modified {_show(r['source_modified_at'])}" if r["in_staging"] else "no longer in staging"
        print(f"    {r['system'] + ':' + r['record_key']:<24} linked by {r['rule']} ({r['confidence']:.2f}) "
              f"in run {r['run_id']}; {where}")
        if r["values"]:
            print("      " + "  ".join(f"{k}={_show(v)}" for k, v in r["values"].items()))
        ev = r.get("evidence")
        if ev:
            weights = "  ".join(f"{k} {v['weight']:+.1f}" for k, v in ev.items() if not k.startswith("_"))
            print(f"      why: probability {ev['_probability']:.6f} against {ev['_with']}; weights {weights}")
    print("  golden:" if p["in_golden"] else "  golden: no current row (history below)")
    for field, g in p["golden"].items():
        if p["in_golden"]:
            src = f"{g['source_system']}:{g['source_record_key']}" if g["source_system"] else "no source holds a value"
            print(f"    {field:<16} {_show(g['value']):<28} {src} ({g['rule']}), since {_show(g['since'])}")
        for h in g["history"]:
            if h["valid_to"] is None and p["in_golden"]:
                continue
            src = f"{h['source_system']}:{h['source_record_key']}" if h["source_system"] else "no source"
            print(f"    {'' if p['in_golden'] else field:<16}   was {_show(h['value'])!r} from {src} ({h['rule']}) "
                  f"{h['valid_from']} -> {_show(h['valid_to'])} [run {h['run_id']}]")
    if p["consent"]:
        print("  consent:")
        for field, c in p["consent"].items():
            src = f"{c['source_system']}:{c['source_record_key']}" if c["source_system"] else "no system holds a value"
            print(f"    {field:<16} {_show(c['value'])}  from {src}, record modified {_show(c['source_modified_at'])}, "
                  f"believed since {_show(c['since'])}")
    for c in p["conflicts"]:
        print(f"  conflict: {c['field']} from {c['system']}: {len(c['candidates'])} records disagree; "
              f"chose {c['chosen_record_key']} ({c['chosen_value']!r}) as the most recently modified")
    if p["changes"] is None:
        print("  changes written: none recorded (audit.changes does not exist yet)")
    else:
        print(f"  changes written: {len(p['changes'])}")
        for ch in p["changes"]:
            print("    " + json.dumps(ch, default=str))


def _erase(args) -> int:
    from .people import PersonNotUnique, erase_person

    cfg = load_config(args.config)
    parsed = _person_query(args, cfg)
    if isinstance(parsed, int):
        return parsed
    query, entities = parsed
    if not args.reason.strip():
        return _usage("--reason is empty; say why (e.g. the DSAR ticket)")
    try:
        result = erase_person(cfg, entities, reason=args.reason, by=args.by, **query)
    except PersonNotUnique as e:
        return _usage(str(e))
    except ReconcileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    entity, xid = result["entity"], result["xid"]
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result["already"]:
        print(f"already erased: {entity} {xid} (request {result['request_id']}, {result['requested_at']} "
              f"by {result['requested_by']}: {result['reason']})")
    else:
        print(f"erasure recorded: {entity} {xid} (request {result['request_id']}); suppressed from golden records, "
              f"{len(result['records'])} record(s): {', '.join(result['records']) or 'none'}")
        print(f"{result['identifiers']} identifier(s) kept as salted hashes (a record reappearing with one is "
              f"suppressed and reviewed); the warehouse holds no value of the person any more")
        print("the next run erases the records in the systems (systems.<name>.writes.erase)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
