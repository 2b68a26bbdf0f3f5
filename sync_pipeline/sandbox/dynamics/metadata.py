"""EntityDefinitions / Attributes documents and the minimal CSDL ``$metadata`` of the sandbox org."""

from __future__ import annotations

import uuid
from typing import Any
from xml.sax.saxutils import escape

from sync_pipeline.sandbox.schema import Column, Table

# Property kinds for $filter/$select over the metadata documents themselves.
ENTITY_PROPS = {"LogicalName": "string", "EntitySetName": "string", "PrimaryIdAttribute": "string",
                "PrimaryNameAttribute": "string", "ChangeTrackingEnabled": "bool", "IsCustomEntity": "bool",
                "SchemaName": "string", "MetadataId": "guid", "IsOptimisticConcurrencyEnabled": "bool",
                "OwnershipType": "string", "DisplayName": "string", "ObjectTypeCode": "number"}
ATTRIBUTE_PROPS = {"LogicalName": "string", "AttributeType": "string", "MaxLength": "number",
                   "Targets": "string", "RequiredLevel": "string", "IsCustomAttribute": "bool",
                   "SchemaName": "string", "MetadataId": "guid", "AttributeOf": "string",
                   "IsValidForCreate": "bool", "IsValidForUpdate": "bool", "IsValidForRead": "bool",
                   "OptionSet": "string", "DisplayName": "string", "IsPrimaryId": "bool",
                   "IsPrimaryName": "bool"}

_ATTRIBUTE_TYPE_NAMES = {"Uniqueidentifier": "UniqueidentifierAttributeMetadata", "String": "StringAttributeMetadata",
                         "Memo": "MemoAttributeMetadata", "Integer": "IntegerAttributeMetadata",
                         "BigInt": "BigIntAttributeMetadata", "Decimal": "DecimalAttributeMetadata",
                         "Double": "DoubleAttributeMetadata", "Money": "MoneyAttributeMetadata",
                         "Boolean": "BooleanAttributeMetadata", "DateTime": "DateTimeAttributeMetadata",
                         "Picklist": "PicklistAttributeMetadata", "State": "StateAttributeMetadata",
                         "Status": "StatusAttributeMetadata", "Lookup": "LookupAttributeMetadata",
                         "Owner": "LookupAttributeMetadata", "Customer": "LookupAttributeMetadata"}
_EDM = {"Uniqueidentifier": "Edm.Guid", "String": "Edm.String", "Memo": "Edm.String", "Integer": "Edm.Int32",
        "BigInt": "Edm.Int64", "Decimal": "Edm.Decimal", "Double": "Edm.Double", "Money": "Edm.Decimal",
        "Boolean": "Edm.Boolean", "DateTime": "Edm.DateTimeOffset", "Picklist": "Edm.Int32", "State": "Edm.Int32",
        "Status": "Edm.Int32", "Lookup": "Edm.Guid", "Owner": "Edm.Guid", "Customer": "Edm.Guid"}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "sandbox-metadata:" + ":".join(parts)))


def _label(text: str) -> dict[str, Any]:
    return {"LocalizedLabels": [{"Label": text, "LanguageCode": 1033}],
            "UserLocalizedLabel": {"Label": text, "LanguageCode": 1033}}


def entity_definition(table: Table, type_code: int) -> dict[str, Any]:
    return {
        "MetadataId": _id(table.logical_name), "LogicalName": table.logical_name,
        "SchemaName": table.logical_name if table.custom else table.logical_name.capitalize(),
        "EntitySetName": table.entity_set, "PrimaryIdAttribute": table.primary_id,
        "PrimaryNameAttribute": table.primary_name, "ChangeTrackingEnabled": table.change_tracking,
        "IsCustomEntity": table.custom, "IsOptimisticConcurrencyEnabled": True,
        "OwnershipType": "UserOwned" if table.user_owned else "OrganizationOwned",
        "ObjectTypeCode": type_code, "DisplayName": table.logical_name,
    }


def attribute_definition(table: Table, col: Column) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{_ATTRIBUTE_TYPE_NAMES.get(col.type, 'AttributeMetadata')}",
        "MetadataId": _id(table.logical_name, col.name), "LogicalName": col.name, "SchemaName": col.name,
        "AttributeType": col.type, "AttributeOf": None, "DisplayName": col.name,
        "IsCustomAttribute": col.name.startswith("new_") or table.custom and "_" in col.name,
        "IsPrimaryId": col.name == table.primary_id, "IsPrimaryName": col.name == table.primary_name,
        "IsValidForRead": True, "IsValidForCreate": not col.read_only or col.name == table.primary_id,
        "IsValidForUpdate": not col.read_only,
        "RequiredLevel": {"Value": "SystemRequired" if col.name == table.primary_id else
                          ("ApplicationRequired" if col.required else "None"),
                          "CanBeChanged": not col.read_only},
        "MaxLength": col.max_length,
        "Targets": list(col.targets) if col.is_lookup else None,
    }
    if col.options:
        doc["OptionSet"] = {"Options": [{"Value": code, "Label": _label(label)} for code, label in col.options]}
    return doc


def csdl(tables: list[Table]) -> str:
    """A minimal CSDL document: entity types with keys, properties and entity sets."""
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>',
           '<Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">']
    for t in tables:
        out.append(f'<EntityType Name="{t.logical_name}"><Key><PropertyRef Name="{t.primary_id}"/></Key>')
        for c in t.columns:
            out.append(f'<Property Name="{escape(c.wire_name)}" Type="{_EDM.get(c.type, "Edm.String")}"/>')
        out.append("</EntityType>")
    out.append('<EntityContainer Name="System">')
    out += [f'<EntitySet Name="{t.entity_set}" EntityType="Microsoft.Dynamics.CRM.{t.logical_name}"/>'
            for t in tables]
    out.append("</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>")
    return "".join(out)
