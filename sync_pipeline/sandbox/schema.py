"""Schemas of the sandbox systems: Dataverse tables and Marketo objects.

Standard tables and objects are defined here, close to the real ones (see domain.md 1.10, 2.3, 3.4,
3.8); custom Dynamics tables and Marketo custom object types come from the sandbox configuration
(``sandbox.yaml``), the way an admin adds them to a real org. The sandbox servers, the generator and
the demo read these definitions; the sync pipeline never does: it discovers schemas over the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("sandbox.yaml")

# --------------------------------------------------------------------------------------------------
# Dataverse


@dataclass(frozen=True)
class Column:
    """One Dataverse attribute. Lookups are read as ``_<name>_value`` and written with ``@odata.bind``."""

    name: str
    type: str  # AttributeType: String Memo Integer BigInt Decimal Double Money Boolean DateTime
    #            Picklist State Status Lookup Owner Customer Uniqueidentifier
    max_length: int | None = None
    targets: tuple[str, ...] = ()  # lookup target tables (logical names)
    options: tuple[tuple[int, str], ...] = ()  # picklist/state/status codes and labels
    required: bool = False
    read_only: bool = False  # system-managed (createdon, modifiedon, versionnumber, ...)
    global_option_set: str | None = None  # name of the global option set a picklist uses (else local)
    custom: bool = False  # added by the org's admin (a schema file's column on a standard table)
    display_name: str | None = None  # DisplayName in the metadata (default: derived from the logical name)

    @property
    def is_lookup(self) -> bool:
        return self.type in ("Lookup", "Owner", "Customer")

    @property
    def wire_name(self) -> str:
        return f"_{self.name}_value" if self.is_lookup else self.name

    @property
    def option_codes(self) -> frozenset[int]:
        return frozenset(code for code, _ in self.options)


@dataclass(frozen=True)
class Table:
    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    columns: tuple[Column, ...]
    custom: bool = False
    change_tracking: bool = True
    user_owned: bool = True
    rows: int | None = None  # rows the generator creates (custom tables; None: the scale's custom_rows)
    display_name: str | None = None

    def __post_init__(self) -> None:
        # Built once: hashing a frozen dataclass on every lookup made lookups the sandbox's hot spot.
        object.__setattr__(self, "_columns", {c.name: c for c in self.columns})

    def column(self, name: str) -> Column | None:
        return self._columns.get(name)  # type: ignore[attr-defined]

    def wire_columns(self) -> list[str]:
        return [c.wire_name for c in self.columns]


def _opts(*labels: str, start: int = 1) -> tuple[tuple[int, str], ...]:
    return tuple((i, label) for i, label in enumerate(labels, start=start))


LEAD_SOURCE = _opts(
    "Advertisement",
    "Employee Referral",
    "External Referral",
    "Partner",
    "Public Relations",
    "Seminar",
    "Trade Show",
    "Web",
    "Word of Mouth",
    "Other",
)
LEAD_QUALITY = _opts("Hot", "Warm", "Cold")
CONTACT_METHOD = _opts("Any", "Email", "Phone", "Fax", "Mail")
INDUSTRY = _opts(
    "Accounting",
    "Agriculture",
    "Broadcasting",
    "Brokers",
    "Building Supply",
    "Business Services",
    "Consulting",
    "Consumer Services",
    "Design",
    "Distributors",
    "Education",
    "Financial",
    "Manufacturing",
    "Retail",
    "Software",
)
BUSINESS_TYPE = _opts("Corporation", "Partnership", "Sole Proprietorship", "Public")


def _system(pk: str, owned: bool = True) -> tuple[Column, ...]:
    cols = [
        Column(pk, "Uniqueidentifier", read_only=True),
        Column("createdon", "DateTime", read_only=True),
        Column("modifiedon", "DateTime", read_only=True),
        Column("versionnumber", "BigInt", read_only=True),
        Column("createdby", "Lookup", targets=("systemuser",), read_only=True),
        Column("modifiedby", "Lookup", targets=("systemuser",), read_only=True),
    ]
    if owned:
        cols.append(Column("ownerid", "Owner", targets=("systemuser", "team")))
    return tuple(cols)


def _person_columns() -> tuple[Column, ...]:
    s = lambda n, length=100: Column(n, "String", max_length=length)  # noqa: E731
    b = lambda n: Column(n, "Boolean")  # noqa: E731
    return (
        s("salutation"),
        s("firstname", 50),
        s("middlename", 50),
        Column("lastname", "String", 50, required=True),
        Column("fullname", "String", 160, read_only=True),
        s("emailaddress1"),
        s("jobtitle"),
        s("telephone1", 50),
        s("telephone2", 50),
        s("mobilephone", 50),
        s("address1_line1", 250),
        s("address1_line2", 250),
        s("address1_line3", 250),
        s("address1_city", 80),
        s("address1_stateorprovince", 50),
        s("address1_country", 80),
        s("address1_postalcode", 20),
        Column("description", "Memo", 2000),
        b("donotphone"),
        b("donotbulkemail"),
        b("donotemail"),
        b("donotfax"),
        b("donotsendmm"),
        Column("preferredcontactmethodcode", "Picklist", options=CONTACT_METHOD),
        Column("new_synctomkto", "Boolean"),
    )


def _merge_columns(table: str) -> tuple[Column, ...]:
    """Set only by the ``Merge`` action on the subordinate row: ``masterid`` (the row it was merged into) and
    ``merged``; both read-only (Dataverse table reference: account / contact / lead columns)."""
    return (
        Column("masterid", "Lookup", targets=(table,), read_only=True),
        Column("merged", "Boolean", read_only=True),
    )


LEAD = Table(
    "lead",
    "leads",
    "leadid",
    "fullname",
    _system("leadid")
    + _person_columns()
    + (
        Column("fax", "String", 50),
        Column("subject", "String", 300),
        Column("companyname", "String", 100),
        Column("revenue", "Money"),
        Column("leadsourcecode", "Picklist", options=LEAD_SOURCE),
        Column("leadqualitycode", "Picklist", options=LEAD_QUALITY),
        Column("statecode", "State", options=_opts("Open", "Qualified", "Disqualified", start=0)),
        Column(
            "statuscode",
            "Status",
            options=_opts(
                "New", "Contacted", "Qualified", "Lost", "Cannot Contact", "No Longer Interested", "Canceled"
            ),
        ),
        Column("parentaccountid", "Lookup", targets=("account",)),
        Column("parentcontactid", "Lookup", targets=("contact",)),
    )
    + _merge_columns("lead"),
)

CONTACT = Table(
    "contact",
    "contacts",
    "contactid",
    "fullname",
    _system("contactid")
    + _person_columns()
    + (
        Column("statecode", "State", options=_opts("Active", "Inactive", start=0)),
        Column("statuscode", "Status", options=_opts("Active", "Inactive")),
        Column("parentcustomerid", "Customer", targets=("account", "contact")),
        Column("originatingleadid", "Lookup", targets=("lead",)),
        Column("mkt_leadscore", "Integer"),
    )
    + _merge_columns("contact"),
)

ACCOUNT = Table(
    "account",
    "accounts",
    "accountid",
    "name",
    _system("accountid")
    + (
        Column("name", "String", 160, required=True),
        Column("accountnumber", "String", 20),
        Column("address1_line1", "String", 250),
        Column("address1_line2", "String", 250),
        Column("address1_line3", "String", 250),
        Column("address1_city", "String", 80),
        Column("address1_stateorprovince", "String", 50),
        Column("address1_country", "String", 80),
        Column("address1_postalcode", "String", 20),
        Column("telephone1", "String", 50),
        Column("businesstypecode", "Picklist", options=BUSINESS_TYPE),
        Column("industrycode", "Picklist", options=INDUSTRY),
        Column("sic", "String", 20),
        Column("website", "String", 200),
        Column("numberofemployees", "Integer"),
        Column("revenue", "Money"),
        Column("description", "Memo", 2000),
        Column("statecode", "State", options=_opts("Active", "Inactive", start=0)),
        Column("statuscode", "Status", options=_opts("Active", "Inactive")),
        Column("primarycontactid", "Lookup", targets=("contact",)),
        Column("originatingleadid", "Lookup", targets=("lead",)),
        Column("new_synctomkto", "Boolean"),
    )
    + _merge_columns("account"),
)

OPPORTUNITY = Table(
    "opportunity",
    "opportunities",
    "opportunityid",
    "name",
    _system("opportunityid")
    + (
        Column("name", "String", 300, required=True),
        Column("estimatedvalue", "Money"),
        Column("closeprobability", "Integer"),
        Column("actualclosedate", "DateTime"),
        Column("estimatedclosedate", "DateTime"),
        Column("description", "Memo", 2000),
        Column("statecode", "State", options=_opts("Open", "Won", "Lost", start=0)),
        Column(
            "statuscode", "Status", options=_opts("In Progress", "On Hold", "Won", "Canceled", "Out-Sold")
        ),
        Column("customerid", "Customer", targets=("account", "contact")),
        Column("parentaccountid", "Lookup", targets=("account",)),
        Column("parentcontactid", "Lookup", targets=("contact",)),
        Column("originatingleadid", "Lookup", targets=("lead",)),
        Column("new_synctomkto", "Boolean"),
    ),
)

SYSTEMUSER = Table(
    "systemuser",
    "systemusers",
    "systemuserid",
    "fullname",
    _system("systemuserid", owned=False)
    + (
        Column("firstname", "String", 64),
        Column("lastname", "String", 64, required=True),
        Column("fullname", "String", 200, read_only=True),
        Column("internalemailaddress", "String", 100),
        Column("title", "String", 128),
        Column("address1_telephone1", "String", 64),
        Column("isdisabled", "Boolean"),
        Column(
            "accessmode",
            "Picklist",
            options=_opts(
                "Read-Write",
                "Administrative",
                "Read",
                "Support User",
                "Non-interactive",
                "Delegated Admin",
                start=0,
            ),
        ),
        Column("applicationid", "Uniqueidentifier"),
    ),
    user_owned=False,
)

TEAM = Table(
    "team",
    "teams",
    "teamid",
    "name",
    _system("teamid", owned=False)
    + (
        Column("name", "String", 160, required=True),
        Column(
            "teamtype",
            "Picklist",
            options=_opts("Owner", "Access", "Security Group", "Office Group", start=0),
        ),
        Column("description", "Memo", 2000),
        Column("administratorid", "Lookup", targets=("systemuser",)),
        Column("isdefault", "Boolean"),
    ),
    user_owned=False,
)

TEAMMEMBERSHIP = Table(
    "teammembership",
    "teammemberships",
    "teammembershipid",
    "teammembershipid",
    (
        Column("teammembershipid", "Uniqueidentifier", read_only=True),
        Column("systemuserid", "Uniqueidentifier", required=True),
        Column("teamid", "Uniqueidentifier", required=True),
        Column("versionnumber", "BigInt", read_only=True),
    ),
    user_owned=False,
)

STANDARD_TABLES = (LEAD, CONTACT, ACCOUNT, OPPORTUNITY, SYSTEMUSER, TEAM, TEAMMEMBERSHIP)

# --------------------------------------------------------------------------------------------------
# Marketo


@dataclass(frozen=True)
class MField:
    name: str
    data_type: str  # string text email phone url integer float currency boolean date datetime reference
    length: int | None = None
    updateable: bool = True
    display_name: str = ""
    crm_managed: bool = False

    @property
    def label(self) -> str:
        return self.display_name or self.name


@dataclass(frozen=True)
class MObject:
    name: str  # lead, company, opportunity, opportunityRole, salesPerson, or a custom object apiName
    display_name: str
    id_field: str
    dedupe_fields: tuple[str, ...]
    searchable_fields: tuple[tuple[str, ...], ...]
    fields: tuple[MField, ...]
    required: tuple[str, ...] = ()
    relationships: tuple[dict[str, Any], ...] = field(default=(), compare=False)  # dicts: not hashable
    custom: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fields", {f.name: f for f in self.fields})

    def field(self, name: str) -> MField | None:
        return self._fields.get(name)  # type: ignore[attr-defined]

    @property
    def field_map(self) -> dict[str, MField]:
        return self._fields  # type: ignore[attr-defined]


def _sys_fields(id_name: str, id_type: str) -> tuple[MField, ...]:
    return (
        MField(id_name, id_type, updateable=False),
        MField("createdAt", "datetime", updateable=False, display_name="Created At"),
        MField("updatedAt", "datetime", updateable=False, display_name="Updated At"),
    )


def _s(name: str, display: str = "", length: int = 255, dtype: str = "string") -> MField:
    return MField(name, dtype, length, display_name=display)


LEAD_FIELDS = _sys_fields("id", "integer") + (
    MField("email", "email", 255, display_name="Email Address"),
    _s("firstName", "First Name"),
    _s("middleName", "Middle Name"),
    _s("lastName", "Last Name"),
    _s("salutation", "Salutation"),
    _s("title", "Job Title"),
    MField("phone", "phone", 255, display_name="Phone Number"),
    MField("mobilePhone", "phone", 255),
    MField("fax", "phone", 255),
    MField("homePhone", "phone", 255, display_name="Microsoft Home Phone"),
    MField("address", "text", 65535, display_name="Address"),
    _s("address2", "Microsoft Address 2"),
    _s("address3", "Microsoft Address 3"),
    _s("city"),
    _s("state"),
    _s("country"),
    _s("postalCode"),
    _s("company", "Company Name"),
    MField("annualRevenue", "currency", display_name="Annual Revenue"),
    _s("leadSource", "Person Source"),
    _s("leadStatus", "Person Status"),
    _s("statusReason", "Status Reason"),
    _s("leadRating", "Person Rating"),
    MField("personNotes", "text", 65535, display_name="Person Notes"),
    MField("doNotCall", "boolean"),
    MField("unsubscribed", "boolean"),
    MField("doNotEmail", "boolean", display_name="Microsoft Do Not Email"),
    MField("doNotFax", "boolean", display_name="Microsoft Do Not Fax"),
    MField("doNotSendMarketingMaterial", "boolean", display_name="Microsoft Do Not Send Marketing Material"),
    _s("preferredMethodOfContact", "Microsoft Preferred Method Of Contact"),
    _s("topic", "Microsoft Topic and Subject"),
    MField("leadScore", "integer", display_name="Person Score"),
    MField("website", "url", 255),
    _s("externalCompanyId", "External Company Id"),
    _s("externalSalesPersonId", "External Sales Person Id"),
    # Fields the sync owns (the native sync's "Microsoft ..." system fields, under API names of ours).
    _s("dynamicsId", "Dynamics Id", 36),
    _s("dynamicsType", "Microsoft Type", 20),
    MField("dynamicsIsDeleted", "boolean", display_name="Microsoft is Deleted"),
    MField("dynamicsCreatedDate", "datetime", display_name="Microsoft Created Date"),
)

LEAD_OBJECT = MObject(
    "lead",
    "Lead",
    "id",
    ("email",),
    (
        ("id",),
        ("email",),
        ("dynamicsId",),
        ("externalCompanyId",),
        ("externalSalesPersonId",),
        ("leadPartitionId",),
    ),
    LEAD_FIELDS,
    required=(),
)

COMPANY_OBJECT = MObject(
    "company",
    "Company",
    "id",
    ("externalCompanyId",),
    (("id",), ("externalCompanyId",), ("company",), ("externalSalesPersonId",)),
    _sys_fields("id", "integer")
    + (
        _s("externalCompanyId"),
        _s("company", "Company Name"),
        _s("billingStreet"),
        _s("billingStreet2"),
        _s("billingStreet3"),
        _s("billingCity"),
        _s("billingState"),
        _s("billingCountry"),
        _s("billingPostalCode"),
        MField("mainPhone", "phone", 255),
        _s("industry"),
        _s("businessType"),
        _s("sicCode"),
        MField("website", "url", 255),
        MField("numberOfEmployees", "integer"),
        MField("annualRevenue", "currency"),
        _s("accountNumber", "Microsoft Account Number"),
        _s("companyStatus", "Microsoft Company Status"),
        MField("companyNotes", "text", 65535),
        _s("externalSalesPersonId"),
        MField("dynamicsIsDeleted", "boolean"),
    ),
    required=("externalCompanyId",),
)

OPPORTUNITY_OBJECT = MObject(
    "opportunity",
    "Opportunity",
    "marketoGUID",
    ("externalOpportunityId",),
    (("marketoGUID",), ("externalOpportunityId",), ("externalCompanyId",), ("externalSalesPersonId",)),
    _sys_fields("marketoGUID", "string")
    + (
        _s("externalOpportunityId"),
        _s("name", "Name"),
        MField("description", "text", 65535),
        MField("amount", "currency", display_name="Estimated Value"),
        MField("probability", "integer"),
        _s("stage"),
        MField("closeDate", "date"),
        MField("expectedCloseDate", "date"),
        MField("isClosed", "boolean"),
        MField("isWon", "boolean"),
        _s("externalCompanyId"),
        _s("externalSalesPersonId"),
        MField("dynamicsIsDeleted", "boolean"),
    ),
    required=("externalOpportunityId", "name"),
)

ROLE_OBJECT = MObject(
    "opportunityRole",
    "Opportunity Role",
    "marketoGUID",
    ("externalOpportunityId", "leadId", "role"),
    (("marketoGUID",), ("externalOpportunityId",), ("leadId",), ("externalOpportunityId", "leadId", "role")),
    _sys_fields("marketoGUID", "string")
    + (
        _s("externalOpportunityId"),
        MField("leadId", "integer"),
        _s("role"),
        MField("isPrimary", "boolean"),
        MField("externalCreatedDate", "datetime"),
    ),
    required=("externalOpportunityId", "leadId", "role"),
)

SALES_PERSON_OBJECT = MObject(
    "salesPerson",
    "Sales Person",
    "id",
    ("externalSalesPersonId",),
    (("id",), ("externalSalesPersonId",), ("email",)),
    _sys_fields("id", "integer")
    + (
        _s("externalSalesPersonId"),
        MField("email", "email", 255),
        _s("firstName"),
        _s("lastName"),
        MField("phone", "phone", 255),
        _s("title"),
        MField("isDisabled", "boolean"),
    ),
    required=("externalSalesPersonId",),
)

STANDARD_OBJECTS = (LEAD_OBJECT, COMPANY_OBJECT, OPPORTUNITY_OBJECT, ROLE_OBJECT, SALES_PERSON_OBJECT)

# --------------------------------------------------------------------------------------------------
# Sandbox configuration (custom tables and custom object types)


@dataclass(frozen=True)
class SandboxSchema:
    tables: dict[str, Table]  # by logical name
    objects: dict[str, MObject]  # by name (custom objects by apiName)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def table_by_set(self, entity_set: str) -> Table | None:
        for t in self.tables.values():
            if t.entity_set == entity_set:
                return t
        return None

    def set_option_label(self, table: str, column: str, code: int, text: str) -> None:
        """An admin renames an option (a global option set changes for every column that uses it)."""
        col = self.tables[table].column(column)
        if col is None or code not in col.option_codes:
            raise KeyError(f"{table}.{column} has no option {code}")
        for name, t in list(self.tables.items()):
            cols = tuple(
                replace(c, options=tuple((k, text if k == code else v) for k, v in c.options))
                if c is col or (col.global_option_set and c.global_option_set == col.global_option_set)
                else c
                for c in t.columns
            )
            if cols != t.columns:
                self.tables[name] = replace(t, columns=cols)

    @property
    def custom_objects(self) -> list[MObject]:
        return [o for o in self.objects.values() if o.custom]


class SandboxConfigError(ValueError):
    pass


FILTER_COLUMN = "new_synctomkto"
_TABLE_KEYS = {"columns", "sync_filter_column", "change_tracking"}
_CUSTOM_TABLE_KEYS = {
    "logical_name",
    "entity_set",
    "primary_id",
    "primary_name",
    "columns",
    "rows",
    "change_tracking",
    "display_name",
}


def _column_from_yaml(table: str, spec: dict[str, Any], custom: bool = False) -> Column:
    if not isinstance(spec, dict):
        raise SandboxConfigError(f"sandbox schema: table {table!r}: column {spec!r} is not a mapping")
    try:
        options = tuple((int(k), str(v)) for k, v in (spec.get("options") or {}).items())
        col = Column(
            spec["name"],
            spec["type"],
            spec.get("max_length"),
            tuple(spec.get("targets", ())),
            options,
            bool(spec.get("required", False)),
            global_option_set=spec.get("global_option_set"),
            custom=custom,
            display_name=spec.get("display_name"),
        )
    except KeyError as exc:
        raise SandboxConfigError(f"sandbox schema: table {table!r}: column {spec!r} lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise SandboxConfigError(
            f"sandbox schema: table {table!r}: column {spec.get('name')!r}: {exc}"
        ) from None
    if col.type not in _COLUMN_TYPES:
        raise SandboxConfigError(
            f"sandbox schema: table {table!r}: column {col.name!r}: type {col.type!r} is not "
            f"one of {', '.join(sorted(_COLUMN_TYPES))}"
        )
    if col.type in ("Picklist", "State", "Status") and not col.options:
        raise SandboxConfigError(
            f"sandbox schema: table {table!r}: column {col.name!r}: a {col.type} column needs "
            "options: {code: label}"
        )
    if col.is_lookup and not col.targets:
        raise SandboxConfigError(
            f"sandbox schema: table {table!r}: column {col.name!r}: a lookup needs targets"
        )
    return col


_COLUMN_TYPES = {
    "String",
    "Memo",
    "Integer",
    "BigInt",
    "Decimal",
    "Double",
    "Money",
    "Boolean",
    "DateTime",
    "Picklist",
    "State",
    "Status",
    "Lookup",
    "Owner",
    "Customer",
    "Uniqueidentifier",
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A user's schema file over the packaged configuration: custom tables / objects with the same name
    replace the packaged ones, new ones are added; standard-table changes and Marketo lead fields are added."""
    out = dict(base)
    for system, lists in (("dynamics", ("custom_tables",)), ("marketo", ("custom_objects",))):
        merged = dict(base.get(system) or {})
        theirs = extra.get(system) or {}
        for key, value in theirs.items():
            if key in lists:
                ident = "logical_name" if key == "custom_tables" else "api_name"
                by_name = {item[ident]: item for item in merged.get(key) or []}
                for item in value or []:
                    if not isinstance(item, dict) or ident not in item:
                        raise SandboxConfigError(f"sandbox schema: {system}.{key}: every entry needs {ident}")
                    by_name[item[ident]] = item
                merged[key] = list(by_name.values())
            else:
                merged[key] = value
        out[system] = merged
    for key, value in extra.items():
        if key not in ("dynamics", "marketo"):
            out[key] = value
    return out


