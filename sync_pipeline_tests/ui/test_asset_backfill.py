"""An asset backfill of a connection's assets through `dagster dev` (daemon, run queue): the partitioned extracts
run over the partition range first, then the unpartitioned plans and pushes once, in a run of their own
(docs/operations.md, "How the initial copy proceeds"). No browser needed."""

from __future__ import annotations

import pytest

from sync_pipeline import runs
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN
from sync_pipeline_tests.ui.test_ui import dagster_dev, graphql, short_history, wait_for  # noqa: F401 (fixtures)

# The documented alternative to the job backfill; about 2 minutes, so with --long.
pytestmark = [pytest.mark.ui, pytest.mark.slow]

LAUNCH = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
RUNS = """query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { runId status startTime endTime
  tags { key value } assetSelection { path } } } } }"""


def test_an_asset_backfill_extracts_every_partition_then_plans_and_pushes_once(
    dagster_dev: str,  # noqa: F811 (the fixture imported above)
    harness,
) -> None:
    url, keys = dagster_dev, runs.partition_keys()
    nodes = wait_for(
        "the code location", lambda: graphql(url, "{ assetNodes { assetKey { path } } }")["assetNodes"], 120
    )
    selection = [{"path": n["assetKey"]["path"]} for n in nodes if n["assetKey"]["path"][0] == CONN]
    launched = graphql(
        url, LAUNCH, {"p": {"assetSelection": selection, "partitionNames": keys, "fromFailure": False}}
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill = launched["backfillId"]
    status = f'{{ partitionBackfillOrError(backfillId: "{backfill}") {{ ... on PartitionBackfill {{ status }} }} }}'
    wait_for(
        "the backfill",
        lambda: graphql(url, status)["partitionBackfillOrError"]["status"] != "REQUESTED",
        600,
        5,
    )
    assert graphql(url, status)["partitionBackfillOrError"]["status"] in ("COMPLETED", "COMPLETED_SUCCESS")
    found = graphql(url, RUNS, {"f": {"tags": [{"key": "dagster/backfill", "value": backfill}]}})
    ordered = sorted(found["runsOrError"]["results"], key=lambda r: r["startTime"])
    stages = [{a["path"][-1] for a in r["assetSelection"]} for r in ordered]
    tags = [{t["key"]: t["value"] for t in r["tags"]} for r in ordered]
    # The short history fits one range run (100 partitions a run); then one run plans and pushes what is pending.
    assert stages == [{"extract"}, {"plan", "push"}], stages
    assert (tags[0]["dagster/asset_partition_range_start"], tags[0]["dagster/asset_partition_range_end"]) == (
        keys[0],
        keys[-1],
    )
    assert "dagster/asset_partition_range_start" not in tags[1] and "dagster/partition" not in tags[1]
    assert all(r["status"] == "SUCCESS" for r in ordered)
    assert ordered[1]["startTime"] >= ordered[0]["endTime"]
    # The copy arrived: every synced account is a Marketo company.
    synced = harness.query("SELECT count(*) FROM identity WHERE entity = 'account' AND state = 'active'")[0][
        0
    ]
    assert synced > 0
