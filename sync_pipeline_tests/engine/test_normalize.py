"""Canonical values: the SQL both mirrors use, and the conversion back to each API's wire types."""

from __future__ import annotations

from typing import Any

import duckdb
import pytest

from sync_pipeline.config.model import FieldMap
from sync_pipeline.engine import normalize

PICK = FieldMap(
    marketo="leadRating",
    dynamics="leadqualitycode",
    transform="picklist",
    options={1: "Hot", 2: "Warm", 3: "Cold"},
)


def fm(transform: str) -> FieldMap:
    return FieldMap(
        marketo="x", dynamics="x", transform=transform, target="account" if transform == "lookup" else None
    )


def canon(expr: str, values: list[Any], sql_type: str) -> list[str | None]:
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t (i INTEGER, v {sql_type})")
    con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values)))
    return [r[0] for r in con.execute(f"SELECT {expr} FROM t ORDER BY i").fetchall()]


def test_booleans_from_both_sides_become_true_false_or_unset() -> None:
    # Issue 9: an unset boolean is unset, not "false" (an opt-out column nobody filled in is no opt-in).
    assert canon(normalize.dynamics_expr(fm("boolean"), "v"), [True, False, None], "BOOLEAN") == [
        "true",
        "false",
        None,
    ]
    assert canon(
        normalize.marketo_expr(fm("boolean"), "v"),
        ["true", "1", "yes", "TRUE", "false", "0", "", None],
        "VARCHAR",
    ) == ["true", "true", "true", "true", "false", "false", None, None]


def test_numbers_drop_trailing_zeros_on_both_sides() -> None:
    assert canon(
        normalize.dynamics_expr(fm("number"), "v"), [12.5, 12.0, 1234567.891, 0.0, None], "DOUBLE"
    ) == ["12.5", "12", "1234567.891", "0", None]
    assert canon(normalize.marketo_expr(fm("number"), "v"), ["12.50", " 12 ", "", None], "VARCHAR") == [
        "12.5",
        "12",
        None,
        None,
    ]
    assert canon(normalize.marketo_expr(fm("integer"), "v"), ["42", "42.0", "x", None], "VARCHAR") == [
        "42",
        "42",
        None,
        None,
    ]


def test_datetimes_with_offsets_become_utc_z() -> None:
    values = ["2026-08-01T12:00:00+02:00", "2026-08-01T10:00:00Z", "2026-08-01T05:30:00-04:30", None]
    expected = ["2026-08-01T10:00:00Z", "2026-08-01T10:00:00Z", "2026-08-01T10:00:00Z", None]
    assert canon(normalize.dynamics_expr(fm("datetime"), "v"), values, "VARCHAR") == expected
    assert canon(normalize.marketo_expr(fm("datetime"), "v"), values, "VARCHAR") == expected
    # A UserLocal date is the UTC date of the instant; a DateOnly date (the default) is the date as written.
    user_local = FieldMap(marketo="x", dynamics="x", transform="date", date_time_behavior="user_local")
    assert canon(
        normalize.dynamics_expr(user_local, "v"),
        ["2026-08-01T00:00:00Z", "2026-08-01T23:30:00-02:00"],
        "VARCHAR",
    ) == ["2026-08-01", "2026-08-02"]
    assert canon(
        normalize.dynamics_expr(fm("date"), "v"), ["2026-08-01T00:00:00Z", "2026-08-01", None], "VARCHAR"
    ) == ["2026-08-01", "2026-08-01", None]


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "America/Los_Angeles", "UTC"])
def test_canonical_times_do_not_depend_on_the_session_time_zone(tz: str) -> None:
    """DuckDB reads a string without an offset in the session's (by default the host's) time zone; no
    canonical form may depend on it (issue 9)."""
    con = duckdb.connect()
    con.execute(f"SET TimeZone = '{tz}'")
    tzi = FieldMap(
        marketo="x", dynamics="x", transform="datetime", date_time_behavior="time_zone_independent"
    )
    cases = [
        (fm("date"), "2026-08-03", "2026-08-03"),
        (fm("date"), "2026-08-03T00:00:00Z", "2026-08-03"),
        (fm("datetime"), "2026-08-03T10:00:00", "2026-08-03T10:00:00Z"),
        (fm("datetime"), "2026-08-03T10:00:00+05:30", "2026-08-03T04:30:00Z"),
        (tzi, "2026-08-03T10:00:00", "2026-08-03T10:00:00Z"),
        (tzi, "2026-08-03T10:00:00-07:00", "2026-08-03T10:00:00Z"),
    ]
    for f, value, expected in cases:
        for expr in (normalize.dynamics_expr(f, "v"), normalize.marketo_expr(f, "v")):
            got = con.execute(f"SELECT {expr} FROM (SELECT ?::VARCHAR AS v)", [value]).fetchone()[0]
            assert got == expected, (tz, f.transform, f.behavior, value)


def test_picklist_codes_become_labels_and_unknown_codes_are_marked_invalid() -> None:
    out = canon(normalize.dynamics_expr(PICK, "v"), [1, 3, 9, None], "BIGINT")
    assert out[:2] == ["Hot", "Cold"] and out[3] is None
    assert out[2] == normalize.INVALID + "9"
    assert canon(normalize.marketo_expr(PICK, "v"), [" Warm ", ""], "VARCHAR") == ["Warm", None]


def test_text_is_trimmed_blank_is_null_and_ids_lower_case() -> None:
    assert canon(normalize.dynamics_expr(fm("text"), "v"), ["  Ann ", "", None], "VARCHAR") == [
        "Ann",
        None,
        None,
    ]
    assert canon(normalize.marketo_expr(fm("lookup"), "v"), ["ABC-Def", None], "VARCHAR") == ["abc-def", None]
    assert canon(normalize.dynamics_expr(fm("owner"), "v"), ["ABC-Def"], "VARCHAR") == ["abc-def"]
    assert normalize.compare_expr(fm("email"), "x") == "lower(x)"
    assert normalize.compare_expr(fm("text"), "x") == "x"


def test_wire_values_for_each_api() -> None:
    assert normalize.to_marketo(fm("boolean"), "true") is True
    assert normalize.to_marketo(fm("integer"), "42") == 42
    assert normalize.to_marketo(fm("number"), "12.5") == 12.5
    assert normalize.to_marketo(PICK, "Warm") == "Warm"
    assert normalize.to_marketo(fm("text"), None) is None
    assert normalize.to_dynamics(PICK, "warm") == 2
    assert normalize.to_dynamics(fm("date"), "2026-08-01") == "2026-08-01T00:00:00Z"
    assert normalize.to_dynamics(fm("boolean"), "false") is False
    assert normalize.to_dynamics(fm("number"), "12.5") == 12.5


def test_label_that_is_not_an_option_names_the_column_and_the_options() -> None:
    with pytest.raises(
        ValueError, match=r"'Lukewarm' is not one of the options of leadqualitycode \(Hot, Warm, Cold\)"
    ):
        normalize.to_dynamics(PICK, "Lukewarm")


def test_unknown_transform_names_the_field() -> None:
    bad = FieldMap.model_construct(marketo="weird", dynamics="weird", transform="rot13")
    with pytest.raises(ValueError, match="field 'weird': unknown transform 'rot13'"):
        normalize.dynamics_expr(bad, "v")
    with pytest.raises(ValueError, match="field 'weird': unknown transform 'rot13'"):
        normalize.marketo_expr(bad, "v")
