"""Preflight validation of a connection: both systems, every mapped table, column, field and object.

Like the native sync's "Validate Sync" step (domain.md 1.16), but per mapped field. Each check is a line
``ok`` / ``warning`` / ``error`` with what to fix; an error is something no retry can fix (a missing
column, a table without change tracking, a refused credential), a warning is something that syncs but
may surprise (a Dynamics text longer than its Marketo field, a table without the sync-filter column,
which then syncs every row as the native sync does).

``sync-pipeline validate`` runs everything; the sync's own runs run the Dynamics checks at their start
from one metadata ``$batch`` (:func:`prepare`) and fail at once, with the check's message, on an error.
Plain Python, no Dagster.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sync_pipeline.config.model import ConfigError, Entity, FieldMap, SyncConfig
from sync_pipeline.engine import orgmeta
from sync_pipeline.engine.orgmeta import OrgMetadata
from sync_pipeline.engine.store.cache import CachedDescribe, ResponseCache

Status = Literal["ok", "warning", "error"]

# Dataverse AttributeType values a transform can read (AttributeMetadata.AttributeType,
# https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/attributetypecode).
COMPATIBLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("String", "Memo", "Uniqueidentifier", "EntityName"),
    "email": ("String",),
    "boolean": ("Boolean",),
    "integer": ("Integer", "BigInt"),
    "number": ("Integer", "BigInt", "Decimal", "Double", "Money"),
    "datetime": ("DateTime",),
    "date": ("DateTime",),
    "picklist": ("Picklist", "State", "Status"),
    "lookup": ("Lookup", "Customer", "Owner", "Uniqueidentifier"),
    "owner": ("Owner", "Lookup"),
    "customer_account": ("Customer", "Lookup"),
}
# Marketo dataType values that hold a transform's canonical value (describe / describe2 "dataType").
COMPATIBLE_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("string", "text", "email", "phone", "url"),
    "email": ("email", "string"),
    "boolean": ("boolean",),
    "integer": ("integer", "float", "currency"),
    "number": ("float", "currency", "integer"),
    "datetime": ("datetime",),
    "date": ("date", "datetime"),
    "picklist": ("string", "text"),
    "lookup": ("string", "reference"),
    "owner": ("string", "reference"),
    "customer_account": ("string", "reference"),
}
# Marketo object -> describe path (Lead Database pages: companies, opportunities, roles, sales persons,
# custom objects: https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database).
_DESCRIBE = {
    "company": "companies",
    "opportunity": "opportunities",
    "opportunityRole": "opportunities/roles",
    "salesPerson": "salespersons",
}


GUID_LENGTH = 36  # a Dynamics id as text (lookups and keys hold them)
# Custom object relationships link to persons, companies and opportunities ("Custom Objects" page).
_LINKABLE = ("lead", "contact", "account", "opportunity")


class ValidationFailed(ConfigError):
    """A preflight check found an error no retry can fix; the message lists every such check."""


@dataclass(frozen=True)
class Check:
    status: Status
    check: str  # e.g. "dynamics.column"
    subject: str  # e.g. "lead.emailaddress1"
    message: str
    fix: str = ""

    def line(self) -> str:
        out = f"{self.status:<7} {self.check:<20} {self.subject}: {self.message}"
        return out + (f" (fix: {self.fix})" if self.fix else "")


def _writes_dynamics(entity: Entity, f: FieldMap) -> bool:
    return entity.field_direction(f) in ("two_way", "to_dynamics")


def _writes_marketo(entity: Entity, f: FieldMap) -> bool:
    return entity.field_direction(f) in ("two_way", "to_marketo")


# ---- Dynamics, from the metadata ----------------------------------------------------------------------------


def dynamics_checks(config: SyncConfig, meta: OrgMetadata) -> list[Check]:
    out: list[Check] = []
    for e in config.entities:
        if e.dynamics is None:
            continue
        table = e.dynamics.table
        where = f"entity {e.name!r}: table {table!r}"
        tm = meta.table(table)
        if tm is None:
            why = meta.missing.get(table, "not found")
            if why.startswith("HTTP 404") or why == "not found":
                out.append(
                    Check(
                        "error",
                        "dynamics.table",
                        table,
                        f"{where} does not exist in the org ({why})",
                        "correct dynamics.table in entities.yaml (a logical name), or remove the entity",
                    )
                )
            else:
                out.append(
                    Check(
                        "error",
                        "dynamics.table",
                        table,
                        f"{where} cannot be read ({why})",
                        "give the application user's security role read access to the table",
                    )
                )
            continue
        if tm.entity_set and tm.entity_set != e.dynamics.entity_set:
            out.append(
                Check(
                    "error",
                    "dynamics.table",
                    table,
                    f"{where}: entity_set is "
                    f"{e.dynamics.entity_set!r} but the org's EntitySetName is {tm.entity_set!r}",
                    f"set dynamics.entity_set: {tm.entity_set}",
                )
            )
        else:
            out.append(Check("ok", "dynamics.table", table, f"{where} exists ({tm.entity_set})"))
        if not tm.change_tracking:
            out.append(
                Check(
                    "error",
                    "dynamics.tracking",
                    table,
                    f"{where}: change tracking is not enabled, so changes and deletes cannot be followed",
                    "Power Apps > Tables > the table > Properties > Advanced options > Track changes",
                )
            )
        else:
            out.append(Check("ok", "dynamics.tracking", table, f"{where}: change tracking enabled"))
        mod = e.dynamics.modified_column
        if mod and mod not in tm.attributes:
            out.append(
                Check(
                    "error",
                    "dynamics.column",
                    f"{table}.{mod}",
                    f"{where}: modified_column {mod!r} does not exist",
                    "set dynamics.modified_column to the table's modified-on column (or null)",
                )
            )
        flt = e.sync_filter_column
        if flt and flt in tm.attributes:
            ok = tm.attributes[flt].type == "Boolean"
            out.append(
                Check(
                    "ok" if ok else "error",
                    "dynamics.sync_filter",
                    f"{table}.{flt}",
                    f"{where}: sync filter column present; only an explicit No excludes a record"
                    if ok
                    else f"{where}: sync filter column {flt!r} is {tm.attributes[flt].type}, not a Yes/No "
                    "column",
                    "" if ok else "point sync_filter_column at a Yes/No column (or null)",
                )
            )
        elif flt:
            out.append(
                Check(
                    "warning",
                    "dynamics.sync_filter",
                    f"{table}.{flt}",
                    f"{where} has no column {flt!r}: every row syncs (as the native sync does without "
                    "the column)",
                    f"add a Yes/No column {flt!r} to filter, or set sync_filter_column: null to silence this",
                )
            )
        for f in e.all_fields:
            out += _column_checks(e, f, tm)
    return out


def _column_checks(e: Entity, f: FieldMap, tm: orgmeta.TableMeta) -> list[Check]:
    subject = f"{tm.logical_name}.{f.dynamics}"
    where = (
        f"entity {e.name!r}: column {f.dynamics!r} of table {tm.logical_name!r} (Marketo field {f.marketo!r})"
    )
    attr = tm.attributes.get(f.dynamics)
    if attr is None:
        similar = [a for a in tm.attributes if f.dynamics.lower() in a or a in f.dynamics.lower()][:3]
        return [
            Check(
                "error",
                "dynamics.column",
                subject,
                f"{where} does not exist",
                "correct the field's dynamics name in entities.yaml"
                + (f" (similar: {', '.join(similar)})" if similar else ""),
            )
        ]
    allowed = COMPATIBLE_COLUMNS.get(f.transform, ())
    if attr.type not in allowed:
        return [
            Check(
                "error",
                "dynamics.column",
                subject,
                f"{where} is {attr.type}, which transform {f.transform!r} cannot read",
                f"use a transform for {attr.type} columns, or another column",
            )
        ]
    out = [Check("ok", "dynamics.column", subject, f"{where}: {attr.type}")]
    if _writes_dynamics(e, f) and not attr.updatable:
        out.append(
            Check(
                "error",
                "dynamics.column",
                subject,
                f"{where} is read-only in Dynamics but the field syncs to Dynamics ({e.field_direction(f)})",
                "set direction: to_marketo on the field",
            )
        )
    if f.transform == "picklist":
        out += _option_checks(e, f, attr, subject, where)
    org_behavior = _BEHAVIORS.get(attr.datetime_behavior or "")
    if f.transform in ("date", "datetime") and org_behavior and org_behavior != f.behavior:
        out.append(
            Check(
                "error",
                "dynamics.column",
                subject,
                f"{where}: the column's DateTimeBehavior is "
                f"{attr.datetime_behavior}, the field declares {f.behavior}, so times would shift",
                f"set date_time_behavior: {org_behavior} on the field",
            )
        )
    return out


# DateTimeAttributeMetadata.DateTimeBehavior values -> the field setting (config/model.py).
_BEHAVIORS = {
    "UserLocal": "user_local",
    "TimeZoneIndependent": "time_zone_independent",
    "DateOnly": "date_only",
}


def _option_checks(e: Entity, f: FieldMap, attr: orgmeta.Attribute, subject: str, where: str) -> list[Check]:
    org = attr.options
    extra = sorted(set(f.options or {}) - set(org))
    labels = {**org, **(f.options or {})}
    if not labels:
        return [
            Check(
                "error",
                "dynamics.options",
                subject,
                f"{where}: no option labels (the org's option set is empty and entities.yaml gives none)",
                "add options: {code: label} to the field",
            )
        ]
    out: list[Check] = []
    if extra:
        out.append(
            Check(
                "warning",
                "dynamics.options",
                subject,
                f"{where}: entities.yaml labels codes the org does not have: {extra}",
                "remove them from options, or add them to the option set",
            )
        )
    twice = sorted(lbl for lbl, n in Counter(v.lower() for v in labels.values()).items() if n > 1)
    if twice:
        status: Status = "error" if _writes_dynamics(e, f) else "warning"
        out.append(
            Check(
                status,
                "dynamics.options",
                subject,
                f"{where}: labels {twice} name more than one code, "
                "so a Marketo value cannot be mapped back to one code",
                "override one of them with options: {code: label} in entities.yaml",
            )
        )
    if not out:
        source = (
            f"global option set {attr.option_set!r}" if attr.global_option_set else "the column's option set"
        )
        out.append(
            Check(
                "ok",
                "dynamics.options",
                subject,
                f"{where}: {len(labels)} codes map to labels both ways "
                f"(from {source}" + (", with entities.yaml overrides)" if f.options else ")"),
            )
        )
    return out


# ---- Marketo --------------------------------------------------------------------------------------------------


def _field_index(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(x.get("name")): x for x in doc.get("fields") or []}


def _searchable(doc: dict[str, Any]) -> set[str]:
    return {s[0] for s in doc.get("searchableFields") or [] if len(s) == 1}


def marketo_checks(
    config: SyncConfig, client: Any, meta: OrgMetadata | None, entities: list[Entity] | None = None
) -> list[Check]:
    from sync_pipeline.clients.marketo import MarketoError

    out: list[Check] = []
    described: dict[str, dict[str, Any] | None] = {}

    def describe(obj: str) -> dict[str, Any] | None:
        if obj not in described:
            try:
                if obj == config.sync.marketo_person_object:
                    described[obj] = client.describe2()
                else:
                    described[obj] = (
                        client.describe_object(_DESCRIBE.get(obj, f"customobjects/{obj}")) or None
                    )
            except MarketoError as exc:
                described[obj] = None
                out.append(
                    Check(
                        "error",
                        "marketo.object",
                        obj,
                        f"describe failed: {exc}",
                        "check the API user's role (Read-Only Lead, Read-Only Custom Object ...)",
                    )
                )
        return described[obj]

    custom = None
    for e in config.entities if entities is None else entities:
        obj = e.marketo.object
        standard = obj in _DESCRIBE or obj == config.sync.marketo_person_object
        if not standard and custom is None:
            try:
                custom = {str(c.get("name")) for c in client.list_custom_objects()}
            except MarketoError as exc:
                custom = set()
                out.append(
                    Check(
                        "error",
                        "marketo.object",
                        "customobjects",
                        f"list failed: {exc}",
                        "give the API user the Read-Write Custom Object permission",
                    )
                )
        if not standard and obj not in (custom or set()):
            out.append(
                Check(
                    "error",
                    "marketo.object",
                    obj,
                    f"entity {e.name!r}: custom object {obj!r} does not exist (or is not approved)",
                    "create and approve it in Marketo Admin > Marketo Custom Objects",
                )
            )
            continue
        doc = describe(obj)
        if doc is None:
            continue
        fields, searchable = _field_index(doc), _searchable(doc)
        dedupe = set(doc.get("dedupeFields") or [])
        key = e.marketo.key
        if key not in fields:
            out.append(
                Check(
                    "error",
                    "marketo.field",
                    f"{obj}.{key}",
                    f"entity {e.name!r}: key field {key!r} does not exist on {obj}",
                    f"create the field {key!r} (string, 36) or change marketo.key",
                )
            )
        elif key not in searchable and key not in dedupe:
            out.append(
                Check(
                    "error",
                    "marketo.field",
                    f"{obj}.{key}",
                    f"entity {e.name!r}: key field {key!r} is "
                    "not searchable, so records cannot be looked up by it",
                    "make it a dedupe or searchable field of the object",
                )
            )
        elif fields[key].get("length") and int(fields[key]["length"]) < GUID_LENGTH:
            out.append(
                Check(
                    "error",
                    "marketo.field",
                    f"{obj}.{key}",
                    f"entity {e.name!r}: key field {key!r} holds "
                    f"{fields[key]['length']} characters, a Dynamics id needs {GUID_LENGTH}",
                    f"lengthen {key!r} to at least {GUID_LENGTH}",
                )
            )
        else:
            out.append(
                Check(
                    "ok",
                    "marketo.field",
                    f"{obj}.{key}",
                    f"entity {e.name!r}: key field exists and is searchable",
                )
            )
        if e.is_person:
            for sys_field in ("dynamicsType", "dynamicsIsDeleted"):
                if sys_field not in fields:
                    out.append(
                        Check(
                            "error",
                            "marketo.field",
                            f"{obj}.{sys_field}",
                            f"system field {sys_field!r} does not exist",
                            "create it (init --create-marketo-fields)",
                        )
                    )
        links = {str(r.get("field")) for r in doc.get("relationships") or []}
        tm = meta.table(e.dynamics.table) if meta is not None and e.dynamics is not None else None
        for f in e.all_fields:
            out += _marketo_field_checks(e, f, obj, fields, links, tm)
    return out


def _marketo_field_checks(
    e: Entity,
    f: FieldMap,
    obj: str,
    fields: dict[str, dict[str, Any]],
    links: set[str],
    tm: orgmeta.TableMeta | None,
) -> list[Check]:
    subject = f"{obj}.{f.marketo}"
    where = f"entity {e.name!r}: Marketo field {f.marketo!r} of {obj} (Dynamics column {f.dynamics!r})"
    mf = fields.get(f.marketo)
    if mf is None:
        return [
            Check(
                "error",
                "marketo.field",
                subject,
                f"{where} does not exist",
                "create it in Marketo Admin > Field Management (or: sync-pipeline init --create-marketo-fields)"
                if e.is_person
                else "add the field to the object, or remove it from entities.yaml",
            )
        ]
    out: list[Check] = []
    dtype = str(mf.get("dataType", ""))
    if dtype not in COMPATIBLE_FIELDS.get(f.transform, (dtype,)):
        out.append(
            Check(
                "warning",
                "marketo.field",
                subject,
                f"{where} is {dtype}, transform {f.transform!r} writes another type",
                "check the field's type",
            )
        )
    if _writes_marketo(e, f) and mf.get("updateable") is False:
        out.append(
            Check(
                "error",
                "marketo.field",
                subject,
                f"{where} is not writable through the API",
                "make the field updateable, or set direction: to_dynamics / none",
            )
        )
    if (
        not e.is_person
        and f.transform == "lookup"
        and obj not in _DESCRIBE
        and f.target in _LINKABLE
        and f.marketo not in links
    ):
        out.append(
            Check(
                "warning",
                "marketo.link",
                subject,
                f"{where}: a link field without a relationship on the "
                "custom object, so Marketo will not show it as linked",
                "add the relationship in the custom object's definition",
            )
        )
    mlen = mf.get("length")
    if f.transform in ("lookup", "owner", "customer_account") and mlen and int(mlen) < GUID_LENGTH:
        out.append(
            Check(
                "error",
                "marketo.field",
                subject,
                f"{where} holds {mlen} characters, a Dynamics id needs {GUID_LENGTH}",
                f"lengthen {f.marketo!r} to at least {GUID_LENGTH}",
            )
        )
    attr = tm.attributes.get(f.dynamics) if tm is not None else None
    if tm is not None and attr is not None and attr.max_length and mlen:
        if _writes_marketo(e, f) and attr.max_length > int(mlen):
            out.append(
                Check(
                    "warning",
                    "length",
                    subject,
                    f"Dynamics {tm.logical_name}.{f.dynamics} holds "
                    f"{attr.max_length} characters, Marketo {obj}.{f.marketo} {mlen}: a longer value does not "
                    "fit",
                    f"lengthen {f.marketo} in Marketo or shorten the column",
                )
            )
        if _writes_dynamics(e, f) and int(mlen) > attr.max_length:
            out.append(
                Check(
                    "warning",
                    "length",
                    subject,
                    f"Marketo {obj}.{f.marketo} holds {mlen} characters, "
                    f"Dynamics {tm.logical_name}.{f.dynamics} {attr.max_length}: a longer value does "
                    "not fit",
                    f"lengthen {tm.logical_name}.{f.dynamics} or make the field to_marketo",
                )
            )
    if not out:
        out.append(Check("ok", "marketo.field", subject, f"{where}: {dtype}"))
    return out


def marketo_access_checks(client: Any) -> list[Check]:
    """Token, activities and bulk extract permissions, and the day's API quota."""
    from sync_pipeline.clients.marketo import MarketoAuthError, MarketoError

    out: list[Check] = []
    probes: list[tuple[str, str, Callable[[], Any], str]] = [
        (
            "marketo.activities",
            "activity types",
            client.activity_types,
            "give the API user's role Read-Only Activity",
        ),
        (
            "marketo.bulk",
            "bulk extract jobs",
            lambda: client.list_exports("leads"),
            "give the API user's role Read-Only Lead and the bulk extract permission",
        ),
    ]
    for name, what, call, fix in probes:
        try:
            call()
            out.append(Check("ok", name, "marketo", f"the API user can read {what}"))
        except MarketoAuthError:
            raise
        except MarketoError as exc:
            out.append(Check("error", name, "marketo", f"reading {what} failed: {exc}", fix))
    try:
        # Usage statistics: https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/rest-api
        # (GET /rest/v1/stats/usage.json: today's calls per API user).
        used = sum(int(r.get("total", 0)) for r in client.usage())
        left = client.governor.daily_quota - used
        status: Status = "ok" if left > client.governor.daily_quota * 0.1 else "warning"
        out.append(
            Check(
                status,
                "marketo.quota",
                "marketo",
                f"{used:,} calls used today, {left:,} of {client.governor.daily_quota:,} left",
                "" if status == "ok" else "wait for the daily reset (midnight US Central) before a backfill",
            )
        )
    except MarketoError as exc:
        out.append(
            Check(
                "warning",
                "marketo.quota",
                "marketo",
                f"today's usage is not readable ({exc}); this "
                f"pipeline budgets {client.governor.daily_quota:,} calls a day (MARKETO_DAILY_QUOTA)",
                "check Admin > Web Services > API call information",
            )
        )
    return out


