"""``python -m sync_pipeline.sandbox``: the ``sync-pipeline sandbox`` command (see its ``--help``)."""

from __future__ import annotations

from sync_pipeline.sandbox.command import sandbox

if __name__ == "__main__":
    sandbox(prog_name="python -m sync_pipeline.sandbox")
