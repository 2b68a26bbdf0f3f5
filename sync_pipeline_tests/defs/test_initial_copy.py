"""The initial copy through a real Dagster run, then quiet incremental cycles (no echoes bounce)."""

from __future__ import annotations


def test_initial_copy_creates_every_entity_once_and_converges(harness) -> None:
    sb = harness.sandbox
    result = harness.run("latest")
    assert result.success
    # Every one-way entity reached Marketo once per Dynamics row (sync filter aside).
    assert sb.marketo_count("salesPerson") == sb.dynamics_count("systemuser")
    assert sb.marketo_count("company") == harness.query(
        "SELECT count(*) FROM d_account WHERE sync_flag IS DISTINCT FROM false")[0][0]
    assert sb.marketo_count("dynamicsTeam_c") == sb.dynamics_count("team")
    # No Marketo person is claimed twice, and every synced Dynamics person has exactly one person.
    dupes = harness.query("""SELECT marketo_id FROM identity WHERE entity IN ('lead', 'contact') AND state = 'active'
                             GROUP BY marketo_id HAVING count(*) > 1""")
    assert dupes == []
    # Two more cycles: the second may absorb our own echoes, the third writes nothing at all.
    harness.run("latest")
    before = harness.query("SELECT count(*) FROM ledger")[0][0]
    harness.run("latest")
    assert harness.query("SELECT count(*) FROM ledger")[0][0] == before
