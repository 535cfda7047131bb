"""`make bench`: time every stage of reconcile nights on a generated demo of N people (default 20,000).

Usage: python scripts/bench.py [--people N] [--seed S] [--keep DIR [--reuse]] [--change-share F] [--identity]
   or: make bench BENCH_ARGS="--people 1000000 --keep /tmp/bench1m --reuse"
`--keep DIR --reuse` generates the systems once (a pristine copy stays in DIR/systems.pristine) and later
runs start from that copy with an empty warehouse, which saves minutes at a million people.

Four nights on the generated systems, in one process, every stage in order as the runner calls them:
- `full`: the first night, everything is new (extract, gates, identity, golden, plan, load);
- `settle`: our own writes of the first night come back as echoes and converge;
- `quiet`: nothing changed in any system;
- `changed`: a share F of the CRM contacts (default 1%) had their first name edited.
The demo's config gets `extract: {overlap_minutes: 0}` (generated rows all carry the generation time, so
an overlap would re-read them every night). Prints one line per stage and night (seconds, rows), then a
table of seconds per stage and night with each night's peak RSS, and the ratios quiet/full and
changed/full, then each warehouse stage of the full night against the join floor (a plain DuckDB join of
every staged record to its xid over the same tables). Figures are in docs/operations.md (sizing).

With --identity (`make bench BENCH_ARGS="--identity --people 100000"`): identity resolution only, measured
against the demo's answer key (pairwise precision of automatic links; their recall over all same-person
pairs, with the ceiling that never merging two records of one system automatically allows, and over the
pairs of two different systems only; review items as a share of records, resolve_identity seconds and
peak memory, pairs scored on a second night with 1% of records changed) and, on the same staged records, Splink's own default model (figures in docs/identity.md).
Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from reconcile import runner
from reconcile.config import load_config
from reconcile.demo import init_demo

NIGHTS = ("full", "settle", "quiet", "changed")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so each night has its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def edit_crm(root: Path, share: float) -> int:
    """A share of the CRM contacts get a new first name (the demo's trigger stamps modifiedon)."""
    con = sqlite3.connect(root / "systems" / "crm.db")
    try:
        step = max(1, round(1 / share))
        with con:
            n = con.execute(f"UPDATE contact SET firstname = coalesce(firstname, '') || 'e' "
                            f"WHERE rowid % {step} = 0").rowcount
    finally:
        con.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--change-share", type=float, default=0.01, help="share of CRM contacts edited (changed night)")
    ap.add_argument("--keep", help="generate into this folder and keep it (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: start from the systems generated before")
    ap.add_argument("--identity", action="store_true", help="identity quality and cost, with Splink's default model")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    if args.identity:
        try:
            identity_bench(root, args.people, args.seed)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return
    seconds: dict[str, dict[str, float]] = {n: {} for n in NIGHTS}
    peaks: dict[str, float] = {}
    night = "setup"

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        took = time.perf_counter() - t0
        if night in seconds:
            seconds[night][name] = seconds[night].get(name, 0.0) + took
        print(f"{name:<28} {took:8.2f} s  {_rows(out)}", flush=True)
        return out

    try:
        pristine = root / "systems.pristine"
        if args.reuse and args.keep and pristine.is_dir():
            shutil.rmtree(root / "systems", ignore_errors=True)
            shutil.copytree(pristine, root / "systems")
        else:
            timed("demo init", init_demo, root, people=args.people, seed=args.seed, force=True)
            if args.keep:
                shutil.rmtree(pristine, ignore_errors=True)
                shutil.copytree(root / "systems", pristine)
        config = root / "reconcile.yaml"
        text = config.read_text()
        if "overlap_minutes" not in text:
            # Every generated row carries the wall-clock time of generation (or of our writes), so the default
            # hour of overlap would re-read them all each night: read only rows after the watermark.
            config.write_text(text.replace("\nload:", "\nextract: {overlap_minutes: 0}\nload:", 1))
        cfg = load_config(config)
        for stale in (cfg.state_dir, cfg.warehouse_path.parent):
            shutil.rmtree(stale, ignore_errors=True)  # every bench starts from an empty warehouse
        for i, night in enumerate(NIGHTS, start=1):
            if night == "changed":
                print(f"edited {edit_crm(root, args.change_share)} CRM contacts")
            run_id, run_at = f"bench{i}", datetime(2026, 2, 1) + timedelta(days=i)
            print(f"-- night {i}: {night}")
            _reset_peak_rss()
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
            peaks[night] = _peak_rss_mb()
            print(f"   status {summary['status']}; changes {json.dumps(summary.get('changes', {}))}; "
                  f"peak RSS {peaks[night]:.0f} MB")
            if night == "full":
                floor = _join_floor(cfg, "contact")
                print(f"join floor                   {floor:8.2f} s  (every staged record joined to its xid)")
        _table(seconds, peaks, args.people)
        _against_floor(seconds["full"], floor)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _table(seconds: dict[str, dict[str, float]], peaks: dict[str, float], people: int) -> None:
    stages = list(dict.fromkeys(s for n in NIGHTS for s in seconds[n]))
    print(f"\n{'stage (seconds)':<28}" + "".join(f"{n:>10}" for n in NIGHTS))
    for s in stages:
        print(f"{s:<28}" + "".join(f"{seconds[n].get(s, 0.0):10.2f}" for n in NIGHTS))
    totals = {n: sum(seconds[n].values()) for n in NIGHTS}
    print(f"{'total':<28}" + "".join(f"{totals[n]:10.2f}" for n in NIGHTS))
    print(f"{'peak RSS (MB)':<28}" + "".join(f"{peaks.get(n, 0):10.0f}" for n in NIGHTS))
    full = totals["full"] or 1.0
    print(f"ratios ({people} people): quiet/full {totals['quiet'] / full:.1%}, changed/full {totals['changed'] / full:.1%}")


# The issue-11 yardstick: stages other than extract and load should cost within 10x of a plain DuckDB join over
# the same tables. The join: every staged record of every system joined to its xid, materialised.
FLOOR_STAGES = ("load_staging", "validate", "resolve_identity", "build_golden", "plan_changes")


def _join_floor(cfg, entity: str) -> float:
    from reconcile.warehouse import open_work, staging_table

    with open_work(cfg) as con:
        union = " UNION ALL BY NAME ".join(f"SELECT '{s}' AS system, * FROM {staging_table(s, entity)}"
                                   for s in cfg.entities[entity].sources)
        t0 = time.perf_counter()
        con.execute(f"""CREATE TEMP TABLE _floor AS SELECT s.*, x.xid FROM ({union}) s
                        JOIN identity.xref x ON x.entity = ? AND x.system = s.system AND x.record_key = s._record_key""",
                    [entity])
        took = time.perf_counter() - t0
        con.execute("DROP TABLE _floor")
    return took


def _against_floor(full: dict[str, float], floor: float) -> None:
    print(f"\nfull night against the join floor ({floor:.2f} s; target: each stage within 10x)")
    for stage in FLOOR_STAGES:
        took = sum(v for k, v in full.items() if k == stage or k.startswith(stage + " "))
        ratio = took / floor if floor else float("inf")
        print(f"{stage:<28}{took:10.2f} s {ratio:8.1f}x  {'ok' if ratio <= 10 else 'over'}")


def _rows(out) -> str:
    if isinstance(out, dict):
        if "xids_planned" in out:  # the plan: how many xids it looked at, and whether incremental
            return f"xids={out['xids_planned']} ({out['mode']})"
        for key in ("rows", "linked", "records"):
            if key in out and not isinstance(out[key], dict):
                return f"{key}={out[key]}"
        if isinstance(out.get("records"), dict):
            return "records=" + ",".join(f"{k}:{v}" for k, v in out["records"].items())
        if "applied" in out:
            return f"applied={out['applied']}"
        if "metrics" in out:
            return f"validated={out['metrics'].get('rows_validated')} ({out['metrics'].get('validation')})"
    return ""


# -- identity ---------------------------------------------------------------------------------------------

PAIRS_SQL = """
    WITH ak AS (SELECT a.* FROM read_csv('{key}', all_varchar = true) a SEMI JOIN recs r USING (system, record_key)),
         l AS (SELECT c.cluster, c.system, c.record_key, ak.person_id FROM ({clusters}) c JOIN ak USING (system, record_key)),
         linked AS (SELECT a.person_id = b.person_id AS same, a.system <> b.system AS cross_system FROM l a JOIN l b
                    ON a.cluster = b.cluster AND (a.system, a.record_key) < (b.system, b.record_key)),
         truth AS (SELECT count(*) AS n, count(*) FILTER (WHERE a.system <> b.system) AS n_cross FROM ak a JOIN ak b
                   ON a.person_id = b.person_id AND (a.system, a.record_key) < (b.system, b.record_key))
    SELECT count(*) FILTER (WHERE same), count(*) FILTER (WHERE NOT same), (SELECT n FROM truth),
           count(*) FILTER (WHERE same AND cross_system), (SELECT n_cross FROM truth) FROM linked
"""


def _precision_recall(con, key: Path, clusters_sql: str) -> tuple[float, float, float, int]:
    """Pairwise precision, recall over all the answer key's same-person pairs, recall over its pairs of two
    different systems only (what automatic links may reach: records of one system are never put on one xid
    automatically), wrong pairs."""
    true, false, all_pairs, true_cross, all_cross = con.execute(
        PAIRS_SQL.format(key=key, clusters=clusters_sql)).fetchall()[0]
    return ((true / (true + false) if true + false else 1.0), (true / all_pairs if all_pairs else 1.0),
            (true_cross / all_cross if all_cross else 1.0), false)


# The best recall automatic links can have when two records of one system are never put on one xid
# automatically (people entered twice wait for a steward): per person, one record per system linked. Over
# all same-person pairs, and over the pairs of two systems (a second CRM record's pairs are lost too).
CEILING_SQL = """
    WITH ak AS (SELECT a.* FROM read_csv('{key}', all_varchar = true) a SEMI JOIN recs r USING (system, record_key)),
         per_system AS (SELECT person_id, system, count(*) AS c FROM ak GROUP BY ALL),
         p AS (SELECT sum(c) AS n, count(*) AS s, sum(c * c) AS sq FROM per_system GROUP BY person_id)
    SELECT sum(s * (s - 1) / 2) / sum(n * (n - 1) / 2), sum(s * (s - 1) / 2) / sum((n * n - sq) / 2) FROM p
"""

# Records left without an xid must each wait in an open identity item about them, or be listed as waiting
# on an open duplicate item: a record that is in none is lost (the v1 bug: at 300k people, orphan items
# were created and resolved in the same run).
LOST_SQL = """
    WITH waiting AS (
        SELECT w.system, w.record_key FROM (
            SELECT unnest(from_json(details->'$.waiting', '[{"system": "VARCHAR", "record_key": "VARCHAR"}]')) AS w
            FROM review.items WHERE entity = 'contact' AND status = 'open' AND kind = 'duplicate'))
    SELECT count(*) FROM recs r
    ANTI JOIN identity.xref x ON x.entity = 'contact' AND x.system = r.system AND x.record_key = r.record_key
    ANTI JOIN (SELECT system, details->>'record_key' AS record_key FROM review.items
               WHERE entity = 'contact' AND status = 'open' AND kind IN ('candidate', 'orphan', 'conflict')) i
         ON i.system = r.system AND i.record_key = r.record_key
    ANTI JOIN waiting w ON w.system = r.system AND w.record_key = r.record_key
"""


def identity_bench(root: Path, people: int, seed: int) -> None:
    import duckdb

    from reconcile.warehouse import open_work

    init_demo(root, people=people, seed=seed, force=True)
    cfg = load_config(root / "reconcile.yaml")
    for stale in (cfg.state_dir, cfg.warehouse_path.parent):
        shutil.rmtree(stale, ignore_errors=True)  # a kept folder's warehouse holds another run's links
    key = root / "answer_key.csv"

    def stage_to_identity(run_id: str, run_at: datetime) -> tuple[dict, float]:
        manifest = runner.begin_run(cfg, "contact", run_id, run_at)
        for s in sorted(manifest["systems"]):
            runner.extract_system(cfg, "contact", s, run_id)
        runner.load_staging(cfg, "contact", run_id)
        for s in sorted(manifest["systems"]):
            runner.validate_system(cfg, "contact", s, run_id)
        runner.apply_gates(cfg, "contact", run_id)
        _reset_peak_rss()
        t0 = time.perf_counter()
        result = runner.resolve_identity(cfg, "contact", run_id)
        return result, time.perf_counter() - t0

    result, seconds = stage_to_identity("bench1", datetime(2026, 2, 2))
    peak_mb = _peak_rss_mb()
    with open_work(cfg) as con:
        con.execute("CREATE OR REPLACE TEMP TABLE recs AS " + " UNION ALL ".join(
            f"SELECT '{s}' AS system, CAST(_record_key AS VARCHAR) AS record_key FROM staging.{s}__contact"
            for s in ("crm", "marketing", "erp")))
        records = con.execute("SELECT count(*) FROM recs").fetchone()[0]
        p, r, r_cross, false = _precision_recall(
            con, key, "SELECT xid AS cluster, system, record_key FROM identity.xref WHERE entity = 'contact'")
        open_items = con.execute("SELECT count(*) FROM review.items WHERE status = 'open' AND kind IN "
                                 "('candidate', 'orphan', 'duplicate', 'conflict')").fetchone()[0]
        ceiling, ceiling_cross = con.execute(CEILING_SQL.format(key=key)).fetchall()[0]
        lost = con.execute(LOST_SQL).fetchone()[0]
        staged = {s: con.execute(f"SELECT * FROM staging.{s}__contact").to_arrow_table()
                  for s in ("crm", "marketing", "erp")}
    print(f"identity, {people} people, {records} records (night 1)")
    print(f"  reconcile  precision {p:.5f}  recall {r:.4f} (ceiling {ceiling:.4f}), cross-system {r_cross:.4f} "
          f"(ceiling {ceiling_cross:.4f})  "
          f"wrong pairs {false}  review items {open_items} "
          f"({open_items / records:.2%} of records)  resolve_identity {seconds:.1f} s  peak RSS {peak_mb:.0f} MB")
    print(f"             {json.dumps({k: result[k] for k in ('auto_links', 'review_band', 'minted', 'pairs_scored')})}")
    print(f"             unlinked records {result['unlinked_records']}, of them without an open item (lost) {lost}")

    # Night 2: 1% of CRM contacts renamed, 0.5% new marketing sign-ups: only those are scored.
    import sqlite3

    crm = sqlite3.connect(root / "systems" / "crm.db")
    with crm:
        crm.execute("UPDATE contact SET lastname = lastname || 'x', modifiedon = '2026-01-15 10:00:00' "
                    "WHERE rowid % 100 = 0")
    crm.close()
    result2, seconds2 = stage_to_identity("bench2", datetime(2026, 2, 3))
    print(f"  night 2 (1% of CRM contacts changed): resolve_identity {seconds2:.1f} s, "
          f"pairs scored {result2['pairs_scored']} (night 1: {result['pairs_scored']})")

    _reset_peak_rss()
    t0 = time.perf_counter()
    clusters = _splink_default(staged)
    splink_seconds = time.perf_counter() - t0
    splink_peak_mb = _peak_rss_mb()
    scon = duckdb.connect()
    scon.register("recs_arrow", con_recs := _recs_table(staged))
    scon.execute("CREATE TABLE recs AS SELECT * FROM recs_arrow")
    scon.register("clusters", clusters)
    sp, sr, sr_cross, sfalse = _precision_recall(scon, key, "SELECT cluster, system, record_key FROM clusters")
    print(f"  splink     precision {sp:.5f}  recall {sr:.4f}, cross-system {sr_cross:.4f}  wrong pairs {sfalse}  "
          f"training + prediction + "
          f"clustering {splink_seconds:.1f} s, peak RSS {splink_peak_mb:.0f} MB (default model, threshold 0.999; "
          f"{con_recs.num_rows} records)")


def _recs_table(staged: dict):
    import pyarrow as pa

    return pa.concat_tables([pa.table({"system": [s] * t.num_rows,
                                       "record_key": t.column("_record_key").cast(pa.string())})
                             for s, t in staged.items()])


def _splink_default(staged: dict):
    """Splink 5 as a new user would set it up: one table per system, link_only, the usual comparisons."""
    import logging

    import duckdb
    import pyarrow as pa
    import pyarrow.compute as pc
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    con = duckdb.connect(config={"memory_limit": "25%"})  # the same budget as reconcile's own databases
    db = DuckDBAPI(connection=con)
    frames = []
    for s, t in staged.items():
        cols = {"unique_id": t.column("_record_key").cast(pa.string())}
        for f in ("email", "first_name", "last_name", "phone", "company"):
            col = t.column(f).cast(pa.string()) if f in t.column_names else pa.nulls(t.num_rows, pa.string())
            cols[f] = pc.utf8_lower(col)
        frames.append(db.register(pa.table(cols), dataset_display_name=s))
    settings = SettingsCreator(
        link_type="link_only",
        comparisons=[cl.EmailComparison("email"), cl.NameComparison("first_name"), cl.NameComparison("last_name"),
                     cl.ExactMatch("phone").configure(term_frequency_adjustments=True),
                     cl.JaroWinklerAtThresholds("company")],
        blocking_rules_to_generate_predictions=[block_on("email"), block_on("phone"),
                                                block_on("first_name", "last_name"), block_on("last_name", "company")],
        retain_intermediate_calculation_columns=False, retain_matching_columns=False)
    linker = Linker(frames, settings, log_level=logging.ERROR)
    linker.training.estimate_probability_two_random_records_match([block_on("email")], recall=0.7)
    linker.training.estimate_u_using_random_sampling(max_pairs=2e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("email"))
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("first_name", "last_name"))
    pred = linker.inference.predict(threshold_match_probability=0.5)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(pred, 0.999)
    rel = clusters.as_duckdbpyrelation()
    return rel.select("cluster_id AS cluster, source_dataset AS system, CAST(unique_id AS VARCHAR) AS record_key") \
        .to_arrow_table()


if __name__ == "__main__":
    main()