# ---- entry points ---------------------------------------------------------------------------------------------


def connection_checks(
    config: SyncConfig,
    dynamics: Any,
    marketo: Any,
) -> tuple[list[Check], OrgMetadata | None]:
    """Everything: credentials, WhoAmI, metadata of every mapped table, Marketo objects, fields, access."""
    from sync_pipeline.clients import errors
    from sync_pipeline.clients.dynamics import AuthenticationError, DynamicsError
    from sync_pipeline.clients.marketo import MarketoAuthError, MarketoError

    out: list[Check] = []
    meta: OrgMetadata | None = None
    try:
        who = dynamics.whoami()
        try:
            org = dynamics.current_organization()
            name = f"{org.get('FriendlyName')} ({org.get('UniqueName')}, version {org.get('OrganizationVersion')}, "
        except DynamicsError:
            name = "("
        out.append(
            Check(
                "ok",
                "dynamics.login",
                dynamics.url,
                f"token and WhoAmI: organisation {name}id "
                f"{who.get('OrganizationId')}), application user {who.get('UserId')}",
            )
        )
        meta = orgmeta.read_metadata(dynamics, orgmeta.mapped_tables(config), config.sync.language)
        out += dynamics_checks(config, meta)
    except AuthenticationError as exc:
        out.append(
            Check(
                "error",
                "dynamics.login",
                dynamics.url,
                str(exc),
                "check DYNAMICS_AUTHORITY (tenant), DYNAMICS_CLIENT_ID/SECRET, and that the app registration "
                "is an application user of the environment with a security role",
            )
        )
    except errors.ClientError as exc:  # only Dynamics is called above (a malformed $batch answer included)
        out.append(Check("error", "dynamics.login", dynamics.url, str(exc), "check DYNAMICS_URL"))
    try:
        access = marketo_access_checks(marketo)  # its first call gets the token
        out.append(Check("ok", "marketo.login", marketo.base_url, "token accepted"))
        out += access + marketo_checks(config, marketo, meta)
    except MarketoAuthError as exc:
        out.append(
            Check(
                "error",
                "marketo.login",
                marketo.base_url,
                str(exc),
                "check MARKETO_BASE_URL (REST endpoint without /rest) and the LaunchPoint service's "
                "MARKETO_CLIENT_ID/SECRET",
            )
        )
    except MarketoError as exc:
        out.append(Check("error", "marketo.login", marketo.base_url, str(exc), "check MARKETO_BASE_URL"))
    return out, meta


