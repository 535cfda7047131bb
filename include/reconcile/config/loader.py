"""Load a YAML config file into typed models, collecting every problem with its key path and line."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError, Problem
from .models import Config
from .rules import check_rules


def _construct(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> Any:
    """Turn a composed YAML node into plain Python, remembering the line of every key path."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node)) if not isinstance(key_node, yaml.ScalarNode) else (
                _scalar(key_node)
            )
            key = str(key) if not isinstance(key, str) else key
            if key in out:
                raise ConfigError("", [Problem(_fmt(path + (key,)), "duplicate key", key_node.start_mark.line + 1)])
            out[key] = _construct(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), lines) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    return yaml.SafeLoader(yaml.serialize(node)).get_single_data() if node.tag != "tag:yaml.org,2002:str" else node.value


def _fmt(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(lines: dict[tuple, int], path: tuple) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def parse_config(data: Any, source: str = "<config>", lines: dict[tuple, int] | None = None,
                 path: Path | None = None, check_expressions: bool = True) -> Config:
    """Validate a config given as plain data. Raises ConfigError listing every problem."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the config must be a YAML mapping (key: value)", 1)])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        problems = [Problem(_fmt(loc), msg, _line(lines, loc)) for loc, msg, _ in _schema_errors(e)]
        # One pass lists everything: the cross-field rules also run, on the config without its broken parts.
        problems += [Problem(_fmt(p), m, _line(lines, p)) for p, m in _rules_without_broken_parts(data, e)]
        raise ConfigError(source, problems) from None
    cfg._path = path
    problems = [Problem(_fmt(p), m, _line(lines, p)) for p, m in check_rules(cfg, expressions=check_expressions)]
    if problems:
        raise ConfigError(source, problems)
    cfg._expressions_checked = check_expressions
    cfg._lines = lines
    return cfg


def _schema_errors(e: ValidationError) -> list[tuple[tuple, str, str]]:
    """(key path, message, pydantic error type) of every schema error, in the words docs/configuration.md uses."""
    out = []
    for err in e.errors():
        # pydantic adds union/validator tags to locations; keep only real keys and indexes
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or not str(p).startswith(("function-", "list[", "dict[")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        out.append((loc, msg, err["type"]))
    return out


def _rules_without_broken_parts(data: dict, error: ValidationError, rounds: int = 6) -> list[tuple[tuple, str]]:
    """Cross-field problems of a config that failed schema validation.

    Removes what the schema rejected (an unknown key, a bad value; a mapping left without a required key goes
    whole), validates again, and runs the rules on what remains. Problems inside, or naming, a removed part
    are left out: they would only echo the schema problem. Nothing when a top-level key itself is broken."""
    import copy

    data = copy.deepcopy(data)
    removed: list[tuple] = []
    errors = _schema_errors(error)
    for _ in range(rounds):
        for loc, _msg, kind in errors:
            if kind == "missing":
                loc = loc[:-1]
            if len(loc) < 2:
                return []
            parent = data
            for part in loc[:-1]:
                try:
                    parent = parent[part]
                except (KeyError, IndexError, TypeError):
                    parent = None
                    break
            if isinstance(parent, dict) and loc[-1] in parent:
                del parent[loc[-1]]
                removed.append(loc)
        try:
            cfg = Config.model_validate(data)
        except ValidationError as again:
            errors = _schema_errors(again)
            continue
        named = {f"{p[-1]!r}" for p in removed if isinstance(p[-1], str) and len(p) <= 4}
        return [(p, m) for p, m in check_rules(cfg)
                if not any(p[:len(r)] == r for r in removed) and not any(n in m for n in named)]
    return []


def ensure_expressions_checked(cfg: Config) -> None:
    """Parse eligibility expressions now if the config was loaded without (e.g. at DAG parse time)."""
    if getattr(cfg, "_expressions_checked", True):
        return
    from .rules import check_expressions

    lines = getattr(cfg, "_lines", {}) or {}
    problems = [Problem(_fmt(p), m, _line(lines, p)) for p, m in check_expressions(cfg)]
    if problems:
        raise ConfigError(str(cfg.path), problems)
    cfg._expressions_checked = True


def load_config(path: str | os.PathLike, check_expressions: bool = True) -> Config:
    """Read and validate a config file. Relative paths inside it resolve against its folder.

    `check_expressions=False` skips parsing eligibility expressions (sqlglot is slow to import): for DAG
    files, which parse often; `begin_run` checks them before a run touches anything."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(str(p), [Problem("", "config file not found")])
    text = p.read_text(encoding="utf-8")
    lines: dict[tuple, int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(str(p), [Problem("", f"not valid YAML: {getattr(e, 'problem', e)}",
                                           mark.line + 1 if mark else None)]) from None
    if node is None:
        raise ConfigError(str(p), [Problem("", "the config file is empty", 1)])
    try:
        data = _construct(node, (), lines)
    except ConfigError as e:
        raise ConfigError(str(p), e.problems) from None
    return parse_config(data, source=str(p), lines=lines, path=p.resolve(), check_expressions=check_expressions)
