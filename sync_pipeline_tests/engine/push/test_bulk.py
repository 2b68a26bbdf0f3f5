"""engine/push/bulk against the Marketo sandbox: files split under the size limit, a full import queue, failed rows
named with their reason, every imported person given its Marketo id, settled records taken out of the push."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pytest

from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.config.model import load_config
from sync_pipeline.engine.push import bulk as bulk_push
from sync_pipeline.engine.store import state
from sync_pipeline.sandbox.marketo import MarketoSandbox


@pytest.fixture
def sandbox():
    sb = MarketoSandbox().start()
    yield sb
    sb.stop()


def planned(con: duckdb.DuckDBPyConnection, records: list[tuple[str, dict[str, str | None]]]) -> None:
    """The push work tables as payloads.planned_records lays them out: planned_ids, planned_rows."""
    con.execute("CREATE TEMP TABLE planned_ids (rn BIGINT, dynamics_id VARCHAR, op VARCHAR)")
    con.execute(
        "CREATE TEMP TABLE planned_rows (rn BIGINT, dynamics_id VARCHAR, op VARCHAR, field VARCHAR, "
        "new_value VARCHAR)"
    )
    for rn, (did, values) in enumerate(records, 1):
        con.execute("INSERT INTO planned_ids VALUES (?, ?, 'create')", [rn, did])
        for f, v in values.items():
            con.execute("INSERT INTO planned_rows VALUES (?, ?, 'create', ?, ?)", [rn, did, f, v])


def test_files_queue_failures_and_ids(sandbox, tmp_path, monkeypatch) -> None:
    config = load_config()
    entity = config.entity("contact")
    maps = {f.marketo: f for f in entity.all_fields}
    monkeypatch.setattr(bulk_push, "FILE_BYTES", 500)  # a few records a file
    monkeypatch.setattr(bulk_push, "RECORD_SLICE", 7)  # results handed over in several slices
    # 2 imports at a time, 3 queued at most: more files than queue places, so 1016 must be waited out. Time
    # enough to process each (0.2 s) keeps the queue full however slowly a loaded machine uploads.
    sandbox.set_limits({"bulk_import_concurrent": 2, "bulk_import_queued": 3, "bulk_processing_seconds": 0.2})
    records = [
        (
            f"d-{i:03d}",
            {
                "email": f"p{i}@example.org",
                "lastName": f"Last {i}",
                "firstName": None if i % 3 else 'Line one\nand "two"',
            },
        )
        for i in range(60)
    ]
    records[7][1]["email"] = "not an email"  # Marketo rejects this row
    con = duckdb.connect()
    state.ensure_schema(con, config)
    planned(con, records)
    got: list[tuple] = []
    client = MarketoClient(
        sandbox.base_url,
        sandbox.client_id,
        sandbox.client_secret,
        backoff_seconds=0.01,
        backoff_max_seconds=0.05,
        poll_seconds=0.05,
    )
    try:
        assert bulk_push.wanted(
            con,
            config.model_copy(update={"sync": config.sync.model_copy(update={"bulk_import_threshold": 60})}),
            entity,
        )
        settled = bulk_push.push(con, config, entity, client, maps, got.extend, "run-1", datetime.now(UTC))
    finally:
        client.close()
    assert settled == 60 and len(got) == 60 and len({r[0] for r in got}) == 60
    accepted = len(sandbox.bulk.imports)
    assert accepted >= 6  # several files, each under the size limit
    assert sandbox.app.calls["marketo.bulk.import.create"] > accepted  # some uploads were answered 1016 first
    assert sandbox.app.calls["marketo.bulk.export.create"] == 1  # ONE export finds every id
    by_did = {r[0]: r for r in got}
    bad = by_did["d-007"]
    assert bad[2] is False and bad[4] == "1001" and "email" in bad[5].lower()
    for did, _op, ok, mid, _code, _msg in got:
        if did == "d-007":
            continue
        assert ok and sandbox.store.find_leads("dynamicsId", did) == [int(mid)]
        lead = sandbox.store.get_lead(int(mid))
        i = int(did[2:])
        assert lead["lastName"] == f"Last {i}" and lead["dynamicsType"] == "Contact"
        assert lead.get("firstName") == (None if i % 3 else 'Line one\nand "two"')
    assert con.execute("SELECT count(*) FROM planned_rows").fetchone()[0] == 0  # nothing left for REST
    assert con.execute("SELECT count(*) FROM planned_ids").fetchone()[0] == 0


def test_threshold_and_types_without_a_bulk_path() -> None:
    config = load_config()
    con = duckdb.connect()
    planned(con, [(f"d{i}", {"company": "x"}) for i in range(5)])
    assert not bulk_push.wanted(con, config, config.entity("contact"))  # 5 < the default threshold
    low = config.model_copy(update={"sync": config.sync.model_copy(update={"bulk_import_threshold": 5})})
    assert bulk_push.wanted(con, low, config.entity("contact"))
    assert bulk_push.wanted(con, low, config.entity("team"))  # a custom object
    assert not bulk_push.wanted(con, low, config.entity("account"))  # companies: REST only
    off = config.model_copy(update={"sync": config.sync.model_copy(update={"bulk_import_threshold": None})})
    assert not bulk_push.wanted(con, off, config.entity("contact"))
