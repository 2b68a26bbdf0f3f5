"""``sync-pipeline init``: an ``entities.yaml`` from the org's metadata and Marketo's describe endpoints.

What it reads (the same public endpoints any client reads):

- Dataverse ``EntityDefinitions`` (custom tables: ``IsCustomEntity``), and per mapped table its attributes with
  their types, lengths, lookup targets, DateTimeBehavior and option sets (one ``$batch``, engine/orgmeta.py);
- Marketo ``leads/describe2.json``, ``customobjects.json`` (each custom object's fields, dedupe fields and
  relationships, "Custom Objects" page), and the standard objects' ``describe.json``.

What it writes, as the native sync does it (domain.md 1.10 and the Marketo field-mapping page): the native
default mapping for the standard tables (the packaged ``entities.yaml``, minus the fields whose column or
Marketo field this org lacks, which become comments), plus the org's custom columns matched to Marketo fields
by display name, and custom tables matched to Marketo custom objects by display name (their link fields by the
custom object's relationships). What it could not match becomes a comment saying why. Option labels are not
written: the sync reads them from the org at run time.

On an existing file it never drops anything: entities and fields the file has stay as they are (and in its
order), discovered ones it lacks are added; the CLI shows the diff and writes only when asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from sync_pipeline.config.model import DEFAULT_PATH
from sync_pipeline.engine import orgmeta

# Dataverse AttributeType -> our transform (AttributeTypeCode page; DateOnly behaviour -> date).
_TRANSFORMS = {
    "String": "text",
    "Memo": "text",
    "Integer": "integer",
    "BigInt": "integer",
    "Decimal": "number",
    "Double": "number",
    "Money": "number",
    "Boolean": "boolean",
    "DateTime": "datetime",
    "Picklist": "picklist",
    "State": "picklist",
    "Status": "picklist",
    "Lookup": "lookup",
    "Owner": "owner",
    "Customer": "customer_account",
    "Uniqueidentifier": "text",
}
# ... and the Marketo dataType a created lead field gets (Field Management page's data types).
_MARKETO_TYPES = {
    "text": "string",
    "integer": "integer",
    "number": "float",
    "boolean": "boolean",
    "datetime": "datetime",
    "date": "date",
    "picklist": "string",
    "lookup": "string",
    "owner": "string",
    "customer_account": "string",
}
_SYSTEM_FIELDS = {"marketoGUID", "createdAt", "updatedAt", "dynamicsIsDeleted", "id"}
_SYSTEM_COLUMNS = {
    "createdon",
    "modifiedon",
    "versionnumber",
    "createdby",
    "modifiedby",
    "statuscode",
    "importsequencenumber",
    "overriddencreatedon",
    "timezoneruleversionnumber",
    "utcconversiontimezonecode",
    "owningbusinessunit",
    "owninguser",
    "owningteam",
}
TEMPLATE_EXAMPLES = {"project"}  # the packaged file's custom-entity example: not a native default
_RELATED = {"lead": ("contact", "lead"), "company": ("account",), "opportunity": ("opportunity",)}
HEADER = """\
# Written by `sync-pipeline init` from the org's metadata (EntityDefinitions) and Marketo's describe
# endpoints: the native sync's default mapping for the standard tables plus this org's custom columns and
# tables matched by display name. Option-set labels are read from the org at every run (add
# `options: {code: label}` to a field to override a label). Check it with `sync-pipeline validate`.
# Field syntax: see the packaged entities.yaml (direction, policy, transform, target).
"""


def norm(text: str) -> str:
    """Display names compared the way people read them: case, spaces and punctuation ignored."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _bare(logical: str) -> str:
    """A custom logical name without its publisher prefix (``new_projectid`` -> ``projectid``)."""
    return logical.split("_", 1)[1] if "_" in logical else logical


@dataclass
class MissingField:
    """A custom person column with no Marketo lead field: what ``--create-marketo-fields`` would create."""

    name: str
    display_name: str
    data_type: str
    length: int | None
    column: str
    table: str