def _standard_table(table: Table, spec: dict[str, Any]) -> Table:
    unknown = set(spec) - _TABLE_KEYS
    if unknown:
        raise SandboxConfigError(
            f"sandbox schema: dynamics.tables.{table.logical_name}: unknown settings "
            f"{sorted(unknown)} (known: {sorted(_TABLE_KEYS)})"
        )
    cols = list(table.columns)
    if spec.get("sync_filter_column") is False:
        cols = [c for c in cols if c.name != FILTER_COLUMN]
    have = {c.name for c in cols}
    for c in spec.get("columns") or []:
        col = _column_from_yaml(table.logical_name, c, custom=True)
        if col.name in have:
            raise SandboxConfigError(
                f"sandbox schema: table {table.logical_name!r}: column {col.name!r} exists"
            )
        cols.append(col)
    return replace(
        table, columns=tuple(cols), change_tracking=bool(spec.get("change_tracking", table.change_tracking))
    )


def load_schema(path: str | Path | None = None) -> SandboxSchema:
    """Standard tables/objects plus the custom ones declared in the sandbox configuration.

    ``path`` is the packaged ``sandbox.yaml`` by default; any other file is a user's schema (``sync-pipeline
    sandbox --schema FILE``, example in ``docs/sandbox-schema.example.yaml``) layered over the packaged one.
    """
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text()) or {}
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG.resolve():
        try:
            extra = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise SandboxConfigError(f"{path}: schema file not found") from None
        except yaml.YAMLError as exc:
            raise SandboxConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(extra, dict):
            raise SandboxConfigError(f"{path}: expected a mapping with dynamics: and/or marketo:")
        raw = _merge(raw, extra)
    tables = {t.logical_name: t for t in STANDARD_TABLES}
    dyn = raw.get("dynamics") or {}
    for name, spec in (dyn.get("tables") or {}).items():
        if name not in tables:
            raise SandboxConfigError(
                f"sandbox schema: dynamics.tables.{name}: not a standard table "
                f"({', '.join(tables)}); declare new tables under custom_tables"
            )
        tables[name] = _standard_table(tables[name], spec or {})
    for spec in dyn.get("custom_tables", []):
        name = spec["logical_name"]
        unknown = set(spec) - _CUSTOM_TABLE_KEYS
        if unknown:
            raise SandboxConfigError(
                f"sandbox schema: custom table {name!r}: unknown settings {sorted(unknown)} "
                f"(known: {sorted(_CUSTOM_TABLE_KEYS)})"
            )
        pk = spec.get("primary_id", f"{name}id")
        cols = _system(pk) + tuple(_column_from_yaml(name, c) for c in spec.get("columns", []))
        rows = spec.get("rows")
        if rows is not None and (not isinstance(rows, int) or rows < 0):
            raise SandboxConfigError(
                f"sandbox schema: custom table {name!r}: rows must be a whole number >= 0"
            )
        tables[name] = Table(
            name,
            spec.get("entity_set", f"{name}s"),
            pk,
            spec.get("primary_name", "new_name"),
            cols,
            custom=True,
            change_tracking=bool(spec.get("change_tracking", True)),
            rows=rows,
            display_name=spec.get("display_name"),
        )
    objects = {o.name: o for o in STANDARD_OBJECTS}
    mkto = raw.get("marketo") or {}
    lead_fields = tuple(
        MField(
            f["name"], f.get("data_type", "string"), f.get("length"), display_name=f.get("display_name", "")
        )
        for f in mkto.get("lead_fields") or []
    )
    if lead_fields:
        clash = [f.name for f in lead_fields if LEAD_OBJECT.field(f.name)]
        if clash:
            raise SandboxConfigError(
                f"sandbox schema: marketo.lead_fields: {clash} already exist on the lead"
            )
        objects["lead"] = replace(LEAD_OBJECT, fields=LEAD_OBJECT.fields + lead_fields)
    for spec in mkto.get("custom_objects", []):
        api = spec["api_name"]
        fields = _sys_fields("marketoGUID", "string") + tuple(
            MField(
                f["name"],
                f.get("data_type", "string"),
                f.get("length"),
                display_name=f.get("display_name", ""),
            )
            for f in spec.get("fields", [])
        )
        dedupe = tuple(spec["dedupe_fields"])
        objects[api] = MObject(
            api,
            spec.get("display_name", api),
            "marketoGUID",
            dedupe,
            (("marketoGUID",), dedupe) + tuple((s,) for s in spec.get("searchable", [])),
            fields,
            required=dedupe,
            relationships=tuple(spec.get("relationships", [])),
            custom=True,
        )
    return SandboxSchema(tables, objects, raw)
