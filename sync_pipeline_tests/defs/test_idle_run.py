"""An idle sync run (nothing changed on either side) costs at most 10 HTTP requests (issue 13): one delta read per
Dynamics table and the Marketo activity reads; the org metadata, the lead describe and the WhoAmI confirmation
come from the state store while fresh, and the run's clients reuse the process's tokens."""

from __future__ import annotations

from sync_pipeline.bench.pipeline import http_requests

IDLE_REQUESTS_MAX = 10


def test_an_idle_run_makes_at_most_ten_requests(harness) -> None:
    sb = harness.sandbox
    assert harness.run("all").success  # the initial copy
    for _ in range(2):  # its echoes come back once
        assert harness.run("latest").success
    before = sb.calls()
    assert harness.run("latest").success
    spent = {k: v - before.get(k, 0) for k, v in sb.calls().items() if v != before.get(k, 0)}
    tables = len(harness.query("SELECT name FROM cursors WHERE name LIKE 'dynamics:delta:%'"))
    assert spent.get("dynamics.query") == tables  # every table's delta link is still read, one request each
    assert not {"dynamics.whoami", "dynamics.batch", "marketo.leads.describe2"} & set(spent), spent
    assert http_requests(spent) <= IDLE_REQUESTS_MAX, spent
