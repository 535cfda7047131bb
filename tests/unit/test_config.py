"""check-config: a valid config passes; every rejection exits 2 naming its key path (and line)."""
from __future__ import annotations

import json

import pytest

from reconcile.cli import main
from reconcile.config import json_schema, load_config, resolve_url
from reconcile.errors import ConfigError, ReconcileError

from ..conftest import BASE_CONFIG


def check(path, capsys, *extra) -> tuple[int, str]:
    code = main(["check-config", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_valid_config_loads_with_resolved_paths(project, capsys):
    cfg = load_config(project / "reconcile.yaml")
    assert sorted(cfg.systems) == ["crm", "marketing"]
    assert cfg.warehouse_path == (project / "warehouse" / "reconcile.duckdb").resolve()
    assert resolve_url(cfg, "crm") == f"sqlite:///{(project / 'systems' / 'crm.db').resolve()}"
    steps = cfg.entities["contact"].sources["crm"].fields["lifecycle"].steps
    assert [(s.name, s.mapping) for s in steps] == [("map", {"Prospect": "lead", "Customer": "customer"})]
    code, out = check(project / "reconcile.yaml", capsys)
    assert code == 0 and "ok (2 systems, 1 entities, 2 sources)" in out


def test_valid_config_passes_connect_check(project, capsys):
    code, out = check(project / "reconcile.yaml", capsys, "--connect")
    assert code == 0, out
    assert "all reachable" in out


REJECTIONS = [
    # (description, text replacement (old, new), expected key path, expected message fragment)
    ("field without owner", ("email:      {owner: crm}", "email:      {send_to: [marketing]}"),
     "entities.contact.fields.email.owner", "needs exactly one owner"),
    ("owner not a configured system", ("lifecycle:  {owner: crm}", "lifecycle:  {owner: erp}"),
     "entities.contact.fields.lifecycle.owner", "'erp' is not a configured system"),
    ("field sent to its owner", ("first_name: {owner: crm, send_to: [marketing]}", "first_name: {owner: crm, send_to: [crm]}"),
     "entities.contact.fields.first_name.send_to[0]", "never sent to the system that owns it"),
    ("field mapped for a system with no source", ("systems:\n", "systems:\n  erp:\n    url: sqlite:///erp.db\n"),
     None, None),  # placeholder replaced below
    ("unknown transform", ("transform: trim}", "transform: titlecase}"),
     "entities.contact.sources.crm.fields.first_name.transform", "unknown transform 'titlecase'"),
    ("eligibility subquery", ('"email is not null and active"', '"email in (select email from x)"'),
     "entities.contact.eligibility.marketing", "subqueries are not allowed"),
    ("eligibility function outside allow-list", ('"email is not null and active"', '"read_csv(email) is not null"'),
     "entities.contact.eligibility.marketing", "function read_csv() is not allowed"),
    ("eligibility semicolon", ('"email is not null and active"', '"active; drop table golden.contact"'),
     "entities.contact.eligibility.marketing", "';' is not allowed"),
    ("eligibility unknown field", ('"email is not null and active"', '"vip = true"'),
     "entities.contact.eligibility.marketing", "unknown field 'vip'"),
    ("eligibility not boolean", ('"email is not null and active"', '"lower(email)"'),
     "entities.contact.eligibility.marketing", "must be a boolean expression"),
    ("password inline in url", ("url: sqlite:///systems/marketing.db", "url: postgresql://app:s3cret@db.example.com/mkt"),
     "systems.marketing.url", "password is inline"),
    ("unknown key", ("creates_identity: true", "creates_identiti: true"),
     "systems.crm.creates_identiti", "unknown key"),
    ("canonical field not declared", ("first_name: firstname", "nickname: firstname"),
     "entities.contact.sources.marketing.fields.nickname", "not a canonical field"),
    ("bad schedule", ('schedule: "0 2 * * *"', 'schedule: "every night"'), "schedule", "cron"),
    ("send_to a query source", ("        table: contacts\n", "        query: select * from contacts\n"),
     "entities.contact.fields.first_name.send_to[0]", "reconcile writes only to a 'table'"),
    ("unknown phone region", ("transform: phone}", "transform: {phone: {region: XX}}}"),
     "entities.contact.sources.crm.fields.phone.transform", "unknown phone region 'XX'"),
]
REJECTIONS[3] = (
    "owner/send_to system with no source for the entity",
    ("phone:      {owner: marketing, fallback: [crm], send_to: [crm]}",
     "phone:      {owner: marketing, fallback: [crm], send_to: [crm, erp]}"),
    "entities.contact.fields.phone.send_to[1]", "'erp' is not a configured system",
)


@pytest.mark.parametrize("desc,replace,key_path,fragment", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejection_exits_2_with_key_path(desc, replace, key_path, fragment, write_config, capsys):
    old, new = replace
    assert old in BASE_CONFIG, f"test setup: {old!r} not in the base config"
    path = write_config(BASE_CONFIG.replace(old, new, 1))
    code, out = check(path, capsys)
    assert code == 2, out
    assert key_path in out, out
    assert fragment in out, out
    assert "(line " in out, out


def test_system_without_source_for_entity_is_named(write_config, capsys):
    text = BASE_CONFIG.replace("systems:\n", "systems:\n  erp:\n    url: sqlite:///systems/erp.db\n", 1)
    text = text.replace("phone:      {owner: marketing, fallback: [crm], send_to: [crm]}",
                        "phone:      {owner: marketing, fallback: [crm, erp], send_to: [crm]}")
    code, out = check(write_config(text), capsys)
    assert code == 2
    assert "entities.contact.fields.phone.fallback[1]" in out
    assert "system 'erp' has no source for entity 'contact'" in out


def test_every_problem_is_reported_not_just_the_first(write_config, capsys):
    text = (BASE_CONFIG.replace("email:      {owner: crm}", "email:      {}")
            .replace("transform: trim}", "transform: nope}")
            .replace("url: sqlite:///systems/marketing.db", "url: mysql://u:pw@h/db"))
    code, out = check(write_config(text), capsys)
    assert code == 2
    assert "3 problem(s)" in out
    for path in ("entities.contact.fields.email.owner", "transform", "systems.marketing.url"):
        assert path in out


def test_line_numbers_point_at_the_key(write_config):
    text = BASE_CONFIG.replace("lifecycle:  {owner: crm}", "lifecycle:  {owner: nowhere}")
    path = write_config(text)
    expected_line = text.splitlines().index("      lifecycle:  {owner: nowhere}") + 1
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (problem,) = exc.value.problems
    assert problem.path == "entities.contact.fields.lifecycle.owner"
    assert problem.line == expected_line


def test_connect_reports_missing_table_and_column(project, capsys):
    import sqlite3

    con = sqlite3.connect(project / "systems" / "marketing.db")
    con.execute("ALTER TABLE contacts RENAME COLUMN phone TO mobile")
    con.commit()
    con.close()
    text = BASE_CONFIG.replace("table: contact\n", "table: contact_typo\n", 1)
    (project / "reconcile.yaml").write_text(text)
    code, out = check(project / "reconcile.yaml", capsys, "--connect")
    assert code == 2
    assert "entities.contact.sources.crm" in out and "table 'contact_typo' does not exist" in out
    assert "entities.contact.sources.marketing: column 'phone' does not exist" in out


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    code, out = check(tmp_path / "nope.yaml", capsys)
    assert code == 2 and "config file not found" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsystems: [unclosed\n")
    code, out = check(bad, capsys)
    assert code == 2 and "not valid YAML" in out


def test_url_env_and_airflow_connection_resolution(write_config, monkeypatch):
    text = (BASE_CONFIG.replace("url: sqlite:///systems/crm.db", "url_env: CRM_DB_URL")
            .replace("url: sqlite:///systems/marketing.db", "connection: marketing_db"))
    cfg = load_config(write_config(text))
    monkeypatch.delenv("CRM_DB_URL", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MARKETING_DB", raising=False)
    with pytest.raises(ReconcileError, match="CRM_DB_URL"):
        resolve_url(cfg, "crm")
    with pytest.raises(ReconcileError, match="AIRFLOW_CONN_MARKETING_DB"):
        resolve_url(cfg, "marketing")
    monkeypatch.setenv("CRM_DB_URL", "postgres://reader@db/crm")  # how Airflow renders a postgres connection
    monkeypatch.setenv("AIRFLOW_CONN_MARKETING_DB", "mysql+pymysql://u:p@h/m")
    assert resolve_url(cfg, "crm") == "postgresql+psycopg2://reader@db/crm"
    assert resolve_url(cfg, "marketing") == "mysql+pymysql://u:p@h/m"
    assert resolve_url(cfg, "crm", overrides={"crm": "sqlite:///x.db"}).endswith("/x.db")


def test_json_schema_describes_the_top_level_keys():
    schema = json_schema()
    assert {"version", "warehouse", "schedule", "systems", "entities"} <= set(schema["properties"])
    assert set(schema["required"]) == {"version", "warehouse", "systems", "entities"}
    json.dumps(schema)


def test_fast_load_defers_expression_checks_to_begin_run(write_config, tmp_path):
    from datetime import datetime

    from reconcile import runner

    path = write_config(BASE_CONFIG.replace('"email is not null and active"', '"nope(email)"'))
    cfg = load_config(path, check_expressions=False)  # what a DAG file does at parse time
    with pytest.raises(ConfigError) as exc:
        runner.begin_run(cfg, "contact", "r1", datetime(2026, 1, 1))
    assert "entities.contact.eligibility.marketing" in str(exc.value) and "nope()" in str(exc.value)
    assert not (tmp_path / "warehouse").exists()  # nothing was touched
