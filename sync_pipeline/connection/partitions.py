"""The time-window partitions of extraction (modified time, UTC): plans and pushes are unpartitioned."""

from __future__ import annotations

import dagster as dg

from sync_pipeline.config.model import SyncConfig


def build_partitions(config: SyncConfig) -> dg.TimeWindowPartitionsDefinition:
    p = config.sync.partitions
    # end_offset=1: today's (still open) window exists, so today's changes are syncable all day.
    if p.cadence == "hourly":
        return dg.HourlyPartitionsDefinition(start_date=f"{p.start_date}-00:00", timezone="UTC", end_offset=1)
    return dg.DailyPartitionsDefinition(start_date=p.start_date, timezone="UTC", end_offset=1)


def is_latest_window(context: dg.AssetExecutionContext, window: dg.TimeWindow) -> bool:
    """True when the run's window reaches the newest partition (the one that follows delta links)."""
    partitions = context.assets_def.partitions_def
    assert isinstance(partitions, dg.TimeWindowPartitionsDefinition)
    last = partitions.get_last_partition_window()
    return last is not None and window.end >= last.end


def latest_partition_key(partitions: dg.TimeWindowPartitionsDefinition) -> str:
    key = partitions.get_last_partition_key()
    assert key is not None
    return key
