"""The Marketo instance's data: the lead database, activities and the other objects.

One re-entrant lock serialises every read and write, so API calls, bulk jobs and direct edits by
tests or the demo ("a marketer edits a person in the UI") see a consistent database. Leads are dicts
holding only their non-null values; searchable fields are indexed (case-insensitive), so a 300-record
sync or query costs a few dictionary look-ups per record even with a million persons loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from sync_pipeline.sandbox.clock import Clock, iso
from sync_pipeline.sandbox.marketo.activities import (
    CHANGE_DATA_VALUE,
    DELETE_LEAD,
    MERGE_LEADS,
    NEW_LEAD,
    SOURCES,
    ActivityLog,
)
from sync_pipeline.sandbox.marketo.assets import AssetStore
from sync_pipeline.sandbox.marketo.objects import ObjectTable, ValueIndex, norm
from sync_pipeline.sandbox.marketo.validation import FieldError, coerce, validate_record
from sync_pipeline.sandbox.schema import MField, MObject, SandboxSchema, load_schema

LEAD_ACTIONS = ("createOnly", "updateOnly", "createOrUpdate", "createDuplicate")
OBJECT_ALIASES = {
    "leads": "lead",
    "companies": "company",
    "opportunities": "opportunity",
    "opportunities/roles": "opportunityRole",
    "roles": "opportunityRole",
    "salespersons": "salesPerson",
}
_REASONS = {
    "API": "Sync Lead",
    "UI": "Changed by user",
    "import": "List Import",
    "merge": "Lead merge",
    "web": "Form fill",
}


# Types whose values are stored as given (email is excluded: it always goes through validation).
_PY_TYPES: dict[str, type[Any]] = {
    "string": str,
    "text": str,
    "phone": str,
    "url": str,
    "integer": int,
    "boolean": bool,
    "currency": float,
    "float": float,
}


class StoreError(ValueError):
    """Bad input to a direct store call (names the record and field)."""


class MarketoStore:
    def __init__(self, schema: SandboxSchema | None = None, clock: Clock | None = None):
        self.schema = schema or load_schema()
        self.clock = clock or Clock()
        self.lock = threading.RLock()
        # This instance's own lead definition: the schema API adds fields to it (never to the shared constant).
        self.lead_object: MObject = replace(self.schema.objects["lead"])
        self.schema.objects["lead"] = self.lead_object
        self.field_ids = {f.name: i for i, f in enumerate(self.lead_object.fields, start=1)}
        self._leads: dict[int, dict[str, Any]] = {}
        self._next_lead_id = 1
        self.searchable = [
            f[0] for f in self.lead_object.searchable_fields if len(f) == 1 and self.lead_object.field(f[0])
        ]
        self._lead_indexes = {name: ValueIndex() for name in self.searchable if name != "id"}
        self.activities = ActivityLog(self.clock)
        self.tables: dict[str, ObjectTable] = {
            name: ObjectTable(obj, self.clock) for name, obj in self.schema.objects.items() if name != "lead"
        }
        self.tables["opportunityRole"].check = self._check_role
        self.assets = AssetStore()
        # Ids of the leads bulk_load created, in load order: generated activities and list memberships name
        # persons by their position among the generated ones.
        self.bulk_lead_ids: list[int] = []

    def add_lead_field(self, f: MField) -> None:
        """A custom lead field created through the schema API (in place: every route sees it at once)."""
        with self.lock:
            obj = self.lead_object
            object.__setattr__(obj, "fields", obj.fields + (f,))
            obj.field_map[f.name] = f
            self.field_ids[f.name] = max(self.field_ids.values(), default=0) + 1

    # ------------------------------------------------------------------ names
    def object_def(self, name: str) -> MObject:
        key = OBJECT_ALIASES.get(name, name)
        obj = self.schema.objects.get(key)
        if obj is None:
            raise StoreError(f"Marketo sandbox: unknown object {name!r}")
        return obj

    def table(self, name: str) -> ObjectTable:
        key = self.object_def(name).name
        if key == "lead":
            raise StoreError("Marketo sandbox: leads are not a generic object table")
        return self.tables[key]

    # ------------------------------------------------------------------ leads: indexes
    def _index_lead(self, lead_id: int, lead: dict[str, Any], add: bool) -> None:
        for name, index in self._lead_indexes.items():
            value = lead.get(name)
            if value is not None:
                (index.add if add else index.remove)(value, lead_id)

    def find_leads(self, field: str, value: Any) -> list[int]:
        with self.lock:
            if field == "id":
                try:
                    lead_id = int(value)
                except (TypeError, ValueError):
                    return []
                return [lead_id] if lead_id in self._leads else []
            index = self._lead_indexes.get(field)
            if index is not None:
                return index.get(value)
            if self.lead_object.field(field) is None:
                raise StoreError(f"Marketo sandbox: lead field {field!r} not found")
            target = norm(value)
            return [
                i for i, lead in self._leads.items() if target is not None and norm(lead.get(field)) == target
            ]

    def get_lead(self, lead_id: int) -> dict[str, Any] | None:
        with self.lock:
            lead = self._leads.get(int(lead_id))
            return dict(lead) if lead is not None else None

    def leads(self) -> Iterator[dict[str, Any]]:
        """Snapshot iteration (copies one lead at a time; writers are not blocked for long)."""
        with self.lock:
            ids = list(self._leads)
        for lead_id in ids:
            lead = self.get_lead(lead_id)
            if lead is not None:
                yield lead

    def count(self, object_name: str = "lead") -> int:
        with self.lock:
            if self.object_def(object_name).name == "lead":
                return len(self._leads)
            return len(self.table(object_name).rows)

    # ------------------------------------------------------------------ leads: writes
    def _insert_lead(self, values: dict[str, Any], now: str, source: str | None) -> int:
        lead_id, self._next_lead_id = self._next_lead_id, self._next_lead_id + 1
        lead = {k: v for k, v in values.items() if v is not None}
        lead["id"] = lead_id
        lead.setdefault("createdAt", now)
        lead.setdefault("updatedAt", now)
        self._leads[lead_id] = lead
        self._index_lead(lead_id, lead, True)
        if source is not None:
            self.activities.record(
                NEW_LEAD,
                lead_id,
                primary=SOURCES.get(source, source),
                attributes=[
                    {"name": "Source", "value": SOURCES.get(source, source)},
                    {"name": "Reason", "value": _REASONS.get(source, source)},
                ],
            )
        return lead_id

    def _update_lead(self, lead_id: int, values: dict[str, Any], source: str) -> list[str]:
        lead = self._leads[lead_id]
        changed = [k for k, v in values.items() if lead.get(k) != v]
        if not changed:
            return []
        self._index_lead(lead_id, lead, False)
        label = SOURCES.get(source, source)
        for name in changed:
            old, new = lead.get(name), values[name]
            if new is None:
                lead.pop(name, None)
            else:
                lead[name] = new
            self.activities.record(
                CHANGE_DATA_VALUE,
                lead_id,
                primary_id=self.field_ids.get(name),
                primary=self.lead_object.field(name).label,  # type: ignore[union-attr]
                fields=[{"id": self.field_ids.get(name), "name": name, "newValue": new, "oldValue": old}],
                attributes=[
                    {"name": "New Value", "value": new},
                    {"name": "Old Value", "value": old},
                    {"name": "Reason", "value": _REASONS.get(source, source)},
                    {"name": "Source", "value": label},
                ],
            )
        lead["updatedAt"] = iso(self.clock.now())
        self._index_lead(lead_id, lead, True)
        return changed

    def _validated(self, fields: dict[str, Any], what: str) -> dict[str, Any]:
        values, reasons = validate_record(self.lead_object, fields, creating=True)
        if reasons:
            raise StoreError(f"Marketo sandbox: {what}: " + "; ".join(r["message"] for r in reasons))
        return values

    def create_lead(self, fields: dict[str, Any], source: str = "UI") -> dict[str, Any]:
        with self.lock:
            values = self._validated(fields, "create_lead")
            lead_id = self._insert_lead(values, iso(self.clock.now()), source)
            return dict(self._leads[lead_id])

    def update_lead(self, lead_id: int, changes: dict[str, Any], source: str = "UI") -> dict[str, Any]:
        with self.lock:
            if lead_id not in self._leads:
                raise StoreError(f"Marketo sandbox: update_lead: lead {lead_id} not found")
            self._update_lead(lead_id, self._validated(changes, f"update_lead({lead_id})"), source)
            return dict(self._leads[lead_id])

    def delete_lead(self, lead_id: int, source: str = "UI") -> None:
        with self.lock:
            lead = self._leads.pop(int(lead_id), None)
            if lead is None:
                raise StoreError(f"Marketo sandbox: delete_lead: lead {lead_id} not found")
            self._index_lead(lead_id, lead, False)
            self.activities.record(
                DELETE_LEAD,
                lead_id,
                primary_id=lead_id,
                primary=lead.get("email"),
                attributes=[
                    {"name": "Remove from CRM", "value": False},
                    {"name": "Source", "value": SOURCES.get(source, source)},
                ],
            )

    def merge_leads(self, winner: int, losers: Iterable[int], source: str = "UI") -> dict[str, Any]:
        """Merge Leads (``POST /rest/v1/leads/{winner}/merge.json?leadIds=...``, at most 25 losers).

        Winner/loser rules, as real Marketo applies them: the winner keeps every non-empty value of its own;
        a field that is empty on the winner takes the value of the FIRST loser, in ``leadIds`` order, that has
        one (Adobe Experience League KB ka-28666, "What Field Values Are Copied to Winning Records When
        Merging Multiple Records From REST API"). That includes CRM link fields such as ``dynamicsId`` (the
        issue-9 report: Marketo copies the loser's Dynamics id onto an unlinked winner). The losers are
        removed without a Delete Lead activity; a "Merge Leads" activity (type 32, ``activities/types.json``)
        is logged on the winner: ``leadId`` and ``primaryAttributeValueId`` = the winner's id, attribute
        "Merge ids" = the losers' ids, comma-separated, "Master Updated" = whether the winner changed (Adobe
        Marketo Engage developer docs, REST API > Activities). The values copied onto the winner are logged
        as its Change Data Value activities (Reason "Lead merge").
        """
        with self.lock:
            losers = [int(x) for x in losers]
            missing = [i for i in [winner, *losers] if i not in self._leads]
            if missing:
                raise StoreError(f"Marketo sandbox: merge_leads: lead(s) {missing} not found")
            base = self._leads[winner]
            fill: dict[str, Any] = {}
            for loser_id in losers:
                for name, value in self._leads[loser_id].items():
                    if (
                        name not in ("id", "createdAt", "updatedAt")
                        and base.get(name) is None
                        and name not in fill
                    ):
                        fill[name] = value
            for loser_id in losers:
                lead = self._leads.pop(loser_id)
                self._index_lead(loser_id, lead, False)
            self._update_lead(winner, fill, "merge")
            self.activities.record(
                MERGE_LEADS,
                winner,
                primary_id=winner,
                primary=base.get("email"),
                attributes=[
                    {"name": "Merge ids", "value": ",".join(str(i) for i in losers)},
                    {"name": "Master Updated", "value": bool(fill)},
                    {"name": "Merge Source", "value": SOURCES.get(source, source)},
                ],
            )
            return dict(self._leads[winner])

    def sync_leads(
        self,
        records: list[Any],
        action: str = "createOrUpdate",
        lookup_field: str = "email",
        source: str = "API",
        fail: Callable[[int], dict[str, str] | None] = lambda i: None,
    ) -> list[dict[str, Any]]:
        """Sync Leads semantics; one result per input record, in input order."""
        with self.lock:
            seen: set[str] = set()
            return [
                self._sync_one(i, rec, action, lookup_field, source, seen, fail(i))
                for i, rec in enumerate(records)
            ]

    def _sync_one(
        self,
        index: int,
        record: Any,
        action: str,
        lookup_field: str,
        source: str,
        seen: set[str],
        injected: dict[str, str] | None,
    ) -> dict[str, Any]:
        skip = lambda *reasons: {"status": "skipped", "reasons": list(reasons)}  # noqa: E731
        if not isinstance(record, dict):
            return skip({"code": "1003", "message": f"Invalid record at index {index}: expected an object"})
        if injected:
            return skip(injected)
        by_id = lookup_field == "id"
        if by_id and action != "updateOnly":
            return skip(
                {"code": "1003", "message": "Lookup field 'id' is only allowed with action updateOnly"}
            )
        key_value = record.get(lookup_field)
        fields = {k: v for k, v in record.items() if not (by_id and k == "id")}
        values, reasons = validate_record(self.lead_object, fields, creating=True)
        if reasons:
            return skip(*reasons)
        key = norm(key_value)
        if action != "createDuplicate" and key is not None:
            if key in seen:
                return skip({"code": "1036", "message": f"Duplicate value for '{lookup_field}' in input"})
            seen.add(key)
        if action == "createDuplicate":
            matches: list[int] = []
        elif key is None:
            if action == "updateOnly":
                return skip(
                    {"code": "1003", "message": f"Value for lookup field '{lookup_field}' not specified"}
                )
            matches = []
        else:
            matches = self.find_leads(lookup_field, key_value)
        if matches and action == "createOnly":
            return skip({"code": "1005", "message": "Lead already exists"})
        if not matches and action == "updateOnly":
            return skip({"code": "1004", "message": "Lead not found"})
        if len(matches) > 1:
            return skip({"code": "1007", "message": "Multiple leads match the lookup criteria"})
        if matches:
            self._update_lead(matches[0], values, source)
            return {"id": matches[0], "status": "updated"}
        return {"id": self._insert_lead(values, iso(self.clock.now()), source), "status": "created"}

    # ------------------------------------------------------------------ bulk load (generator fast path)
    def bulk_load(self, object_name: str, rows: Iterable[dict[str, Any]]) -> int:
        """Load generated data; values are coerced, unknown fields rejected. Leads load without activities:
        the generator's ``activity`` rows (and ``asset`` rows) are loaded by the same call, by name."""
        if object_name == "activity":
            return self._load_activities(list(rows))
        if object_name == "asset":
            return self.assets.load(list(rows), self.bulk_lead_ids)
        obj = self.object_def(object_name)
        fmap = obj.field_map
        # Values already in stored form skip coerce(): (python type, max length) per field.
        ready = {
            name: (_PY_TYPES[f.data_type], f.length) for name, f in fmap.items() if f.data_type in _PY_TYPES
        }
        loaded = 0
        with self.lock:
            now = iso(self.clock.now())
            table = None if obj.name == "lead" else self.tables[obj.name]
            for n, row in enumerate(rows):
                values: dict[str, Any] = {}
                if "leadIndex" in row and obj.name == "opportunityRole":  # a generated role names its person
                    row = {
                        **{k: v for k, v in row.items() if k != "leadIndex"},
                        "leadId": self._generated_lead(row["leadIndex"], "opportunityRole", n),
                    }
                for name, raw in row.items():
                    if raw is None:
                        if name not in fmap:
                            raise StoreError(
                                f"Marketo sandbox: bulk_load {obj.name} row {n}: field {name!r} not found"
                            )
                        continue
                    spec = ready.get(name)
                    if spec is not None and type(raw) is spec[0] and (spec[1] is None or len(raw) <= spec[1]):
                        values[name] = raw
                        continue
                    field = fmap.get(name)
                    if field is None:
                        raise StoreError(
                            f"Marketo sandbox: bulk_load {obj.name} row {n}: field {name!r} not found"
                        )
                    try:
                        values[name] = coerce(field, raw)
                    except FieldError as exc:
                        raise StoreError(
                            f"Marketo sandbox: bulk_load {obj.name} row {n}: {exc.message}"
                        ) from None
                if table is None:
                    self._load_lead(values, now)
                else:
                    dk = table.dedupe_key(values)
                    if dk is not None and dk in table.dedupe:
                        raise StoreError(
                            f"Marketo sandbox: bulk_load {obj.name} row {n}: duplicate "
                            f"{'+'.join(obj.dedupe_fields)} {dk}"
                        )
                    values.pop(obj.id_field, None)
                    table.insert(values, now)
                loaded += 1
        return loaded

    def _load_lead(self, values: dict[str, Any], now: str) -> None:
        lead_id = self._next_lead_id
        self._next_lead_id += 1
        values["id"] = lead_id
        self.bulk_lead_ids.append(lead_id)
        values.setdefault("createdAt", now)
        values.setdefault("updatedAt", now)
        self._leads[lead_id] = values
        for name, index in self._lead_indexes.items():
            value = values.get(name)
            if value is not None:
                index.add(value, lead_id)

    def _generated_lead(self, index: int, what: str, n: int) -> int:
        """The id of a person bulk_load created, by its position counted from the end (negative)."""
        if not -len(self.bulk_lead_ids) <= index < len(self.bulk_lead_ids):
            raise StoreError(f"Marketo sandbox: bulk_load {what} row {n}: no generated person {index}")
        return self.bulk_lead_ids[index]

    def _load_activities(self, rows: list[dict[str, Any]]) -> int:
        """Generated history: ``{"leadIndex", "activityTypeId", "activityDate", ...}`` rows, in date order
        before anything the API logs later (the log stays ordered by date)."""
        items = []
        with self.lock:
            for n, row in enumerate(rows):
                lead_id = self._generated_lead(row["leadIndex"], "activity", n)
                type_id = row["activityTypeId"]
                field_name = row.get("field")
                item: dict[str, Any] = {
                    "leadId": lead_id,
                    "activityDate": row["activityDate"],
                    "activityTypeId": type_id,
                    "campaignId": None,
                }
                if type_id == NEW_LEAD:
                    source = row.get("source", "web")
                    item.update(
                        primaryAttributeValueId=None,
                        primaryAttributeValue=SOURCES.get(source, source),
                        attributes=[
                            {"name": "Source", "value": SOURCES.get(source, source)},
                            {"name": "Reason", "value": _REASONS.get(source, source)},
                        ],
                    )
                elif type_id == CHANGE_DATA_VALUE and field_name:
                    fid = self.field_ids.get(field_name)
                    label = self.lead_object.field(field_name).label  # type: ignore[union-attr]
                    new, old = row.get("newValue"), row.get("oldValue")
                    item.update(
                        primaryAttributeValueId=fid,
                        primaryAttributeValue=label,
                        fields=[{"id": fid, "name": field_name, "newValue": new, "oldValue": old}],
                        attributes=[
                            {"name": "New Value", "value": new},
                            {"name": "Old Value", "value": old},
                            {"name": "Reason", "value": _REASONS["UI"]},
                            {"name": "Source", "value": SOURCES["UI"]},
                        ],
                    )
                else:
                    raise StoreError(
                        f"Marketo sandbox: bulk_load activity row {n}: unsupported activity {row!r}"
                    )
                items.append(item)
            self.activities.load_history(items)
        return len(items)

    # ------------------------------------------------------------------ other objects
    def objects(self, object_name: str) -> Iterator[dict[str, Any]]:
        with self.lock:
            rows = [dict(r) for r in self.table(object_name).rows.values()]
        return iter(rows)

    def get_object(self, object_name: str, key: Any) -> dict[str, Any] | None:
        """By idField value, or by dedupe key (a value, or a dict for compound keys)."""
        with self.lock:
            table = self.table(object_name)
            parsed = table.parse_key(key) if not isinstance(key, dict) else None
            if parsed in table.rows:
                return dict(table.rows[parsed])
            record = key if isinstance(key, dict) else {table.obj.dedupe_fields[0]: key}
            found = table.find_compound(table.obj.dedupe_fields, record)
            return dict(table.rows[found[0]]) if found else None

    def _check_role(self, row: dict[str, Any]) -> list[dict[str, str]]:
        reasons = []
        if not self.tables["opportunity"].find("externalOpportunityId", row.get("externalOpportunityId")):
            reasons.append(
                {"code": "1013", "message": f"Opportunity '{row.get('externalOpportunityId')}' not found"}
            )
        if row.get("leadId") not in self._leads:
            reasons.append({"code": "1013", "message": f"Lead '{row.get('leadId')}' not found"})
        return reasons

    def opportunity_in_use(self, key: Any) -> dict[str, str] | None:
        opp = self.tables["opportunity"].rows.get(key)
        if opp and self.tables["opportunityRole"].find(
            "externalOpportunityId", opp.get("externalOpportunityId")
        ):
            return {"code": "1022", "message": "Object in use: the opportunity still has roles"}
        return None
