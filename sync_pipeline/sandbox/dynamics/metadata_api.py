"""The metadata routes of the Dataverse sandbox: EntityDefinitions, Attributes (with type casts),
relationships and global option sets, with ``$select``, ``$filter`` and ``$expand`` as documented in
"Query table definitions using the Web API"
(https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api):

- ``$filter`` on enum properties takes ``Microsoft.Dynamics.CRM.OwnershipTypes'UserOwned'``; on managed and
  complex properties the ``/Value`` path (``IsCustomizable/Value eq true``); labels cannot be filtered.
- ``$expand=Attributes($select=...;$filter=...)`` (and the relationship collections) on ``EntityDefinitions``;
  ``$expand=OptionSet,GlobalOptionSet`` on the picklist/boolean/state/status casts.
- ``MetadataId`` is always returned; unknown properties answer 400 "Could not find a property named ...".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sync_pipeline.sandbox.dynamics import metadata as md
from sync_pipeline.sandbox.dynamics.odata import ODataError, compile_filter
from sync_pipeline.sandbox.dynamics.store import DataverseFault
from sync_pipeline.sandbox.dynamics.wire import ODATA_HEADERS
from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.schema import Column, Table

if TYPE_CHECKING:  # pragma: no cover
    from sync_pipeline.sandbox.dynamics.server import DynamicsSandbox

P = "/api/data/v9\\.2/"
_GUID = r"[0-9a-fA-F-]{36}"
_CAST = r"(?:/Microsoft\.Dynamics\.CRM\.(?P<cast>\w+))?"
ENTITY_KEY = rf"EntityDefinitions\((?:LogicalName='(?P<logical>[^']+)'|(?P<entity_id>{_GUID}))\)"
ATTRIBUTE_KEY = rf"Attributes\((?:LogicalName='(?P<attr>[^']+)'|(?P<attr_id>{_GUID}))\)"
_REL_COLLECTIONS = ("ManyToOneRelationships", "OneToManyRelationships", "ManyToManyRelationships", "Keys")


def routes(sb: DynamicsSandbox) -> list[tuple[str, str, Any]]:
    """(pattern, route name, handler); registered before the generic entity-set routes."""
    api = MetadataApi(sb)
    return [
        (r"EntityDefinitions", "dynamics.entitydefinitions", api.entity_definitions),
        (ENTITY_KEY, "dynamics.entitydefinition", api.entity_definition),
        (ENTITY_KEY + "/Attributes" + _CAST, "dynamics.attributes", api.attributes),
        (ENTITY_KEY + "/" + ATTRIBUTE_KEY + _CAST, "dynamics.attribute", api.attribute),
        (
            ENTITY_KEY + f"/(?P<nav>{'|'.join(_REL_COLLECTIONS)})",
            "dynamics.entityrelationships",
            api.entity_relationships,
        ),
        (r"RelationshipDefinitions" + _CAST, "dynamics.relationships", api.relationship_definitions),
        (
            rf"RelationshipDefinitions\((?:SchemaName='(?P<schema>[^']+)'|(?P<rel_id>{_GUID}))\)" + _CAST,
            "dynamics.relationship",
            api.relationship_definition,
        ),
        (r"GlobalOptionSetDefinitions", "dynamics.globaloptionsets", api.global_option_sets),
        (
            rf"GlobalOptionSetDefinitions\((?:Name='(?P<name>[^']+)'|(?P<os_id>{_GUID}))\)" + _CAST,
            "dynamics.globaloptionset",
            api.global_option_set,
        ),
    ]


# ------------------------------------------------------------------------------------ query options
def split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and quotes."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quoted = 0, False
    for ch in text:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_expand(text: str | None) -> dict[str, dict[str, str]]:
    """``Attributes($select=a,b;$filter=x eq 1),OptionSet`` -> {"Attributes": {"$select": ..., "$filter": ...}}."""
    out: dict[str, dict[str, str]] = {}
    for item in split_top(text or "", ","):
        m = re.fullmatch(r"(\w+)(?:\((.*)\))?", item, re.S)
        if m is None:
            raise ODataError(f"Syntax error in $expand near '{item}'.")
        opts: dict[str, str] = {}
        for opt in split_top(m.group(2) or "", ";"):
            key, eq, value = opt.partition("=")
            if not eq or key.strip() not in ("$select", "$filter", "$expand"):
                raise ODataError(f"The query option '{key.strip()}' is not supported inside $expand here.")
            opts[key.strip()] = value.strip()
        out[m.group(1)] = opts
    return out


def _flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """A row view for $filter: managed/complex properties also as ``Name/Value``."""
    flat = dict(doc)
    for k, v in doc.items():
        if isinstance(v, dict) and "Value" in v:
            flat[f"{k}/Value"] = v["Value"]
    return flat


def _filter_kinds(kinds: dict[str, str]) -> dict[str, str]:
    out = dict(kinds)
    for k, kind in kinds.items():
        if kind in ("managed", "complex"):
            out[f"{k}/Value"] = (
                "enum"
                if k in ("RequiredLevel", "AttributeTypeName", "FormatName", "DateTimeBehavior")
                else "bool"
            )
    return out


def apply_options(
    docs: list[dict[str, Any]],
    options: Mapping[str, str | None],
    kinds: dict[str, str],
    type_name: str,
    navigation: tuple[str, ...] = (),
    always: tuple[str, ...] = ("MetadataId",),
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """$filter then $select over metadata documents; returns (docs, selected names or None)."""
    flt, select = options.get("$filter"), options.get("$select")
    if flt:
        predicate = compile_filter(flt, _filter_kinds(kinds), type_name)
        docs = [d for d in docs if predicate(_flatten(d))]
    names: list[str] | None = None
    if select:
        names = [n.strip() for n in select.split(",") if n.strip()]
        for n in names:
            if n not in kinds and n not in navigation:
                raise ODataError(
                    f"Could not find a property named '{n}' on type 'Microsoft.Dynamics.CRM.{type_name}'."
                )
        keep = set(names) | set(always)
        docs = [{k: v for k, v in d.items() if k in keep or k == "@odata.type"} for d in docs]
    return docs, names


def _context(sb: DynamicsSandbox, path: str, names: list[str] | None, entity: bool = False) -> str:
    sel = f"({','.join(names)})" if names else ""
    return f"{sb.api_url}/api/data/v9.2/$metadata#{path}{sel}{'/$entity' if entity else ''}"


def _json(body: dict[str, Any]) -> Response:
    return Response.json(body, headers=ODATA_HEADERS)


class MetadataApi:
    def __init__(self, sb: DynamicsSandbox):
        self.sb = sb

    @property
    def tables(self) -> dict[str, Table]:
        return self.sb.schema.tables

    # -------------------------------------------------------------------------------- lookups
    def table(self, req: Request) -> Table:
        logical, mid = req.params.get("logical"), req.params.get("entity_id")
        for t in self.tables.values():
            if (logical and t.logical_name == logical.lower()) or (
                mid and md._id(t.logical_name) == mid.lower()
            ):
                return t
        raise DataverseFault(404, "0x80040217", f"Could not find an entity with name '{logical or mid}'.")

    @staticmethod
    def _cast_ok(cast: str | None, allowed: list[str]) -> None:
        if cast and cast not in allowed:
            raise DataverseFault(
                400,
                "0x80060888",
                f"The type 'Microsoft.Dynamics.CRM.{cast}' is not compatible "
                f"with the type of the segment before it.",
            )

    # ---------------------------------------------------------------------------- entities
    def _entity_docs(
        self, tables: list[Table], req: Request
    ) -> tuple[list[dict[str, Any]], list[str] | None]:
        kinds = {k: p.kind for k, p in md.ENTITY.items()}
        expand = parse_expand(req.arg("$expand"))
        for nav in expand:
            if nav not in md.ENTITY_NAVIGATION:
                raise ODataError(
                    f"Could not find a property named '{nav}' on type 'Microsoft.Dynamics.CRM."
                    f"EntityMetadata'."
                )
        docs = [md.entity_definition(t) for t in tables]
        docs, names = apply_options(
            docs, {"$filter": req.arg("$filter"), "$select": req.arg("$select")}, kinds, "EntityMetadata"
        )
        by_id = {md._id(t.logical_name): t for t in tables}
        for doc in docs:
            table = by_id[doc["MetadataId"]]
            for nav, opts in expand.items():
                doc[nav] = self._navigation(table, nav, opts)
        return docs, names

    def _navigation(self, table: Table, nav: str, opts: dict[str, str]) -> list[dict[str, Any]]:
        if nav == "Attributes":
            return self._attribute_docs(table, None, opts)[0]
        if nav == "Keys":
            return []
        rels = self._relationships_of(table, nav)
        return apply_options(rels, opts, md.RELATIONSHIP_KINDS, "OneToManyRelationshipMetadata")[0]

    def _relationships_of(self, table: Table, nav: str) -> list[dict[str, Any]]:
        rels = md.relationships(self.tables)
        if nav == "ManyToOneRelationships":
            return [r for r in rels if r["ReferencingEntity"] == table.logical_name]
        if nav == "OneToManyRelationships":
            return [r for r in rels if r["ReferencedEntity"] == table.logical_name]
        return []

    def entity_definitions(self, req: Request) -> Response:
        docs, names = self._entity_docs(list(self.tables.values()), req)
        return _json({"@odata.context": _context(self.sb, "EntityDefinitions", names), "value": docs})

    def entity_definition(self, req: Request) -> Response:
        docs, names = self._entity_docs([self.table(req)], req)
        return _json(
            {"@odata.context": _context(self.sb, "EntityDefinitions", names, entity=True), **docs[0]}
        )

    def entity_relationships(self, req: Request) -> Response:
        table, nav = self.table(req), req.params["nav"]
        docs = [] if nav == "Keys" else self._relationships_of(table, nav)
        docs, names = apply_options(
            docs,
            {"$filter": req.arg("$filter"), "$select": req.arg("$select")},
            md.RELATIONSHIP_KINDS,
            "OneToManyRelationshipMetadata",
        )
        return _json(
            {
                "@odata.context": _context(
                    self.sb, f"EntityDefinitions('{table.logical_name}')/{nav}", names
                ),
                "value": docs,
            }
        )

    # -------------------------------------------------------------------------- attributes
    def _attribute_docs(
        self,
        table: Table,
        cast: str | None,
        opts: Mapping[str, str | None],
        columns: list[Column] | None = None,
    ) -> tuple[list[dict[str, Any]], list[str] | None]:
        self._cast_ok(cast, md.ATTRIBUTE_TYPES)
        cols = [
            c
            for c in (columns if columns is not None else table.columns)
            if not cast or md.type_name(c) == cast
        ]
        kinds = {k: p.kind for k, p in md.ATTRIBUTE.items()}
        navigation: tuple[str, ...] = ()
        type_name = "AttributeMetadata"
        if cast:
            kinds.update(md.DERIVED.get(cast, {}))
            navigation = md.DERIVED_NAVIGATION.get(cast, ())
            type_name = cast
        expand = parse_expand(opts.get("$expand"))
        for nav in expand:
            if nav not in navigation:
                raise ODataError(
                    f"Could not find a property named '{nav}' on type 'Microsoft.Dynamics.CRM.{type_name}'."
                )
        docs = [md.attribute_definition(table, c) for c in cols]
        if cast:  # the declared type of the segment: no @odata.type needed in minimal metadata
            for d in docs:
                d.pop("@odata.type", None)
        docs, names = apply_options(docs, opts, kinds, type_name, navigation)
        if expand:
            by_id = {md._id(table.logical_name, c.name): c for c in cols}
            for doc in docs:
                col = by_id[doc["MetadataId"]]
                for nav, nav_opts in expand.items():
                    doc[nav] = self._option_set(table, col, nav, nav_opts)
        return docs, names

    def _option_set(self, table: Table, col: Column, nav: str, opts: dict[str, str]) -> dict[str, Any] | None:
        os_doc = md.option_set(table, col)
        if os_doc is None:
            return None
        if nav == "GlobalOptionSet" and not col.global_option_set:
            return None
        docs, _ = apply_options([os_doc], opts, md.OPTIONSET_KINDS, "OptionSetMetadataBase")
        return docs[0]

    def attributes(self, req: Request) -> Response:
        table, cast = self.table(req), req.params.get("cast")
        docs, names = self._attribute_docs(
            table, cast, {k: req.arg(k) for k in ("$select", "$filter", "$expand")}
        )
        path = f"EntityDefinitions('{table.logical_name}')/Attributes" + (
            f"/Microsoft.Dynamics.CRM.{cast}" if cast else ""
        )
        return _json({"@odata.context": _context(self.sb, path, names), "value": docs})

    def attribute(self, req: Request) -> Response:
        table, cast = self.table(req), req.params.get("cast")
        name, mid = req.params.get("attr"), req.params.get("attr_id")
        col = next(
            (
                c
                for c in table.columns
                if (name and c.name == name.lower())
                or (mid and md._id(table.logical_name, c.name) == mid.lower())
            ),
            None,
        )
        if col is None:
            raise DataverseFault(
                404,
                "0x80040217",
                f"Could not find attribute '{name or mid}' on entity '{table.logical_name}'.",
            )
        self._cast_ok(cast, md.ATTRIBUTE_TYPES)
        if cast and md.type_name(col) != cast:
            raise DataverseFault(
                404, "0x80060888", f"The attribute '{col.name}' is a {md.type_name(col)}, not a {cast}."
            )
        docs, names = self._attribute_docs(
            table, cast, {k: req.arg(k) for k in ("$select", "$filter", "$expand")}, [col]
        )
        path = f"EntityDefinitions('{table.logical_name}')/Attributes" + (
            f"/Microsoft.Dynamics.CRM.{cast}" if cast else ""
        )
        return _json({"@odata.context": _context(self.sb, path, names, entity=True), **docs[0]})

    # ------------------------------------------------------------------------ relationships
    def relationship_definitions(self, req: Request) -> Response:
        cast = req.params.get("cast")
        self._cast_ok(cast, ["OneToManyRelationshipMetadata", "ManyToManyRelationshipMetadata"])
        docs = [] if cast == "ManyToManyRelationshipMetadata" else md.relationships(self.tables)
        docs, names = apply_options(
            docs,
            {"$filter": req.arg("$filter"), "$select": req.arg("$select")},
            md.RELATIONSHIP_KINDS,
            cast or "RelationshipMetadataBase",
        )
        return _json({"@odata.context": _context(self.sb, "RelationshipDefinitions", names), "value": docs})

    def relationship_definition(self, req: Request) -> Response:
        cast = req.params.get("cast")
        self._cast_ok(cast, ["OneToManyRelationshipMetadata"])
        schema, rid = req.params.get("schema"), req.params.get("rel_id")
        found = [
            r
            for r in md.relationships(self.tables)
            if (schema and r["SchemaName"].lower() == schema.lower())
            or (rid and r["MetadataId"] == rid.lower())
        ]
        if not found:
            raise DataverseFault(404, "0x80040217", f"Could not find relationship '{schema or rid}'.")
        docs, names = apply_options(
            found, {"$select": req.arg("$select")}, md.RELATIONSHIP_KINDS, cast or "RelationshipMetadataBase"
        )
        return _json(
            {"@odata.context": _context(self.sb, "RelationshipDefinitions", names, entity=True), **docs[0]}
        )

    # ------------------------------------------------------------------------ global option sets
    def global_option_sets(self, req: Request) -> Response:
        docs = md.global_option_sets(list(self.tables.values()))
        docs, names = apply_options(
            docs,
            {"$filter": req.arg("$filter"), "$select": req.arg("$select")},
            md.OPTIONSET_KINDS,
            "OptionSetMetadataBase",
        )
        return _json(
            {"@odata.context": _context(self.sb, "GlobalOptionSetDefinitions", names), "value": docs}
        )

    def global_option_set(self, req: Request) -> Response:
        cast = req.params.get("cast")
        self._cast_ok(cast, ["OptionSetMetadata"])
        name, oid = req.params.get("name"), req.params.get("os_id")
        found = [
            d
            for d in md.global_option_sets(list(self.tables.values()))
            if (name and d["Name"].lower() == name.lower()) or (oid and d["MetadataId"] == oid.lower())
        ]
        if not found:
            raise DataverseFault(404, "0x80040217", f"Could not find optionset with name '{name or oid}'.")
        docs, names = apply_options(
            found, {"$select": req.arg("$select")}, md.OPTIONSET_KINDS, cast or "OptionSetMetadataBase"
        )
        return _json(
            {"@odata.context": _context(self.sb, "GlobalOptionSetDefinitions", names, entity=True), **docs[0]}
        )