@dataclass
class Discovery:
    sync: dict[str, Any]
    entities: list[dict[str, Any]]
    comments: dict[str, list[str]] = field(default_factory=dict)  # entity name (or "") -> comment lines
    notes: list[str] = field(default_factory=list)
    missing_marketo_fields: list[MissingField] = field(default_factory=list)
    meta: orgmeta.OrgMetadata | None = None


def _template() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))


def _fmap(f: dict[str, Any] | list[Any]) -> str:
    return yaml.safe_dump(f, default_flow_style=True, sort_keys=False, width=10_000).strip()


def _value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return _fmap(v)
    return yaml.safe_dump(v, width=10_000).strip().removesuffix("...").strip()


def _marketo_objects(mclient: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(standard objects by name incl. the lead, custom objects by apiName), each with its describe."""
    from sync_pipeline.clients.marketo import MarketoError

    std: dict[str, dict[str, Any]] = {"lead": mclient.describe2()}
    for name, path in (
        ("company", "companies"),
        ("opportunity", "opportunities"),
        ("opportunityRole", "opportunities/roles"),
        ("salesPerson", "salespersons"),
    ):
        try:
            std[name] = mclient.describe_object(path)
        except (
            MarketoError
        ) as exc:  # e.g. disabled while Marketo's native CRM sync is on (Lead Database page)
            std[name] = {"error": str(exc)}
    custom: dict[str, dict[str, Any]] = {}
    for c in mclient.list_custom_objects():
        custom[str(c["name"])] = mclient.describe_object(f"customobjects/{c['name']}") or c
    return std, custom


def _fields_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(f.get("name")): f for f in doc.get("fields") or []}


def discover(dclient: Any, mclient: Any, prefix: str = "") -> Discovery:
    template = _template()
    tables = dclient.entity_definitions(select="LogicalName,EntitySetName,IsCustomEntity")
    custom_tables = sorted(
        t["LogicalName"] for t in tables if t.get("IsCustomEntity") and t["LogicalName"].startswith(prefix)
    )
    native = [
        e
        for e in template["entities"]
        if e["name"] not in TEMPLATE_EXAMPLES and (e.get("dynamics") or {}).get("table") not in custom_tables
    ]
    std_tables = [e["dynamics"]["table"] for e in native if e.get("dynamics")]
    meta = orgmeta.read_metadata(dclient, std_tables + custom_tables)
    std, custom = _marketo_objects(mclient)
    out = Discovery(sync=template.get("sync") or {}, entities=[], meta=meta)
    names = {e["name"] for e in native}

    for e in native:
        block: dict[str, Any] = {k: v for k, v in e.items() if k not in ("fields", "extra_fields")}
        comments = out.comments.setdefault(e["name"], [])
        obj = e["marketo"]["object"]
        mdoc = std.get(obj) if obj in std else custom.get(obj)
        if e.get("dynamics"):
            tm = meta.table(e["dynamics"]["table"])
            if tm is None:
                out.notes.append(
                    f"table {e['dynamics']['table']!r} is not in the org: entity {e['name']!r} left out"
                )
                names.discard(e["name"])
                continue
            flt = e.get("sync_filter_column", "new_synctomkto")
            if flt and flt not in tm.attributes:
                block["sync_filter_column"] = None
                comments.append(f"the org's {tm.logical_name} table has no {flt} column: every row syncs")
        else:
            tm = None
        if not mdoc or "error" in mdoc:
            why = f" ({mdoc['error']})" if mdoc and "error" in mdoc else ""
            out.notes.append(f"Marketo has no object {obj!r}{why}: entity {e['name']!r} left out")
            names.discard(e["name"])
            continue
        mfields = _fields_of(mdoc)
        for part in ("fields", "extra_fields"):
            kept = []
            for f in e.get(part) or []:
                if tm is not None and f["dynamics"] not in tm.attributes:
                    comments.append(f"not in this org's {tm.logical_name} table: {_fmap(f)}")
                elif f["marketo"] not in mfields:
                    comments.append(f"no Marketo field {f['marketo']!r} on {obj}: {_fmap(f)}")
                else:
                    kept.append(dict(f))
            if kept or part == "fields":
                block[part] = kept
        out.entities.append(block)

    # Custom columns of the standard tables, matched to Marketo fields by display name.
    by_table = {e["dynamics"]["table"]: e for e in out.entities if e.get("dynamics")}
    for table, e in by_table.items():
        tm = meta.table(table)
        if tm is None:
            continue
        obj = e["marketo"]["object"]
        mfields = _fields_of(std.get(obj) or custom.get(obj) or {})
        used_m = {f["marketo"] for part in ("fields", "extra_fields") for f in e.get(part) or []}
        used_d = {f["dynamics"] for part in ("fields", "extra_fields") for f in e.get(part) or []}
        flt = e.get("sync_filter_column", "new_synctomkto")
        for attr in tm.attributes.values():
            if not attr.custom or attr.name in used_d or attr.name == flt or not attr.name.startswith(prefix):
                continue
            fmap = _field_for(attr, meta, names, {n: f for n, f in mfields.items() if n not in used_m})
            comments = out.comments.setdefault(e["name"], [])
            if fmap is None:
                if obj == "lead":
                    spec = _missing_field(attr, table)
                    if spec.name not in {m.name for m in out.missing_marketo_fields}:
                        out.missing_marketo_fields.append(spec)
                    comments.append(
                        f"custom column {attr.name} ({attr.display or attr.name}): no Marketo lead "
                        f"field named {attr.display or attr.name!r}; --create-marketo-fields creates "
                        f"{spec.name} ({spec.data_type})"
                    )
                else:
                    comments.append(
                        f"custom column {attr.name} ({attr.display or attr.name}): no {obj} field "
                        "with that display name (Marketo's standard objects take no custom fields "
                        "through the API)"
                    )
                continue
            e.setdefault("extra_fields", []).append(fmap)
            used_m.add(fmap["marketo"])

    # Custom tables -> custom objects.
    for table in custom_tables:
        tm = meta.table(table)
        if tm is None:
            continue
        obj = next(
            (
                c
                for c, d in custom.items()
                if norm(d.get("displayName", "")) == norm(tm.display)
                or norm(c.removesuffix("_c")) == norm(_bare(table))
            ),
            None,
        )
        name = _bare(table)
        if obj is None:
            out.comments.setdefault("", []).append(
                f"custom table {table} ({tm.display}) has no Marketo custom object with that display name: create "
                f"one (a dedupe field for {tm.primary_id}, one field per column) and run init again"
            )
            continue
        doc = custom[obj]
        dedupe = list(doc.get("dedupeFields") or [])
        if len(dedupe) != 1:
            out.comments.setdefault("", []).append(
                f"custom object {obj} has dedupe fields {dedupe}; one field holding the {table} id is needed"
            )
            continue
        block = {
            "name": name,
            "dynamics": {"table": table, "entity_set": tm.entity_set},
            "marketo": {"object": obj, "key": dedupe[0]},
        }
        if "new_synctomkto" not in tm.attributes:
            block["sync_filter_column"] = None
        comments = out.comments.setdefault(name, [])
        links = {str(r.get("field")): r for r in doc.get("relationships") or []}
        fields, used = [], {tm.primary_id, "new_synctomkto"}
        for fname, mf in _fields_of(doc).items():
            if fname in _SYSTEM_FIELDS or fname == dedupe[0]:
                continue
            column = _column_for(fname, mf, links.get(fname), tm, used)
            if column is None:
                comments.append(
                    f"Marketo field {fname} ({mf.get('displayName') or fname}) of {obj}: no column of "
                    f"{table} with that display name"
                )
                continue
            used.add(column.name)
            fmap = _field_for(column, meta, names | {name}, {fname: mf}, force=fname)
            if fmap is not None:
                fields.append(fmap)
        for attr in tm.attributes.values():
            if attr.name not in used and attr.custom and attr.name != tm.primary_id:
                comments.append(
                    f"column {attr.name} ({attr.display}): no field of {obj} with that display name"
                )
        block["fields"] = fields
        out.entities.append(block)
        names.add(name)
    return out


def _field_for(
    attr: orgmeta.Attribute,
    meta: orgmeta.OrgMetadata,
    entities: set[str],
    mfields: dict[str, dict[str, Any]],
    force: str | None = None,
) -> dict[str, Any] | None:
    """The field map of a column, if a Marketo field matches it (or ``force`` names the field)."""
    target_name = force or next(
        (
            n
            for n, mf in mfields.items()
            if norm(str(mf.get("displayName") or n)) in (norm(attr.display), norm(_bare(attr.name)))
            or norm(n) == norm(attr.display)
        ),
        None,
    )
    if target_name is None:
        return None
    transform = _TRANSFORMS.get(attr.type)
    if transform is None:
        return None
    if transform == "datetime" and attr.datetime_behavior == "DateOnly":
        transform = "date"
    if transform == "text" and str(mfields.get(target_name, {}).get("dataType")) == "email":
        transform = "email"
    out: dict[str, Any] = {"marketo": target_name, "dynamics": attr.name}
    if transform == "lookup":
        target = next((_entity_of(t, meta) for t in attr.targets if _entity_of(t, meta) in entities), None)
        if target is None:
            return None
        out.update(transform="lookup", target=target)
    elif transform != "text":
        out["transform"] = transform
    if attr.datetime_behavior == "TimeZoneIndependent":  # the default for datetime is user_local
        out["date_time_behavior"] = "time_zone_independent"
    return out


def _entity_of(table: str, meta: orgmeta.OrgMetadata) -> str:
    tm = meta.table(table)
    return _bare(table) if tm is not None and tm.custom else table


def _column_for(
    fname: str, mf: dict[str, Any], link: dict[str, Any] | None, tm: orgmeta.TableMeta, used: set[str]
) -> orgmeta.Attribute | None:
    """The column of a custom table that fills a custom object field: a link field by its relationship's
    target, anything else by display name (or its logical name without the publisher prefix)."""
    free = [a for a in tm.attributes.values() if a.name not in used and a.name not in _SYSTEM_COLUMNS]
    if link is not None:
        related = str((link.get("relatedTo") or {}).get("name", "")).lower()
        wanted = _RELATED.get(related, (related,))
        for a in free:
            if a.type in ("Lookup", "Customer") and any(t in wanted for t in a.targets):
                return a
    keys = {norm(fname), norm(str(mf.get("displayName") or fname))}
    return next((a for a in free if norm(a.display) in keys or norm(_bare(a.name)) in keys), None)


def _missing_field(attr: orgmeta.Attribute, table: str) -> MissingField:
    label = attr.display or _bare(attr.name)
    words = re.findall(r"[A-Za-z0-9]+", label) or [_bare(attr.name)]
    name = words[0].lower() + "".join(w[:1].upper() + w[1:] for w in words[1:])
    transform = _TRANSFORMS.get(attr.type, "text")
    if transform == "datetime" and attr.datetime_behavior == "DateOnly":
        transform = "date"
    dtype = "currency" if attr.type == "Money" else _MARKETO_TYPES.get(transform, "string")
    length = None
    if transform in ("lookup", "owner", "customer_account"):
        return MissingField(name, label, "string", 36, attr.name, table)
    if attr.type == "Memo":
        return MissingField(name, label, "text", None, attr.name, table)
    if dtype == "string":
        length = min(attr.max_length or 255, 255)
        if (attr.max_length or 0) > 255:
            dtype, length = "text", None
    return MissingField(name, label, dtype, length, attr.name, table)


def create_marketo_fields(mclient: Any, found: Discovery) -> list[tuple[str, str]]:
    """Create exactly the missing custom lead fields; returns (name, status or reason) per field."""
    if not found.missing_marketo_fields:
        return []
    inputs = []
    for m in found.missing_marketo_fields:
        item: dict[str, Any] = {
            "name": m.name,
            "displayName": m.display_name,
            "dataType": m.data_type,
            "description": f"Dynamics {m.table}.{m.column} (created by sync-pipeline init)",
            "isHidden": False,
            "isHtmlEncodingInEmail": True,
            "isSensitive": False,
        }
        if m.length:
            item["length"] = m.length
        inputs.append(item)
    results = mclient.create_lead_fields(inputs)
    out = []
    for m, r in zip(found.missing_marketo_fields, results, strict=True):
        status = str(r.get("status"))
        if status != "created":
            reasons = "; ".join(f"{x.get('code')} {x.get('message')}" for x in r.get("reasons") or [])
            status = f"{status}: {reasons}" if reasons else status
        out.append((m.name, status))
    return out


# ---- rendering and merging ------------------------------------------------------------------------------------


def render_data(sync: dict[str, Any], entities: list[dict[str, Any]], comments: dict[str, list[str]]) -> str:
    lines = [HEADER, "sync:"]
    lines += [f"  {k}: {_value(v)}" for k, v in sync.items()]
    lines += ["", "entities:"]
    for e in entities:
        lines.append(f"  - name: {e['name']}")
        lines += [
            f"    {k}: {_value(v)}" for k, v in e.items() if k not in ("name", "fields", "extra_fields")
        ]
        for part in ("fields", "extra_fields"):
            if part not in e:
                continue
            if not e[part]:
                lines.append(f"    {part}: []")
                continue
            lines.append(f"    {part}:")
            lines += [f"      - {_fmap(f)}" for f in e[part]]
        for c in comments.get(e["name"], []):
            lines.append(f"    # {c}")
        lines.append("")
    for c in comments.get("", []):
        lines.append(f"# {c}")
    return "\n".join(lines).rstrip() + "\n"


def render(found: Discovery) -> str:
    return render_data(found.sync, found.entities, found.comments)


def merge_with_existing(found: Discovery, existing: str) -> str:
    """The user's file, unchanged in what it syncs, with what the org offers beyond it as comments.

    Nothing of the user's is removed, changed or re-added (a field the user deleted stays deleted): a column or
    table the org has and the file does not map is listed as a commented-out line or block to uncomment, and a
    mapped column the org no longer has is flagged (``validate`` fails on it until it is fixed)."""
    raw = yaml.safe_load(existing) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("entities"), list):
        raise ValueError("the existing file is not an entities.yaml (no 'entities' list); move it away first")
    mine = [dict(e) for e in raw["entities"]]
    by_name = {e.get("name"): e for e in mine}
    by_table = {(e.get("dynamics") or {}).get("table"): e for e in mine if e.get("dynamics")}
    comments: dict[str, list[str]] = {}
    tail: list[str] = []
    for d in found.entities:
        e = by_name.get(d["name"]) or by_table.get((d.get("dynamics") or {}).get("table"))
        if e is None:
            block = render_data({}, [d], {d["name"]: found.comments.get(d["name"], [])}).split(
                "entities:\n", 1
            )[1]
            tail.append(f"found in the org, not mapped here (uncomment to sync): entity {d['name']}")
            tail += [ln[2:] if ln.startswith("  ") else ln for ln in block.rstrip().splitlines()]
            continue
        notes = comments.setdefault(str(e.get("name")), [])
        have = {f.get("marketo") for part in ("fields", "extra_fields") for f in e.get(part) or []}
        have_cols = {f.get("dynamics") for part in ("fields", "extra_fields") for f in e.get(part) or []}
        for part in ("fields", "extra_fields"):
            for f in d.get(part) or []:
                if f["marketo"] not in have and f["dynamics"] not in have_cols:
                    notes.append(f"available in the org, not mapped here: - {_fmap(f)}")
        notes += [
            c
            for c in found.comments.get(d["name"], [])
            if not c.startswith(("not in this org", "no Marketo"))
        ]
    for e in mine:
        table = (e.get("dynamics") or {}).get("table")
        tm = found.meta.table(table) if table and found.meta is not None else None
        if tm is None:
            continue
        for f in (f for p in ("fields", "extra_fields") for f in e.get(p) or []):
            if f.get("dynamics") not in tm.attributes:
                comments.setdefault(str(e.get("name")), []).append(
                    f"no longer in the org: column {f.get('dynamics')} (validate fails until it is fixed or removed)"
                )
    comments[""] = list(found.comments.get("", [])) + tail
    return render_data(raw.get("sync") or found.sync, mine, comments)
