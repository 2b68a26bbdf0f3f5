"""The declared entities: loading and validating ``entities.yaml``.

Plain pydantic, no Dagster. Every error names the entity and the field it is about, and the whole
configuration is checked at load so a typo fails before anything touches either system.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PATH = Path(__file__).with_name("entities.yaml")

Direction = Literal["two_way", "to_marketo", "to_dynamics", "none"]
Policy = Literal["dynamics_wins", "marketo_wins", "latest", "prefer_non_blank", "hold", "opt_out_sticky"]
# How Dataverse stores a DateTime column (DateTimeAttributeMetadata.DateTimeBehavior): UserLocal values are
# stored and returned in UTC, TimeZoneIndependent and DateOnly values are wall-clock / calendar values with no
# zone (learn.microsoft.com/power-apps/developer/data-platform/behavior-format-date-time-attribute). New
# columns default to UserLocal; a `date` field defaults to DateOnly.
DateTimeBehavior = Literal["user_local", "time_zone_independent", "date_only"]
# Consent: opted out is "true". Such a field never becomes false through the sync unless the side it comes
# from changed from true to false since the last sync (README, rules).
STICKY = "opt_out_sticky"
Transform = Literal[
    "text",
    "email",
    "boolean",
    "integer",
    "number",
    "datetime",
    "date",
    "picklist",
    "lookup",
    "owner",
    "customer_account",
]
DeleteMode = Literal["flag", "delete", "ignore"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PERSON_OBJECT = "lead"


class ConfigError(ValueError):
    """Invalid configuration; the message names the file, entity and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldMap(_Strict):
    marketo: str = Field(description="Marketo field (REST API name)")
    dynamics: str = Field(description="Dynamics column (logical name; lookups without _value)")
    direction: Direction | None = None
    policy: Policy | None = None
    transform: Transform = "text"
    options: dict[int, str] | None = None
    target: str | None = None
    date_time_behavior: DateTimeBehavior | None = None

    @model_validator(mode="after")
    def _check(self) -> FieldMap:
        for name in (self.marketo, self.dynamics):
            if not _IDENT.match(name):
                raise ValueError(f"field name {name!r} is not a valid identifier")
        # Picklist labels come from the org's metadata at run time (``options`` here overrides single labels);
        # a code neither the org nor this map knows is rejected at run time, naming the record and field.
        if self.transform == "lookup" and not self.target:
            raise ValueError(f"field {self.marketo!r}: transform lookup needs a target entity")
        if self.policy == STICKY and self.transform != "boolean":
            raise ValueError(
                f"field {self.marketo!r}: policy {STICKY} applies to boolean (opt-out) fields only, "
                f"not transform {self.transform}"
            )
        if self.date_time_behavior and self.transform not in ("date", "datetime"):
            raise ValueError(
                f"field {self.marketo!r}: date_time_behavior applies to date and datetime fields only"
            )
        return self

    @property
    def behavior(self) -> str:
        """The column's DateTimeBehavior (date and datetime fields)."""
        return self.date_time_behavior or ("date_only" if self.transform == "date" else "user_local")


class Condition(_Strict):
    field: str
    op: Literal["eq", "ne", "gt", "ge", "lt", "le", "in", "not_blank", "blank"]
    value: Any = None


class Rule(_Strict):
    all: list[Condition] = Field(default_factory=list)


class DynamicsSide(_Strict):
    table: str
    entity_set: str
    modified_column: str | None = "modifiedon"


class MarketoSide(_Strict):
    object: str
    key: str = Field(description="Marketo field holding the Dynamics id (dedupe / lookup field)")
    type_value: str | None = Field(None, description="persons: value of the Microsoft Type field")


class Entity(_Strict):
    name: str
    dynamics: DynamicsSide | None = None
    marketo: MarketoSide
    derived_from: str | None = None
    role_name: str = "Potential Customer"
    direction: Direction = "to_marketo"
    policy: Policy = "dynamics_wins"
    on_dynamics_delete: DeleteMode = "flag"
    on_marketo_delete: Literal["tombstone", "recreate"] = "tombstone"
    sync_filter_column: str | None = "new_synctomkto"
    create_in_dynamics: Rule | None = None
    fields: list[FieldMap] = Field(default_factory=list)
    extra_fields: list[FieldMap] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Entity:
        if not _IDENT.match(self.name):
            raise ValueError(f"entity name {self.name!r} is not a valid identifier")
        if self.policy == STICKY:
            raise ValueError(f"policy {STICKY} is set per consent field (boolean), not for a whole entity")
        if self.derived_from is None and self.dynamics is None:
            raise ValueError("needs a dynamics block (or derived_from)")
        seen: set[str] = set()
        for f in self.all_fields:
            if f.marketo in seen:
                raise ValueError(f"field {f.marketo!r} is mapped twice")
            seen.add(f.marketo)
            if not self.is_person and self.field_direction(f) in ("two_way", "to_dynamics"):
                raise ValueError(f"field {f.marketo!r}: only persons (leads, contacts) sync to Dynamics")
        if self.create_in_dynamics and not self.is_person:
            raise ValueError("create_in_dynamics applies to person entities only")
        return self

    @property
    def all_fields(self) -> list[FieldMap]:
        return [*self.fields, *self.extra_fields]

    @property
    def is_person(self) -> bool:
        return self.marketo.object == PERSON_OBJECT

    @property
    def is_derived(self) -> bool:
        return self.derived_from is not None

    def field_direction(self, f: FieldMap) -> Direction:
        return f.direction or self.direction

    def field_policy(self, f: FieldMap) -> Policy:
        return f.policy or self.policy


