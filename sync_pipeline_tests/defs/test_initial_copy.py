"""The initial copy through a real Dagster run, then quiet incremental cycles (no echoes bounce)."""

from __future__ import annotations

from typing import Any

MARKETO_BORN = ("company", "opportunity", "opportunityRole")


def _marketo_born(sb: Any) -> dict[str, list[dict[str, Any]]]:
    """The instance's own companies, opportunities and roles (generated with ``mkto-`` keys, not by the sync)."""
    return {
        o: sorted(
            (
                r
                for r in sb.marketo_rows(o, 1_000_000)
                if r["externalCompanyId" if o == "company" else "externalOpportunityId"].startswith("mkto-")
            ),
            key=repr,
        )
        for o in MARKETO_BORN
    }


def test_initial_copy_creates_every_entity_once_and_converges(harness) -> None:
    sb = harness.sandbox
    before = _marketo_born(sb)
    assert all(before.values()), "the tiny org seeds Marketo-born companies, opportunities and roles"
    result = harness.run("latest")
    assert result.success
    # Every one-way entity reached Marketo once per Dynamics row (sync filter aside).
    assert sb.marketo_count("salesPerson") == sb.dynamics_count("systemuser")
    # Exactly one Marketo company per synced account, keyed by its id; the instance's own companies (and
    # opportunities and roles) are neither duplicated, changed nor deleted.
    synced = {r[0] for r in harness.query("SELECT id FROM d_account WHERE sync_flag IS DISTINCT FROM false")}
    ours = [
        c["externalCompanyId"]
        for c in sb.marketo_rows("company", 1_000_000)
        if not c["externalCompanyId"].startswith("mkto-")
    ]
    assert sorted(ours) == sorted(synced)
    assert sb.marketo_count("company") == len(synced) + len(before["company"])
    assert _marketo_born(sb) == before
    assert sb.marketo_count("dynamicsTeam_c") == sb.dynamics_count("team")
    # No Marketo person is claimed twice, and every synced Dynamics person has exactly one person.
    dupes = harness.query("""SELECT marketo_id FROM identity WHERE entity IN ('lead', 'contact') AND state = 'active'
                             GROUP BY marketo_id HAVING count(*) > 1""")
    assert dupes == []
    # Two more cycles: the second may absorb our own echoes, the third writes nothing at all.
    harness.run("latest")
    before_ledger = harness.query("SELECT count(*) FROM ledger")[0][0]
    harness.run("latest")
    assert harness.query("SELECT count(*) FROM ledger")[0][0] == before_ledger
    assert _marketo_born(sb) == before
