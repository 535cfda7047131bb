"""Transforms: exact canonical values in DuckDB for each transform and for chains."""
from __future__ import annotations

import duckdb
import pytest

from reconcile.config.models import _parse_transform
from reconcile.transforms import NANP_PATTERN, apply_steps, phone_e164, register_functions


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect()
    register_functions(c)
    yield c
    c.close()


def canon(con, spec, values, region="US"):
    expr = apply_steps("v", _parse_transform(spec), region)
    table = "(VALUES " + ", ".join("(NULL)" if v is None else f"('{v}')" for v in values) + ") t(v)"
    return [r[0] for r in con.execute(f"SELECT {expr} FROM {table}").fetchall()]


def test_email_trims_and_lowercases_and_blanks_become_null(con):
    assert canon(con, "email", [" Anna.Berg@Example.COM ", "", "  ", None]) == ["anna.berg@example.com", None, None, None]


def test_phone_formats_become_e164(con):
    assert canon(con, "phone", ["+1 415-555-0134", "(415) 555 0134", "4155550134", "001 415 555 0134"]) == ["+14155550134"] * 4
    assert canon(con, "phone", ["+44 20 7946 0018", "020 7946 0018"], region="GB") == ["+442079460018"] * 2
    assert canon(con, {"phone": {"region": "GB"}}, ["020 7946 0018"]) == ["+442079460018"]


def test_unparseable_phone_is_kept_not_dropped():
    assert phone_e164(" call me ", "US") == "call me"
    assert phone_e164("", "US") is None


def test_trim_lower_upper_and_chains(con):
    assert canon(con, "trim", ["  a b  ", ""]) == ["a b", None]
    assert canon(con, "lower", ["AbC"]) == ["abc"]
    assert canon(con, "upper", ["AbC"]) == ["ABC"]
    assert canon(con, ["trim", "upper"], ["  x "]) == ["X"]


def test_map_translates_known_values_and_passes_unknown_through(con):
    spec = {"map": {"Prospect": "lead", "Customer": "customer"}}
    assert canon(con, spec, ["Prospect", "Customer", "Partner", None]) == ["lead", "customer", "Partner", None]
    assert canon(con, {"map": {"0": True, "1": False}}, ["0", "1"]) == ["true", "false"]


@pytest.mark.parametrize("bad", ["titlecase", {"map": {}}, {"phone": {"country": "US"}}, {"a": 1, "b": 2}, 3])
def test_bad_transform_specs_raise(bad):
    with pytest.raises(ValueError):
        _parse_transform(bad)


def _phone_variants() -> list[str]:
    """North American numbers in every form the SQL fast path takes, and near misses it must leave to the
    library (exchange or area code starting 0/1, too few or many digits, letters, other countries)."""
    import random

    rnd = random.Random(11)
    out = []
    for _ in range(3000):
        area = f"{rnd.randint(0, 9)}{rnd.randint(0, 99):02}"
        exch = f"{rnd.randint(0, 9)}{rnd.randint(0, 99):02}"
        line = f"{rnd.randint(0, 9999):04}"
        prefix = rnd.choice(["", "", "+1", "1", "+1 ", "1-", "+1.", "+", "01", "001 "])
        sep = rnd.choice(["", " ", "-", ".", "  ", "/"])
        a = rnd.choice([area, f"({area})", f"({area}", f"{area})"])
        tail = rnd.choice(["", "", " ", " x12", "5"])
        out.append(f"{rnd.choice(['', ' '])}{prefix}{a}{sep}{exch}{rnd.choice([sep, '-'])}{line}{tail}")
    return out + ["+44 20 7946 0018", "call me", "555-0134", "+1 415-555-013", "14155550134", "1 (415) 555-0134"]


@pytest.mark.parametrize("region", ["US", "CA", "GB"])
def test_phone_sql_fast_path_gives_exactly_what_the_library_gives(con, region):
    values = _phone_variants()
    expr = apply_steps("v", _parse_transform("phone"), region)
    got = [r[0] for r in con.execute(f"SELECT {expr} FROM unnest(?) t(v)", [values]).fetchall()]
    want = [phone_e164(v, region) for v in values]
    assert [(v, g) for v, g, w in zip(values, got, want) if g != w] == []
    if region != "GB":  # the fast path really takes most of them: only the others reach the UDF
        assert "regexp_full_match" in expr
        fast = con.execute(f"SELECT count(*) FROM unnest(?) t(v) WHERE regexp_full_match(trim(v), "
                           f"'{NANP_PATTERN}')", [values]).fetchone()[0]
        assert fast > 300
