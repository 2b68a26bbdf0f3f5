"""What the org says about its tables: columns, types, lengths, option sets, change tracking.

Read from the Dataverse metadata endpoints, the way any Web API client reads them (Microsoft Learn,
"Query table definitions using the Web API",
https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api):

- ``EntityDefinitions(LogicalName='t')`` with ``$expand=Attributes($select=...)`` for the columns;
- type-cast segments (``/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata``) for the derived
  properties: ``MaxLength`` of text columns, ``Targets`` of lookups, ``DateTimeBehavior`` of date columns, and
  ``$expand=OptionSet,GlobalOptionSet`` for the options of choice, state and status columns ("Query
  option sets", same page: the option set is a navigation property, only returned with ``$expand``).

All of it goes in one ``$batch`` (GET requests are allowed outside change sets, "Execute batch operations
using the Web API", https://learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api),
so a sync run pays at most one HTTP call for the metadata of every mapped table. The sync's runs keep the
answer in the state store for ``sync.metadata_ttl_seconds`` (``engine/store/cache.py``): a label an admin renamed
reaches the sync within that time, a field added to the mapping at once (the key holds the mapping's version).

Plain Python, no Dagster. :func:`runtime_config` turns the declared configuration into the one a run
uses: option labels from the org (the YAML may override single labels), and the sync-filter column
dropped from tables that do not have it (as the native sync: no column, every row syncs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig

NS = "Microsoft.Dynamics.CRM"
_CASTS = {  # derived type -> the derived properties we read ($select after the cast)
    "StringAttributeMetadata": "LogicalName,MaxLength,Format",
    "MemoAttributeMetadata": "LogicalName,MaxLength",
    "LookupAttributeMetadata": "LogicalName,Targets",
    "DateTimeAttributeMetadata": "LogicalName,DateTimeBehavior",
}
_OPTION_CASTS = ("PicklistAttributeMetadata", "StateAttributeMetadata", "StatusAttributeMetadata")


@dataclass
class Attribute:
    name: str
    type: str  # AttributeType: String, Memo, Integer, ..., Picklist, State, Status, Lookup, Owner, Customer
    display: str = ""
    custom: bool = False
    updatable: bool = True
    max_length: int | None = None
    targets: tuple[str, ...] = ()
    datetime_behavior: str | None = None
    options: dict[int, str] = field(default_factory=dict)
    option_set: str | None = None  # name of the option set (global ones are shared between columns)
    global_option_set: bool = False


@dataclass
class TableMeta:
    logical_name: str
    entity_set: str = ""
    display: str = ""
    custom: bool = False
    change_tracking: bool = False
    primary_id: str = ""
    primary_name: str = ""
    attributes: dict[str, Attribute] = field(default_factory=dict)


@dataclass
class OrgMetadata:
    tables: dict[str, TableMeta]
    missing: dict[str, str]  # table -> the service's message (404: no such table)

    def table(self, name: str) -> TableMeta | None:
        return self.tables.get(name)


def localized(label: Any, language: int | None = None) -> str:
    """The text of a ``Label``: the configured language's localized label, else the user's label."""
    if not isinstance(label, dict):
        return ""
    if language is not None:
        for loc in label.get("LocalizedLabels") or []:
            if loc.get("LanguageCode") == language and loc.get("Label"):
                return str(loc["Label"])
    user = label.get("UserLocalizedLabel") or {}
    if user.get("Label"):
        return str(user["Label"])
    locs = label.get("LocalizedLabels") or []
    return str(locs[0].get("Label", "")) if locs else ""


def _options_of(doc: dict[str, Any], language: int | None) -> tuple[dict[int, str], str | None, bool]:
    for nav in ("OptionSet", "GlobalOptionSet"):
        os_ = doc.get(nav)
        if isinstance(os_, dict) and os_.get("Options"):
            opts = {int(o["Value"]): localized(o.get("Label"), language) for o in os_["Options"]}
            return opts, os_.get("Name"), bool(os_.get("IsGlobal"))
    return {}, None, False


def _requests(table: str, casts: set[str] | None = None) -> list[tuple[str, str]]:
    """The batch parts for one table: its definition and columns, then the type casts (all, or ``casts``)."""
    base = f"EntityDefinitions(LogicalName='{table}')"
    out = [
        (
            "entity",
            f"{base}?$select=LogicalName,EntitySetName,DisplayName,IsCustomEntity,ChangeTrackingEnabled,"
            "PrimaryIdAttribute,PrimaryNameAttribute&$expand=Attributes($select=LogicalName,AttributeType,"
            "DisplayName,IsCustomAttribute,IsValidForUpdate,AttributeOf)",
        )
    ]
    for cast, select in _CASTS.items():
        if casts is None or cast in casts:
            out.append((cast, f"{base}/Attributes/{NS}.{cast}?$select={select}"))
    for cast in _OPTION_CASTS:
        if casts is not None and cast not in casts:
            continue
        out.append(
            (
                cast,
                f"{base}/Attributes/{NS}.{cast}?$select=LogicalName"
                "&$expand=OptionSet($select=Name,IsGlobal,Options),GlobalOptionSet($select=Name,IsGlobal,Options)",
            )
        )
    return out


@dataclass
class _Stored:
    """A metadata answer read back from the cache (only complete, successful answers are stored)."""

    body: Any
    status: int = 200

    def error(self) -> None:
        return None


def read_metadata(
    client: Any,
    tables: list[str],
    language: int | None = None,
    casts: dict[str, set[str]] | None = None,
    cache: Any | None = None,
) -> OrgMetadata:
    """Every named table's definition, columns and options, in one ``$batch`` call. ``casts`` (table -> derived
    types) narrows the type-cast parts to what the caller needs; by default every one is read. ``cache`` (a
    :class:`~sync_pipeline.engine.store.cache.ResponseCache`) answers from the state store while fresh."""
    from sync_pipeline.clients import errors
    from sync_pipeline.engine.ports import BatchRequest

    tables = list(dict.fromkeys(tables))
    plan = [
        (t, kind, url)
        for t in tables
        for kind, url in _requests(t, None if casts is None else casts.get(t, set()))
    ]
    if not plan:
        return OrgMetadata({}, {})
    key = [str(getattr(client, "url", "")), str(language), *(url for _, _, url in plan)]
    stored = cache.get("orgmeta", key) if cache is not None else None
    responses: list[Any]
    if isinstance(stored, list) and len(stored) == len(plan):
        responses = [_Stored(body) for body in stored]
    else:
        responses = client.execute_batch(
            [BatchRequest("GET", url) for _, _, url in plan], continue_on_error=True, idempotent=True
        )
        if cache is not None and len(responses) == len(plan) and all(r.error() is None for r in responses):
            cache.put("orgmeta", key, [r.body for r in responses])
    if len(responses) != len(plan):
        raise errors.MalformedResponse(
            "invalid_batch_response", f"metadata $batch: {len(plan)} requests, {len(responses)} responses"
        )
    out: dict[str, TableMeta] = {}
    missing: dict[str, str] = {}
    for (table, kind, _), resp in zip(plan, responses, strict=True):  # lengths checked above
        if table in missing:
            continue
        body = resp.body if isinstance(resp.body, dict) else {}
        if resp.error() is not None:
            if kind == "entity":
                err = body.get("error") or {}
                missing[table] = f"HTTP {resp.status} {err.get('code', '')}: {err.get('message', '')}".strip()
            continue
        if kind == "entity":
            tm = TableMeta(
                table,
                body.get("EntitySetName", ""),
                localized(body.get("DisplayName"), language),
                bool(body.get("IsCustomEntity")),
                bool(body.get("ChangeTrackingEnabled")),
                body.get("PrimaryIdAttribute", ""),
                body.get("PrimaryNameAttribute", "") or "",
            )
            for a in body.get("Attributes") or []:
                if a.get("AttributeOf"):  # companions (…name, …yominame) are not columns of their own
                    continue
                tm.attributes[a["LogicalName"]] = Attribute(
                    a["LogicalName"],
                    str(a.get("AttributeType", "")),
                    localized(a.get("DisplayName"), language),
                    bool(a.get("IsCustomAttribute")),
                    a.get("IsValidForUpdate") is not False,
                )
            out[table] = tm
            continue
        known = out.get(table)
        if known is None:
            continue
        for doc in body.get("value", []):
            attr = known.attributes.get(doc.get("LogicalName", ""))
            if attr is None:
                continue
            if "MaxLength" in doc:
                attr.max_length = doc.get("MaxLength")
            if "Targets" in doc:
                attr.targets = tuple(doc.get("Targets") or ())
            if "DateTimeBehavior" in doc:
                dtb = doc.get("DateTimeBehavior")
                attr.datetime_behavior = dtb.get("Value") if isinstance(dtb, dict) else dtb
            if kind in _OPTION_CASTS:
                attr.options, attr.option_set, attr.global_option_set = _options_of(doc, language)
    return OrgMetadata(out, missing)


# ---- the configuration a run uses ---------------------------------------------------------------------------


def runtime_entity(entity: Entity, meta: OrgMetadata) -> Entity:
    """The entity with option labels from the org (YAML labels override) and no filter column if the table lacks it."""
    if entity.dynamics is None:
        return entity
    tm = meta.tables.get(entity.dynamics.table)
    if tm is None:
        return entity
    update: dict[str, Any] = {}
    if entity.sync_filter_column and entity.sync_filter_column not in tm.attributes:
        update["sync_filter_column"] = None

    def resolve(fields: list[FieldMap]) -> list[FieldMap]:
        out = []
        for f in fields:
            attr = tm.attributes.get(f.dynamics)
            if f.transform == "picklist" and attr is not None and attr.options:
                f = f.model_copy(update={"options": {**attr.options, **(f.options or {})}})
            out.append(f)
        return out

    update["fields"] = resolve(entity.fields)
    update["extra_fields"] = resolve(entity.extra_fields)
    return entity.model_copy(update=update)


def runtime_config(config: SyncConfig, meta: OrgMetadata) -> SyncConfig:
    return SyncConfig(sync=config.sync, entities=[runtime_entity(e, meta) for e in config.entities])


def mapped_tables(config: SyncConfig) -> list[str]:
    return [e.dynamics.table for e in config.entities if e.dynamics is not None]


def run_casts(config: SyncConfig) -> dict[str, set[str]]:
    """What a sync run needs beyond the columns: the option sets of its picklist fields. The state and status
    columns of every table are ``statecode`` and ``statuscode`` (their AttributeType is State / Status)."""
    out: dict[str, set[str]] = {}
    for e in config.entities:
        if e.dynamics is None:
            continue
        need = out.setdefault(e.dynamics.table, set())
        for f in e.all_fields:
            if f.transform == "picklist":
                need.add(
                    {"statecode": "StateAttributeMetadata", "statuscode": "StatusAttributeMetadata"}.get(
                        f.dynamics, "PicklistAttributeMetadata"
                    )
                )
    return out
