"""How long incremental syncs wait during a backfill (issue 15), measured through `dagster dev` (daemon, run queue,
the `duckdb` pool) on the tiny sandbox with the packaged daily partitions: the store has synced once, a backfill of
every partition is launched (`sync-pipeline initial-copy --again`), and while it runs a Dynamics edit is made,
delivered by the change sensor, and made again. The longest edit-to-arrival time is the gap. Slow (minutes):
only with --long; the numbers are printed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from sync_pipeline.cli import main
from sync_pipeline_tests.ui.test_ui import graphql, start_dagster_dev, wait_for

pytestmark = [pytest.mark.ui, pytest.mark.slow]


@pytest.fixture
def synced_dagster_dev(harness, tmp_path) -> Iterator[str]:
    assert harness.run("latest").success  # the initial copy's effect, in-process: the sensor is live
    yield from start_dagster_dev(tmp_path)


def test_incremental_syncs_keep_flowing_during_a_backfill(synced_dagster_dev: str, harness) -> None:
    url, sb = synced_dagster_dev, harness.sandbox
    contact_id, person = (
        harness.query("""SELECT dynamics_id, marketo_id FROM identity WHERE entity = 'contact'
                                          AND state = 'active' ORDER BY 1 LIMIT 1""")[0]
    )
    launched = CliRunner().invoke(main, ["initial-copy", "--url", url, "--again"], catch_exceptions=False)
    assert launched.exit_code == 0, launched.output
    backfill_id = launched.output.split("backfill ")[1].split()[0]
    query = f'{{ partitionBackfillOrError(backfillId: "{backfill_id}") {{ ... on PartitionBackfill {{ status }} }} }}'
    started = time.monotonic()
    latencies: list[float] = []
    n = 0
    while graphql(url, query)["partitionBackfillOrError"]["status"] == "REQUESTED":
        n += 1
        phone = f"+1 555 {n:04d}"
        sb.dynamics_update("contact", contact_id, {"telephone1": phone})
        edited = time.monotonic()
        wait_for(
            "an edit during the backfill",
            lambda phone=phone: sb.marketo_get_lead(int(person)).get("phone") == phone,
            1800,
            1,
        )
        latencies.append(time.monotonic() - edited)
    took = time.monotonic() - started
    print(
        f"backfill of every partition: {took:.0f} s; edits delivered during it: {len(latencies)}; "
        f"edit-to-arrival: {[round(x) for x in latencies]} s; longest gap {max(latencies or [0]):.0f} s"
    )
    assert latencies, "the backfill ended before any edit was delivered"
    assert graphql(url, query)["partitionBackfillOrError"]["status"] in ("COMPLETED", "COMPLETED_SUCCESS")
