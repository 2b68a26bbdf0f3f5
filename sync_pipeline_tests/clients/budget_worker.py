"""One OS process hammering a Marketo instance through its own client (run by test_shared_budget).

Usage: python budget_worker.py '<json settings>'; prints {"ok": n, "errors": {code: n}} as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from typing import Any

from sync_pipeline.clients.budget import SharedBudget
from sync_pipeline.clients.governor import CallBudget, RateGovernor
from sync_pipeline.clients.marketo import MarketoClient, MarketoError


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    budget: CallBudget
    limits = {key: cfg[key] for key in ("calls_per_window", "window_seconds", "max_concurrent")}
    if cfg.get("budget_url"):
        budget = SharedBudget(cfg["budget_url"], cfg["instance"], **limits)
    else:
        budget = RateGovernor(**limits)
    client = MarketoClient(
        cfg["base_url"], cfg["client_id"], cfg["client_secret"], governor=budget, max_retries=0
    )  # a refused call surfaces instead of being retried
    client.describe2()  # the token first, so the start is a burst of API calls only
    ok, errors, lock = 0, Counter(), threading.Lock()

    def work(n: int) -> None:
        nonlocal ok
        for _ in range(n):
            try:
                client.activity_types()
                with lock:
                    ok += 1
            except MarketoError as exc:
                with lock:
                    errors[exc.code] += 1

    per_thread = [
        cfg["calls"] // cfg["threads"] + (i < cfg["calls"] % cfg["threads"]) for i in range(cfg["threads"])
    ]
    time.sleep(max(0.0, cfg["start_at"] - time.time()))  # every process starts its burst at the same moment
    threads = [threading.Thread(target=work, args=(n,)) for n in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return {"ok": ok, "errors": dict(errors)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
