"""In-memory Dataverse tables: rows, an org-wide row version, a delete log and sorted query views.

Rows are plain dicts keyed by WIRE names (``_ownerid_value``, polymorphic targets under
``_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname``); GUIDs are lower-case strings and
date-times ISO UTC strings ``YYYY-MM-DDTHH:MM:SSZ``. A stored row is never mutated: writes replace it,
so readers may keep references without locks. Every write takes the next org-wide ``versionnumber``
(Dataverse's rowversion), which also drives change tracking.

Queries go through :meth:`DynamicsStore.view`: the matching rows sorted by the requested order (primary
key last, as a tie-breaker), cached per (table, filter, order) until the table next changes, so paging
a large table costs one sort, then a bisect and a slice per page.
"""

from __future__ import annotations

import threading
import uuid
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cmp_to_key
from typing import Any

from sync_pipeline.sandbox.clock import Clock, iso
from sync_pipeline.sandbox.schema import SandboxSchema, Table

Row = dict[str, Any]
LOOKUP_TARGET = "@Microsoft.Dynamics.CRM.lookuplogicalname"
_PERSON_TABLES = ("lead", "contact", "systemuser")


class DataverseFault(Exception):
    """An error the Web API reports to the caller: HTTP status, Dataverse hex code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class RecordNotFound(DataverseFault):
    def __init__(self, table: str, record_id: str):
        super().__init__(404, "0x80040217", f"{table} With Id = {record_id} Does Not Exist")


class DuplicateRecord(DataverseFault):
    def __init__(self, table: str, record_id: str):
        super().__init__(
            412,
            "0x80040237",
            f"A record with matching key values already exists. ({table} with Id = {record_id})",
        )


@dataclass(frozen=True)
class View:
    keys: list[Any]  # sort keys, ascending in the view's order (bisect-able)
    rows: list[Row]
    key_of: Callable[[Row], Any]  # row -> sort key
    raw_of: Callable[[Row], tuple]  # row -> JSON-able sort values (for skip tokens)
    from_raw: Callable[[list], Any]  # decoded skip-token values -> sort key


def _norm(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, "")
    return (1, value.casefold() if isinstance(value, str) else value)


def _make_keyer(orderby: list[tuple[str, bool]], pk: str) -> tuple[Callable, Callable, Callable]:
    if orderby == [(pk, False)]:  # default order: the primary key string itself, no tuples
        return (lambda r: r[pk]), (lambda r: (r[pk],)), (lambda raw: raw[0])
    cols = [c for c, _ in orderby]

    def raw_of(row: Row) -> tuple:
        return tuple(_norm(row.get(c)) for c in cols)

    def from_raw_plain(raw: list) -> tuple:
        return tuple(tuple(v) for v in raw)

    descending = [d for _, d in orderby]
    if not any(descending):
        return raw_of, raw_of, from_raw_plain

    def cmp(a: tuple, b: tuple) -> int:
        for x, y, desc in zip(a, b, descending, strict=True):
            if x != y:
                result = -1 if x < y else 1
                return -result if desc else result
        return 0

    key_cls = cmp_to_key(cmp)
    return (lambda r: key_cls(raw_of(r))), raw_of, (lambda raw: key_cls(from_raw_plain(raw)))


class DynamicsStore:
    def __init__(self, schema: SandboxSchema, clock: Clock | None = None):
        self.schema = schema
        self.clock = clock or Clock()
        self.lock = threading.RLock()
        self._rows: dict[str, dict[str, Row]] = {name: {} for name in schema.tables}
        self._deleted: dict[str, list[tuple[int, str]]] = {name: [] for name in schema.tables}
        self._table_version: dict[str, int] = {name: 0 for name in schema.tables}
        self._version = 1_000_000
        self._views: OrderedDict[tuple, tuple[int, View]] = OrderedDict()
        self._undo: list[tuple[str, str, Row | None]] | None = None

    # ---------------------------------------------------------------------------------------- helpers
    def table(self, name: str) -> Table:
        table = self.schema.tables.get(name)
        if table is None:
            raise DataverseFault(404, "0x80060888", f"Table '{name}' does not exist in this organization.")
        return table

    @property
    def version(self) -> int:
        return self._version

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def _put(self, table: str, record_id: str, row: Row | None) -> None:
        rows = self._rows[table]
        if self._undo is not None:
            self._undo.append((table, record_id, rows.get(record_id)))
        if row is None:
            rows.pop(record_id, None)
        else:
            rows[record_id] = row
        self._table_version[table] += 1

    @staticmethod
    def _fill_fullname(table: str, row: Row) -> None:
        if table in _PERSON_TABLES and ("firstname" in row or "lastname" in row):
            row["fullname"] = " ".join(p for p in (row.get("firstname"), row.get("lastname")) if p) or None

    # ------------------------------------------------------------------------------------------ reads
    def get(self, table: str, record_id: str) -> Row | None:
        return self._rows[self.table(table).logical_name].get(record_id.lower())

    def rows(self, table: str) -> Iterator[Row]:
        with self.lock:
            snapshot = list(self._rows[self.table(table).logical_name].values())
        return iter(snapshot)

    def count(self, table: str) -> int:
        return len(self._rows[self.table(table).logical_name])

    def view(
        self,
        table: str,
        filter_key: str,
        predicate: Callable[[Row], bool] | None,
        orderby: list[tuple[str, bool]],
    ) -> View:
        """Matching rows in ``orderby`` order (primary key appended as tie-breaker), cached."""
        t = self.table(table)
        order = list(orderby)
        if not any(c == t.primary_id for c, _ in order):
            order.append((t.primary_id, False))
        cache_key = (t.logical_name, filter_key, tuple(order))
        with self.lock:
            stamp = self._table_version[t.logical_name]
            cached = self._views.get(cache_key)
            if cached is not None and cached[0] == stamp:
                self._views.move_to_end(cache_key)
                return cached[1]
            source = list(self._rows[t.logical_name].values())
        key_of, raw_of, from_raw = _make_keyer(order, t.primary_id)
        matched = source if predicate is None else [r for r in source if predicate(r)]
        matched.sort(key=key_of)
        view = View([key_of(r) for r in matched], matched, key_of, raw_of, from_raw)
        with self.lock:
            if self._table_version[t.logical_name] == stamp:
                self._views[cache_key] = (stamp, view)
                while len(self._views) > 8:
                    self._views.popitem(last=False)
        return view

    @staticmethod
    def page(view: View, after_raw: list | None, size: int) -> tuple[list[Row], bool]:
        start = 0 if after_raw is None else bisect_right(view.keys, view.from_raw(after_raw))
        return view.rows[start : start + size], start + size < len(view.rows)

    def changes_since(self, table: str, version: int) -> tuple[list[Row], list[tuple[int, str]]]:
        """Rows written after ``version`` (version order) and ids deleted after it (still absent)."""
        t = self.table(table).logical_name
        with self.lock:
            rows = self._rows[t]
            changed = [r for r in rows.values() if r.get("versionnumber", 0) > version]
            deleted = [(v, i) for v, i in self._deleted[t] if v > version and i not in rows]
        changed.sort(key=lambda r: r["versionnumber"])
        return changed, deleted

    # ----------------------------------------------------------------------------------------- writes
    def bulk_load(self, table: str, rows: Iterable[Row]) -> int:
        """Fast load of wire-keyed rows (no validation); fills missing key and system columns."""
        t = self.table(table)
        pk, name = t.primary_id, t.logical_name
        stamp = iso(self.clock.now())
        loaded = 0
        with self.lock:
            target = self._rows[name]
            for source in rows:
                row = dict(source)
                row[pk] = str(row.get(pk) or uuid.uuid4()).lower()
                row.setdefault("createdon", stamp)
                row.setdefault("modifiedon", row["createdon"])
                if "versionnumber" not in row:
                    row["versionnumber"] = self._next_version()
                else:
                    self._version = max(self._version, row["versionnumber"])
                if "fullname" not in row:
                    self._fill_fullname(name, row)
                target[row[pk]] = row
                loaded += 1
            self._table_version[name] += 1
        return loaded

    def insert(self, table: str, row: Row, modified_by: str | None = None) -> Row:
        t = self.table(table)
        with self.lock:
            new = dict(row)
            record_id = str(new.get(t.primary_id) or uuid.uuid4()).lower()
            if record_id in self._rows[t.logical_name]:
                raise DuplicateRecord(t.logical_name, record_id)
            now = iso(self.clock.now())
            new[t.primary_id] = record_id
            new["createdon"] = new["modifiedon"] = now
            new["versionnumber"] = self._next_version()
            if modified_by:
                new["_createdby_value"] = new["_modifiedby_value"] = modified_by
                if t.user_owned and not new.get("_ownerid_value"):
                    new["_ownerid_value"] = modified_by
                    new["_ownerid_value" + LOOKUP_TARGET] = "systemuser"
            self._fill_fullname(t.logical_name, new)
            self._put(t.logical_name, record_id, new)
            return new

    def update(self, table: str, record_id: str, changes: Row, modified_by: str | None = None) -> Row:
        t = self.table(table)
        record_id = record_id.lower()
        with self.lock:
            old = self._rows[t.logical_name].get(record_id)
            if old is None:
                raise RecordNotFound(t.logical_name, record_id)
            new = {**old, **changes, t.primary_id: record_id}
            new["modifiedon"] = iso(self.clock.now())
            new["versionnumber"] = self._next_version()
            if modified_by:
                new["_modifiedby_value"] = modified_by
            self._fill_fullname(t.logical_name, new)
            self._put(t.logical_name, record_id, new)
            return new

    def delete(self, table: str, record_id: str) -> None:
        t = self.table(table)
        record_id = record_id.lower()
        with self.lock:
            if record_id not in self._rows[t.logical_name]:
                raise RecordNotFound(t.logical_name, record_id)
            self._put(t.logical_name, record_id, None)
            self._deleted[t.logical_name].append((self._next_version(), record_id))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside succeed together or are undone together (change sets, *Multiple)."""
        with self.lock:
            if self._undo is not None:  # nested: the outer transaction decides
                yield
                return
            self._undo, deleted_len = [], {k: len(v) for k, v in self._deleted.items()}
            try:
                yield
            except BaseException:
                for table, record_id, old in reversed(self._undo):
                    if old is None:
                        self._rows[table].pop(record_id, None)
                    else:
                        self._rows[table][record_id] = old
                    self._table_version[table] += 1
                for table, length in deleted_len.items():
                    del self._deleted[table][length:]
                raise
            finally:
                self._undo = None

    # -------------------------------------------------------------------------------------- messages
    # The Merge action ("Merge table rows using the Web API", Microsoft Learn, webapi/merge-entity-using-web-api,
    # and the Merge action reference): an unbound action for account, contact and lead (incident needs
    # Service). UpdateContent's columns are set on the target; the target's other data is not overwritten;
    # then the subordinate is deactivated, with ``merged`` = true and ``masterid`` = the target, and the rows
    # that pointed at the subordinate are re-parented to the target. Validation messages follow what
    # Dataverse answers (M. Carrington, "MSDyn365 Internals: Merge Permissions", 2019): a record cannot be
    # merged with itself, only these types merge, and both records must be active.
    MERGEABLE = ("account", "contact", "lead")
    # statecode / statuscode of a merged subordinate: Inactive/Inactive; a lead becomes Disqualified/Canceled.
    MERGED_STATE = {"account": (1, 2), "contact": (1, 2), "lead": (2, 7)}
    # Lookups a merge does not move: history (where a row came from) and system columns.
    NOT_REPARENTED = ("originatingleadid", "masterid", "createdby", "modifiedby")

    def merge(
        self,
        table: str,
        target_id: str,
        subordinate_id: str,
        update_content: Row | None = None,
        perform_parenting_checks: bool = False,
        modified_by: str | None = None,
    ) -> None:
        t = self.table(table)
        name = t.logical_name
        if name not in self.MERGEABLE:
            raise DataverseFault(
                400, "0x80040203", f"This type: {name} is not supported with merge operation"
            )
        target_id, subordinate_id = target_id.lower(), subordinate_id.lower()
        if target_id == subordinate_id:
            raise DataverseFault(
                400, "0x80040203", "Merge cannot be performed on master and sub-entities that are identical."
            )
        with self.transaction():
            target, sub = self.get(name, target_id), self.get(name, subordinate_id)
            if target is None:
                raise RecordNotFound(name, target_id)
            if sub is None:
                raise RecordNotFound(name, subordinate_id)
            if (target.get("statecode") or 0) != 0:
                raise DataverseFault(400, "0x80040203", f"master entity:{name}-{target_id} is deactive")
            if (sub.get("statecode") or 0) != 0:
                raise DataverseFault(400, "0x80040203", f"sub-entity:{name}-{subordinate_id} is deactive")
            if perform_parenting_checks:
                for col in t.columns:
                    if col.name in ("parentcustomerid", "parentaccountid") and col.is_lookup:
                        a, b = target.get(col.wire_name), sub.get(col.wire_name)
                        if a and b and a != b:
                            raise DataverseFault(
                                400,
                                "0x80040203",
                                f"Unable to merge: the subordinate {name} "
                                f"{subordinate_id} has a different parent ({col.name}) than the "
                                f"master {target_id}; merge without PerformParentingChecks.",
                            )
            if update_content:
                self.update(name, target_id, update_content, modified_by)
            self._reparent(name, subordinate_id, target_id, modified_by)
            state, status = self.MERGED_STATE[name]
            self.update(
                name,
                subordinate_id,
                {"statecode": state, "statuscode": status, "merged": True, "_masterid_value": target_id},
                modified_by,
            )

    def _reparent(self, table: str, old_id: str, new_id: str, modified_by: str | None) -> None:
        for other in self.schema.tables.values():
            cols = [
                c
                for c in other.columns
                if c.is_lookup
                and table in c.targets
                and not c.read_only
                and c.name not in self.NOT_REPARENTED
            ]
            for col in cols:
                wire = col.wire_name
                for row in list(self._rows[other.logical_name].values()):
                    if row.get(wire) != old_id or (row.get(wire + LOOKUP_TARGET) not in (None, table)):
                        continue
                    if other.logical_name == table and row[other.primary_id] == old_id:
                        continue
                    self.update(other.logical_name, row[other.primary_id], {wire: new_id}, modified_by)

    def qualify_lead(
        self,
        lead_id: str,
        create_account: bool,
        create_contact: bool,
        create_opportunity: bool,
        status: int = 3,
        modified_by: str | None = None,
    ) -> dict[str, str]:
        """QualifyLead: create the requested rows from the lead, then close it as Qualified."""
        with self.transaction():
            lead = self.get("lead", lead_id)
            if lead is None:
                raise RecordNotFound("lead", lead_id)
            if lead.get("statecode", 0) != 0:
                raise DataverseFault(
                    400,
                    "0x80040225",
                    f"The lead {lead_id} is closed (statecode "
                    f"{lead.get('statecode')}). You cannot qualify a lead that is already closed.",
                )
            owner = {k: lead[k] for k in ("_ownerid_value", "_ownerid_value" + LOOKUP_TARGET) if lead.get(k)}
            origin = {"_originatingleadid_value": lead["leadid"], **owner}
            created: dict[str, str] = {}
            if create_account and lead.get("companyname"):
                created["account"] = self.insert(
                    "account",
                    {
                        "name": lead["companyname"],
                        "telephone1": lead.get("telephone1"),
                        "address1_city": lead.get("address1_city"),
                        "address1_country": lead.get("address1_country"),
                        "revenue": lead.get("revenue"),
                        **origin,
                    },
                    modified_by,
                )["accountid"]
            if create_contact:
                person = {
                    k: lead.get(k)
                    for k in (
                        "firstname",
                        "lastname",
                        "emailaddress1",
                        "jobtitle",
                        "telephone1",
                        "mobilephone",
                        "address1_line1",
                        "address1_city",
                        "address1_stateorprovince",
                        "address1_postalcode",
                        "address1_country",
                        "salutation",
                    )
                }
                if "account" in created:
                    person["_parentcustomerid_value"] = created["account"]
                    person["_parentcustomerid_value" + LOOKUP_TARGET] = "account"
                created["contact"] = self.insert("contact", {**person, **origin}, modified_by)["contactid"]
                if "account" in created:
                    self.update(
                        "account",
                        created["account"],
                        {"_primarycontactid_value": created["contact"]},
                        modified_by,
                    )
            if create_opportunity:
                customer = (
                    ("account", created["account"])
                    if "account" in created
                    else (("contact", created["contact"]) if "contact" in created else None)
                )
                opp: Row = {
                    "name": lead.get("subject") or f"Opportunity for {lead.get('fullname') or lead_id}",
                    "estimatedvalue": lead.get("revenue"),
                    "statecode": 0,
                    "statuscode": 1,
                    "_parentaccountid_value": created.get("account"),
                    "_parentcontactid_value": created.get("contact"),
                    **origin,
                }
                if customer:
                    opp["_customerid_value"], opp["_customerid_value" + LOOKUP_TARGET] = (
                        customer[1],
                        customer[0],
                    )
                created["opportunity"] = self.insert("opportunity", opp, modified_by)["opportunityid"]
            self.update(
                "lead",
                lead["leadid"],
                {
                    "statecode": 1,
                    "statuscode": status if status and status > 0 else 3,
                    "_parentaccountid_value": created.get("account", lead.get("_parentaccountid_value")),
                    "_parentcontactid_value": created.get("contact", lead.get("_parentcontactid_value")),
                },
                modified_by,
            )
            return created
