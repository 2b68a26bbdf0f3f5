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
OPS = ("d_update", "m_update", "conflict_same", "conflict_different", "d_insert_contact", "d_delete_contact",
       "m_delete_lead_person", "qualify", "m_create_person", "m_merge", "filter_flip", "account_update")
WEIGHTS = (5, 5, 3, 3, 2, 1, 1, 1, 2, 1, 1, 3)

# Fault plan: >= 10% of API calls (identity endpoints excepted) fail in one of the ways real services fail.
FAULT_RULES: list[dict[str, Any]] = [
    {"pattern": "marketo.leads.sync", "rate": 0.2, "faults": [
        {"kind": "partial", "code": "1001", "weight": 3}, {"kind": "code", "code": "606", "weight": 1},
        {"kind": "code", "code": "615", "weight": 1}, {"kind": "code", "code": "604", "weight": 1},
        {"kind": "status", "status": 503, "weight": 1}, {"kind": "drop", "weight": 1}]},
    {"pattern": "marketo.[!i]*", "rate": 0.2, "faults": [
        {"kind": "code", "code": "601", "weight": 1}, {"kind": "code", "code": "602", "weight": 1},
        {"kind": "code", "code": "604", "weight": 1}, {"kind": "code", "code": "606", "weight": 2},
        {"kind": "code", "code": "615", "weight": 1}, {"kind": "status", "status": 502, "weight": 1},
        {"kind": "html", "status": 503, "weight": 1}, {"kind": "drop", "weight": 1},
        {"kind": "timeout", "seconds": 0.05, "weight": 1}]},
    {"pattern": "dynamics.*", "rate": 0.2, "faults": [
        {"kind": "throttle", "seconds": 1, "weight": 2}, {"kind": "status", "status": 503, "weight": 2},
        {"kind": "timeout", "seconds": 0.05, "weight": 1}, {"kind": "drop", "weight": 1},
        {"kind": "html", "status": 502, "weight": 1}]},
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
    merged_away: list[tuple[str, int]] = field(default_factory=list)  # (email, loser id): must not become leads
    ops: int = 0
    counter: int = 0

    # ---- setup ---------------------------------------------------------------------------------
    def adopt_synced(self) -> None:
        """After the initial sync: every linked person and synced account enters the model."""
        for entity, table in (("contact", "contact"), ("lead", "lead")):
            for row in self.sb.dynamics_rows(table, limit=100_000):
                did = row[f"{table}id"]
                ids = self.sb.marketo_find_leads("dynamicsId", did)
                if len(ids) != 1 or row.get("new_synctomkto") is False or row.get("statecode", 0) != 0:
                    continue
                self.records[did] = Expect(entity, did, {f: row.get(c) for f, c in PERSON_FIELDS.items()},
                                           mid=ids[0])
        companies = {c["externalCompanyId"] for c in self.sb.marketo_rows("company", limit=100_000)}
        for row in self.sb.dynamics_rows("account", limit=100_000):
            if row["accountid"] in companies:
                self.records[row["accountid"]] = Expect("account", row["accountid"],
                                                        {f: row.get(c) for f, c in ACCOUNT_FIELDS.items()})

    # ---- helpers -------------------------------------------------------------------------------
    def _pick(self, entity: str | tuple[str, ...], state: str = "linked", exclude: set[str] = frozenset()
              ) -> Expect | None:
        entities = (entity,) if isinstance(entity, str) else entity
        pool = sorted(d for d, r in self.records.items()
                      if r.entity in entities and r.marketo == state and d not in exclude)
        return self.records[self.rng.choice(pool)] if pool else None

    def _d_set(self, r: Expect, f: str, value: str) -> None:
        column = (ACCOUNT_FIELDS if r.entity == "account" else PERSON_FIELDS)[f]
        self.sb.dynamics_update(r.entity, r.did, {column: value})

    def _m_set(self, r: Expect, f: str, value: str) -> None:
        assert r.mid is not None
        self.sb.marketo_update_lead(r.mid, {f: value})

    def _text(self, f: str, side: str) -> str:
        self.counter += 1
        return f"+1 555 {1 if side == 'd' else 2}{self.counter:06d}" if f in ("phone", "mainPhone") else \
            f"{'Dyn' if side == 'd' else 'Mkt'} title {self.counter}"

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
        self.sb.dynamics_insert("contact", {"contactid": did, "firstname": "Model", "lastname": f"New{self.counter}",
                                            "emailaddress1": f"model.new{self.counter}@example.org",
                                            "new_synctomkto": True, "telephone1": values["phone"],
                                            "jobtitle": values["title"]})
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
        lead = self.sb.marketo_create_lead({"email": email, "firstName": "Web", "lastName": f"Form{self.counter}",
                                            "leadScore": 50 + self.rng.randrange(50)})
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
            company = next((c for c in sb.marketo_rows("company", limit=1_000_000) if c["externalCompanyId"] == r.did),
                           {})
            return {**{(f, "d"): row.get(c) for f, c in ACCOUNT_FIELDS.items()},
                    **{(f, "m"): company.get(f) for f in ACCOUNT_FIELDS}}
        row, person = sb.dynamics_get(r.entity, r.did), sb.marketo_get_lead(int(r.mid or 0))
        return {**{(f, "d"): row.get(c) for f, c in PERSON_FIELDS.items()},
                **{(f, "m"): person.get(f) for f in PERSON_FIELDS}}

    def round(self) -> None:
        import os

        from sync_pipeline.cli.ops import _clients
        from sync_pipeline.clients.dynamics import DynamicsError
        from sync_pipeline.clients.marketo import MarketoError
        from sync_pipeline.config.model import load_config
        from sync_pipeline.engine import state
        from sync_pipeline.ops import rollback as rb

        work, sb = self.work, self.work.sb
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
            for f in (ACCOUNT_FIELDS if r.entity == "account" else PERSON_FIELDS):
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
                    items = rb.plan_rollback(con, config, source, dynamics.get_client(), marketo.get_client(),
                                             ignore_runs=[*runs, *ids])
                    outcome = rb.execute_rollback(con, config, items, dynamics.get_client(), marketo.get_client(),
                                                  source_run=source, run_id=rid)
                except (MarketoError, DynamicsError):
                    # The faults stopped this rollback (like the command exiting 1): what it did write is
                    # in the ledger under its run id; the older runs are left as they are.
                    self.aborted += 1
                    done += [rb.Item(0, ent, did, mid, target, "update", fld, after, None, source)
                             for ent, did, mid, target, fld, after in con.execute(
                                 """SELECT entity, dynamics_id, marketo_id, target, field, value_after FROM ledger
                                    WHERE run_id = ? AND op = 'update'""", [rid]).fetchall()]
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
                        f"(restored {it.restore!r} on {w})")
            heal.add((r.did, it.field))
        for (did, f), value in later.items():
            r = work.records[did]
            now = self._values(r)
            if now[(f, "d")] != value or now[(f, "m")] != value:
                self.violations.append(f"edit after the run lost: {r.entity} {did}.{f} = {value!r}, now Dynamics "
                                       f"{now[(f, 'd')]!r}, Marketo {now[(f, 'm')]!r}")
        # Back to a model where both sides agree: a fresh Dynamics edit of every restored field.
        for did, f in sorted(heal):
            r = work.records[did]
            value = work._text(f, "d")
            work._d_set(r, f, value)
            r.values[f], r.writer[f] = value, "d"
            work.ops += 1
