"""The ``sync-pipeline`` command line."""

from __future__ import annotations

import click

from sync_pipeline.cli.sandbox import bench_sandbox, sandbox


@click.group()
def main() -> None:
    """Self-hosted Dynamics 365 <-> Marketo sync."""


main.add_command(sandbox)
main.add_command(bench_sandbox)
