"""Eligibility expressions: parsed with sqlglot and checked against an allow-list before anything runs.

An eligibility expression is a plain boolean SQL expression over an entity's canonical fields, e.g.
`email is not null and active`. It is evaluated later in DuckDB over golden records, so it must never
smuggle in a subquery, a statement separator or an arbitrary function.
"""
from __future__ import annotations

from collections.abc import Iterable

from functools import lru_cache

ALLOWED_FUNCTIONS = ("lower", "upper", "trim", "coalesce", "length")


@lru_cache(maxsize=1)
def _nodes():
    """(allowed node types, boolean-valued node types). sqlglot is imported lazily: it is slow to import,
    and a DAG file parses the config often."""
    from sqlglot import exp

    allowed = (
        exp.And, exp.Or, exp.Not, exp.Paren, exp.Is, exp.Null, exp.Boolean, exp.Literal, exp.Column,
        exp.Identifier, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ,
        exp.In, exp.Like, exp.ILike, exp.Between, exp.Neg, exp.Tuple,
        # allow-listed functions
        exp.Lower, exp.Upper, exp.Trim, exp.Coalesce, exp.Length,
    )
    predicates = (
        exp.And, exp.Or, exp.Not, exp.Is, exp.Boolean, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE,
        exp.NullSafeEQ, exp.NullSafeNEQ, exp.In, exp.Like, exp.ILike, exp.Between,
    )
    return allowed, predicates


def check_expression(text: str, fields: dict[str, str]) -> list[str]:
    """Return the problems with an eligibility expression ([] when it is fine).

    `fields` maps canonical field name -> type; a bare column at the top must be boolean.
    """
    if not isinstance(text, str) or not text.strip():
        return ["must be a non-empty boolean expression"]
    if ";" in text:
        return ["must be a single expression: ';' is not allowed"]
    import sqlglot
    from sqlglot import exp

    _ALLOWED_NODES, _PREDICATES = _nodes()
    try:
        parsed = [p for p in sqlglot.parse(text, read="duckdb") if p is not None]
    except sqlglot.errors.ParseError as e:
        return [f"cannot be parsed as a SQL expression: {str(e).splitlines()[0]}"]
    if len(parsed) != 1:
        return ["must be exactly one expression"]
    tree = parsed[0]
    problems: list[str] = []
    for node in tree.walk():
        if isinstance(node, (exp.Subquery, exp.Select, exp.Query)):
            problems.append("subqueries are not allowed")
        elif isinstance(node, exp.Func) and not isinstance(node, _ALLOWED_NODES):
            name = node.sql_name() if not isinstance(node, exp.Anonymous) else node.name
            problems.append(
                f"function {name.lower()}() is not allowed; allowed: {', '.join(ALLOWED_FUNCTIONS)}"
            )
        elif not isinstance(node, _ALLOWED_NODES):
            problems.append(f"{type(node).__name__} is not allowed in an eligibility expression")
        elif isinstance(node, exp.Column):
            if node.table:
                problems.append(f"column {node.sql()} must be a bare canonical field name (no table prefix)")
            elif node.name not in fields:
                problems.append(
                    f"unknown field {node.name!r}; known canonical fields: {', '.join(sorted(fields))}"
                )
    if not problems:
        base = tree.this if isinstance(tree, exp.Paren) else tree
        is_bool_col = isinstance(base, exp.Column) and fields.get(base.name) == "boolean"
        if not (isinstance(base, _PREDICATES) or is_bool_col):
            problems.append("must be a boolean expression (a comparison, IS [NOT] NULL, AND/OR/NOT, or a boolean field)")
    return _unique(problems)


def to_duckdb_sql(text: str, column_prefix: str | None = None) -> str:
    """Render a checked expression as DuckDB SQL, optionally qualifying columns with a table alias."""
    import sqlglot
    from sqlglot import exp

    tree = sqlglot.parse_one(text, read="duckdb")
    if column_prefix:
        tree = tree.transform(
            lambda n: exp.column(n.name, table=column_prefix, quoted=True) if isinstance(n, exp.Column) else n
        )
    return tree.sql(dialect="duckdb")


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