def errors(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "error"]


# The sync's own runs: the Dynamics checks once per run, from one metadata call, and the run's configuration.
_PREPARED: dict[tuple[str, str], SyncConfig | ValidationFailed] = {}


def _remember(key: tuple[str, str], value: SyncConfig | ValidationFailed) -> None:
    while len(_PREPARED) >= 16:
        _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = value


def _failed(bad: list[Check]) -> ValidationFailed:
    return ValidationFailed(
        "preflight (sync-pipeline validate shows every check): "
        + "; ".join(f"{c.message} (fix: {c.fix})" if c.fix else c.message for c in bad)
    )


def prepare_persons(run_id: str, config: SyncConfig, marketo: Any, con: Any | None = None) -> None:
    """The person extract's preflight: every mapped person field exists on the Marketo lead (one describe call
    per run, or none while the state store's copy is fresh), so a missing field fails the run at once instead of
    a bulk export refused and retried."""
    key = (run_id, "marketo:" + getattr(marketo, "base_url", ""))
    if key not in _PREPARED:
        cache = ResponseCache(con, config) if con is not None else None
        client = CachedDescribe(marketo, cache) if cache is not None else marketo
        bad = errors(marketo_checks(config, client, None, entities=config.persons))
        if bad and cache is not None:
            cache.drop("marketo.describe2")
        _remember(key, _failed(bad) if bad else config)
    if isinstance(_PREPARED[key], ValidationFailed):
        raise ValidationFailed(str(_PREPARED[key]))


def prepare(run_id: str, config: SyncConfig, dynamics: Any, con: Any | None = None) -> SyncConfig:
    """The run's configuration (option labels from the org, filter column only where it exists), after the
    Dynamics checks; raises :class:`ValidationFailed` naming every error. Cached per run, and the org's answer
    in the state store (``con``) for ``sync.metadata_ttl_seconds``."""
    key = (run_id, getattr(dynamics, "url", ""))
    if key not in _PREPARED:  # the other steps of a failed run fail with the same message, no new call
        cache = ResponseCache(con, config) if con is not None else None
        meta = orgmeta.read_metadata(
            dynamics,
            orgmeta.mapped_tables(config),
            config.sync.language,
            casts=orgmeta.run_casts(config),
            cache=cache,
        )
        bad = errors(dynamics_checks(config, meta))
        if bad and cache is not None:
            cache.drop("orgmeta")
        _remember(key, _failed(bad) if bad else orgmeta.runtime_config(config, meta))
    found = _PREPARED[key]
    if isinstance(found, ValidationFailed):
        raise ValidationFailed(str(found))
    return found
