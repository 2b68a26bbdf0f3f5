"""The Marketo sandbox's merge follows real Marketo's winner/loser rules (Adobe KB ka-28666): the winner's
non-empty values stay, each of its empty fields takes the FIRST loser's value in ``leadIds`` order (the CRM
link fields too), the losers disappear without a Delete Lead activity, and one Merge Leads activity (type
32) names the winner and the losers."""

from __future__ import annotations

from sync_pipeline.sandbox.marketo.activities import CHANGE_DATA_VALUE, DELETE_LEAD, MERGE_LEADS
from sync_pipeline.sandbox.marketo.store import MarketoStore


def _merged(order: str) -> tuple[dict, dict]:
    store = MarketoStore()
    w = store.create_lead({"email": "w@example.com", "firstName": "Winner"})["id"]
    a = store.create_lead(
        {
            "email": "a@example.com",
            "firstName": "A",
            "title": "Title A",
            "dynamicsId": "00000000-0000-0000-0000-00000000000a",
            "dynamicsType": "Contact",
        }
    )["id"]
    b = store.create_lead({"email": "b@example.com", "title": "Title B", "phone": "555 0100"})["id"]
    losers = [a, b] if order == "ab" else [b, a]
    start = len(store.activities)
    winner = store.merge_leads(w, losers, source="API")
    return winner, {"store": store, "ids": (w, a, b), "losers": losers, "log": store.activities.items[start:]}


def test_first_loser_in_order_fills_the_winners_blanks() -> None:
    winner, _ = _merged("ab")
    assert (winner["firstName"], winner["email"]) == ("Winner", "w@example.com")  # the winner's values stay
    assert winner["title"] == "Title A" and winner["phone"] == "555 0100"
    assert winner["dynamicsId"] == "00000000-0000-0000-0000-00000000000a"  # a loser's CRM link moves too
    winner, _ = _merged("ba")
    assert winner["title"] == "Title B"  # the first loser listed wins a blank field


def test_losers_vanish_and_one_merge_leads_activity_names_everyone() -> None:
    winner, ctx = _merged("ab")
    store, (w, a, b) = ctx["store"], ctx["ids"]
    assert store.get_lead(a) is None and store.get_lead(b) is None and store.count("lead") == 1
    kinds = [i["activityTypeId"] for i in ctx["log"]]
    assert DELETE_LEAD not in kinds and kinds.count(MERGE_LEADS) == 1
    merge = next(i for i in ctx["log"] if i["activityTypeId"] == MERGE_LEADS)
    assert merge["leadId"] == w and merge["primaryAttributeValueId"] == w
    attrs = {x["name"]: x["value"] for x in merge["attributes"]}
    assert attrs["Merge ids"] == f"{a},{b}" and attrs["Master Updated"] is True
    # The copied values are the winner's Change Data Value activities (what a lead-changes reader sees).
    changed = {i["fields"][0]["name"] for i in ctx["log"] if i["activityTypeId"] == CHANGE_DATA_VALUE}
    assert {"title", "phone", "dynamicsId", "dynamicsType"} <= changed
