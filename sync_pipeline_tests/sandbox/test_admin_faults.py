"""The sandbox admin API refuses a fault rule that would inject nothing (its pattern matches no route)."""

from __future__ import annotations

import httpx

from sync_pipeline.sandbox.runner import Sandbox


def test_a_fault_rule_matching_no_route_is_rejected_with_the_routes_named(sandbox: Sandbox) -> None:
    url = sandbox.admin_url + "/_sandbox/faults"
    rule = {"pattern": "marketo.companys.sync", "rate": 1.0, "faults": [{"kind": "status", "status": 503}]}
    with httpx.Client(trust_env=False) as http:
        resp = http.put(url, json={"rules": [rule]})
        assert resp.status_code == 400
        message = resp.json()["error"]
        assert "'marketo.companys.sync' match no route" in message and "marketo.leads.sync" in message
        assert not sandbox.marketo.app.faults.rules  # nothing configured
        # Admin routes are not targets either; a matching pattern is accepted.
        assert http.put(url, json={"rules": [dict(rule, pattern="admin.*")]}).status_code == 400
        assert http.put(url, json={"rules": [dict(rule, pattern="marketo.leads.*")]}).status_code == 200
    assert [r.pattern for r in sandbox.marketo.app.faults.rules] == ["marketo.leads.*"]