class Partitions(_Strict):
    start_date: str = "2026-08-01"
    cadence: Literal["daily", "hourly"] = "daily"


class RetrySettings(_Strict):
    max_attempts: int = Field(5, ge=1)
    backoff_seconds: int = Field(60, ge=0)


class SyncSettings(_Strict):
    partitions: Partitions = Partitions()
    retry: RetrySettings = RetrySettings()
    # Every how many plans of a person entity the whole store is searched for damaged links (a record nobody
    # edits, a store repaired by hand); 1: every plan. In between only the records with pending work are looked at,
    # so a plan reads what changed, not the tables (at 1 the sweep reads identity and the person mirror whole).
    # The derived opportunity-role plan compares every opportunity with its base as often.
    damage_sweep_every: int = Field(1, ge=1)
    # ART indexes on the pending marks, identity and the person mirror's keys, so an incremental run reads only what
    # changed; off by default because maintaining them costs more time than they save on DuckDB 1.4.5 (see
    # engine/store/state.py).
    index_state: bool = False
    marketo_person_object: str = PERSON_OBJECT
    bulk_import_threshold: int | None = Field(
        1000,
        ge=1,
        description="planned creates of persons or custom objects in one push from which they go "
        "through Marketo bulk import (CSV files) instead of REST; null: always REST",
    )
    metadata_ttl_seconds: int = Field(
        3600,
        ge=0,
        description="how long the org's table metadata (columns, option labels) and the Marketo lead describe "
        "are reused from the state store before they are read again; a mapping change reads them at once; "
        "0: every run",
    )
    environment_check_seconds: int = Field(
        3600,
        ge=0,
        description="how long a WhoAmI that confirmed the pinned Dynamics org is trusted for the same URL and "
        "client id (a different URL is checked at once); 0: every run",
    )
    language: int | None = Field(
        None,
        description="LCID of the option-set labels to sync (e.g. 1033); default: the API user's language",
    )


class SyncConfig(_Strict):
    sync: SyncSettings = SyncSettings()
    entities: list[Entity]

    @model_validator(mode="after")
    def _check(self) -> SyncConfig:
        names = [e.name for e in self.entities]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"entity names must be unique: {sorted(dupes)}")
        derived = [e.name for e in self.entities if e.derived_from]
        if len(derived) > 1:  # one reader of the store's derived marks (engine/store/ledger.py)
            raise ValueError(f"at most one derived entity (opportunity roles): {derived}")
        person_fields = {f.marketo for f in self.person_fields()}
        for e in self.entities:
            for cond in e.create_in_dynamics.all if e.create_in_dynamics else []:
                if cond.field not in person_fields:
                    raise ValueError(
                        f"entity {e.name!r}: create_in_dynamics: field {cond.field!r} is not a "
                        "mapped person field"
                    )
            if e.derived_from and e.derived_from not in names:
                raise ValueError(f"entity {e.name!r}: derived_from {e.derived_from!r} is not declared")
            for f in e.all_fields:
                if f.transform == "lookup" and f.target not in names:
                    raise ValueError(
                        f"entity {e.name!r}: field {f.marketo!r}: lookup target {f.target!r} "
                        "is not a declared entity"
                    )
        return self

    @cached_property
    def by_name(self) -> dict[str, Entity]:
        return {e.name: e for e in self.entities}

    def entity(self, name: str) -> Entity:
        try:
            return self.by_name[name]
        except KeyError:
            raise ConfigError(f"unknown entity {name!r}; declared: {', '.join(self.by_name)}") from None

    @property
    def persons(self) -> list[Entity]:
        return [e for e in self.entities if e.is_person]

    def person_fields(self) -> list[FieldMap]:
        """Union of the person entities' fields, by Marketo name (the person mirror's columns)."""
        out: dict[str, FieldMap] = {}
        for e in self.persons:
            for f in e.all_fields:
                out.setdefault(f.marketo, f)
        return list(out.values())


def _describe(err: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        where = []
        if len(loc) >= 2 and loc[0] == "entities" and isinstance(loc[1], int):
            ents = raw.get("entities") or []
            name = (
                ents[loc[1]].get("name", f"#{loc[1]}")
                if loc[1] < len(ents) and isinstance(ents[loc[1]], dict)
                else f"#{loc[1]}"
            )
            where.append(f"entity {name!r}")
            rest = loc[2:]
            if len(rest) >= 2 and rest[0] in ("fields", "extra_fields") and isinstance(rest[1], int):
                fields = ents[loc[1]].get(rest[0]) or []
                fname = (
                    fields[rest[1]].get("marketo", f"#{rest[1]}")
                    if rest[1] < len(fields) and isinstance(fields[rest[1]], dict)
                    else f"#{rest[1]}"
                )
                where.append(f"field {fname!r}")
                rest = rest[2:]
            if rest:
                where.append("setting " + ".".join(str(p) for p in rest))
        elif loc:
            where.append("setting " + ".".join(str(p) for p in loc))
        lines.append(f"{', '.join(where) or 'top level'}: {e['msg']}")
    return "; ".join(lines)


def load_config(path: str | Path | None = None) -> SyncConfig:
    path = Path(path) if path else DEFAULT_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict) or "entities" not in raw:
        raise ConfigError(f"{path}: expected a mapping with an 'entities' list")
    try:
        return SyncConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_describe(err, raw)}") from None
