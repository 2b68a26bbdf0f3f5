"""Contract tests of the Dataverse sandbox's table definitions, written from Microsoft Learn:

- "Query table definitions using the Web API"
  https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api
- "Retrieve table definitions by name or MetadataId"
  https://learn.microsoft.com/power-apps/developer/data-platform/webapi/retrieve-metadata-name-metadataid
- the EntityMetadata / *AttributeMetadata / OneToManyRelationshipMetadata reference pages
  https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/entitymetadata
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics import DynamicsSandbox
from sync_pipeline.sandbox.tls import SandboxCA

EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DynamicsSandbox, SandboxCA]]:
    ca = SandboxCA.create(tmp_path_factory.mktemp("tls"))
    ctx = ca.server_context()
    sandbox = DynamicsSandbox(clock=Clock()).start(identity_ssl=ctx, api_ssl=ctx)
    yield sandbox, ca
    sandbox.stop()


@pytest.fixture(scope="module")
def api(sb: tuple[DynamicsSandbox, SandboxCA]) -> Iterator[httpx.Client]:
    sandbox, ca = sb
    form = {
        "grant_type": "client_credentials",
        "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret,
        "scope": f"{sandbox.api_url}/.default",
    }
    token = httpx.post(f"{sandbox.authority}/oauth2/v2.0/token", data=form, verify=str(ca.ca_path)).json()
    with httpx.Client(
        base_url=f"{sandbox.api_url}/api/data/v9.2/",
        verify=str(ca.ca_path),
        headers={
            "Authorization": f"Bearer {token['access_token']}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
        },
    ) as client:
        yield client


def _get(api: httpx.Client, path: str, **params: str) -> Any:
    resp = api.get(path, params=params or None)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_entity_definitions_select_any_documented_property(api: httpx.Client) -> None:
    doc = _get(
        api,
        "EntityDefinitions(LogicalName='account')",
        **{
            "$select": "DisplayName,IsKnowledgeManagementEnabled,EntitySetName,CanChangeTrackingBeEnabled,"
            "OwnershipType,ObjectTypeCode,IsCustomizable,ChangeTrackingEnabled"
        },
    )
    assert doc["@odata.context"].endswith(
        "$metadata#EntityDefinitions(DisplayName,IsKnowledgeManagementEnabled,"
        "EntitySetName,CanChangeTrackingBeEnabled,OwnershipType,ObjectTypeCode,"
        "IsCustomizable,ChangeTrackingEnabled)/$entity"
    )
    assert "MetadataId" in doc  # "The MetadataId property value is always returned."
    assert doc["CanChangeTrackingBeEnabled"] == {
        "Value": True,
        "CanBeChanged": True,
        "ManagedPropertyLogicalName": "canchangetrackingbeenabled",
    }
    label = doc["DisplayName"]
    assert (
        label["UserLocalizedLabel"]["Label"] == "Account"
        and label["LocalizedLabels"][0]["LanguageCode"] == 1033
    )
    assert doc["OwnershipType"] == "UserOwned" and doc["ObjectTypeCode"] == 1
    assert doc["IsKnowledgeManagementEnabled"] is False and doc["ChangeTrackingEnabled"] is True
    assert set(doc) == {
        "@odata.context",
        "MetadataId",
        "DisplayName",
        "IsKnowledgeManagementEnabled",
        "EntitySetName",
        "CanChangeTrackingBeEnabled",
        "OwnershipType",
        "ObjectTypeCode",
        "IsCustomizable",
        "ChangeTrackingEnabled",
    }
    bad = api.get("EntityDefinitions", params={"$select": "LogicalName,NoSuchProperty"})
    assert bad.status_code == 400 and "Could not find a property named 'NoSuchProperty'" in bad.text


def test_entity_definitions_filter_on_enum_managed_and_primitive(api: httpx.Client) -> None:
    owned = _get(
        api,
        "EntityDefinitions",
        **{
            "$select": "LogicalName",
            "$filter": "OwnershipType eq Microsoft.Dynamics.CRM.OwnershipTypes'UserOwned'",
        },
    )
    assert {d["LogicalName"] for d in owned["value"]} == {
        "lead",
        "contact",
        "account",
        "opportunity",
        "new_project",
    }
    customizable = _get(
        api,
        "EntityDefinitions",
        **{"$select": "LogicalName", "$filter": "IsCustomizable/Value eq true and IsCustomEntity eq true"},
    )
    assert [d["LogicalName"] for d in customizable["value"]] == ["new_project"]
    by_schema = _get(
        api, "EntityDefinitions", **{"$select": "LogicalName", "$filter": "SchemaName eq 'Account'"}
    )
    assert [d["LogicalName"] for d in by_schema["value"]] == ["account"]
    label = api.get("EntityDefinitions", params={"$filter": "DisplayName eq 'Account'"})
    assert label.status_code == 400


def test_expand_attributes_with_nested_select_and_filter(api: httpx.Client) -> None:
    doc = _get(
        api,
        "EntityDefinitions(LogicalName='lead')",
        **{
            "$select": "LogicalName",
            "$expand": "Attributes($select=LogicalName,AttributeType,RequiredLevel;$filter=IsValidForCreate eq true)",
        },
    )
    attrs = {a["LogicalName"]: a for a in doc["Attributes"]}
    assert "createdon" not in attrs and "lastname" in attrs
    assert attrs["lastname"]["RequiredLevel"]["Value"] == "ApplicationRequired"
    assert attrs["leadsourcecode"]["@odata.type"] == "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    assert set(attrs["lastname"]) == {
        "@odata.type",
        "MetadataId",
        "LogicalName",
        "AttributeType",
        "RequiredLevel",
    }
    rels = _get(
        api,
        "EntityDefinitions(LogicalName='lead')",
        **{
            "$select": "LogicalName",
            "$expand": "ManyToOneRelationships($select=ReferencedEntity,ReferencingAttribute)",
        },
    )
    assert ("account", "parentaccountid") in {
        (r["ReferencedEntity"], r["ReferencingAttribute"]) for r in rels["ManyToOneRelationships"]
    }


def test_attribute_type_casts_carry_type_specific_properties(api: httpx.Client) -> None:
    base = "EntityDefinitions(LogicalName='lead')/Attributes/Microsoft.Dynamics.CRM."
    dates = _get(
        api, base + "DateTimeAttributeMetadata", **{"$select": "LogicalName,DateTimeBehavior,Format"}
    )
    created = next(a for a in dates["value"] if a["LogicalName"] == "createdon")
    assert created["DateTimeBehavior"] == {"Value": "UserLocal"} and created["Format"] == "DateAndTime"
    strings = {
        a["LogicalName"]: a
        for a in _get(api, base + "StringAttributeMetadata", **{"$select": "LogicalName,MaxLength,Format"})[
            "value"
        ]
    }
    assert strings["subject"]["MaxLength"] == 300 and strings["emailaddress1"]["Format"] == "Email"
    lookups = {
        a["LogicalName"]: a
        for a in _get(api, base + "LookupAttributeMetadata", **{"$select": "LogicalName,Targets"})["value"]
    }
    assert lookups["parentaccountid"]["Targets"] == ["account"]
    assert lookups["ownerid"]["Targets"] == ["systemuser", "team"]
    status = _get(api, base + "StatusAttributeMetadata", **{"$select": "LogicalName", "$expand": "OptionSet"})
    options = {o["Value"]: o["State"] for o in status["value"][0]["OptionSet"]["Options"]}
    assert options[3] == 1 and options[1] == 0  # Qualified is a status of the Qualified state
    ints = _get(
        api,
        "EntityDefinitions(LogicalName='contact')/Attributes/Microsoft.Dynamics.CRM.IntegerAttributeMetadata",
        **{"$select": "LogicalName,MinValue,MaxValue"},
    )["value"]
    assert {a["LogicalName"] for a in ints} == {"mkt_leadscore"} and ints[0]["MaxValue"] == 2147483647
    money = _get(api, base + "MoneyAttributeMetadata", **{"$select": "LogicalName,Precision"})["value"]
    assert [(a["LogicalName"], a["Precision"]) for a in money] == [("revenue", 2)]
    booleans = _get(
        api,
        base + "BooleanAttributeMetadata",
        **{"$select": "LogicalName,DefaultValue", "$expand": "OptionSet"},
    )["value"]
    dnc = next(a for a in booleans if a["LogicalName"] == "donotphone")
    assert dnc["OptionSet"]["TrueOption"]["Value"] == 1 and dnc["OptionSet"]["FalseOption"]["Value"] == 0
    # Derived properties need the cast: on the base type they are unknown (400), as in Dataverse.
    unknown = api.get(
        "EntityDefinitions(LogicalName='lead')/Attributes", params={"$select": "LogicalName,MaxLength"}
    )
    assert unknown.status_code == 400 and "MaxLength" in unknown.text
    # Without $select each attribute is its derived type and carries that type's properties.
    full = {
        a["LogicalName"]: a for a in _get(api, "EntityDefinitions(LogicalName='lead')/Attributes")["value"]
    }
    assert full["subject"]["MaxLength"] == 300 and "OptionSet" not in full["leadsourcecode"]


def test_picklist_cast_expands_option_set_and_global_option_set(api: httpx.Client) -> None:
    path = "EntityDefinitions(LogicalName='new_project')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    doc = _get(
        api, path, **{"$select": "LogicalName", "$expand": "OptionSet($select=Options),GlobalOptionSet"}
    )
    status = next(a for a in doc["value"] if a["LogicalName"] == "new_status")
    assert [o["Value"] for o in status["OptionSet"]["Options"]] == [1, 2, 3, 4]
    assert status["OptionSet"]["Options"][0]["Label"]["UserLocalizedLabel"]["Label"] == "Planned"
    assert set(status["OptionSet"]) == {"MetadataId", "Options"}
    assert status["GlobalOptionSet"]["Name"] == "new_projectstatus" and status["GlobalOptionSet"]["IsGlobal"]
    local = _get(
        api,
        "EntityDefinitions(LogicalName='lead')/Attributes(LogicalName='leadsourcecode')/"
        "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
        **{"$select": "LogicalName", "$expand": "OptionSet($select=Options),GlobalOptionSet"},
    )
    assert local["LogicalName"] == "leadsourcecode" and local["GlobalOptionSet"] is None
    assert len(local["OptionSet"]["Options"]) == 10
    one = _get(api, "EntityDefinitions(LogicalName='account')/Attributes(LogicalName='name')")
    assert one["@odata.type"] == "#Microsoft.Dynamics.CRM.StringAttributeMetadata" and one["MaxLength"] == 160
    missing = api.get("EntityDefinitions(LogicalName='account')/Attributes(LogicalName='nope')")
    assert missing.status_code == 404
    wrong_cast = api.get(
        "EntityDefinitions(LogicalName='account')/Attributes(LogicalName='name')/"
        "Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    )
    assert wrong_cast.status_code == 404


def test_global_option_sets_and_relationship_definitions(api: httpx.Client) -> None:
    sets = _get(api, "GlobalOptionSetDefinitions", **{"$select": "Name"})["value"]
    assert [s["Name"] for s in sets] == ["new_projectstatus"]
    one = _get(api, "GlobalOptionSetDefinitions(Name='new_projectstatus')")
    assert one["OptionSetType"] == "Picklist" and [o["Value"] for o in one["Options"]] == [1, 2, 3, 4]
    rels = _get(
        api,
        "RelationshipDefinitions/Microsoft.Dynamics.CRM.OneToManyRelationshipMetadata",
        **{
            "$select": "SchemaName,ReferencedEntity,ReferencingEntity,ReferencingAttribute,"
            "ReferencingEntityNavigationPropertyName",
            "$filter": "ReferencingEntity eq 'contact'",
        },
    )["value"]
    pairs = {
        (r["ReferencedEntity"], r["ReferencingAttribute"], r["ReferencingEntityNavigationPropertyName"])
        for r in rels
    }
    assert ("account", "parentcustomerid", "parentcustomerid_account") in pairs
    assert ("contact", "parentcustomerid", "parentcustomerid_contact") in pairs
    schema = next(r["SchemaName"] for r in rels if r["ReferencingAttribute"] == "originatingleadid")
    single = _get(api, f"RelationshipDefinitions(SchemaName='{schema}')")
    assert single["ReferencedAttribute"] == "leadid" and single["RelationshipType"] == "OneToManyRelationship"
    assert single["CascadeConfiguration"]["Delete"] == "RemoveLink"


def test_csdl_is_consistent_with_entity_definitions(api: httpx.Client) -> None:
    resp = api.get("$metadata")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/xml")
    root = ET.fromstring(resp.content)
    schema = root.find(".//" + EDM + "Schema")
    assert schema is not None and schema.get("Namespace") == "Microsoft.Dynamics.CRM"
    types = {t.get("Name"): t for t in schema.findall(EDM + "EntityType")}
    defs = _get(api, "EntityDefinitions", **{"$select": "LogicalName,EntitySetName,PrimaryIdAttribute"})[
        "value"
    ]
    sets = {s.get("Name"): s.get("EntityType") for s in schema.iter(EDM + "EntitySet")}
    for d in defs:
        et = types[d["LogicalName"]]
        assert et.find(f"{EDM}Key/{EDM}PropertyRef").get("Name") == d["PrimaryIdAttribute"]
        assert sets[d["EntitySetName"]] == f"mscrm.{d['LogicalName']}"
        attrs = _get(
            api,
            f"EntityDefinitions(LogicalName='{d['LogicalName']}')/Attributes",
            **{"$select": "LogicalName,AttributeType"},
        )["value"]
        props = {p.get("Name"): p.get("Type") for p in et.findall(EDM + "Property")}
        for a in attrs:
            wire = (
                f"_{a['LogicalName']}_value"
                if a["AttributeType"] in ("Lookup", "Owner", "Customer")
                else a["LogicalName"]
            )
            assert wire in props, (d["LogicalName"], wire)
    lead_nav = {n.get("Name"): n.get("Type") for n in types["lead"].findall(EDM + "NavigationProperty")}
    assert lead_nav["parentaccountid"] == "mscrm.account"
    assert types["contact"].find(f"{EDM}Property[@Name='lastname']").get("MaxLength") == "50"
    entity_meta = {p.get("Name") for p in types["EntityMetadata"].findall(EDM + "Property")}
    assert {"CanChangeTrackingBeEnabled", "OwnershipType", "DisplayName", "LogicalName"} <= entity_meta
    assert {p.get("Name") for p in types["StringAttributeMetadata"].findall(EDM + "Property")} >= {
        "MaxLength",
        "Format",
    }
