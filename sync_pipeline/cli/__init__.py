"""The ``sync-pipeline`` command line."""

from __future__ import annotations

import click

from sync_pipeline.cli.bench import bench, bench_sandbox
from sync_pipeline.cli.connect import backfill, init, validate
from sync_pipeline.cli.demo import demo
from sync_pipeline.cli.extras import optional_command
from sync_pipeline.cli.initial_copy import initial_copy
from sync_pipeline.cli.ops import errors, plan, rebaseline, rollback, status
from sync_pipeline.cli.resync import resync

# The sandbox's own command (it imports no production code, so it lives in the sandbox package).
sandbox = optional_command("sync_pipeline.sandbox.command", "sandbox", extra="sandbox")


@click.group()
def main() -> None:
    """Self-hosted Dynamics 365 <-> Marketo sync."""


main.add_command(demo)
main.add_command(sandbox)
main.add_command(bench_sandbox)
main.add_command(initial_copy)
main.add_command(plan)
main.add_command(status)
main.add_command(errors)
main.add_command(rollback)
main.add_command(rebaseline)
main.add_command(bench)
main.add_command(validate)
main.add_command(init)
main.add_command(backfill)
main.add_command(resync)
