"""The API-budget floor: the least wall time the calls a run made need under the services' own limits.

The sandbox's realistic profile admits calls by the vendors' rules and counts what it admitted
(``limits.*`` counters); the floor applies the same rules to those counts, per system:

- Marketo (https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/rest-api, Limits): every
  REST and bulk call of the instance (token calls excluded) counts toward 100 calls per 20 s sliding window and
  the 50,000-a-day quota; 10 concurrent calls (a concurrency bound only matters when a call takes longer than
  window/rate = 0.2 s x 10, which the sandbox's calls do not).
- Dataverse (https://learn.microsoft.com/power-apps/developer/data-platform/api-limits): per user, 300 s sliding
  window: 6,000 requests (a ``$batch`` or a bulk message is ONE request) and 1,200 s combined execution time (a
  ``$batch`` costs the time of all its parts: "You could send fewer requests by bundling them in batch
  operations. The combined execution time limit will counter this."); 52 concurrent.

The binding system is the one whose floor is longest: no client can finish sooner against the real services.
"""

from __future__ import annotations

from typing import Any

# (units per window, window seconds) each service allows; the realistic profile (sandbox.yaml) has the same figures.
API_BUDGET: dict[str, tuple[int, float]] = {"marketo": (100, 20.0), "dynamics": (6000, 300.0)}
DYNAMICS_EXECUTION_BUDGET = (1200.0, 300.0)  # seconds of combined execution time per window
MARKETO_DAILY_QUOTA = 50_000
# The sandbox's admitted-call counters (sync_pipeline.sandbox.{marketo,dynamics}.server).
COUNTED_CALLS = {"marketo": "limits.marketo.calls", "dynamics": "limits.dynamics.requests"}
DYNAMICS_EXECUTION_MS = "limits.dynamics.execution_ms"


def budget_floor_seconds(calls: int, per_window: int, window_seconds: float) -> float:
    """Least wall time ``calls`` need under a sliding window: each full window of calls waits one window."""
    return ((calls - 1) // per_window) * window_seconds if calls > 0 else 0.0


def execution_floor_seconds(execution: float, per_window: float, window_seconds: float) -> float:
    """Least wall time ``execution`` seconds of combined server time need when a window holds ``per_window``."""
    if execution <= per_window:
        return 0.0
    return (-(-execution // per_window) - 1) * window_seconds  # ceil(execution / per_window) - 1 full windows


def budget_floor(calls: dict[str, int], budget: dict[str, tuple[int, float]] | None = None) -> dict[str, Any]:
    """The floor of a run from the sandbox's admitted-call counters: per system, the binding one, and overall."""
    limits: dict[str, tuple[int, float]] = budget or API_BUDGET
    marketo_calls = calls.get(COUNTED_CALLS["marketo"], 0)
    dynamics_requests = calls.get(COUNTED_CALLS["dynamics"], 0)
    execution = calls.get(DYNAMICS_EXECUTION_MS, 0) / 1000
    marketo: dict[str, Any] = {
        "calls": marketo_calls,
        "seconds": budget_floor_seconds(marketo_calls, *limits["marketo"]),
        "rule": f"{limits['marketo'][0]} calls / {limits['marketo'][1]:g} s",
        "daily_quota_share": round(marketo_calls / MARKETO_DAILY_QUOTA, 5),
    }
    by_requests = budget_floor_seconds(dynamics_requests, *limits["dynamics"])
    by_execution = execution_floor_seconds(execution, *DYNAMICS_EXECUTION_BUDGET)
    dynamics: dict[str, Any] = {
        "requests": dynamics_requests,
        "execution_seconds": round(execution, 3),
        "requests_seconds": by_requests,
        "execution_floor_seconds": by_execution,
        "seconds": max(by_requests, by_execution),
        "rule": f"{limits['dynamics'][0]} requests and {DYNAMICS_EXECUTION_BUDGET[0]:g} s execution "
        f"/ {limits['dynamics'][1]:g} s",
    }
    systems = {"marketo": marketo, "dynamics": dynamics}
    binding = max(systems, key=lambda s: float(systems[s]["seconds"]))
    return {
        "marketo": marketo,
        "dynamics": dynamics,
        "binding": binding,
        "seconds": systems[binding]["seconds"],
        "counted": {"marketo": marketo_calls, "dynamics": dynamics_requests},
        "per_service": {s: v["seconds"] for s, v in systems.items()},
    }
