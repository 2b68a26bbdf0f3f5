"""Seeded synthetic orgs for the sandbox: a Dynamics 365 org and a Marketo instance at a named scale.

The data is realistic where the sync cares: users and owner teams own records (polymorphic ``ownerid``),
contacts belong to accounts, some contacts and opportunities originate from qualified leads,
opportunities point at accounts or contacts, custom tables (``new_project``) link to both, emails carry
upper-case and whitespace variants and a few names are non-ASCII, ``new_synctomkto`` is mostly null,
and ``modifiedon`` spreads over a window ending "now" (the pipeline partitions by modifiedon day). The
Marketo database holds persons of its own (about 10% of the Dynamics person count), some sharing an
email with a Dynamics contact, exactly or in another case, and none with a ``dynamicsId``; companies for
half of the company names those persons carry, opportunities on some of them with roles for their persons
(all keyed by non-Dynamics ids), their activity history and assets.

Everything derives from one ``random.Random(seed)`` plus per-table GUID spaces, so a seed (and ``now``)
always yields the same org. Rows are keyed by wire names (``_ownerid_value``, with the
``@Microsoft.Dynamics.CRM.lookuplogicalname`` annotation on polymorphic lookups); null columns are left
out. Rows stream in chunks: nothing but a few small lookup lists is kept while generating.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sync_pipeline.sandbox import generator_pools as pools
from sync_pipeline.sandbox.marketo.assets import generate_assets
from sync_pipeline.sandbox.schema import (
    FILTER_COLUMN,
    STANDARD_TABLES,
    Column,
    SandboxSchema,
    Table,
    load_schema,
)

Row = dict[str, Any]
Chunk = tuple[str, str, list[Row]]  # (system "dynamics" | "marketo", table or object name, rows)

CHUNK_SIZE = 5000
HISTORY_CHUNKS = ("activity", "asset")  # Marketo history: loaded with the records, not counted as records
LOOKUP_TABLE = "@Microsoft.Dynamics.CRM.lookuplogicalname"
OWNER_TABLE_KEY = "_ownerid_value" + LOOKUP_TABLE
DAY = 86400
HISTORY_SECONDS = 2 * 365 * DAY  # how far createdon may precede modifiedon


@dataclass(frozen=True)
class Scale:
    name: str
    users: int
    teams: int
    accounts: int
    contacts: int
    leads: int
    opportunities: int
    custom_rows: int  # per custom table without its own `rows:` (the packaged new_project)
    marketo_share: float = 0.10  # Marketo-only persons, as a share of Dynamics leads + contacts

    @property
    def marketo_persons(self) -> int:
        return int((self.leads + self.contacts) * self.marketo_share)

    @property
    def memberships(self) -> int:
        # every user is in one team; every third user in a second one
        if self.teams == 0:
            return 0
        return self.users + (self.users + 2) // 3 if self.teams > 1 else self.users


SCALES: dict[str, Scale] = {
    "tiny": Scale(
        "tiny", users=10, teams=3, accounts=30, contacts=120, leads=120, opportunities=30, custom_rows=30
    ),
    "small": Scale(
        "small",
        users=50,
        teams=10,
        accounts=900,
        contacts=3600,
        leads=3600,
        opportunities=900,
        custom_rows=900,
    ),
    "medium": Scale(
        "medium",
        users=1250,
        teams=50,
        accounts=25_000,
        contacts=100_000,
        leads=100_000,
        opportunities=25_000,
        custom_rows=25_000,
    ),
    "large": Scale(
        "large",
        users=5000,
        teams=200,
        accounts=100_000,
        contacts=400_000,
        leads=400_000,
        opportunities=100_000,
        custom_rows=100_000,
    ),
}


def resolve_scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        return scale
    try:
        return SCALES[scale]
    except KeyError:
        raise ValueError(f"unknown sandbox scale {scale!r}; choose one of {', '.join(SCALES)}") from None


# --------------------------------------------------------------------------------------------------
# Cheap deterministic building blocks

_MASK = (1 << 128) - 1
_MULT = 0x9E3779B97F4A7C15F39CC0605CEDC835  # odd, so multiplication mod 2**128 is a bijection
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


class GuidSpace:
    """Row index -> GUID for one table: random-looking, unique, and computable for any index.

    Random access lets a contact name its account (or an account its primary contact) without
    keeping every generated id in memory.
    """

    def __init__(self, base: int):
        self.base = base

    def __call__(self, index: int) -> str:
        x = ((self.base ^ index) * _MULT) & _MASK
        x ^= x >> 67  # xorshift keeps it a bijection and mixes the high bits down
        h = f"{x:032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


class Timeline:
    """Random ``modifiedon`` in the window and ``createdon`` before it, formatted without strftime."""

    def __init__(self, rng: random.Random, now: datetime, window_days: float):
        if window_days <= 0:
            raise ValueError(f"generator: window_days must be positive, got {window_days}")
        self.rng = rng
        self.end = int(now.timestamp())
        self.span = max(1, int(window_days * DAY))
        self.start = self.end - self.span
        self.first_day = (self.start - HISTORY_SECONDS) // DAY
        self._days = [
            time.strftime("%Y-%m-%dT", time.gmtime(d * DAY))
            for d in range(self.first_day, self.end // DAY + 1)
        ]
        self._clock = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(DAY)]

    def fmt(self, t: int) -> str:
        return self._days[t // DAY - self.first_day] + self._clock[t % DAY]

    def date(self, t: int) -> str:
        """Midnight UTC of the day holding ``t``; days outside the precomputed range use strftime."""
        day = t // DAY - self.first_day
        return (
            self._days[day] + "00:00:00Z"
            if 0 <= day < len(self._days)
            else time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(t))
        )

    def stamps(self) -> tuple[str, str]:
        """(createdon, modifiedon); a third of the rows were never edited after creation."""
        rnd = self.rng.random
        modified = self.start + int(rnd() * self.span)
        if rnd() < 0.33:
            return self.fmt(modified), self.fmt(modified)
        return self.fmt(modified - int(rnd() * HISTORY_SECONDS)), self.fmt(modified)


class _Store(Protocol):
    def bulk_load(self, name: str, rows: list[Row]) -> Any: ...


# --------------------------------------------------------------------------------------------------
# The org


class _Org:
    """State shared by the table generators of one run."""

    def __init__(self, scale: Scale, seed: int, now: datetime, window_days: float, schema: SandboxSchema):
        self.scale, self.schema = scale, schema
        self.rng = rng = random.Random(seed)
        self.time = Timeline(rng, now, window_days)
        self.ids = {name: GuidSpace(rng.getrandbits(128)) for name in sorted(schema.tables)}
        self.marketo_ids = GuidSpace(rng.getrandbits(128))  # for custom objects, not persons
        self.users = [self.ids["systemuser"](i) for i in range(scale.users)]
        self.active_users: list[str] = []  # enabled, interactive users: owners and editors
        self.owner_teams: list[str] = []
        self.account_names: list[str] = []  # small: one string per account
        self.account_domains: list[str] = []
        # Qualified lead index -> (first, last, email, company, city tuple), for contacts made from them.
        self.qualified: dict[int, tuple[str, str, str | None, str, tuple[str, str, str, str]]] = {}
        self.shared_contacts: list[tuple[str, str, str]] = []  # (first, last, email) Marketo reuses
        self.marketo_history: list[tuple[str, str, int]] = []  # (createdAt, updatedAt, leadScore) per person
        self.marketo_companies: list[tuple[int, str, str]] = []  # (person index, company, domain slug)

    # -- helpers ----------------------------------------------------------------------------------
    def options(self, table: str, column: str) -> list[int]:
        col = self.schema.tables[table].column(column)
        return sorted(col.option_codes) if col is not None else []

    def owner(self) -> tuple[str, str]:
        rnd = self.rng.random
        if self.owner_teams and rnd() < 0.1:
            return self.owner_teams[int(rnd() * len(self.owner_teams))], "team"
        users = self.active_users or self.users
        return users[int(rnd() ** 2 * len(users))], "systemuser"  # a few reps own most records

    def editor(self) -> str:
        users = self.active_users or self.users
        return users[int(self.rng.random() * len(users))]

    def system_columns(self, row: Row, owned: bool = True) -> None:
        row["createdon"], row["modifiedon"] = self.time.stamps()
        row["_createdby_value"] = self.editor()
        row["_modifiedby_value"] = self.editor()
        if owned:
            owner, kind = self.owner()
            row["_ownerid_value"] = owner
            row[OWNER_TABLE_KEY] = kind

    def sync_flag(self, row: Row) -> None:
        r = self.rng.random()
        if r < 0.17:
            row["new_synctomkto"] = True
        elif r < 0.20:
            row["new_synctomkto"] = False

    def person(self) -> tuple[str, str, str, str]:
        """(first, last, first email token, last email token), with occasional case/space variants."""
        rnd = self.rng.random
        first, first_tok = pools.pick(rnd, pools.FIRST, pools.FIRST_INTL)
        last, last_tok = pools.pick(rnd, pools.LAST, pools.LAST_INTL)
        r = rnd()
        if r < 0.01:
            last = last.upper()
        elif r < 0.02:
            first = first + " "
        elif r < 0.025:
            first, last = first.lower(), last.lower()
        return first, last, first_tok, last_tok

    def email(self, local: str, domain: str, padded: bool = True) -> str:
        """An address, sometimes upper-case or capitalised, and (if ``padded``) sometimes space-padded."""
        r = self.rng.random()
        address = f"{local}@{domain}"
        if r < 0.02:
            return address.upper()
        if r < 0.05:
            return pools.capitalise_email(address)
        if r < 0.06 and padded:  # Dynamics stores what the user typed; Marketo rejects it
            return f" {address} "
        return address

    def phone(self) -> str:
        rng = self.rng
        return pools.PHONE_FORMATS[int(rng.random() * len(pools.PHONE_FORMATS))].format(
            a=pools.AREA_CODES[int(rng.random() * len(pools.AREA_CODES))], n=int(rng.random() * 10000)
        )

    def address(self, row: Row) -> tuple[str, str, str, str]:
        rnd = self.rng.random
        place = pools.PLACES[int(rnd() * len(pools.PLACES))]
        row["address1_line1"] = f"{1 + int(rnd() * 9900)} {pools.STREETS[int(rnd() * len(pools.STREETS))]}"
        if rnd() < 0.1:
            row["address1_line2"] = f"Suite {100 + int(rnd() * 900)}"
        row["address1_city"], row["address1_stateorprovince"], row["address1_country"] = place[:3]
        row["address1_postalcode"] = place[3]
        return place


def _chunks(system: str, name: str, rows: Iterator[Row]) -> Iterator[Chunk]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK_SIZE:
            yield system, name, chunk
            chunk = []
    if chunk:
        yield system, name, chunk


# --------------------------------------------------------------------------------------------------
# Tables


def _users(org: _Org) -> Iterator[Row]:
    rng, rnd = org.rng, org.rng.random
    app_user_ids = GuidSpace(rng.getrandbits(128))
    for i, uid in enumerate(org.users):
        first, last, ft, lt = org.person()
        first, last = first.strip(), last.strip()
        # user 0 administers the org; users 1-2 are integration (application) users
        access = 1 if i == 0 else 4 if i in (1, 2) else 0
        disabled = access == 0 and rnd() < 0.03
        row: Row = {
            "systemuserid": uid,
            "firstname": first,
            "lastname": last,
            "fullname": f"{first} {last}",
            "internalemailaddress": f"{ft}.{lt}{i}@{pools.ORG_DOMAIN}",
            "title": pools.TITLES[int(rnd() * len(pools.TITLES))],
            "isdisabled": disabled,
            "accessmode": access,
            "address1_telephone1": org.phone(),
        }
        if access == 4:
            row.update(
                firstname="# Integration",
                lastname=f"App {i}",
                fullname=f"# Integration App {i}",
                applicationid=app_user_ids(i),
                internalemailaddress=f"app{i}@{pools.ORG_DOMAIN}",
            )
        if access == 0 and not disabled:
            org.active_users.append(uid)
        row["createdon"], row["modifiedon"] = org.time.stamps()
        row["_createdby_value"] = row["_modifiedby_value"] = org.users[0]
        yield row


def _teams(org: _Org) -> Iterator[Row]:
    rnd = org.rng.random
    ids = org.ids["team"]
    for i in range(org.scale.teams):
        tid = ids(i)
        default = i == 0
        team_type = 0 if default or rnd() < 0.8 else 1
        name = (
            pools.ORG_NAME
            if default
            else (
                f"{pools.REGIONS[i % len(pools.REGIONS)]} {pools.FUNCTIONS[i // len(pools.REGIONS) % len(pools.FUNCTIONS)]}"
                + (f" {i}" if i >= len(pools.REGIONS) * len(pools.FUNCTIONS) else "")
            )
        )
        if team_type == 0:
            org.owner_teams.append(tid)
        row: Row = {
            "teamid": tid,
            "name": name,
            "teamtype": team_type,
            "isdefault": default,
            "_administratorid_value": org.editor(),
        }
        if rnd() < 0.5:
            row["description"] = f"{name} ({'owner' if team_type == 0 else 'access'} team)"
        org.system_columns(row, owned=False)
        yield row


def _memberships(org: _Org) -> Iterator[Row]:
    ids, teams = org.ids["teammembership"], org.ids["team"]
    n_teams = org.scale.teams
    if n_teams == 0:
        return
    k = 0
    for i, uid in enumerate(org.users):
        picks = [i % n_teams]
        if n_teams > 1 and i % 3 == 0:
            picks.append((i * 7 + 1) % n_teams if (i * 7 + 1) % n_teams != i % n_teams else (i + 1) % n_teams)
        for t in picks:
            yield {"teammembershipid": ids(k), "systemuserid": uid, "teamid": teams(t)}
            k += 1


def _accounts(org: _Org) -> Iterator[Row]:
    rnd = org.rng.random
    ids, contact_ids = org.ids["account"], org.ids["contact"]
    industries, business = org.options("account", "industrycode"), org.options("account", "businesstypecode")
    n_contacts = org.scale.contacts
    for i in range(org.scale.accounts):
        name, slug = pools.company(rnd)
        domain = f"{slug}.{'com' if i % 5 else 'org'}"
        org.account_names.append(name)
        org.account_domains.append(domain)
        active = rnd() < 0.95
        row: Row = {
            "accountid": ids(i),
            "name": name,
            "accountnumber": f"AC-{i:07d}",
            "telephone1": org.phone(),
            "website": f"https://www.{domain}",
            "industrycode": industries[int(rnd() * len(industries))],
            "businesstypecode": business[int(rnd() * len(business))],
            "numberofemployees": int(10 ** (1 + rnd() * 4)),
            "revenue": round(10 ** (5 + rnd() * 4), 2),
            "statecode": 0 if active else 1,
            "statuscode": 1 if active else 2,
        }
        org.address(row)
        if rnd() < 0.3:
            row["sic"] = f"{1000 + int(rnd() * 8999)}"
        if rnd() < 0.1:
            row["description"] = pools.DESCRIPTIONS[int(rnd() * len(pools.DESCRIPTIONS))]
        if i < n_contacts and rnd() < 0.8:
            row["_primarycontactid_value"] = contact_ids(i)  # contact i belongs to account i
        org.system_columns(row)
        org.sync_flag(row)
        yield row


def _person_details(org: _Org, row: Row) -> None:
    rnd = org.rng.random
    row["telephone1"] = org.phone()
    if rnd() < 0.5:
        row["mobilephone"] = org.phone()
    row["jobtitle"] = pools.TITLES[int(rnd() * len(pools.TITLES))]
    if rnd() < 0.3:
        row["salutation"] = pools.SALUTATIONS[int(rnd() * len(pools.SALUTATIONS))]
    if rnd() < 0.05:
        row["description"] = pools.DESCRIPTIONS[int(rnd() * len(pools.DESCRIPTIONS))]
    row["preferredcontactmethodcode"] = 1 if rnd() < 0.7 else 2 + int(rnd() * 4)
    row["donotemail"] = rnd() < 0.03
    row["donotbulkemail"] = rnd() < 0.05
    row["donotphone"] = rnd() < 0.04
    org.sync_flag(row)


# Lead index i is qualified iff i % 5 == 0; contact k with k % 4 == 1 was made from qualified lead
# (k // 4) * 5 when that lead exists. Both sides can compute the link from an index alone.
def _origin_lead(contact_index: int, n_leads: int) -> int | None:
    if contact_index % 4 != 1:
        return None
    lead = (contact_index // 4) * 5
    return lead if lead < n_leads else None


def _contact_parent(k: int, n_accounts: int) -> int | None:
    """Contact k belongs to account k % n_accounts; about 3% of the rest have no account."""
    if not n_accounts or (k >= n_accounts and (k * 2654435761 >> 7) % 100 < 3):
        return None
    return k % n_accounts


def _leads(org: _Org) -> Iterator[Row]:
    rnd = org.rng.random
    ids = org.ids["lead"]
    sources, quality = org.options("lead", "leadsourcecode"), org.options("lead", "leadqualitycode")
    n_contacts, n_leads = org.scale.contacts, org.scale.leads
    for i in range(n_leads):
        first, last, ft, lt = org.person()
        company, slug = pools.company(rnd)
        if i % 5 == 0:
            state, status = 1, 3
        elif rnd() < 0.12:
            state, status = 2, 4 + int(rnd() * 4)
        else:
            state, status = 0, 1 + int(rnd() * 2)
        row: Row = {
            "leadid": ids(i),
            "firstname": first,
            "lastname": last,
            "fullname": f"{first} {last}",
            "companyname": company,
            "subject": f"{pools.INTERESTS[int(rnd() * len(pools.INTERESTS))]} - {company}",
            "leadsourcecode": sources[int(rnd() * len(sources))],
            "leadqualitycode": quality[int(rnd() * len(quality))],
            "statecode": state,
            "statuscode": status,
        }
        email = None
        if rnd() < 0.97:
            email = row["emailaddress1"] = org.email(f"{ft}.{lt}{i}", f"{slug}.{pools.LEAD_TLDS[i % 4]}")
        if rnd() < 0.4:
            row["revenue"] = round(10 ** (5 + rnd() * 4), 2)
        place = org.address(row)
        _person_details(org, row)
        org.system_columns(row)
        if i % 5 == 0 and (i // 5) * 4 + 1 < n_contacts:  # a contact will be made from it
            org.qualified[i] = (first, last, email, company, place)
        yield row


def _contacts(org: _Org) -> Iterator[Row]:
    rnd = org.rng.random
    ids, account_ids, lead_ids = org.ids["contact"], org.ids["account"], org.ids["lead"]
    n_accounts, n_leads, n = org.scale.accounts, org.scale.leads, org.scale.contacts
    n_shared = int(org.scale.marketo_persons * 0.2)
    stride = max(1, n // n_shared) if n_shared else 0
    for k in range(n):
        row: Row = {"contactid": ids(k), "statecode": 0, "statuscode": 1}
        lead = _origin_lead(k, n_leads)
        parent = _contact_parent(k, n_accounts)
        domain = (
            org.account_domains[parent] if parent is not None else pools.FREEMAIL[k % len(pools.FREEMAIL)]
        )
        if lead is not None:
            first, last, email, _company, place = org.qualified[lead]
            row["_originatingleadid_value"] = lead_ids(lead)
            if email is not None:
                row["emailaddress1"] = email
            row["address1_city"], row["address1_stateorprovince"], row["address1_country"] = place[:3]
            row["address1_postalcode"] = place[3]
        else:
            first, last, ft, lt = org.person()
            if rnd() < 0.97:
                row["emailaddress1"] = org.email(f"{ft}.{lt}{k}", domain)
            org.address(row)
        row.update(firstname=first, lastname=last, fullname=f"{first} {last}")
        if parent is not None:
            row["_parentcustomerid_value"] = account_ids(parent)
            row["_parentcustomerid_value" + LOOKUP_TABLE] = "account"
        if rnd() < 0.02:
            row["statecode"], row["statuscode"] = 1, 2
        if rnd() < 0.6:
            row["mkt_leadscore"] = int(rnd() * 100)
        _person_details(org, row)
        org.system_columns(row)
        email = row.get("emailaddress1")
        if (
            stride
            and k % stride == 0
            and len(org.shared_contacts) < n_shared
            and email
            and email == email.strip()
        ):
            org.shared_contacts.append((first.strip(), last.strip(), email))
        yield row


def _opportunities(org: _Org) -> Iterator[Row]:
    rnd = org.rng.random
    ids, account_ids, contact_ids, lead_ids = (
        org.ids[t] for t in ("opportunity", "account", "contact", "lead")
    )
    n_accounts, n_contacts, n_leads = org.scale.accounts, org.scale.contacts, org.scale.leads
    span = org.time
    for m in range(org.scale.opportunities):
        row: Row = {"opportunityid": ids(m)}
        if n_contacts and (m % 5 == 4 or not n_accounts):
            c = int(rnd() * n_contacts)
            row["_customerid_value"] = row["_parentcontactid_value"] = contact_ids(c)
            row["_customerid_value" + LOOKUP_TABLE] = "contact"
            parent = _contact_parent(c, n_accounts)
            if parent is not None:
                row["_parentaccountid_value"] = account_ids(parent)
            lead = _origin_lead(c, n_leads)
            if lead is not None:
                row["_originatingleadid_value"] = lead_ids(lead)
            company = org.account_names[parent] if parent is not None else f"{pools.INDIVIDUAL} {c}"
        elif n_accounts:
            a = int(rnd() * n_accounts)
            row["_customerid_value"] = row["_parentaccountid_value"] = account_ids(a)
            row["_customerid_value" + LOOKUP_TABLE] = "account"
            if a < n_contacts and rnd() < 0.5:
                row["_parentcontactid_value"] = contact_ids(a)
            company = org.account_names[a]
        else:
            company = "Prospect"
        r = rnd()
        state, status = (
            (0, 1 + int(rnd() * 2)) if r < 0.6 else (1, 3) if r < 0.85 else (2, 4 + int(rnd() * 2))
        )
        row.update(
            name=f"{company} - {pools.INTERESTS[int(rnd() * len(pools.INTERESTS))]}",
            estimatedvalue=round(1000 + rnd() * 250_000, 2),
            statecode=state,
            statuscode=status,
            closeprobability=(10 + int(rnd() * 80)) if state == 0 else (100 if state == 1 else 0),
        )
        org.system_columns(row)
        row["estimatedclosedate"] = span.date(span.end + int((rnd() - 0.3) * 180 * DAY))
        if state:
            row["actualclosedate"] = row["modifiedon"][:11] + "00:00:00Z"
        if rnd() < 0.1:
            row["description"] = pools.DESCRIPTIONS[int(rnd() * len(pools.DESCRIPTIONS))]
        org.sync_flag(row)
        yield row


def _custom_rows(org: _Org, table: Table) -> Iterator[Row]:
    """A custom table's declared rows (`rows:`, else the scale's count), filled by column type."""
    rnd = org.rng.random
    ids = org.ids[table.logical_name]
    n_accounts = org.scale.accounts
    writable = [c for c in table.columns if not c.read_only and c.name not in ("ownerid", table.primary_id)]
    # A schema file's `rows:` says how many; the packaged example table follows the scale.
    for j in range(table.rows if table.rows is not None else org.scale.custom_rows):
        row: Row = {table.primary_id: ids(j)}
        account = int(rnd() * n_accounts) if n_accounts else None
        _fill(org, row, writable, j, account)
        org.system_columns(row, owned=table.user_owned)
        yield row


def _fill(org: _Org, row: Row, writable: list[Column], j: int, account: int | None) -> None:
    """Values by column type (lookups to account/contact keep a row's account and contact paired)."""
    rnd = org.rng.random
    n_contacts = org.scale.contacts
    for col in writable:
        if col.name == "new_synctomkto":
            org.sync_flag(row)
        elif col.type in ("Lookup", "Customer"):
            if "account" in col.targets and account is not None:
                row[col.wire_name] = org.ids["account"](account)
            elif "contact" in col.targets and n_contacts and rnd() < 0.7:
                # a contact of the same account: contacts k with k % n_accounts == account
                k = account if account is not None and account < n_contacts else int(rnd() * n_contacts)
                row[col.wire_name] = org.ids["contact"](k)
        elif col.type == "State":
            row[col.name] = 0 if rnd() < 0.9 else 1
        elif col.type in ("Picklist", "Status"):
            codes = sorted(col.option_codes)
            if codes:
                row[col.name] = codes[int(rnd() * len(codes))]
        elif col.type == "Money" or col.type in ("Decimal", "Double"):
            row[col.name] = round(5000 + rnd() * 500_000, 2)
        elif col.type in ("Integer", "BigInt"):
            row[col.name] = int(rnd() * 1000)
        elif col.type == "Boolean":
            row[col.name] = rnd() < 0.5
        elif col.type == "DateTime":
            row[col.name] = org.time.fmt(org.time.start + int(rnd() * org.time.span))
        elif col.type in ("String", "Memo"):
            text = (
                f"{pools.PROJECT_WORDS[int(rnd() * len(pools.PROJECT_WORDS))]} "
                f"{pools.INTERESTS[int(rnd() * len(pools.INTERESTS))]} {j}"
            )
            row[col.name] = text[: col.max_length or None]


def _conform(org: _Org, name: str, rows: Iterator[Row]) -> Iterator[Row]:
    """A standard table as a schema file declares it: without the sync-filter column, with the admin's columns."""
    table = org.schema.tables[name]
    extra = [c for c in table.columns if c.custom and not c.read_only]
    packaged = next((t for t in STANDARD_TABLES if t.logical_name == name), None)
    drop_flag = (
        packaged is not None
        and packaged.column(FILTER_COLUMN) is not None
        and table.column(FILTER_COLUMN) is None
    )
    if not extra and not drop_flag:
        yield from rows
        return
    n_accounts = org.scale.accounts
    for j, row in enumerate(rows):
        if drop_flag:
            row.pop(FILTER_COLUMN, None)
        if extra:
            _fill(org, row, extra, j, int(org.rng.random() * n_accounts) if n_accounts else None)
        yield row


def _marketo_persons(org: _Org) -> Iterator[Row]:
    """Persons created in Marketo (forms, list imports); some share a Dynamics contact's email."""
    rnd = org.rng.random
    shared = org.shared_contacts
    for i in range(org.scale.marketo_persons):
        created, updated = org.time.stamps()
        row: Row = {
            "createdAt": created,
            "updatedAt": updated,
            "leadSource": pools.MARKETO_SOURCES[int(rnd() * len(pools.MARKETO_SOURCES))],
            "leadStatus": pools.MARKETO_STATUSES[int(rnd() * len(pools.MARKETO_STATUSES))],
            "leadScore": int(rnd() * 120),
            "unsubscribed": rnd() < 0.04,
        }
        if i < len(shared):
            first, last, email = shared[i]
            # half exact, half in another case: Marketo matches emails case-insensitively, Dynamics too
            row["email"] = email if i % 2 == 0 else email.upper() if email != email.upper() else email.lower()
        else:
            first, last, ft, lt = org.person()
            if rnd() < 0.95:
                row["email"] = org.email(
                    f"{ft}{lt}{i}", pools.FREEMAIL[i % len(pools.FREEMAIL)], padded=False
                )
        row["firstName"], row["lastName"] = first, last
        place = pools.PLACES[int(rnd() * len(pools.PLACES))]
        row["city"], row["state"], row["country"], row["postalCode"] = place
        if rnd() < 0.6:
            row["company"], slug = pools.company(rnd)
            org.marketo_companies.append((i, row["company"], slug))
            row["title"] = pools.TITLES[int(rnd() * len(pools.TITLES))]
        if rnd() < 0.5:
            row["phone"] = org.phone()
        org.marketo_history.append((created, updated, row["leadScore"]))
        yield row


# Activity history of the generated persons, as a real instance has it (Adobe, "Activities",
# https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/activities): a
# "New Lead" (type 12) when the person was created, by form fill or list import, and a "Change Data Value" (13)
# when it was last changed (a score change made in Marketo). Rows name persons by their position counted from
# the end of the generated ones (negative), so a store that already held persons maps them right.
def _marketo_activities(org: _Org) -> list[Row]:
    n = len(org.marketo_history)
    rows: list[Row] = []
    for i, (created, updated, score) in enumerate(org.marketo_history):
        rows.append(
            {
                "leadIndex": i - n,
                "activityTypeId": 12,
                "activityDate": created,
                "source": "import" if i % 3 == 0 else "web",
            }
        )
        if updated != created:
            delta = 5 + i % 20
            rows.append(
                {
                    "leadIndex": i - n,
                    "activityTypeId": 13,
                    "activityDate": updated,
                    "field": "leadScore",
                    "oldValue": score - delta if score >= delta else score + delta,
                    "newValue": score,
                }
            )
    rows.sort(key=lambda r: r["activityDate"])  # the activity log is ordered by date across chunks
    return rows


# Companies, opportunities and opportunity roles the instance already holds before any sync: made by a form or
# list import integration, or by a CRM sync used before this one (Adobe, "Companies" and "Opportunities",
# https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/companies,
# https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/opportunities). They
# are keyed by that source's own ids (``mkto-<seed>-<n>``, ``mkto-opp-<seed>-<n>``: orgs of other seeds can be
# loaded into the same store), never by a Dynamics GUID, so they are the customer's data, never the sync's.
# The persons keep their own company fields (no ``externalCompanyId`` link), so the records above stay as they
# were. Roles name persons by position like the activities do.
MARKETO_COMPANY_SHARE = 0.5  # of the distinct company names Marketo-born persons carry
MARKETO_OPPORTUNITY_SHARE = 0.4  # of those companies; a quarter of them have a second one


def _marketo_accounts(org: _Org, seed: int) -> tuple[list[Row], list[Row], list[Row]]:
    """(companies, opportunities, roles); their own random stream, so the records above do not depend on them."""
    rng = random.Random(f"companies:{seed}")
    rnd = rng.random
    timeline = Timeline(rng, datetime.fromtimestamp(org.time.end, UTC), org.time.span / DAY)
    n = len(org.marketo_history)
    people: dict[str, list[int]] = {}
    slugs: dict[str, str] = {}
    for i, name, slug in org.marketo_companies:
        people.setdefault(name, []).append(i)
        slugs.setdefault(name, slug)
    companies: list[Row] = []
    opportunities: list[Row] = []
    roles: list[Row] = []
    for name, persons in people.items():  # first-seen order: deterministic
        if rnd() >= MARKETO_COMPANY_SHARE:
            continue
        company_id = f"mkto-{seed}-{len(companies) + 1}"
        created, updated = timeline.stamps()
        city, state, country, postal = pools.PLACES[int(rnd() * len(pools.PLACES))]
        company: Row = {
            "externalCompanyId": company_id,
            "company": name,
            "website": f"https://www.{slugs[name]}.com",
            "industry": pools.MARKETO_INDUSTRIES[int(rnd() * len(pools.MARKETO_INDUSTRIES))],
            "numberOfEmployees": int(10 ** (1 + rnd() * 3)),
            "mainPhone": f"+1 555-{int(rnd() * 10000):04d}",
            "billingCity": city,
            "billingCountry": country,
            "billingPostalCode": postal,
            "createdAt": created,
            "updatedAt": updated,
        }
        if state:
            company["billingState"] = state
        companies.append(company)
        if rnd() >= MARKETO_OPPORTUNITY_SHARE:
            continue
        for _ in range(2 if rnd() < 0.25 else 1):
            opp_id = f"mkto-opp-{seed}-{len(opportunities) + 1}"
            stage, probability, closed, won = pools.OPPORTUNITY_STAGES[
                int(rnd() * len(pools.OPPORTUNITY_STAGES))
            ]
            close = timeline.date(timeline.end + int((rnd() - 0.5) * 120 * DAY))[:10]
            opp: Row = {
                "externalOpportunityId": opp_id,
                "externalCompanyId": company_id,
                "name": f"{name} - {pools.INTERESTS[int(rnd() * len(pools.INTERESTS))]}",
                "amount": round(1000 + rnd() * 100_000, 2),
                "stage": stage,
                "probability": probability,
                "isClosed": closed,
                "isWon": won,
                "expectedCloseDate": close,
            }
            if closed:
                opp["closeDate"] = close
            opp["createdAt"], opp["updatedAt"] = timeline.stamps()
            opportunities.append(opp)
            for k, person in enumerate(persons[:3]):  # the company's people, each in one role
                roles.append(
                    {
                        "externalOpportunityId": opp_id,
                        "leadIndex": person - n,
                        "isPrimary": k == 0,
                        "role": pools.OPPORTUNITY_ROLES[int(rnd() * len(pools.OPPORTUNITY_ROLES))],
                        "createdAt": opp["createdAt"],
                        "updatedAt": opp["createdAt"],
                    }
                )
    return companies, opportunities, roles


def _marketo_assets(org: _Org, seed: int) -> list[Row]:
    """Programs, folders, tokens, smart campaigns, static lists (members among the generated persons),
    emails and segmentations; their own random stream, so the records above do not depend on them."""
    rng = random.Random(f"assets:{seed}")
    timeline = Timeline(rng, datetime.fromtimestamp(org.time.end, UTC), org.time.span / DAY)
    n = len(org.marketo_history)
    rows = generate_assets(rng, n, timeline.stamps)
    for row in rows:
        if "memberIndexes" in row:
            row["memberIndexes"] = [i - n for i in row["memberIndexes"]]
    return rows


# --------------------------------------------------------------------------------------------------
# Public API


def generate(
    scale: str | Scale,
    seed: int = 0,
    now: datetime | None = None,
    *,
    window_days: float = 90,
    schema: SandboxSchema | None = None,
) -> Iterator[Chunk]:
    """Stream an org as ``(system, table_or_object, rows)`` chunks, referenced tables first."""
    spec = resolve_scale(scale)
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("generator: `now` must be timezone-aware (UTC)")
    org = _Org(spec, seed, now, window_days, schema or load_schema())
    yield from _chunks("dynamics", "systemuser", _conform(org, "systemuser", _users(org)))
    yield from _chunks("dynamics", "team", _conform(org, "team", _teams(org)))
    yield from _chunks("dynamics", "teammembership", _conform(org, "teammembership", _memberships(org)))
    yield from _chunks("dynamics", "account", _conform(org, "account", _accounts(org)))
    yield from _chunks("dynamics", "lead", _conform(org, "lead", _leads(org)))
    yield from _chunks("dynamics", "contact", _conform(org, "contact", _contacts(org)))
    org.qualified.clear()
    yield from _chunks("dynamics", "opportunity", _conform(org, "opportunity", _opportunities(org)))
    for table in org.schema.tables.values():
        if table.custom:
            yield from _chunks("dynamics", table.logical_name, _custom_rows(org, table))
    yield from _chunks("marketo", "lead", _marketo_persons(org))
    companies, opportunities, roles = _marketo_accounts(org, seed)
    yield from _chunks("marketo", "company", iter(companies))
    yield from _chunks("marketo", "opportunity", iter(opportunities))
    yield from _chunks("marketo", "opportunityRole", iter(roles))
    yield from _chunks("marketo", "activity", iter(_marketo_activities(org)))
    yield from _chunks("marketo", "asset", iter(_marketo_assets(org, seed)))


def populate(
    dynamics_store: _Store | None,
    marketo_store: _Store | None,
    scale: str | Scale,
    seed: int = 0,
    now: datetime | None = None,
    *,
    window_days: float = 90,
    schema: SandboxSchema | None = None,
) -> dict[str, int]:
    """Generate and bulk-load an org; returns row counts keyed ``"dynamics.<table>"`` / ``"marketo.<object>"``.

    A store passed as None is skipped (its rows are still generated, so the other side stays identical).
    Marketo history (``activity`` and ``asset`` rows) is loaded but not counted: the counts are records. The
    Marketo-born companies, opportunities and roles count under ``marketo.company`` / ``marketo.opportunity`` /
    ``marketo.opportunityRole``.
    """
    counts: dict[str, int] = {}
    stores = {"dynamics": dynamics_store, "marketo": marketo_store}
    for system, name, rows in generate(scale, seed, now, window_days=window_days, schema=schema):
        store = stores[system]
        key = f"{system}.{name}"
        loaded = counts.get(key, 0)
        if store is not None:
            try:
                store.bulk_load(name, rows)
            except Exception as exc:
                raise RuntimeError(
                    f"populate: the {system} store refused generated {name} rows "
                    f"{loaded}-{loaded + len(rows) - 1}: {exc}"
                ) from exc
        if name not in HISTORY_CHUNKS:
            counts[key] = loaded + len(rows)
    return counts
