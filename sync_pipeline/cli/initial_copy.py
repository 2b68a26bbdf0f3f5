"""``initial-copy``: start a connection's first full sync, deliberately, as a backfill of its ``sync`` job.

Until the initial copy runs, the connection's change sensor launches nothing, so nothing is written to Dynamics
or Marketo unasked. This command asks the running Dagster webserver (``dagster dev`` / ``dg dev``) to launch the
backfill the UI launches from the ``<connection>__sync`` job (every partition, ``launchPartitionBackfill`` over the
job's partition set), so it shows under Jobs > <connection>__sync > Backfills and the daemon runs it with the
job's backfill policy: runs of at most 100 partitions, oldest first, each extracting its range and then planning
and pushing what is pending once (plans and pushes are unpartitioned; docs/operations.md).
"""

from __future__ import annotations

from typing import Any

import click
import httpx

from sync_pipeline.connection.automation import initial_copy_started, read_cursors
from sync_pipeline.connection.build import sync_job_name

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
        resp = httpx.post(
            f"{url.rstrip('/')}/graphql",
            json={"query": query, "variables": variables or {}},
            timeout=60,
            trust_env=False,
        )
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise click.ClickException(
            f"cannot reach the Dagster webserver at {url} ({exc}); start it with "
            "`dagster dev -w workspace.yaml` (or `dg dev`), or pass --url"
        ) from None
    body = resp.json()
    if body.get("errors"):
        raise click.ClickException(f"the Dagster webserver refused: {body['errors'][0].get('message')}")
    return body["data"]


@click.command("initial-copy")
@click.option(
    "--url",
    envvar="DAGSTER_WEBSERVER_URL",
    default="http://127.0.0.1:3000",
    show_default=True,
    help="The Dagster webserver (env DAGSTER_WEBSERVER_URL).",
)
@click.option("--location", default=LOCATION, show_default=True, help="Code location name.")
@click.option(
    "--connection",
    "connection",
    envvar="SYNC_CONNECTION",
    default="sandbox",
    show_default=True,
    help="The connection (a folder under sync_pipeline/defs/; env SYNC_CONNECTION).",
)
@click.option(
    "--state",
    "state_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The connection's state store, if not where its defs.yaml says (checked for a finished copy).",
)
@click.option(
    "--again", is_flag=True, help="Launch it even though a sync has already read the latest window."
)
def initial_copy(url: str, location: str, connection: str, state_path: str | None, again: bool) -> None:
    """Launch the initial copy: a backfill of the connection's sync job over every partition (writes to both
    systems).

    In the UI the same backfill is: Jobs > <connection>__sync > Partitions > Materialize..., select every partition,
    Launch backfill. Follow it under Jobs > <connection>__sync > Backfills (or Overview > Backfills);
    `sync-pipeline status` shows the result.
    """
    from sync_pipeline import runs

    spec = runs.connection(connection, state_path=state_path)
    state_path, job = spec.store_path, sync_job_name(spec.connection)
    tokens = read_cursors(state_path)
    if tokens is not None and initial_copy_started(tokens) and not again:
        raise click.ClickException(
            f"{state_path} has already synced (the initial copy ran); the change sensor "
            "keeps it current. Use --again to copy everything once more."
        )
    params = {
        "selector": {
            "partitionSetName": f"{job}_partition_set",
            "repositorySelector": {"repositoryName": REPOSITORY, "repositoryLocationName": location},
        },
        "allPartitions": True,
        "title": "initial copy",
        "description": f"Every partition of {job}, launched by `sync-pipeline initial-copy`.",
        "tags": [{"key": "sync/initial-copy", "value": "true"}],
    }
    result = graphql(url, LAUNCH, {"params": params})["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        detail = (
            result.get("message") or result.get("invalidStepKey") or result.get("invalidOutputName") or ""
        )
        raise click.ClickException(f"the backfill was not launched: {result['__typename']} {detail}".strip())
    backfill = result["backfillId"]
    click.echo(f"initial copy launched: backfill {backfill} of job {job}, every partition")
    click.echo(f"follow it at {url.rstrip('/')}/runs/b/{backfill} (Jobs > {job} > Backfills)")
