"""The data-flow map (problems found from the config alone) and the CLI's newcomer fixes: --version, check-config
listing schema and cross-field problems in one pass with -c and --json, help text on every option."""
from __future__ import annotations

import argparse
import json

import pytest

from reconcile import __version__
from reconcile.cli import build_parser, main
from reconcile.config import Config, load_config
from reconcile.flow import flow_map, matrix, mermaid
from reconcile.html import flow_body, flow_svg

from ..conftest import BASE_CONFIG

# Two canonical fields mapped to the same physical columns in both systems, owned on opposite sides: crm.x feeds
# marketing.y (as `alpha`) and marketing.y feeds crm.x (as `beta`): a write cycle no single-field rule sees.
CYCLE_CONFIG = """\
version: 1
warehouse: warehouse/reconcile.duckdb
systems:
  crm: {url: sqlite:///crm.db, creates_identity: true}
  marketing: {url: sqlite:///marketing.db}
entities:
  contact:
    sources:
      crm:
        table: contact
        key: id
        fields: {email: mail, alpha: x, beta: x}
      marketing:
        table: contacts
        key: vid
        fields: {email: mail, alpha: y, beta: y}
    fields:
      email: {owner: crm}
      alpha: {owner: crm, send_to: [marketing]}
      beta:  {owner: marketing, send_to: [crm]}
"""


def test_write_cycle_through_shared_columns_is_flagged(write_config):
    fm = flow_map(load_config(write_config(CYCLE_CONFIG)))
    (cycle,) = [p for p in fm.problems if p["kind"] == "write_cycle"]
    assert cycle["severity"] == "error"
    assert cycle["columns"] == ["crm.contact.x", "marketing.contacts.y"]
    assert cycle["fields"] == ["contact.alpha", "contact.beta"]
    assert {p["kind"] for p in fm.problems} == {"write_cycle"}
    assert "linkStyle" in mermaid(fm) and "write cycle" in flow_body(fm)


def test_demo_like_config_flags_a_system_supplying_and_receiving_a_field(write_config):
    fm = flow_map(load_config(write_config(BASE_CONFIG)))
    assert [(p["kind"], p["fields"], p["systems"]) for p in fm.problems] == [
        ("read_and_overwritten", ["phone"], ["crm"])]
    rows = {r["field"]: r["cells"] for r in matrix(fm)}
    assert rows["phone"] == {"crm": "fallback 1, sent to", "marketing": "owner"}
    assert rows["first_name"] == {"crm": "owner", "marketing": "sent to"}
    assert rows["lifecycle"] == {"crm": "owner", "marketing": ""}
    assert {(e["source"], e["target"]): e["fields"] for e in fm.edges} == {
        ("crm", "crm"): ["phone"], ("crm", "marketing"): ["first_name"], ("marketing", "crm"): ["phone"]}


def test_field_sent_to_its_owner_is_flagged_in_a_config_built_in_code(write_config):
    cfg = load_config(write_config(BASE_CONFIG))
    data = cfg.model_dump()
    data["entities"]["contact"]["fields"]["first_name"]["send_to"] = ["crm", "marketing"]
    fm = flow_map(Config.model_validate(data))  # model only: the config rules would reject this file
    assert [(p["kind"], p["systems"]) for p in fm.problems if p["severity"] == "error"] == [
        ("written_into_owner", ["crm"])]


def test_flow_cli_formats(write_config, capsys, tmp_path):
    path = write_config(CYCLE_CONFIG)
    assert main(["flow", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("flowchart LR") and "error: write cycle" in out.err
    assert main(["flow", "-c", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"][0]["kind"] == "write_cycle"
    assert main(["flow", "-c", str(path), "--format", "html", "-o", str(tmp_path / "f.html")]) == 0
    html = (tmp_path / "f.html").read_text()
    assert "Ownership matrix" in html and "http" not in html
    assert flow_svg(flow_map(load_config(path)), standalone=True).startswith('<svg class="flow" xmlns=')


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"reconcile {__version__}"


def test_check_config_lists_schema_and_cross_field_problems_in_one_pass(write_config, capsys):
    text = (BASE_CONFIG.replace("creates_identity: true", "creates_identiti: true")          # schema: unknown key
            .replace("lifecycle:  {owner: crm}", "lifecycle:  {owner: erp}"))                # rule: unknown system
    path = write_config(text)
    assert main(["check-config", "-c", str(path), "--json"]) == 2
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["path"], p["message"][:20]) for p in problems] == [
        ("systems.crm.creates_identiti", "unknown key (check t"),
        ("entities.contact.fields.lifecycle.owner", "'erp' is not a confi")]
    assert all(p["line"] for p in problems)
    assert main(["check-config", "--config", str(path)]) == 2
    assert "2 problem(s)" in capsys.readouterr().err


def test_check_config_json_ok(project, capsys):
    assert main(["check-config", "-c", str(project / "reconcile.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["problems"] == [] and out["systems"] == 2


def test_every_option_has_help():
    missing = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "reconcile")
    assert missing == []
