"""`make bench`: time every stage of a night on a generated demo of N people (default 20,000).

Usage: python scripts/bench.py [--people N] [--seed S] [--keep DIR]
Prints one line per stage (seconds, rows) and a total; numbers go in PRs that touch performance.
Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from reconcile import runner
from reconcile.config import load_config
from reconcile.demo import init_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", help="generate into this folder and keep it (default: a temp folder)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    timings: list[tuple[str, float, str]] = []

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings.append((name, time.perf_counter() - t0, _rows(out)))
        print(f"{name:<28} {timings[-1][1]:8.2f} s  {timings[-1][2]}", flush=True)
        return out

    try:
        timed("demo init", init_demo, root, people=args.people, seed=args.seed, force=True)
        cfg = load_config(root / "reconcile.yaml")
        for night in (1, 2):
            run_id, run_at = f"bench{night}", datetime(2026, 2, 1) + timedelta(days=night)
            print(f"-- night {night}")
            manifest = timed("begin_run", runner.begin_run, cfg, "contact", run_id, run_at)
            for s in sorted(manifest["systems"]):
                timed(f"extract {s}", runner.extract_system, cfg, "contact", s, run_id)
            timed("load_staging", runner.load_staging, cfg, "contact", run_id)
            for s in sorted(manifest["systems"]):
                timed(f"validate {s}", runner.validate_system, cfg, "contact", s, run_id)
            timed("apply_gates", runner.apply_gates, cfg, "contact", run_id)
            timed("resolve_identity", runner.resolve_identity, cfg, "contact", run_id)
            timed("build_golden", runner.build_golden, cfg, "contact", run_id)
            timed("guard_collisions", runner.guard_collisions, cfg, "contact", run_id)
            timed("plan_changes", runner.plan_changes, cfg, "contact", run_id, approve=True)
            for target, state in runner.targets_to_load(cfg, "contact", run_id).items():
                if state == "ok":
                    timed(f"load {target}", runner.load_changes, cfg, "contact", run_id, target)
            summary = timed("finish_run", runner.finish_run, cfg, "contact", run_id)
            print(f"   status {summary['status']}; changes {json.dumps(summary.get('changes', {}))}")
        total = sum(t for _, t, _ in timings)
        print(f"{'total':<28} {total:8.2f} s  ({args.people} people, {root})")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _rows(out) -> str:
    if isinstance(out, dict):
        for key in ("rows", "linked", "records"):
            if key in out:
                return f"{key}={out[key]}"
        if "records" in out and isinstance(out["records"], dict):
            return "records=" + ",".join(f"{k}:{v}" for k, v in out["records"].items())
        if "applied" in out:
            return f"applied={out['applied']}"
    return ""


if __name__ == "__main__":
    main()
