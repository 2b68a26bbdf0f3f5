"""A seeded random workload on both systems and a model of what the sync must make of it.

The model keeps, per synced record and checked field, the value each side must hold once the sync has
converged, and which side wrote it last (so the ledger must explain the other side's copy). Operations
are applied in *rounds*: a few edits on either side, then sync cycles until one succeeds with no
pending failure. Conflicts are edits of the same field on both sides within one round.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

# Checked fields: Marketo name -> Dynamics column, per entity.
PERSON_FIELDS = {"phone": "telephone1", "title": "jobtitle"}
ACCOUNT_FIELDS = {"mainPhone": "telephone1"}
OPS = (
    "d_update",
    "m_update",
    "conflict_same",
    "conflict_different",
    "d_insert_contact",
    "d_delete_contact",
    "m_delete_lead_person",
    "qualify",
    "m_create_person",
    "m_merge",
    "filter_flip",
    "account_update",
)
WEIGHTS = (5, 5, 3, 3, 2, 1, 1, 1, 2, 1, 1, 3)
# Merges on both sides (issue 9): Marketo merges of linked persons, Dataverse Merge of contacts and accounts.
MERGE_OPS = ("m_merge_linked_loser", "m_merge_lead_contact", "d_merge_contacts", "d_merge_accounts")
MERGE_WEIGHTS = (1, 1, 1, 1)
OPS, WEIGHTS = OPS + MERGE_OPS, WEIGHTS + MERGE_WEIGHTS

# Consent (issue 9): a marketer opts a lead's person out (with notes and a home phone) and the lead is
# qualified in a later round; an opted-out Marketo-only person gets a Dynamics contact with the same email
# (first link) in a later round. Invariants: no opt-out reversed by the sync, no field blanked by it.
OPS += ("opt_out_lead", "qualify_opted_out", "m_create_opted_out", "first_link_email")
WEIGHTS += (1, 1, 1, 1)
CONSENT_FIELDS = {"unsubscribed": "donotbulkemail", "doNotEmail": "donotemail", "doNotCall": "donotphone"}
CONSENT_EXTRAS = {"personNotes": "description", "homePhone": "telephone2"}

# Fault plan: >= 10% of API calls (identity endpoints excepted) fail in one of the ways real services fail.
FAULT_RULES: list[dict[str, Any]] = [
    {
        "pattern": "marketo.leads.sync",
        "rate": 0.2,
        "faults": [
            {"kind": "partial", "code": "1001", "weight": 3},
            {"kind": "code", "code": "606", "weight": 1},
            {"kind": "code", "code": "615", "weight": 1},
            {"kind": "code", "code": "604", "weight": 1},
            {"kind": "status", "status": 503, "weight": 1},
            {"kind": "drop", "weight": 1},
        ],
    },
    {
        "pattern": "marketo.[!i]*",
        "rate": 0.2,
        "faults": [
            {"kind": "code", "code": "601", "weight": 1},
            {"kind": "code", "code": "602", "weight": 1},
            {"kind": "code", "code": "604", "weight": 1},
            {"kind": "code", "code": "606", "weight": 2},
            {"kind": "code", "code": "615", "weight": 1},
            {"kind": "status", "status": 502, "weight": 1},
            {"kind": "html", "status": 503, "weight": 1},
            {"kind": "drop", "weight": 1},
            {"kind": "timeout", "seconds": 0.05, "weight": 1},
        ],
    },
    {
        "pattern": "dynamics.*",
        "rate": 0.2,
        "faults": [
            {"kind": "throttle", "seconds": 1, "weight": 2},
            {"kind": "status", "status": 503, "weight": 2},
            {"kind": "timeout", "seconds": 0.05, "weight": 1},
            {"kind": "drop", "weight": 1},
            {"kind": "html", "status": 502, "weight": 1},
        ],
    },
]


@dataclass
class Expect:
    """What one synced record must look like after convergence."""

    entity: str  # contact | lead | account
    did: str
    values: dict[str, str | None]  # Marketo field -> value both sides hold
    writer: dict[str, str] = field(default_factory=dict)  # Marketo field -> side that changed it last (d|m)
    marketo: str = "linked"  # linked | flagged (Dynamics delete) | tombstoned | frozen (filtered) | retired
    mid: int | None = None


@dataclass
class Workload:
    sb: Any
    rng: random.Random
    records: dict[str, Expect] = field(default_factory=dict)
    new_persons: dict[str, int] = field(default_factory=dict)  # email -> Marketo id (must become a lead)
    merged_away: list[tuple[str, int]] = field(
        default_factory=list
    )  # (email, loser id): must not become leads
    merged_persons: list[tuple[int, int]] = field(
        default_factory=list
    )  # (loser id, winner id) of merged persons
    merged_accounts: list[tuple[str, str]] = field(
        default_factory=list
    )  # (subordinate, master) Dataverse merges
    ops: int = 0
    counter: int = 0
    # Consent: (entity, Dynamics id) -> (Marketo id, extras that must survive); leads opted out awaiting a
    # qualification; opted-out Marketo-only persons awaiting a contact (email -> (Marketo id, extras)).
    opted_out: dict[tuple[str, str], tuple[int, dict[str, str]]] = field(default_factory=dict)
    to_qualify: list[str] = field(default_factory=list)
    to_link: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)

    # ---- setup ---------------------------------------------------------------------------------
    def adopt_synced(self) -> None:
        """After the initial sync: every linked person and synced account enters the model."""
        for entity, table in (("contact", "contact"), ("lead", "lead")):
            for row in self.sb.dynamics_rows(table, limit=100_000):
                did = row[f"{table}id"]
                ids = self.sb.marketo_find_leads("dynamicsId", did)
                if len(ids) != 1 or row.get("new_synctomkto") is False or row.get("statecode", 0) != 0:
                    continue
                self.records[did] = Expect(
                    entity, did, {f: row.get(c) for f, c in PERSON_FIELDS.items()}, mid=ids[0]
                )
        companies = {c["externalCompanyId"] for c in self.sb.marketo_rows("company", limit=100_000)}
        for row in self.sb.dynamics_rows("account", limit=100_000):
            if row["accountid"] in companies:
                self.records[row["accountid"]] = Expect(
                    "account", row["accountid"], {f: row.get(c) for f, c in ACCOUNT_FIELDS.items()}
                )

    # ---- helpers -------------------------------------------------------------------------------
    def _pick(
        self, entity: str | tuple[str, ...], state: str = "linked", exclude: set[str] = frozenset()
    ) -> Expect | None:
        entities = (entity,) if isinstance(entity, str) else entity
        pool = sorted(
            d
            for d, r in self.records.items()
            if r.entity in entities and r.marketo == state and d not in exclude
        )
        return self.records[self.rng.choice(pool)] if pool else None

    def _d_set(self, r: Expect, f: str, value: str) -> None:
        column = (ACCOUNT_FIELDS if r.entity == "account" else PERSON_FIELDS)[f]
        self.sb.dynamics_update(r.entity, r.did, {column: value})

    def _m_set(self, r: Expect, f: str, value: str) -> None:
        assert r.mid is not None
        self.sb.marketo_update_lead(r.mid, {f: value})

    def _text(self, f: str, side: str) -> str:
        self.counter += 1
        return (
            f"+1 555 {1 if side == 'd' else 2}{self.counter:06d}"
            if f in ("phone", "mainPhone")
            else f"{'Dyn' if side == 'd' else 'Mkt'} title {self.counter}"
        )

    # ---- one round -----------------------------------------------------------------------------
    def round(self, size: int) -> list[str]:
        """Apply ``size`` operations on distinct records; returns their names (for the log)."""
        touched: set[str] = set()
        done = []
        for _ in range(size):
            op = self.rng.choices(OPS, WEIGHTS)[0]
            if getattr(self, "_" + op)(touched):
                done.append(op)
                self.ops += 1
        return done

    def _d_update(self, touched: set[str]) -> bool:
        r = self._pick(("contact", "lead"), exclude=touched)
        if r is None:
            return False
        f = self.rng.choice(sorted(PERSON_FIELDS))
        v = self._text(f, "d")
        self._d_set(r, f, v)
        r.values[f], r.writer[f] = v, "d"
        touched.add(r.did)
        return True

    def _m_update(self, touched: set[str]) -> bool:
        r = self._pick(("contact", "lead"), exclude=touched)
        if r is None:
            return False
        f = self.rng.choice(sorted(PERSON_FIELDS))
        v = self._text(f, "m")
        self._m_set(r, f, v)
        r.values[f], r.writer[f] = v, "m"
        touched.add(r.did)
        return True

    def _conflict_same(self, touched: set[str]) -> bool:
        r = self._pick(("contact", "lead"), exclude=touched)
        if r is None:
            return False
        f = self.rng.choice(sorted(PERSON_FIELDS))
        dv, mv = self._text(f, "d"), self._text(f, "m")
        self._d_set(r, f, dv)
        self._m_set(r, f, mv)
        winner = "d" if r.entity == "contact" else "m"  # contacts: Dynamics wins; leads: Marketo wins
        r.values[f], r.writer[f] = (dv if winner == "d" else mv), winner
        touched.add(r.did)
        return True

    def _conflict_different(self, touched: set[str]) -> bool:
        r = self._pick(("contact", "lead"), exclude=touched)
        if r is None:
            return False
        dv, mv = self._text("phone", "d"), self._text("title", "m")
        self._d_set(r, "phone", dv)
        self._m_set(r, "title", mv)
        r.values.update(phone=dv, title=mv)
        r.writer.update(phone="d", title="m")
        touched.add(r.did)
        return True

    def _d_insert_contact(self, touched: set[str]) -> bool:
        did = str(uuid.UUID(int=self.rng.getrandbits(128)))
        self.counter += 1
        values = {"phone": self._text("phone", "d"), "title": self._text("title", "d")}
        self.sb.dynamics_insert(
            "contact",
            {
                "contactid": did,
                "firstname": "Model",
                "lastname": f"New{self.counter}",
                "emailaddress1": f"model.new{self.counter}@example.org",
                "new_synctomkto": True,
                "telephone1": values["phone"],
                "jobtitle": values["title"],
            },
        )
        self.records[did] = Expect("contact", did, values, {"phone": "d", "title": "d"}, marketo="new")
        touched.add(did)
        return True

    def _d_delete_contact(self, touched: set[str]) -> bool:
        r = self._pick("contact", exclude=touched)
        if r is None:
            return False
        self.sb.dynamics_delete("contact", r.did)
        r.marketo = "flagged"
        touched.add(r.did)
        return True

    def _m_delete_lead_person(self, touched: set[str]) -> bool:
        r = self._pick("lead", exclude=touched)
        if r is None:
            return False
        assert r.mid is not None
        self.sb.marketo_delete_lead(r.mid)
        r.marketo = "tombstoned"
        touched.add(r.did)
        return True

    def _qualify(self, touched: set[str]) -> bool:
        r = self._pick("lead", exclude=touched)
        if r is None:
            return False
        created = self.sb.qualify_lead(r.did, create_account=False, create_contact=True)
        cid = next(v for k, v in created.items() if "contact" in k)
        row = self.sb.dynamics_get("contact", cid)
        r.marketo = "retired"  # the lead is closed; its person now belongs to the contact
        # The contact carries the lead's values; both sides agree on them already.
        values = {f: row.get(c) for f, c in PERSON_FIELDS.items()}
        self.records[cid] = Expect("contact", cid, values, marketo="linked", mid=r.mid)
        touched.update({r.did, cid})
        return True

    def _m_create_person(self, touched: set[str]) -> bool:
        self.counter += 1
        email = f"model.person{self.counter}@example.net"
        lead = self.sb.marketo_create_lead(
            {
                "email": email,
                "firstName": "Web",
                "lastName": f"Form{self.counter}",
                "leadScore": 50 + self.rng.randrange(50),
            }
        )
        self.new_persons[email] = int(lead["id"])
        return True

    def _m_merge(self, touched: set[str]) -> bool:
        """A marketer merges a duplicate web person (too cold to become a lead) into a synced contact's person."""
        r = self._pick("contact", exclude=touched)
        if r is None or r.mid is None:
            return False
        winner = self.sb.marketo_get_lead(r.mid)
        if not winner.get("email") or not winner.get("lastName"):
            return False  # a merge fills the winner's blanks from the loser; keep the expected values simple
        self.counter += 1
        email = f"model.dupe{self.counter}@example.net"
        loser = self.sb.marketo_create_lead({"email": email, "lastName": "Dupe", "leadScore": 5})
        self.sb.marketo_merge_leads(r.mid, [int(loser["id"])])
        self.merged_away.append((email, int(loser["id"])))
        touched.add(r.did)
        return True

    def _filter_flip(self, touched: set[str]) -> bool:
        r = self._pick("contact", exclude=touched)
        if r is None:
            return False
        self.sb.dynamics_update("contact", r.did, {"new_synctomkto": False})
        r.marketo = "frozen"  # Marketo keeps what it had; later Dynamics edits must not reach it
        touched.add(r.did)
        return True

    def _account_update(self, touched: set[str]) -> bool:
        r = self._pick("account", exclude=touched)
        if r is None:
            return False
        v = self._text("mainPhone", "d")
        self._d_set(r, "mainPhone", v)
        r.values["mainPhone"], r.writer["mainPhone"] = v, "d"
        touched.add(r.did)
        return True

    def edit_frozen(self) -> int:
        """Dynamics edits to filtered-out contacts (after the flip synced): they must stay out of Marketo."""
        n = 0
        for r in [r for r in self.records.values() if r.marketo == "frozen"]:
            self.sb.dynamics_update("contact", r.did, {"telephone1": self._text("phone", "d")})
            n += 1
        return n

    # ---- merges (issue 9) ----------------------------------------------------------------------
    def _m_merge_linked_loser(self, touched: set[str]) -> bool:
        """A synced person loses a merge to a new Marketo-only person: the link must move to the winner.

        The winner carries no checked field, so Marketo fills them (and the Dynamics id) from the loser and
        the expected values stay; the record's person becomes the winner."""
        r = self._pick(("contact", "lead"), exclude=touched)
        if r is None or r.mid is None:
            return False
        self.counter += 1
        winner = self.sb.marketo_create_lead(
            {
                "email": f"model.winner{self.counter}@example.net",
                "firstName": "Winner",
                "lastName": f"Merge{self.counter}",
                "leadScore": 5,
            }
        )
        self.sb.marketo_merge_leads(int(winner["id"]), [r.mid])
        self.merged_persons.append((r.mid, int(winner["id"])))
        r.mid = int(winner["id"])
        touched.add(r.did)
        return True

    def _m_merge_lead_contact(self, touched: set[str]) -> bool:
        """A contact's person is merged into a lead's person (the lead's wins in Marketo). Decision under
        test: the contact keeps the surviving person, the lead's link retires (no person carries its id);
        the winner's non-empty values are Marketo-side changes for the contact, its blanks come from the
        contact's person."""
        lead = self._pick("lead", exclude=touched)
        contact = self._pick("contact", exclude=touched)
        if lead is None or contact is None or lead.mid is None or contact.mid is None:
            return False
        self.sb.marketo_merge_leads(lead.mid, [contact.mid])
        self.merged_persons.append((contact.mid, lead.mid))
        for f in PERSON_FIELDS:
            if lead.values[f] and lead.values[f] != contact.values[f]:
                contact.values[f], contact.writer[f] = lead.values[f], "m"
        contact.mid = lead.mid
        lead.marketo = "retired"
        touched.update({lead.did, contact.did})
        return True

    def _d_merge_contacts(self, touched: set[str]) -> bool:
        """Dataverse Merge of two synced contacts: the subordinate's person is merged into the master's in
        Marketo (its values fill the master person's blanks, which then reach the master contact); the
        deactivated subordinate syncs no more and no person carries its id."""
        master = self._pick("contact", exclude=touched)
        sub = self._pick("contact", exclude=touched | ({master.did} if master else set()))
        if master is None or sub is None or master.mid is None or sub.mid is None:
            return False
        self.sb.dynamics_merge("contact", master.did, sub.did)
        self.merged_persons.append((sub.mid, master.mid))
        for f in PERSON_FIELDS:
            if not master.values[f] and sub.values[f]:
                master.values[f], master.writer[f] = sub.values[f], "m"
        sub.marketo = "retired"
        touched.update({master.did, sub.did})
        return True

    def _d_merge_accounts(self, touched: set[str]) -> bool:
        """Dataverse Merge of two synced accounts: the subordinate's contacts are re-parented (a Dynamics
        change the sync must carry), the subordinate leaves the model (its company keeps its last state)."""
        master = self._pick("account", exclude=touched)
        sub = self._pick("account", exclude=touched | ({master.did} if master else set()))
        if master is None or sub is None:
            return False
        self.sb.dynamics_merge("account", master.did, sub.did)
        self.records.pop(sub.did)
        self.merged_accounts.append((sub.did, master.did))
        touched.update({master.did, sub.did})
        return True

    # ---- consent (issue 9) -------------------------------------------------------------------------
    def _consent_extras(self) -> dict[str, str]:
        self.counter += 1
        return {"personNotes": f"Opted out, note {self.counter}", "homePhone": f"+1 555 3{self.counter:06d}"}

    def _opt_out_lead(self, touched: set[str]) -> bool:
        """A marketer opts a lead's person out of everything and adds notes and a home phone."""
        r = self._pick("lead", exclude=touched | set(self.to_qualify))
        if r is None or r.mid is None:
            return False
        extras = self._consent_extras()
        self.sb.marketo_update_lead(r.mid, {**{f: True for f in CONSENT_FIELDS}, **extras})
        self.opted_out[("lead", r.did)] = (r.mid, extras)
        self.to_qualify.append(r.did)
        touched.add(r.did)
        return True

    def _qualify_opted_out(self, touched: set[str]) -> bool:
        """A lead opted out in an earlier round is qualified: its contact takes over the opted-out person."""
        ready = [d for d in self.to_qualify if d not in touched and self.records[d].marketo == "linked"]
        if not ready:
            return False
        r = self.records[ready[0]]
        self.to_qualify.remove(r.did)
        created = self.sb.qualify_lead(r.did, create_account=False, create_contact=True)
        cid = created["contact"]
        row = self.sb.dynamics_get("contact", cid)
        r.marketo = "retired"
        self.records[cid] = Expect(
            "contact", cid, {f: row.get(c) for f, c in PERSON_FIELDS.items()}, marketo="linked", mid=r.mid
        )
        self.opted_out[("contact", cid)] = self.opted_out[("lead", r.did)]
        touched.update({r.did, cid})
        return True

    def _m_create_opted_out(self, touched: set[str]) -> bool:
        """An opted-out person exists only in Marketo (too cold to become a lead)."""
        self.counter += 1
        email = f"model.optout{self.counter}@example.net"
        extras = self._consent_extras()
        lead = self.sb.marketo_create_lead(
            {
                "email": email,
                "firstName": "Opted",
                "lastName": f"Out{self.counter}",
                "leadScore": 5,
                **{f: True for f in CONSENT_FIELDS},
                **extras,
            }
        )
        self.to_link[email] = (int(lead["id"]), extras)
        return True

    def _first_link_email(self, touched: set[str]) -> bool:
        """A new Dynamics contact with that person's email and no consent columns: linked by email."""
        if not self.to_link:
            return False
        email = sorted(self.to_link)[0]
        mid, extras = self.to_link.pop(email)
        did = str(uuid.UUID(int=self.rng.getrandbits(128)))
        values = {"phone": self._text("phone", "d"), "title": self._text("title", "d")}
        self.sb.dynamics_insert(
            "contact",
            {
                "contactid": did,
                "firstname": "Opted",
                "lastname": "Linked",
                "emailaddress1": email.upper(),
                "telephone1": values["phone"],
                "jobtitle": values["title"],
            },
        )
        self.records[did] = Expect("contact", did, values, {"phone": "d", "title": "d"}, mid=mid)
        self.opted_out[("contact", did)] = (mid, extras)
        touched.add(did)
        return True

    def consent_violations(self, harness: Any) -> list[str]:
        """Opted-out records are opted out on both sides with their notes and home phone; the ledger shows
        no opt-out reversed and no value blanked by the sync (the workload never opts in nor blanks)."""
        bad: list[str] = []
        for (entity, did), (mid, extras) in sorted(self.opted_out.items()):
            r = self.records.get(did)
            if r is not None and r.marketo in ("tombstoned",):
                continue
            try:
                person = self.sb.marketo_get_lead(mid)
            except KeyError:
                continue  # merged away by another operation
            try:
                row: dict[str, Any] | None = self.sb.dynamics_get(entity, did)
            except KeyError:
                row = None  # deleted in Dynamics meanwhile: the person keeps its consent
            for f, col in CONSENT_FIELDS.items():
                if person.get(f) is not True:
                    bad.append(
                        f"{entity} {did}: Marketo person {mid}.{f} is {person.get(f)!r}, opted out expected"
                    )
                if row is not None and (r is None or r.marketo != "frozen") and row.get(col) is not True:
                    bad.append(f"{entity} {did}.{col} is {row.get(col)!r}, opted out expected")
            for f in CONSENT_EXTRAS:
                if person.get(f) != extras[f]:
                    bad.append(
                        f"{entity} {did}: Marketo person {mid}.{f} is {person.get(f)!r}, "
                        f"expected {extras[f]!r} (blanked?)"
                    )
        consent = ", ".join(
            f"'{f}'"
            for f in ("unsubscribed", "doNotEmail", "doNotCall", "doNotFax", "doNotSendMarketingMaterial")
        )
        for entity, did, target, f, before, after in harness.query(
            f"""SELECT entity, dynamics_id, target, field, value_before, value_after FROM ledger
                    WHERE op = 'update' AND field IN ({consent}) AND value_before = 'true'
                      AND value_after IS DISTINCT FROM 'true'"""
        ):
            bad.append(f"opt-out reversed by the sync: {entity} {did} {target}.{f} {before!r} -> {after!r}")
        for entity, did, target, f, before in harness.query(
            """SELECT entity, dynamics_id, target, field, value_before FROM ledger
                   WHERE op = 'update' AND value_after IS NULL AND value_before IS NOT NULL"""
        ):
            bad.append(f"field blanked by the sync: {entity} {did} {target}.{f} (was {before!r})")
        return bad


