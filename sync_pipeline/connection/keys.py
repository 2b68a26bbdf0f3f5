"""The one translator from (connection, entity, stage) to Dagster names: asset keys, groups, jobs, sensors, pools.

Asset keys are ``<connection>/<system>/<entity>/<stage>``; the last part names the stage (the UI titles a node by
it): ``<c>/dynamics/contact/extract``, ``<c>/marketo/person/extract``, ``<c>/sync/contact/plan``,
``<c>/marketo/contact/push`` and, for persons, ``<c>/dynamics/contact/push``. Every module and test builds keys here.
"""

from __future__ import annotations

import re

import dagster as dg

STAGES = ("extract", "plan", "push")
PERSON = "person"  # the Marketo person mirror, shared by every person entity of a connection
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def check_connection_name(name: str) -> str:
    """A connection name is a key prefix and part of job, sensor and pool names: lower-case identifier."""
    if not _NAME.match(name) or "__" in name:
        raise ValueError(f"connection name {name!r}: use lower-case letters, digits and single underscores")
    return name


def asset_key(connection: str, entity: str, stage: str, system: str | None = None) -> dg.AssetKey:
    """``system`` defaults by stage: extract reads Dynamics (Marketo for ``person``), plan is ``sync``, push
    writes Marketo (``system="dynamics"`` for the write-back of persons)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if system is None:
        system = {
            "extract": "marketo" if entity == PERSON else "dynamics",
            "plan": "sync",
            "push": "marketo",
        }[stage]
    return dg.AssetKey([connection, system, entity, stage])


def stage_of(key: dg.AssetKey) -> str:
    return key.path[-1]


def connection_of(key: dg.AssetKey) -> str:
    return key.path[0]


def key_name(key: dg.AssetKey) -> str:
    """The key as the UI and metadata print it, e.g. ``sandbox/marketo/contact/push``."""
    return key.to_user_string()


def group_name(connection: str, entity: str) -> str:
    return f"{connection}_{entity}"


def qualified(connection: str, name: str) -> str:
    """Job, sensor, op and pool names: ``<connection>__<name>`` (unique in a code location with many connections)."""
    return f"{connection}__{name}"


def pool(connection: str) -> str:
    """One DuckDB writer per connection: every step that opens its state store is in this pool (limit 1)."""
    return qualified(connection, "state")


CONNECTION_TAG = "sync/connection"
