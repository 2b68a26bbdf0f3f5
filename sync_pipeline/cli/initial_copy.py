"""``initial-copy``: start the first full sync, deliberately, as a backfill of the ``sync`` job through Dagster.

Until the initial copy runs, the change sensor, the safety-net schedule and declarative automation launch
nothing, so nothing is written to Dynamics or Marketo unasked. This command asks the running Dagster webserver
(``dagster dev`` / ``dg dev``) to launch the backfill the UI launches from the ``sync`` job (every partition,
``launchPartitionBackfill`` over the job's partition set), so it shows under Jobs > sync > Backfills and the
daemon runs it with the job's backfill policy (at most 100 partitions a run).
"""

from __future__ import annotations

from typing import Any

import click
import httpx

from sync_pipeline.defs.automation import JOB_NAME, initial_copy_started, read_cursors
from sync_pipeline.defs.resources import DEFAULT_STATE_PATH

LOCATION = "sync_pipeline"  # workspace.yaml and [tool.dg.project] use the same code location name
REPOSITORY = "__repository__"  # the repository Dagster builds from a Definitions object

LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionSetNotFoundError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { invalidOutputName }
    ... on UnauthorizedError { message }
    ... on RunConflict { message }
    ... on InvalidSubsetError { message }
  }
}
"""


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        resp = httpx.post(f"{url.rstrip('/')}/graphql", json={"query": query, "variables": variables or {}},
                          timeout=60, trust_env=False)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the Dagster webserver at {url} ({exc}); start it with "
                                   "`dagster dev -w workspace.yaml` (or `dg dev`), or pass --url") from None
    body = resp.json()
    if body.get("errors"):
        raise click.ClickException(f"the Dagster webserver refused: {body['errors'][0].get('message')}")
    return body["data"]


@click.command("initial-copy")
@click.option("--url", envvar="DAGSTER_WEBSERVER_URL", default="http://127.0.0.1:3000", show_default=True,
              help="The Dagster webserver (env DAGSTER_WEBSERVER_URL).")
@click.option("--location", default=LOCATION, show_default=True, help="Code location name.")
@click.option("--state", "state_path", envvar="SYNC_STATE_PATH", default=DEFAULT_STATE_PATH, show_default=True,
              type=click.Path(dir_okay=False), help="DuckDB state store (env SYNC_STATE_PATH).")
@click.option("--again", is_flag=True, help="Launch it even though a sync has already read the latest window.")
def initial_copy(url: str, location: str, state_path: str, again: bool) -> None:
    """Launch the initial copy: a backfill of the `sync` job over every partition (writes to both systems).

    In the UI the same backfill is: Jobs > sync > Partitions > Materialize..., select every partition, Launch backfill.
    Follow it under Jobs > sync > Backfills (or Overview > Backfills); `sync-pipeline status` shows the result.
    """
    tokens = read_cursors(state_path)
    if tokens is not None and initial_copy_started(tokens) and not again:
        raise click.ClickException(f"{state_path} has already synced (the initial copy ran); the change sensor "
                                   "keeps it current. Use --again to copy everything once more.")
    params = {"selector": {"partitionSetName": f"{JOB_NAME}_partition_set",
                           "repositorySelector": {"repositoryName": REPOSITORY, "repositoryLocationName": location}},
              "allPartitions": True, "title": "initial copy",
              "description": "Every partition of the sync job, launched by `sync-pipeline initial-copy`.",
              "tags": [{"key": "sync/initial-copy", "value": "true"}]}
    result = graphql(url, LAUNCH, {"params": params})["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        detail = result.get("message") or result.get("invalidStepKey") or result.get("invalidOutputName") or ""
        raise click.ClickException(f"the backfill was not launched: {result['__typename']} {detail}".strip())
    backfill = result["backfillId"]
    click.echo(f"initial copy launched: backfill {backfill} of job {JOB_NAME}, every partition")
    click.echo(f"follow it at {url.rstrip('/')}/runs/b/{backfill} (Jobs > {JOB_NAME} > Backfills)")
