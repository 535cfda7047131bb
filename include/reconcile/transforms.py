"""Canonicalising transforms as DuckDB SQL: one place, used by extraction (and later by planning).

Every transform maps a VARCHAR expression to a VARCHAR expression, so steps chain. Blanks become NULL,
which is what lets later stages say "a blank never wins over a value". `phone` is the one step that needs
a library (phonenumbers): it runs as a vectorised DuckDB UDF, registered by `register_functions`. Parsing
costs ~65 us a value in Python (a minute per million distinct numbers), so for a US or Canadian region the
plain North American forms (`(415) 555-0134`, `+1 415-555-0134`, `415.555.0134`, ...) are rewritten in SQL,
giving exactly what phonenumbers gives them (tests/unit/test_transforms.py compares the two), and only the
other values reach the library.
"""
from __future__ import annotations

from functools import lru_cache

from .config.models import TransformStep

EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
PHONE_UDF = "reconcile_phone_e164"
# Regions whose numbers are North American (+1, ten digits): a plain number, with or without its +1 or 1
# prefix, in the usual separators. Area code and exchange start with 2-9; anything else goes to the library.
NANP_REGIONS = frozenset({"US", "CA"})
NANP_PATTERN = r"^(\+1|1)?[ .-]?\(?([2-9][0-9]{2})\)?[ .-]?([2-9][0-9]{2})[ .-]?([0-9]{4})$"


def staged_text(value: object) -> str:
    """The text a scalar from the config is staged as: booleans as 'true'/'false', anything else as str()."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def sql_literal(value: object) -> str:
    """A SQL literal for a scalar from the config (strings quoted, booleans as text 'true'/'false')."""
    if value is None:
        return "NULL"
    return "'" + staged_text(value).replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def apply_steps(expr: str, steps: list[TransformStep], default_region: str) -> str:
    """Wrap a VARCHAR SQL expression in the transform steps, in order."""
    for step in steps:
        if step.name == "email":
            expr = f"nullif(lower(trim({expr})), '')"
        elif step.name == "trim":
            expr = f"nullif(trim({expr}), '')"
        elif step.name == "lower":
            expr = f"lower({expr})"
        elif step.name == "upper":
            expr = f"upper({expr})"
        elif step.name == "phone":
            expr = _phone_sql(expr, step.region or default_region)
        elif step.name == "map":
            # Values the map does not name pass through unchanged: a gate reports them, nothing is lost.
            whens = " ".join(f"WHEN {sql_literal(k)} THEN {sql_literal(v)}" for k, v in sorted(step.mapping.items()))
            expr = f"(CASE CAST({expr} AS VARCHAR) {whens} ELSE CAST({expr} AS VARCHAR) END)"
        else:  # pragma: no cover - the config rules reject unknown names first
            raise ValueError(f"unknown transform {step.name!r}")
    return expr


def _phone_sql(expr: str, region: str) -> str:
    call = f"{PHONE_UDF}({expr}, {sql_literal(region)})"
    if region not in NANP_REGIONS:
        return call
    pattern = sql_literal(NANP_PATTERN)
    return (f"(CASE WHEN regexp_full_match(trim({expr}), {pattern}) "
            f"THEN '+1' || regexp_replace(trim({expr}), {pattern}, '\\2\\3\\4') ELSE {call} END)")


@lru_cache(maxsize=200_000)
def phone_e164(value: str | None, region: str) -> str | None:
    """E.164 for a phone number, or the trimmed input when it cannot be parsed (never dropped)."""
    import phonenumbers

    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    candidate = "+" + text[2:].lstrip() if text.startswith("00") else text
    try:
        num = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return text
    if not phonenumbers.is_possible_number(num):
        return text
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def register_functions(con) -> None:
    """Register the UDFs transforms need on a DuckDB connection (idempotent)."""
    import duckdb
    import pyarrow as pa

    def _phone(values, regions):  # pyarrow arrays in, pyarrow array out
        vals = values.to_pylist()
        regs = regions.to_pylist()
        return pa.array([phone_e164(v, r or "US") for v, r in zip(vals, regs)], type=pa.string())

    try:
        con.create_function(PHONE_UDF, _phone, [duckdb.sqltype("VARCHAR"), duckdb.sqltype("VARCHAR")],
                            duckdb.sqltype("VARCHAR"), type="arrow", null_handling="special")
    except duckdb.CatalogException:
        pass  # already registered on this connection
