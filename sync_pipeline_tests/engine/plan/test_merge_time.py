"""Policy ``latest`` compares the change times of the field itself, not of the records (issue 9)."""

from __future__ import annotations

import duckdb
import pytest

from sync_pipeline.engine.store.state import ensure_schema
from sync_pipeline_tests.engine.plan.test_merge import AGREED, C1, C2, _config, plan, synced_contact


@pytest.fixture
def con():
    c = duckdb.connect()
    yield c
    c.close()


def test_latest_uses_per_field_times_and_falls_back_to_record_times(con) -> None:
    cfg = _config(field_policies={"title": "latest"})
    ensure_schema(con, cfg)
    # C1: Dynamics changed the title at 10:00 and the phone at 10:04 (the record's time); Marketo changed the
    # title at 10:02. The later edit of the title is Marketo's.
    synced_contact(
        con,
        C1,
        11,
        AGREED,
        dynamics={"title": "D", "phone": "+47 4"},
        marketo={"title": "M"},
        modified="2026-11-20T10:04:00Z",
    )
    con.execute("UPDATE m_person SET updated_at = '2026-11-20T10:02:00Z' WHERE id = 11")
    con.execute(
        """INSERT INTO field_times VALUES ('d:contact', ?, 'title', '2026-11-20T10:00:00Z'),
                   ('m', '11', 'title', '2026-11-20T10:02:00Z'), ('d:contact', ?, 'phone', '2026-11-20T10:04:00Z')""",
        [C1, C1],
    )
    # C2: the same without field times (e.g. values read before tracking began): the records' times decide.
    synced_contact(
        con,
        C2,
        12,
        AGREED,
        dynamics={"title": "D", "phone": "+47 4"},
        marketo={"title": "M"},
        modified="2026-11-20T10:04:00Z",
    )
    con.execute("UPDATE m_person SET updated_at = '2026-11-20T10:02:00Z' WHERE id = 12")
    _, rows = plan(con, cfg, "contact")
    assert rows == [
        (C1, "dynamics", "update", "title", "M", "conflict:latest"),
        (C1, "marketo", "update", "phone", "+47 4", "two_way"),
        (C2, "marketo", "update", "phone", "+47 4", "two_way"),
        (C2, "marketo", "update", "title", "D", "conflict:latest"),
    ]


def test_dynamics_field_time_is_the_first_version_that_showed_the_value(con) -> None:
    from sync_pipeline.engine.extract import dynamics as extract

    cfg = _config(field_policies={"title": "latest"})
    ensure_schema(con, cfg)
    contact = cfg.entity("contact")

    def page(version: int, modified: str, title: str, phone: str) -> list[dict]:
        return [
            {
                "contactid": C1,
                "versionnumber": version,
                "modifiedon": modified,
                "@odata.etag": f'W/"{version}"',
                "jobtitle": title,
                "telephone1": phone,
                "lastname": "Lee",
            }
        ]

    def title_time() -> str:
        return con.execute(
            "SELECT changed_at FROM field_times WHERE side = 'd:contact' AND id = ? AND field = 'title'", [C1]
        ).fetchone()[0]

    extract.ingest_dynamics_page(con, contact, page(1, "2026-11-20T09:00:00Z", "CTO", "+47 1"), "p")
    assert title_time() == "2026-11-20T09:00:00Z"
    extract.ingest_dynamics_page(con, contact, page(2, "2026-11-20T10:00:00Z", "CEO", "+47 1"), "p")
    extract.ingest_dynamics_page(con, contact, page(3, "2026-11-20T10:04:00Z", "CEO", "+47 4"), "p")
    extract.ingest_dynamics_page(
        con, contact, page(2, "2026-11-20T10:00:00Z", "CEO", "+47 1"), "p"
    )  # re-read
    assert title_time() == "2026-11-20T10:00:00Z"