# ---- random rollbacks ------------------------------------------------------------------------------------

ROLLBACK_EDITS = ("d_update", "m_update", "conflict_same", "conflict_different", "account_update")


@dataclass
class RandomRollbacks:
    """Now and then: edits, sync, more edits on some fields the sync wrote, rollback of those runs, sync.

    Invariant, checked on both systems right after the rollback and one more sync: every field the
    rollback restored (it found what the run wrote) holds its pre-run value on both sides (the written
    side got its before-value back, the other side kept what it had); every edit made after the run
    is on both sides (not lost, not overwritten). Then the fields the rollback left different on the two
    systems get a fresh Dynamics edit, so the model's "both sides agree" holds again for the final check.
    """

    work: Workload
    harness: Any
    sync: Any  # () -> None: sync cycles until one succeeds with nothing waiting (the test's converge)
    rng: random.Random
    violations: list[str]
    rounds: int = 0
    restored: int = 0
    aborted: int = 0  # rollbacks the injected faults stopped midway

    def maybe(self, n: int, total: int) -> None:
        if n == total // 2 or self.rng.random() < 0.3:
            self.round()

    def _values(self, r: Expect) -> dict[tuple[str, str], Any]:
        """(field, side) -> raw value, read from the sandbox itself."""
        sb = self.work.sb
        if r.entity == "account":
            row = sb.dynamics_get("account", r.did)
            company = next(
                (c for c in sb.marketo_rows("company", limit=1_000_000) if c["externalCompanyId"] == r.did),
                {},
            )
            return {
                **{(f, "d"): row.get(c) for f, c in ACCOUNT_FIELDS.items()},
                **{(f, "m"): company.get(f) for f in ACCOUNT_FIELDS},
            }
        row, person = sb.dynamics_get(r.entity, r.did), sb.marketo_get_lead(int(r.mid or 0))
        return {
            **{(f, "d"): row.get(c) for f, c in PERSON_FIELDS.items()},
            **{(f, "m"): person.get(f) for f in PERSON_FIELDS},
        }

    def round(self) -> None:
        import os

        from sync_pipeline.admin import rollback as rb
        from sync_pipeline.cli.ops import _clients
        from sync_pipeline.clients.dynamics import DynamicsError
        from sync_pipeline.clients.marketo import MarketoError
        from sync_pipeline.config.model import load_config
        from sync_pipeline.engine.store import state

        work = self.work
        touched: set[str] = set()
        for _ in range(self.rng.randrange(2, 6)):
            if getattr(work, "_" + self.rng.choice(ROLLBACK_EDITS))(touched):
                work.ops += 1
        records = [work.records[d] for d in sorted(touched) if d in work.records]
        pre = {r.did: self._values(r) for r in records}
        since = state.utcnow()
        self.sync()
        # Edits after the run, on some of the fields it wrote (accounts only in Dynamics: one-way).
        later: dict[tuple[str, str], str] = {}
        for r in records:
            for f in ACCOUNT_FIELDS if r.entity == "account" else PERSON_FIELDS:
                if self.rng.random() < 0.25:
                    side = "d" if r.entity == "account" else self.rng.choice("dm")
                    value = work._text(f, side)
                    (work._d_set if side == "d" else work._m_set)(r, f, value)
                    r.values[f], r.writer[f] = value, side
                    later[(r.did, f)] = value
                    work.ops += 1
        config = load_config(os.environ.get("SYNC_CONFIG"))
        stack, dynamics, marketo = _clients()
        done: list[rb.Item] = []
        with stack, state.connect(self.harness.state_path) as con:
            runs = rb.runs_since(con, since)
            ids: list[str] = []
            for source in runs:  # newest first, like `rollback --since`
                rid = rb.new_run_id()
                ids.append(rid)
                try:
                    items = rb.plan_rollback(
                        con,
                        config,
                        source,
                        dynamics.get_client(),
                        marketo.get_client(),
                        ignore_runs=[*runs, *ids],
                    )
                    outcome = rb.execute_rollback(
                        con,
                        config,
                        items,
                        dynamics.get_client(),
                        marketo.get_client(),
                        source_run=source,
                        run_id=rid,
                    )
                except (MarketoError, DynamicsError):
                    # The faults stopped this rollback (like the command exiting 1): what it did write is
                    # in the ledger under its run id; the older runs are left as they are.
                    self.aborted += 1
                    done += [
                        rb.Item(0, ent, did, mid, target, "update", fld, after, None, source)
                        for ent, did, mid, target, fld, after in con.execute(
                            """SELECT entity, dynamics_id, marketo_id, target, field, value_after FROM ledger
                                    WHERE run_id = ? AND op = 'restore'""",
                            [rid],
                        ).fetchall()
                    ]
                    break
                failed = {id(it) for it, _ in outcome.failed} | {id(it) for it in outcome.skipped}
                done += [it for it in items if it.action == rb.RESTORE and id(it) not in failed]
        self.sync()
        self.rounds += 1
        self.restored += len(done)
        # The invariant.
        fields = set(PERSON_FIELDS) | set(ACCOUNT_FIELDS)
        heal: set[tuple[str, str]] = set()
        for it in done:
            r = work.records.get(it.dynamics_id)
            if r is None or it.field not in fields or r.did not in pre or (r.did, it.field) in later:
                continue
            now = self._values(r)
            w = "d" if it.target == "dynamics" else "m"
            for side in "dm":
                if now[(it.field, side)] != pre[r.did][(it.field, side)]:
                    self.violations.append(
                        f"rollback of {it.source_run}: {r.entity} {r.did}.{it.field} on {side}: "
                        f"{now[(it.field, side)]!r}, pre-run value {pre[r.did][(it.field, side)]!r} "
                        f"(restored {it.restore!r} on {w})"
                    )
            heal.add((r.did, it.field))
        for (did, f), value in later.items():
            r = work.records[did]
            now = self._values(r)
            if now[(f, "d")] != value or now[(f, "m")] != value:
                self.violations.append(
                    f"edit after the run lost: {r.entity} {did}.{f} = {value!r}, now Dynamics "
                    f"{now[(f, 'd')]!r}, Marketo {now[(f, 'm')]!r}"
                )
        # Back to a model where both sides agree: a fresh Dynamics edit of every restored field.
        for did, f in sorted(heal):
            r = work.records[did]
            value = work._text(f, "d")
            work._d_set(r, f, value)
            r.values[f], r.writer[f] = value, "d"
            work.ops += 1
