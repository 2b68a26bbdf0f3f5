"""Reading Marketo's Merge Leads activities (type 32): the winner is the activity's lead, the losers are the
"Merge ids" attribute; anything else in it is not a merge the sync can follow."""

from __future__ import annotations

from sync_pipeline.engine.extract.merges import MERGE_LEADS_TYPE, MarketoMerge, parse_merge_activity


def _activity(lead: object, merge_ids: object, **extra: object) -> dict:
    return {
        "id": 7,
        "leadId": lead,
        "activityDate": "2026-12-01T10:00:00Z",
        "activityTypeId": MERGE_LEADS_TYPE,
        "primaryAttributeValueId": extra.pop("primary", lead),
        "attributes": [{"name": "Merge ids", "value": merge_ids}, {"name": "Master Updated", "value": True}],
    }


def test_winner_and_losers_in_order() -> None:
    assert parse_merge_activity(_activity(10, "12,11")) == MarketoMerge(10, [12, 11], "2026-12-01T10:00:00Z")
    assert parse_merge_activity(_activity(10, " 12 , 11 ,12")).losers == [12, 11]  # spaces, a repeat


def test_the_winner_is_never_its_own_loser_and_junk_is_ignored() -> None:
    assert parse_merge_activity(_activity(10, "10,11")).losers == [11]
    assert parse_merge_activity(_activity(10, "abc, 11, -3")).losers == [11]
    assert parse_merge_activity(_activity(10, "")) is None
    assert parse_merge_activity(_activity(10, None)) is None
    assert parse_merge_activity(_activity(None, "11", primary=None)) is None
    assert parse_merge_activity({"leadId": 10, "attributes": []}) is None
