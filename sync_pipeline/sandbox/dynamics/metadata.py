"""Table definitions (metadata) of the sandbox org, built from its schema so every path agrees.

Served as the Web API serves them (Microsoft Learn, "Query table definitions using the Web API",
https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api, and
"Retrieve table definitions by name or MetadataId",
https://learn.microsoft.com/power-apps/developer/data-platform/webapi/retrieve-metadata-name-metadataid):

- ``EntityDefinitions`` documents carry the documented ``EntityMetadata`` properties
  (https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/entitymetadata):
  managed properties as ``{Value, CanBeChanged, ManagedPropertyLogicalName}``
  (``BooleanManagedProperty``), labels as ``{LocalizedLabels, UserLocalizedLabel}`` (``Label``), enums as
  their member names (``OwnershipType: "UserOwned"``). ``MetadataId`` is always returned.
- ``Attributes`` is polymorphic: each item is its derived type (``@odata.type``
  ``#Microsoft.Dynamics.CRM.StringAttributeMetadata`` ...) and carries that type's properties; ``$select`` and
  ``$filter`` on the base collection only know ``AttributeMetadata`` properties; a type-cast segment
  (``/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata``) narrows the rows and makes the derived
  properties selectable. ``OptionSet``/``GlobalOptionSet`` are navigation properties: only with ``$expand``.
- Relationships are ``OneToManyRelationshipMetadata`` for every lookup of the schema
  (``RelationshipDefinitions``, ``ManyToOneRelationships``/``OneToManyRelationships``), option sets flagged
  global in the sandbox configuration are ``GlobalOptionSetDefinitions``.
- ``csdl()`` declares the same tables, keys, properties and lookups (navigation properties) and the metadata
  entity types with the property names the JSON documents use.

Simplifications (docs/sandbox.md lists them): one language (1033), display names derived from logical
names, no calculated/rollup columns, no ``_base`` money companions, no ``...name``/``...yominame`` lookup
companions, no alternate keys, no many-to-many relationships.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from sync_pipeline.sandbox.schema import Column, Table

NS = "Microsoft.Dynamics.CRM"
CREATED_ON = "2024-01-01T00:00:00Z"
# Real object type codes of the standard tables (entity reference pages); custom tables start at 10000.
_TYPE_CODES = {
    "account": 1,
    "contact": 2,
    "opportunity": 3,
    "lead": 4,
    "systemuser": 8,
    "team": 9,
    "teammembership": 23,
}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "sandbox-metadata:" + ":".join(parts)))


def label(text: str | None, *owner: str) -> dict[str, Any]:
    """A ``Label`` complex value (one language, 1033)."""
    if not text:
        return {"LocalizedLabels": [], "UserLocalizedLabel": None}
    loc = {
        "Label": text,
        "LanguageCode": 1033,
        "IsManaged": True,
        "MetadataId": _id("label", text, *owner),
        "HasChanged": None,
    }
    return {"LocalizedLabels": [loc], "UserLocalizedLabel": dict(loc)}


def managed(value: Any, logical: str, can_change: bool = True) -> dict[str, Any]:
    """A ``BooleanManagedProperty`` (or another managed property) value."""
    return {"Value": value, "CanBeChanged": can_change, "ManagedPropertyLogicalName": logical}


def _display(name: str) -> str:
    bare = name[4:] if name.startswith("new_") else name
    return bare.replace("_", " ").title()


# ---------------------------------------------------------------------------------------------- catalog
# Property kinds, for $select/$filter: string bool number guid datetime enum label managed complex collection.
# "managed"/"complex" filter through their "/Value" path; labels and collections cannot be filtered.


@dataclass(frozen=True)
class Prop:
    kind: str
    value: Callable[..., Any]


def _const(v: Any) -> Callable[..., Any]:
    return lambda *a: v


def _m(logical: str, value: bool = True, can_change: bool = True) -> Prop:
    return Prop("managed", lambda *a: managed(value, logical, can_change))


def _entity_props() -> dict[str, Prop]:
    t = lambda f: Prop("string", f)  # noqa: E731
    b = lambda v: Prop("bool", _const(v))  # noqa: E731
    return {
        "MetadataId": Prop("guid", lambda tb: _id(tb.logical_name)),
        "HasChanged": Prop("bool", _const(None)),
        "ActivityTypeMask": Prop("number", _const(0)),
        "AutoCreateAccessTeams": b(False),
        "AutoRouteToOwnerQueue": b(False),
        "CanBeInCustomEntityAssociation": _m("canbeincustomentityassociation"),
        "CanBeInManyToMany": _m("canbeinmanytomany"),
        "CanBePrimaryEntityInRelationship": _m("canbeprimaryentityinrelationship"),
        "CanBeRelatedEntityInRelationship": _m("canberelatedentityinrelationship"),
        "CanChangeHierarchicalRelationship": _m("canchangehierarchicalrelationship"),
        "CanChangeTrackingBeEnabled": _m("canchangetrackingbeenabled"),
        "CanCreateAttributes": _m("cancreateattributes"),
        "CanCreateCharts": _m("cancreatecharts"),
        "CanCreateForms": _m("cancreateforms"),
        "CanCreateViews": _m("cancreateviews"),
        "CanEnableSyncToExternalSearchIndex": _m("canenablesynctoexternalsearchindex"),
        "CanModifyAdditionalSettings": _m("canmodifyadditionalsettings"),
        "CanTriggerWorkflow": b(True),
        "ChangeTrackingEnabled": Prop("bool", lambda tb: tb.change_tracking),
        "CollectionSchemaName": t(lambda tb: _schema_name(tb) + "s"),
        "CreatedOn": Prop("datetime", _const(CREATED_ON)),
        "DataProviderId": Prop("guid", _const(None)),
        "DataSourceId": Prop("guid", _const(None)),
        "DaysSinceRecordLastModified": Prop("number", _const(0)),
        "Description": Prop("label", lambda tb: label(None)),
        "DisplayCollectionName": Prop(
            "label", lambda tb: label(_display(tb.entity_set), tb.logical_name, "c")
        ),
        "DisplayName": Prop(
            "label", lambda tb: label(tb.display_name or _display(tb.logical_name), tb.logical_name)
        ),
        "EnforceStateTransitions": b(False),
        "EntityColor": t(_const(None)),
        "EntityHelpUrl": t(_const(None)),
        "EntityHelpUrlEnabled": b(False),
        "EntitySetName": t(lambda tb: tb.entity_set),
        "ExternalCollectionName": t(_const(None)),
        "ExternalName": t(_const(None)),
        "HasActivities": b(True),
        "HasEmailAddresses": Prop("bool", lambda tb: tb.logical_name in ("lead", "contact")),
        "HasFeedback": b(False),
        "HasNotes": b(True),
        "IconLargeName": t(_const(None)),
        "IconMediumName": t(_const(None)),
        "IconSmallName": t(_const(None)),
        "IconVectorName": t(_const(None)),
        "IntroducedVersion": t(lambda tb: "1.0" if tb.custom else "5.0.0.0"),
        "IsActivity": b(False),
        "IsActivityParty": Prop(
            "bool", lambda tb: tb.logical_name in ("lead", "contact", "account", "systemuser")
        ),
        "IsAIRelevant": b(False),
        "IsArchivalEnabled": b(False),
        "IsAuditEnabled": _m("canmodifyauditsettings", False),
        "IsAvailableOffline": b(True),
        "IsBPFEntity": b(False),
        "IsBusinessProcessEnabled": b(False),
        "IsChildEntity": b(False),
        "IsConnectionsEnabled": _m("canmodifyconnectionsettings", False),
        "IsCustomEntity": Prop("bool", lambda tb: tb.custom),
        "IsCustomizable": _m("iscustomizable"),
        "IsDocumentManagementEnabled": b(False),
        "IsDocumentRecommendationsEnabled": b(False),
        "IsDuplicateDetectionEnabled": _m("canmodifyduplicatedetectionsettings"),
        "IsEnabledForCharts": b(True),
        "IsEnabledForExternalChannels": b(False),
        "IsEnabledForTrace": b(False),
        "IsImportable": b(True),
        "IsInteractionCentricEnabled": _m("canenableinteractioncentric", False),
        "IsIntersect": Prop("bool", lambda tb: tb.logical_name == "teammembership"),
        "IsKnowledgeManagementEnabled": b(False),
        "IsLogicalEntity": b(False),
        "IsMailMergeEnabled": _m("canmodifymailmergesettings"),
        "IsManaged": Prop("bool", lambda tb: not tb.custom),
        "IsMappable": _m("ismappable"),
        "IsMSTeamsIntegrationEnabled": b(False),
        "IsOfflineInMobileClient": _m("canmodifymobileclientoffline", False),
        "IsOneNoteIntegrationEnabled": b(False),
        "IsOptimisticConcurrencyEnabled": b(True),
        "IsPrivate": b(False),
        "IsQuickCreateEnabled": b(True),
        "IsReadingPaneEnabled": b(True),
        "IsReadOnlyInMobileClient": _m("canmodifymobileclientreadonly", False),
        "IsRenameable": _m("isrenameable"),
        "IsRetrieveAuditEnabled": b(False),
        "IsRetrieveMultipleAuditEnabled": b(False),
        "IsSLAEnabled": b(False),
        "IsSolutionAware": b(False),
        "IsStateModelAware": Prop("bool", lambda tb: tb.column("statecode") is not None),
        "IsValidForAdvancedFind": b(True),
        "IsValidForQueue": _m("canmodifyqueuesettings", False),
        "IsVisibleInMobile": _m("canmodifymobilevisibility"),
        "IsVisibleInMobileClient": _m("canmodifymobileclientvisibility"),
        "LogicalCollectionName": t(lambda tb: tb.entity_set),
        "LogicalName": t(lambda tb: tb.logical_name),
        "MobileOfflineFilters": t(_const(None)),
        "ModifiedOn": Prop("datetime", _const(CREATED_ON)),
        "ObjectTypeCode": Prop("number", lambda tb: _TYPE_CODES.get(tb.logical_name, _custom_code(tb))),
        "OwnershipType": Prop("enum", lambda tb: "UserOwned" if tb.user_owned else "OrganizationOwned"),
        "PrimaryIdAttribute": t(lambda tb: tb.primary_id),
        "PrimaryImageAttribute": t(_const(None)),
        "PrimaryNameAttribute": t(lambda tb: tb.primary_name),
        "RecurrenceBaseEntityLogicalName": t(_const(None)),
        "ReportViewName": t(lambda tb: f"Filtered{_schema_name(tb)}"),
        "SchemaName": t(lambda tb: _schema_name(tb)),
        "SettingOf": t(_const(None)),
        "Settings": Prop("collection", _const([])),
        "SyncToExternalSearchIndex": b(False),
        "TableType": t(_const("Standard")),
        "UsesBusinessDataLabelTable": b(False),
    }


ENTITY = _entity_props()
ENTITY_NAVIGATION = (
    "Attributes",
    "Keys",
    "ManyToManyRelationships",
    "ManyToOneRelationships",
    "OneToManyRelationships",
)


def _custom_code(table: Table) -> int:
    """Custom tables get codes from 10000 up; stable per logical name (the product numbers them in creation order)."""
    return 10000 + int(_id(table.logical_name)[:8], 16) % 90000


def _schema_name(table: Table) -> str:
    return table.logical_name if table.custom else table.logical_name.capitalize()


def _col_schema(col: Column) -> str:
    return col.name if col.name.startswith("new_") else col.name[:1].upper() + col.name[1:]


_TYPE_NAMES = {
    "Uniqueidentifier": "UniqueidentifierAttributeMetadata",
    "String": "StringAttributeMetadata",
    "Memo": "MemoAttributeMetadata",
    "Integer": "IntegerAttributeMetadata",
    "BigInt": "BigIntAttributeMetadata",
    "Decimal": "DecimalAttributeMetadata",
    "Double": "DoubleAttributeMetadata",
    "Money": "MoneyAttributeMetadata",
    "Boolean": "BooleanAttributeMetadata",
    "DateTime": "DateTimeAttributeMetadata",
    "Picklist": "PicklistAttributeMetadata",
    "State": "StateAttributeMetadata",
    "Status": "StatusAttributeMetadata",
    "Lookup": "LookupAttributeMetadata",
    "Owner": "LookupAttributeMetadata",
    "Customer": "LookupAttributeMetadata",
}
EDM = {
    "Uniqueidentifier": "Edm.Guid",
    "String": "Edm.String",
    "Memo": "Edm.String",
    "Integer": "Edm.Int32",
    "BigInt": "Edm.Int64",
    "Decimal": "Edm.Decimal",
    "Double": "Edm.Double",
    "Money": "Edm.Decimal",
    "Boolean": "Edm.Boolean",
    "DateTime": "Edm.DateTimeOffset",
    "Picklist": "Edm.Int32",
    "State": "Edm.Int32",
    "Status": "Edm.Int32",
    "Lookup": "Edm.Guid",
    "Owner": "Edm.Guid",
    "Customer": "Edm.Guid",
}
_TYPE_NAME_VALUES = {
    "Uniqueidentifier": "UniqueidentifierType",
    "String": "StringType",
    "Memo": "MemoType",
    "Integer": "IntegerType",
    "BigInt": "BigIntType",
    "Decimal": "DecimalType",
    "Double": "DoubleType",
    "Money": "MoneyType",
    "Boolean": "BooleanType",
    "DateTime": "DateTimeType",
    "Picklist": "PicklistType",
    "State": "StateType",
    "Status": "StatusType",
    "Lookup": "LookupType",
    "Owner": "OwnerType",
    "Customer": "CustomerType",
}
ATTRIBUTE_TYPES = sorted(set(_TYPE_NAMES.values()))


def _is_custom_attr(table: Table, col: Column) -> bool:
    return col.custom or col.name.startswith("new_") or (table.custom and "_" in col.name)


def _required_level(table: Table, col: Column) -> dict[str, Any]:
    value = (
        "SystemRequired"
        if col.name == table.primary_id
        else ("ApplicationRequired" if col.required else "None")
    )
    return managed(value, "canmodifyrequirementlevelsettings", not col.read_only)


def _attribute_props() -> dict[str, Prop]:
    b = lambda v: Prop("bool", _const(v))  # noqa: E731
    return {
        "MetadataId": Prop("guid", lambda tb, c: _id(tb.logical_name, c.name)),
        "HasChanged": Prop("bool", _const(None)),
        "AttributeOf": Prop("string", _const(None)),
        "AttributeType": Prop("enum", lambda tb, c: c.type),
        "AttributeTypeName": Prop("complex", lambda tb, c: {"Value": _TYPE_NAME_VALUES[c.type]}),
        "AutoNumberFormat": Prop("string", _const(None)),
        "CanBeSecuredForCreate": b(False),
        "CanBeSecuredForRead": b(False),
        "CanBeSecuredForUpdate": b(False),
        "CanModifyAdditionalSettings": _m("canmodifyadditionalsettings"),
        "ColumnNumber": Prop("number", lambda tb, c: tb.columns.index(c) + 1),
        "CreatedOn": Prop("datetime", _const(CREATED_ON)),
        "DeprecatedVersion": Prop("string", _const(None)),
        "Description": Prop("label", lambda tb, c: label(None)),
        "DisplayName": Prop(
            "label", lambda tb, c: label(c.display_name or _display(c.name), tb.logical_name, c.name)
        ),
        "EntityLogicalName": Prop("string", lambda tb, c: tb.logical_name),
        "ExternalName": Prop("string", _const(None)),
        "InheritsFrom": Prop("string", _const(None)),
        "IntroducedVersion": Prop("string", lambda tb, c: "1.0" if _is_custom_attr(tb, c) else "5.0.0.0"),
        "IsAuditEnabled": _m("canmodifyauditsettings"),
        "IsCustomAttribute": Prop("bool", _is_custom_attr),
        "IsCustomizable": _m("iscustomizable"),
        "IsDataSourceSecret": b(False),
        "IsFilterable": b(True),
        "IsGlobalFilterEnabled": _m("canmodifyglobalfiltersettings", False),
        "IsLogical": b(False),
        "IsManaged": Prop("bool", lambda tb, c: not _is_custom_attr(tb, c)),
        "IsPrimaryId": Prop("bool", lambda tb, c: c.name == tb.primary_id),
        "IsPrimaryName": Prop("bool", lambda tb, c: c.name == tb.primary_name),
        "IsRenameable": _m("isrenameable"),
        "IsRequiredForForm": b(False),
        "IsRetrievable": b(True),
        "IsSearchable": b(True),
        "IsSecured": b(False),
        "IsSortableEnabled": _m("canmodifyissortablesettings", False),
        "IsValidForAdvancedFind": _m("canmodifysearchsettings"),
        "IsValidForCreate": Prop("bool", lambda tb, c: not c.read_only or c.name == tb.primary_id),
        "IsValidForForm": b(True),
        "IsValidForGrid": b(True),
        "IsValidForRead": b(True),
        "IsValidForUpdate": Prop("bool", lambda tb, c: not c.read_only),
        "IsValidODataAttribute": b(True),
        "LinkedAttributeId": Prop("guid", _const(None)),
        "LogicalName": Prop("string", lambda tb, c: c.name),
        "ModifiedOn": Prop("datetime", _const(CREATED_ON)),
        "RequiredLevel": Prop("managed", _required_level),
        "SchemaName": Prop("string", lambda tb, c: _col_schema(c)),
        "Settings": Prop("collection", _const([])),
        "SourceType": Prop("number", _const(0)),
    }


ATTRIBUTE = _attribute_props()

_STRING_FORMATS = {
    "emailaddress1": "Email",
    "internalemailaddress": "Email",
    "website": "Url",
    "telephone1": "Phone",
    "telephone2": "Phone",
    "mobilephone": "Phone",
    "fax": "Phone",
    "address1_telephone1": "Phone",
}
_NUMBER_RANGES = {
    "Integer": (-2147483648, 2147483647),
    "BigInt": (-9223372036854775808, 9223372036854775807),
    "Decimal": (-100000000000, 100000000000),
    "Double": (-100000000000, 100000000000),
    "Money": (-922337203685477, 922337203685477),
}


# Status reason -> its state, and state -> its default status, for the standard tables (entity reference pages,
# e.g. https://learn.microsoft.com/power-apps/developer/data-platform/reference/entities/lead#BKMK_StatusCode).
_STATUS_STATE = {
    "lead": {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2},
    "opportunity": {1: 0, 2: 0, 3: 1, 4: 2, 5: 2},
}
_DEFAULT_STATUS = {"lead": {0: 1, 1: 3, 2: 4}, "opportunity": {0: 1, 1: 3, 2: 4}}


def _options(col: Column, table: str = "") -> dict[str, Any]:
    """OptionSetMetadata (``OptionSet`` navigation property) of a picklist/state/status column."""
    opts = []
    for code, text in col.options:
        opt: dict[str, Any] = {
            "Value": code,
            "Color": None,
            "IsManaged": False,
            "ExternalValue": None,
            "ParentValues": [],
            "Tag": None,
            "IsHidden": False,
            "MetadataId": None,
            "HasChanged": None,
            "Label": label(text, col.name, str(code)),
            "Description": label(None),
        }
        if col.type == "State":
            opt = {
                "@odata.type": f"#{NS}.StateOptionMetadata",
                **opt,
                "InvariantName": text,
                "DefaultStatus": _DEFAULT_STATUS.get(table, {}).get(code, code + 1),
            }
        elif col.type == "Status":
            opt = {
                "@odata.type": f"#{NS}.StatusOptionMetadata",
                **opt,
                "State": _STATUS_STATE.get(table, {}).get(code, 0 if code <= 1 else 1),
                "TransitionData": None,
            }
        opts.append(opt)
    kind = {"State": "State", "Status": "Status"}.get(col.type, "Picklist")
    name = col.global_option_set or col.name
    return {
        "MetadataId": _id("optionset", name),
        "HasChanged": None,
        "IsCustomOptionSet": col.name.startswith("new_"),
        "IsGlobal": bool(col.global_option_set),
        "IsManaged": not col.name.startswith("new_"),
        "Name": name,
        "ExternalTypeName": None,
        "OptionSetType": kind,
        "IntroducedVersion": "1.0",
        "ParentOptionSetName": None,
        "Description": label(None),
        "DisplayName": label(_display(name), "optionset", name),
        "IsCustomizable": managed(True, "iscustomizable"),
        "Options": opts,
    }


def boolean_options(col: Column) -> dict[str, Any]:
    def opt(v: int, t: str) -> dict[str, Any]:
        return {
            "Value": v,
            "Color": None,
            "IsManaged": True,
            "ExternalValue": "",
            "ParentValues": [],
            "Tag": None,
            "IsHidden": False,
            "MetadataId": None,
            "HasChanged": None,
            "Label": label(t, col.name, str(v)),
            "Description": label(None),
        }

    return {
        "MetadataId": _id("optionset", col.name),
        "HasChanged": None,
        "IsCustomOptionSet": False,
        "IsGlobal": False,
        "IsManaged": True,
        "Name": col.name,
        "ExternalTypeName": None,
        "OptionSetType": "Boolean",
        "IntroducedVersion": "5.0.0.0",
        "ParentOptionSetName": None,
        "Description": label(None),
        "DisplayName": label(_display(col.name), "optionset", col.name),
        "IsCustomizable": managed(True, "iscustomizable"),
        "TrueOption": opt(1, "Yes"),
        "FalseOption": opt(0, "No"),
    }


def _derived(tb: Table, c: Column) -> dict[str, Any]:
    """The derived type's own properties (https://learn.microsoft.com/power-apps/developer/data-platform/
    webapi/reference/stringattributemetadata and the sibling ``*AttributeMetadata`` reference pages)."""
    t = c.type
    if t in ("String", "Memo"):
        fmt = "TextArea" if t == "Memo" else _STRING_FORMATS.get(c.name, "Text")
        out: dict[str, Any] = {
            "MaxLength": c.max_length or (2000 if t == "Memo" else 100),
            "Format": fmt,
            "ImeMode": "Auto",
            "IsLocalizable": False,
            "DatabaseLength": 2 * (c.max_length or 100),
        }
        if t == "String":
            out.update(
                {"FormatName": {"Value": fmt}, "YomiOf": None, "FormulaDefinition": None, "SourceTypeMask": 0}
            )
        return out
    if t in _NUMBER_RANGES:
        lo, hi = _NUMBER_RANGES[t]
        out = {"MaxValue": hi, "MinValue": lo}
        if t == "Integer":
            out.update({"Format": "None", "FormulaDefinition": None, "SourceTypeMask": 0})
        if t in ("Decimal", "Double", "Money"):
            out.update({"Precision": 2, "ImeMode": "Auto"})
        if t == "Money":
            out.update(
                {
                    "PrecisionSource": 2,
                    "CalculationOf": None,
                    "IsBaseCurrency": False,
                    "FormulaDefinition": None,
                    "SourceTypeMask": 0,
                }
            )
        return out
    if t == "DateTime":
        date_only = c.name.endswith("closedate")
        return {
            "Format": "DateOnly" if date_only else "DateAndTime",
            "ImeMode": "Auto",
            "DateTimeBehavior": {"Value": "DateOnly" if date_only else "UserLocal"},
            "CanChangeDateTimeBehavior": managed(not c.read_only, "canchangedatetimebehavior", False),
            "MinSupportedValue": "1753-01-01T00:00:00Z",
            "MaxSupportedValue": "9999-12-30T23:59:59Z",
            "FormulaDefinition": None,
            "SourceTypeMask": 0,
        }
    if t == "Boolean":
        return {"DefaultValue": False, "FormulaDefinition": None, "SourceTypeMask": 0}
    if t == "Picklist":
        return {
            "DefaultFormValue": -1,
            "FormulaDefinition": None,
            "SourceTypeMask": 0,
            "ParentPicklistLogicalName": None,
            "ChildPicklistLogicalNames": [],
        }
    if t in ("State", "Status"):
        return {"DefaultFormValue": -1 if t == "Status" else None}
    if c.is_lookup:
        return {"Targets": list(c.targets), "Format": "None"}
    return {}


# Per derived type: its own property kinds (for $select/$filter after a cast) and navigation properties.
DERIVED: dict[str, dict[str, str]] = {}
DERIVED_NAVIGATION = {
    "PicklistAttributeMetadata": ("OptionSet", "GlobalOptionSet"),
    "BooleanAttributeMetadata": ("OptionSet", "GlobalOptionSet"),
    "StateAttributeMetadata": ("OptionSet", "GlobalOptionSet"),
    "StatusAttributeMetadata": ("OptionSet", "GlobalOptionSet"),
}


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "managed" if "ManagedPropertyLogicalName" in value else "complex"
    if isinstance(value, list):
        return "collection"
    return (
        "enum"
        if value in ("Auto", "Text", "TextArea", "Email", "Url", "Phone", "DateOnly", "DateAndTime", "None")
        else "string"
    )


def _sample_column(t: str) -> Column:
    return Column("x", t, 10, ("account",), ((1, "x"),))


for _t, _name in _TYPE_NAMES.items():
    _sample = _derived(Table("t", "ts", "tid", "tid", ()), _sample_column(_t))
    DERIVED.setdefault(_name, {}).update({k: _kind_of(v) for k, v in _sample.items()})
DERIVED["StringAttributeMetadata"]["YomiOf"] = "string"
DERIVED["StatusAttributeMetadata"]["DefaultFormValue"] = "number"
DERIVED["StateAttributeMetadata"]["DefaultFormValue"] = "number"
for _n in ("FormulaDefinition", "CalculationOf"):
    for _props in DERIVED.values():
        if _n in _props:
            _props[_n] = "string"


def type_name(col: Column) -> str:
    return _TYPE_NAMES.get(col.type, "AttributeMetadata")


def entity_definition(table: Table) -> dict[str, Any]:
    return {name: p.value(table) for name, p in ENTITY.items()}


def attribute_definition(table: Table, col: Column) -> dict[str, Any]:
    doc = {"@odata.type": f"#{NS}.{type_name(col)}"}
    doc.update({name: p.value(table, col) for name, p in ATTRIBUTE.items()})
    doc.update(_derived(table, col))
    return doc


def option_set(table: Table, col: Column) -> dict[str, Any] | None:
    if col.type == "Boolean":
        return boolean_options(col)
    if col.options:
        return _options(col, table.logical_name)
    return None


def global_option_sets(tables: list[Table]) -> list[dict[str, Any]]:
    """``GlobalOptionSetDefinitions``: the option sets columns declare global (one per name)."""
    seen: dict[str, dict[str, Any]] = {}
    for t in tables:
        for c in t.columns:
            if c.global_option_set and c.global_option_set not in seen:
                seen[c.global_option_set] = {
                    "@odata.type": f"#{NS}.OptionSetMetadata",
                    **_options(c, t.logical_name),
                }
    return list(seen.values())


# --------------------------------------------------------------------------------------- relationships
def nav_names(col: Column) -> list[tuple[str, str]]:
    """(single-valued navigation property name, target) of a lookup, as the API binds it."""
    return [(f"{col.name}_{t}" if len(col.targets) > 1 else col.name, t) for t in col.targets]


def relationships(tables: dict[str, Table]) -> list[dict[str, Any]]:
    """One ``OneToManyRelationshipMetadata`` per lookup target of the schema."""
    out = []
    for table in tables.values():
        for col in table.columns:
            if not col.is_lookup:
                continue
            for nav, target in nav_names(col):
                ref = tables.get(target)
                if ref is None:
                    continue
                schema = f"{target}_{table.logical_name}_{col.name}"
                custom = table.custom or col.name.startswith("new_")
                out.append(
                    {
                        "@odata.type": f"#{NS}.OneToManyRelationshipMetadata",
                        "MetadataId": _id("relationship", schema),
                        "HasChanged": None,
                        "SchemaName": schema,
                        "RelationshipType": "OneToManyRelationship",
                        "IsCustomRelationship": custom,
                        "IsManaged": not custom,
                        "IsValidForAdvancedFind": True,
                        "IsHierarchical": False,
                        "SecurityTypes": "Append" if col.type == "Owner" else "None",
                        "IntroducedVersion": "1.0" if custom else "5.0.0.0",
                        "RelationshipBehavior": 0,
                        "IsCustomizable": managed(True, "iscustomizable"),
                        "ReferencedAttribute": ref.primary_id,
                        "ReferencedEntity": target,
                        "ReferencingAttribute": col.name,
                        "ReferencingEntity": table.logical_name,
                        "ReferencedEntityNavigationPropertyName": schema,
                        "ReferencingEntityNavigationPropertyName": nav,
                        "AssociatedMenuConfiguration": {
                            "Behavior": "UseCollectionName",
                            "Group": "Details",
                            "Label": label(None),
                            "Order": 10000,
                            "IsCustomizable": True,
                            "Icon": None,
                            "ViewId": None,
                            "AvailableOffline": True,
                            "MenuId": None,
                            "QueryApi": None,
                        },
                        "CascadeConfiguration": {
                            "Assign": "NoCascade",
                            "Delete": "RemoveLink",
                            "Merge": "NoCascade",
                            "Reparent": "NoCascade",
                            "Share": "NoCascade",
                            "Unshare": "NoCascade",
                            "RollupView": "NoCascade",
                            "Archive": "NoCascade",
                        },
                    }
                )
    return out


RELATIONSHIP_KINDS = {
    k: _kind_of(v)
    for k, v in relationships(
        {"a": Table("a", "as", "aid", "aid", (Column("l", "Lookup", targets=("a",)),))}
    )[0].items()
}
RELATIONSHIP_KINDS.update(
    {"SecurityTypes": "enum", "RelationshipType": "enum", "HasChanged": "bool", "MetadataId": "guid"}
)
OPTIONSET_KINDS = {
    "MetadataId": "guid",
    "HasChanged": "bool",
    "IsCustomOptionSet": "bool",
    "IsGlobal": "bool",
    "IsManaged": "bool",
    "Name": "string",
    "ExternalTypeName": "string",
    "OptionSetType": "enum",
    "IntroducedVersion": "string",
    "ParentOptionSetName": "string",
    "Description": "label",
    "DisplayName": "label",
    "IsCustomizable": "managed",
    "Options": "collection",
    "TrueOption": "complex",
    "FalseOption": "complex",
}


# ---------------------------------------------------------------------------------------------- CSDL
def _kind_edm(kind: str, name: str) -> str:
    return {
        "string": "Edm.String",
        "bool": "Edm.Boolean",
        "number": "Edm.Int32",
        "guid": "Edm.Guid",
        "datetime": "Edm.DateTimeOffset",
        "label": f"{NS}.Label",
        "managed": f"{NS}.BooleanManagedProperty",
        "collection": "Collection(Edm.String)",
        "complex": f"{NS}.{name}",
    }.get(kind, f"{NS}.{name}")


def csdl(tables: list[Table]) -> str:
    """The service's CSDL: an entity type per table (key, properties with their EDM types, a navigation
    property per lookup target), the entity container, and the metadata entity types with the properties
    the JSON documents carry (OData CSDL XML v4.0, as ``GET [org]/api/data/v9.2/$metadata`` answers:
    https://learn.microsoft.com/power-apps/developer/data-platform/webapi/web-api-service-documents)."""
    by_name = {t.logical_name: t for t in tables}
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>',
        f'<Schema Namespace="{NS}" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">',
        '<EntityType Name="crmbaseentity" Abstract="true"/>',
    ]
    for t in tables:
        out.append(
            f'<EntityType Name="{t.logical_name}" BaseType="mscrm.crmbaseentity">'
            f'<Key><PropertyRef Name="{t.primary_id}"/></Key>'
        )
        for c in t.columns:
            facet = f' MaxLength="{c.max_length}"' if c.type in ("String", "Memo") and c.max_length else ""
            out.append(
                f'<Property Name="{escape(c.wire_name)}" Type="{EDM.get(c.type, "Edm.String")}"{facet}/>'
            )
        for c in t.columns:
            if c.is_lookup:
                for nav, target in nav_names(c):
                    if target in by_name:
                        out.append(
                            f'<NavigationProperty Name="{nav}" Type="mscrm.{target}" '
                            f'Partner="{target}_{t.logical_name}_{c.name}">'
                            f'<ReferentialConstraint Property="{c.wire_name}" '
                            f'ReferencedProperty="{by_name[target].primary_id}"/></NavigationProperty>'
                        )
        for other in tables:
            for c in other.columns:
                if c.is_lookup:
                    for _nav, target in nav_names(c):
                        if target == t.logical_name:
                            out.append(
                                f'<NavigationProperty Name="{t.logical_name}_{other.logical_name}_{c.name}" '
                                f'Type="Collection(mscrm.{other.logical_name})"/>'
                            )
        out.append("</EntityType>")
    out.append(
        '<EntityType Name="MetadataBase" Abstract="true"><Key><PropertyRef Name="MetadataId"/></Key>'
        '<Property Name="MetadataId" Type="Edm.Guid" Nullable="false"/>'
        '<Property Name="HasChanged" Type="Edm.Boolean"/></EntityType>'
    )

    def meta_type(
        name: str, base: str, kinds: dict[str, str], navs: tuple[str, ...] = (), abstract: bool = False
    ) -> None:
        flag = ' Abstract="true"' if abstract else ""
        out.append(f'<EntityType Name="{name}" BaseType="mscrm.{base}"{flag}>')
        for prop, kind in kinds.items():
            if prop not in ("MetadataId", "HasChanged"):
                out.append(f'<Property Name="{prop}" Type="{_kind_edm(kind, prop)}"/>')
        for nav in navs:
            out.append(f'<NavigationProperty Name="{nav}" Type="mscrm.OptionSetMetadataBase"/>')
        out.append("</EntityType>")

    meta_type("EntityMetadata", "MetadataBase", {k: p.kind for k, p in ENTITY.items()})
    meta_type("AttributeMetadata", "MetadataBase", {k: p.kind for k, p in ATTRIBUTE.items()})
    for derived, kinds in sorted(DERIVED.items()):
        meta_type(derived, "AttributeMetadata", kinds, DERIVED_NAVIGATION.get(derived, ()))
    meta_type("RelationshipMetadataBase", "MetadataBase", {}, abstract=True)
    meta_type("OneToManyRelationshipMetadata", "RelationshipMetadataBase", RELATIONSHIP_KINDS)
    meta_type("OptionSetMetadataBase", "MetadataBase", OPTIONSET_KINDS)
    out.append('<EntityContainer Name="System">')
    for t in tables:
        out.append(f'<EntitySet Name="{t.entity_set}" EntityType="mscrm.{t.logical_name}">')
        for c in t.columns:
            if c.is_lookup:
                for nav, target in nav_names(c):
                    if target in by_name:
                        out.append(
                            f'<NavigationPropertyBinding Path="{nav}" Target="{by_name[target].entity_set}"/>'
                        )
        out.append("</EntitySet>")
    out += [
        '<EntitySet Name="EntityDefinitions" EntityType="mscrm.EntityMetadata"/>',
        '<EntitySet Name="RelationshipDefinitions" EntityType="mscrm.RelationshipMetadataBase"/>',
        '<EntitySet Name="GlobalOptionSetDefinitions" EntityType="mscrm.OptionSetMetadataBase"/>',
        "</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>",
    ]
    return "".join(out)
