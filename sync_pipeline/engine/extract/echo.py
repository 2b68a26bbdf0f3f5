"""The echo of our own bulk writes (an initial copy's creates and updates), absorbed with one bulk activity export
instead of paging every activity through ``leadchanges.json`` (300 a call).

Decided from the ledger before anything is read: when our own person writes since the lead-change cursor's time
exceed ``ECHO_EXPORT_PERSONS`` (more than 10 pages of lead changes, at least one activity each), the window
cursor time .. now - margin is read as New Lead / Change Data Value rows of a bulk activity export and applied
set-based with the lead-change semantics (``marketo._apply_activities``): known persons take each watched
field's last new value, values equal to the mirror (our echo) change nothing, unknown persons are read whole, and
fields with policy ``latest`` record the activity time of their last real change.

Why activities, not a bulk lead export by ``updatedAt``: a lead row carries every mapped field of every person we
wrote (the whole copy, often more than Marketo's 500 MB daily export quota at a million persons), while an
activity row is one short line per create or changed field (the columns below); and activities keep the time
of each field's change, which a lead export would flatten to the person's ``updatedAt``.

The export file, as Adobe documents it ("Bulk Activity Extract",
https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/bulk-extract/bulk-activity-extract):
columns ``marketoGUID, leadId, activityDate, activityTypeId, campaignId, primaryAttributeValueId,
primaryAttributeValue, attributes`` (``fields`` picks a subset), empty values the literal ``null``; for Change
Data Value the primary attribute is the lead field (id, and its display name), and ``attributes`` a JSON object
with "New Value", "Old Value", "Reason" and "Source". The field id is mapped to its REST name with one
``leads/describe.json`` call.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.engine.extract.common import ExtractStats, iso_utc
from sync_pipeline.engine.ports import MarketoPort
from sync_pipeline.engine.store.state import fcol, qi

ECHO_EXPORT_PERSONS = 3000  # our person writes since the cursor above which the backlog is read as one export
NEW_LEAD_TYPE, CHANGE_DATA_VALUE_TYPE = 12, 13
EXPORT_FIELDS = [
    "marketoGUID",
    "leadId",
    "activityDate",
    "activityTypeId",
    "primaryAttributeValueId",
    "attributes",
]
MAX_WINDOW = timedelta(days=31)  # the createdAt filter's longest range
SLICE = 20_000  # changed persons handed to the mirror upsert at a time


def own_person_writes_since(con: duckdb.DuckDBPyConnection, config: SyncConfig, since: datetime) -> int:
    """Distinct Marketo persons our pushes wrote (created or updated) since ``since`` (the ledger's times are UTC)."""
    row = con.execute(
        """SELECT count(DISTINCT marketo_id) FROM ledger WHERE target = 'marketo' AND written_at >= ?
           AND entity IN (SELECT unnest(?::VARCHAR[]))""",
        [since.astimezone(UTC).replace(tzinfo=None), [e.name for e in config.persons]],
    ).fetchone()
    return int(row[0]) if row else 0


def export_window(
    con: duckdb.DuckDBPyConnection,
    client: MarketoPort,
    start: datetime,
    end: datetime,
    work_dir: Path | None,
    stats: ExtractStats,
) -> None:
    """The New Lead and Change Data Value activities created in [start, end] into temp table ``echo_acts``
    (one export per 31 days of window)."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="sync-pipeline-echo-"))
    work.mkdir(parents=True, exist_ok=True)
    con.execute("""CREATE OR REPLACE TEMP TABLE echo_acts (guid VARCHAR, lead_id BIGINT, act_at VARCHAR,
        type_id INTEGER, field_id INTEGER, attributes VARCHAR)""")
    s = start
    while s < end:
        e = min(s + MAX_WINDOW, end)
        path = work / f"activities-{s:%Y%m%d%H%M%S}-{e:%Y%m%d%H%M%S}.csv"
        flt = {
            "createdAt": {"startAt": iso_utc(s), "endAt": iso_utc(e)},
            "activityTypeIds": [NEW_LEAD_TYPE, CHANGE_DATA_VALUE_TYPE],
        }
        client.export_to_file("activities", flt, path, fields=EXPORT_FIELDS)
        stats.pages += 1
        src = "read_csv(?, all_varchar = true, nullstr = 'null', header = true, quote = '\"', escape = '\"')"
        con.execute(
            f"""INSERT INTO echo_acts SELECT "marketoGUID", TRY_CAST("leadId" AS BIGINT), "activityDate",
                TRY_CAST("activityTypeId" AS INTEGER), TRY_CAST("primaryAttributeValueId" AS INTEGER), "attributes"
                FROM {src} WHERE TRY_CAST("leadId" AS BIGINT) IS NOT NULL""",
            [str(path)],
        )
        path.unlink(missing_ok=True)
        s = e


def apply_echo(
    con: duckdb.DuckDBPyConnection,
    client: MarketoPort,
    watch: list[str],
    timed: set[str],
) -> tuple[pa.Table | None, list[int], list[tuple[int, str, str]]]:
    """``echo_acts`` applied to the mirror's view, set-based. Returns the changed persons' rows (raw values, the
    mirror's for fields without a change; None when no person changed), the unknown persons to read whole and the
    (person, field, time) of the last real change of each ``timed`` field."""
    names = {
        int(f["id"]): str((f.get("rest") or {}).get("name"))
        for f in client.describe_leads()
        if f.get("id") is not None and (f.get("rest") or {}).get("name") in watch
    }
    fields = pa.table(  # noqa: F841 (DuckDB reads it by name)
        {"field_id": pa.array(list(names), pa.int32()), "name": pa.array(list(names.values()), pa.string())}
    )
    con.execute("""CREATE OR REPLACE TEMP TABLE echo_changes AS
        SELECT a.lead_id, f.name AS field, a.act_at, TRY_CAST(a.guid AS BIGINT) AS seq, a.guid,
               json_extract_string(a.attributes, '$."New Value"') AS new_value
        FROM echo_acts a JOIN fields f ON f.field_id = a.field_id WHERE a.type_id = 13""")
    con.execute("""CREATE OR REPLACE TEMP TABLE echo_persons AS
        SELECT a.lead_id, max(a.act_at) AS updated_at, bool_or(m.id IS NOT NULL) AS known
        FROM echo_acts a LEFT JOIN m_person m ON m.id = a.lead_id AND NOT m.deleted GROUP BY a.lead_id""")
    unknown = [
        int(r[0])
        for r in con.execute("SELECT lead_id FROM echo_persons WHERE NOT known ORDER BY 1").fetchall()
    ]
    times = _field_times(con, [f for f in watch if f in timed]) if timed else []
    pivots = ", ".join(
        f"bool_or(field = '{f}') AS {qi('h_' + f)}, "
        f"arg_max_null(new_value, (act_at, seq, guid)) FILTER (WHERE field = '{f}') AS {qi('v_' + f)}"
        for f in watch
    )
    con.execute(f"""CREATE OR REPLACE TEMP TABLE echo_last AS
        SELECT c.lead_id, {pivots} FROM echo_changes c
        WHERE c.lead_id IN (SELECT lead_id FROM echo_persons WHERE known) GROUP BY c.lead_id""")
    values = ", ".join(
        f"CASE WHEN l.{qi('h_' + f)} THEN l.{qi('v_' + f)} ELSE CAST(m.{fcol(f)} AS VARCHAR) END AS {qi(f)}"
        for f in watch
    )
    count = con.execute("SELECT count(*) FROM echo_last").fetchone()
    if not count or not count[0]:
        return None, unknown, times
    table = con.execute(
        f"""SELECT CAST(l.lead_id AS VARCHAR) AS id, p.updated_at AS "updatedAt", {values}
        FROM echo_last l JOIN echo_persons p ON p.lead_id = l.lead_id JOIN m_person m ON m.id = l.lead_id
        ORDER BY l.lead_id"""
    ).fetch_arrow_table()
    return table, unknown, times


def _field_times(con: duckdb.DuckDBPyConnection, timed: list[str]) -> list[tuple[int, str, str]]:
    """Per known person and ``latest`` field, the time of the last change to a new value (compared loosely, as
    ``marketo._text_of`` does, with the value before it: the mirror's for the first change in the window)."""
    if not timed:
        return []
    mirrored = " ".join(f"WHEN '{f}' THEN CAST(m.{fcol(f)} AS VARCHAR)" for f in timed)
    rows = con.execute(
        f"""WITH seq AS (
            SELECT c.lead_id, c.field, c.act_at, NULLIF(trim(c.new_value), '') AS new_value,
                   lag(NULLIF(trim(c.new_value), '')) OVER w AS prev, row_number() OVER w AS k,
                   NULLIF(trim(CASE c.field {mirrored} END), '') AS mirror
            FROM echo_changes c JOIN m_person m ON m.id = c.lead_id AND NOT m.deleted
            WHERE c.field IN (SELECT unnest(?::VARCHAR[]))
            WINDOW w AS (PARTITION BY c.lead_id, c.field ORDER BY c.act_at, c.seq, c.guid))
        SELECT lead_id, field, max(act_at) FROM seq
        WHERE new_value IS DISTINCT FROM (CASE WHEN k = 1 THEN mirror ELSE prev END) AND act_at IS NOT NULL
        GROUP BY lead_id, field""",
        [timed],
    ).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def slices(table: pa.Table) -> list[pa.Table]:
    return [table.slice(i, SLICE) for i in range(0, table.num_rows, SLICE)]


def window_end(now: datetime, margin: timedelta) -> datetime:
    """The export window's end: a little before now, so activities still being logged are left to the REST read
    that follows (its paging token is taken at this time)."""
    return (now if now.tzinfo else now.replace(tzinfo=UTC)) - margin
