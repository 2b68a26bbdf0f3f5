"""The sandbox admin API: drive a sandbox that runs in another process (tests, the demo, benchmarks).

It is its own :class:`~sync_pipeline.sandbox.http.App` on its own port, bound to 127.0.0.1 only and
without auth; its calls are not counted with the services' calls. JSON in, JSON out; errors come back
as ``{"error": "<message naming the record or setting>"}`` with 400 (bad input), 404 (no such record)
or the Dataverse status of a refused store operation.

Routes (all under ``/_sandbox``):

====== ===================================== ==========================================================
GET    /settings                             the environment settings (URLs, ids, secrets, CA bundle)
GET    /calls, DELETE /calls                 merged call counters of all service apps; reset them
GET    /faults, PUT /faults, DELETE /faults  injected-fault counts; ``{"seed", "rules"}`` plan; clear
PUT    /limits                               ``{"profile": "off" | "realistic"}``
GET    /clock, POST /clock/advance           sandbox time; ``{"seconds": n}`` moves it forward
POST   /populate                             ``{"scale", "seed"}`` -> row counts
GET    /dynamics/<table>                     ``{"count", "rows"}`` (``?limit=`` rows, default 100)
POST   /dynamics/<table>                     insert a row (wire names) as the CRM UI user
GET|PATCH|DELETE /dynamics/<table>/<id>      read / edit as the CRM UI user / delete a row
POST   /dynamics/lead/<id>/qualify           ``{"create_account", "create_contact", "create_opportunity"}``
GET    /marketo/leads?field=&value=          matching person ids
POST   /marketo/leads                        create a person as a marketer in the UI
GET|PATCH|DELETE /marketo/leads/<id>         read / edit / delete a person
POST   /marketo/leads/<id>/merge             ``{"losers": [ids]}``
GET    /marketo/<object>                     ``{"count", "rows"}`` (``?limit=``)
====== ===================================== ==========================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from sync_pipeline.sandbox.http import App, Request, Response

if TYPE_CHECKING:
    from sync_pipeline.sandbox.runner import Sandbox

PREFIX = "/_sandbox"
_ID = r"(?P<id>[^/]+)"
_NAME = r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)"


class SandboxAdminError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"sandbox admin API: HTTP {status}: {message}")
        self.status, self.message = status, message


def _error(status: int, message: str) -> Response:
    return Response.json({"error": message}, status)


def _guard(handler: Callable[[Request], Any]) -> Callable[[Request], Response]:
    """Turn a handler's result into JSON and its exceptions into errors that name what went wrong."""

    def wrapped(req: Request) -> Response:
        try:
            result = handler(req)
        except json.JSONDecodeError as exc:
            return _error(400, f"{req.method} {req.path}: body is not JSON ({exc.msg})")
        except LookupError as exc:  # KeyError / our not-found errors
            return _error(404, str(exc.args[0]) if exc.args else repr(exc))
        except Exception as exc:
            status = getattr(exc, "status", 400)
            message = getattr(exc, "message", None) or str(exc)
            return _error(status if isinstance(status, int) and 400 <= status < 600 else 400, message)
        return result if isinstance(result, Response) else Response.json(result)

    return wrapped


def _body(req: Request) -> dict[str, Any]:
    body = req.json()
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValueError(f"{req.method} {req.path}: body must be a JSON object")
    return body


def _limit(req: Request) -> int:
    raw = req.arg("limit", "100") or "100"
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"limit must be an integer, got {raw!r}") from None


def _lead_id(req: Request) -> int:
    try:
        return int(req.params["id"])
    except ValueError:
        raise ValueError(f"Marketo lead id must be an integer, got {req.params['id']!r}") from None


def unmatched_fault_patterns(sandbox: Sandbox, rules: list[Any]) -> list[str]:
    """Patterns of fault rules that match none of the sandbox's API routes (bad rules raise ValueError: 400)."""
    import fnmatch

    from sync_pipeline.sandbox.runner import parse_fault_rules

    names = [r.name for a in sandbox.apps() for r in a.routes if not r.name.startswith("admin.")]
    return [
        r.pattern
        for r in parse_fault_rules(rules)
        if not any(fnmatch.fnmatchcase(n, r.pattern) for n in names)
    ]


def make_admin_app(sandbox: Sandbox) -> App:
    app = App("admin")
    sb = sandbox

    def route(method: str, pattern: str, name: str) -> Callable[[Callable[[Request], Any]], Any]:
        def register(fn: Callable[[Request], Any]) -> Any:
            app.route(method, PREFIX + pattern, f"admin.{name}")(_guard(fn))
            return fn

        return register

    @route("GET", "/settings", "settings")
    def settings(req: Request) -> Any:
        return sb.settings()

    @route("GET", "/calls", "calls")
    def calls(req: Request) -> Any:
        return sb.calls()

    @route("DELETE", "/calls", "calls.reset")
    def reset_calls(req: Request) -> Any:
        sb.reset_calls()
        return {}

    @route("GET", "/faults", "faults")
    def injected(req: Request) -> Any:
        return sb.faults_injected()

    @route("PUT", "/faults", "faults.set")
    def set_faults(req: Request) -> Any:
        body = _body(req)
        rules = body.get("rules") or []
        unmatched = unmatched_fault_patterns(sb, rules)
        if unmatched:  # a rule that matches no route would inject nothing, silently
            names = sorted({r.name for a in sb.apps() for r in a.routes if not r.name.startswith("admin.")})
            return _error(
                400,
                f"fault rule pattern(s) {', '.join(repr(p) for p in unmatched)} match no route; "
                f"routes: {', '.join(names)}",
            )
        sb.faults(rules, seed=int(body.get("seed", 0)))
        return {}

    @route("DELETE", "/faults", "faults.clear")
    def clear_faults(req: Request) -> Any:
        sb.clear_faults()
        return {}

    @route("PUT", "/limits", "limits")
    def limits(req: Request) -> Any:
        sb.set_profile(_body(req).get("profile", "off"))
        return {"profile": sb.profile}

    @route("GET", "/clock", "clock")
    def clock(req: Request) -> Any:
        return {"now": sb.clock.now().isoformat()}

    @route("POST", "/clock/advance", "clock.advance")
    def advance(req: Request) -> Any:
        sb.advance_clock(float(_body(req).get("seconds", 0)))
        return {"now": sb.clock.now().isoformat()}

    @route("POST", "/populate", "populate")
    def populate(req: Request) -> Any:
        body = _body(req)
        return sb.populate(body.get("scale", "tiny"), seed=body.get("seed"))

    @route("GET", f"/dynamics/{_NAME}", "dynamics.rows")
    def dynamics_rows(req: Request) -> Any:
        name = req.params["name"]
        return {"count": sb.dynamics_count(name), "rows": sb.dynamics_rows(name, _limit(req))}

    @route("POST", f"/dynamics/{_NAME}", "dynamics.insert")
    def dynamics_insert(req: Request) -> Any:
        return Response.json(sb.dynamics_insert(req.params["name"], _body(req)), 201)

    @route("GET", f"/dynamics/{_NAME}/{_ID}", "dynamics.get")
    def dynamics_get(req: Request) -> Any:
        return sb.dynamics_get(req.params["name"], req.params["id"])

    @route("PATCH", f"/dynamics/{_NAME}/{_ID}", "dynamics.update")
    def dynamics_update(req: Request) -> Any:
        return sb.dynamics_update(req.params["name"], req.params["id"], _body(req))

    @route("DELETE", f"/dynamics/{_NAME}/{_ID}", "dynamics.delete")
    def dynamics_delete(req: Request) -> Any:
        sb.dynamics_delete(req.params["name"], req.params["id"])
        return {}

    @route("POST", f"/dynamics/lead/{_ID}/qualify", "dynamics.qualify")
    def qualify(req: Request) -> Any:
        body = _body(req)
        return sb.qualify_lead(
            req.params["id"],
            create_account=bool(body.get("create_account", True)),
            create_contact=bool(body.get("create_contact", True)),
            create_opportunity=bool(body.get("create_opportunity", False)),
        )

    @route("GET", "/marketo/leads", "marketo.find")
    def find(req: Request) -> Any:
        field, value = req.arg("field"), req.arg("value")
        if not field or value is None:
            raise ValueError("GET /_sandbox/marketo/leads needs ?field=<name>&value=<value>")
        return {"ids": sb.marketo_find_leads(field, value)}

    @route("POST", "/marketo/leads", "marketo.create")
    def create(req: Request) -> Any:
        return Response.json(sb.marketo_create_lead(_body(req)), 201)

    @route("GET", f"/marketo/leads/{_ID}", "marketo.get")
    def get(req: Request) -> Any:
        return sb.marketo_get_lead(_lead_id(req))

    @route("PATCH", f"/marketo/leads/{_ID}", "marketo.update")
    def update(req: Request) -> Any:
        return sb.marketo_update_lead(_lead_id(req), _body(req))

    @route("DELETE", f"/marketo/leads/{_ID}", "marketo.delete")
    def delete(req: Request) -> Any:
        sb.marketo_delete_lead(_lead_id(req))
        return {}

    @route("POST", f"/marketo/leads/{_ID}/merge", "marketo.merge")
    def merge(req: Request) -> Any:
        losers = _body(req).get("losers")
        if not isinstance(losers, list) or not losers:
            raise ValueError("merge needs a non-empty list 'losers' of lead ids")
        return sb.marketo_merge_leads(_lead_id(req), [int(x) for x in losers])

    @route("GET", f"/marketo/{_NAME}", "marketo.objects")
    def objects(req: Request) -> Any:
        name = req.params["name"]
        return {"count": sb.marketo_count(name), "rows": sb.marketo_rows(name, _limit(req))}

    return app


class AdminClient:
    """The admin API as Python methods (same names and arguments as :class:`Sandbox`)."""

    def __init__(self, admin_url: str, timeout: float = 600.0):
        self.admin_url = admin_url.rstrip("/")
        self._http = httpx.Client(base_url=self.admin_url + PREFIX, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        resp = self._http.request(method, path, json=body, params=params)
        try:
            payload = resp.json()
        except ValueError:
            raise SandboxAdminError(
                resp.status_code, f"{method} {path}: not JSON: {resp.text[:200]!r}"
            ) from None
        if resp.status_code >= 400:
            raise SandboxAdminError(resp.status_code, payload.get("error", resp.text[:200]))
        return payload

    # -- sandbox-wide
    def calls(self) -> dict[str, int]:
        return self._call("GET", "/calls")

    def reset_calls(self) -> None:
        self._call("DELETE", "/calls")

    def faults(self, rules: list[dict[str, Any]], seed: int = 0) -> None:
        self._call("PUT", "/faults", {"seed": seed, "rules": rules})

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def faults_injected(self) -> dict[str, int]:
        return self._call("GET", "/faults")

    def set_profile(self, profile: str) -> None:
        self._call("PUT", "/limits", {"profile": profile})

    def advance_clock(self, seconds: float) -> None:
        self._call("POST", "/clock/advance", {"seconds": seconds})

    def now(self) -> str:
        return self._call("GET", "/clock")["now"]

    def populate(self, scale: str, seed: int | None = None) -> dict[str, int]:
        return self._call("POST", "/populate", {"scale": scale, "seed": seed})

    # -- Dynamics
    def dynamics_count(self, table: str) -> int:
        return self._call("GET", f"/dynamics/{table}", params={"limit": 0})["count"]

    def dynamics_rows(self, table: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._call("GET", f"/dynamics/{table}", params={"limit": limit})["rows"]

    def dynamics_get(self, table: str, record_id: str) -> dict[str, Any]:
        return self._call("GET", f"/dynamics/{table}/{record_id}")

    def dynamics_insert(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/dynamics/{table}", row)

    def dynamics_update(self, table: str, record_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", f"/dynamics/{table}/{record_id}", changes)

    def dynamics_delete(self, table: str, record_id: str) -> None:
        self._call("DELETE", f"/dynamics/{table}/{record_id}")

    def qualify_lead(
        self,
        lead_id: str,
        create_account: bool = True,
        create_contact: bool = True,
        create_opportunity: bool = False,
    ) -> dict[str, str]:
        return self._call(
            "POST",
            f"/dynamics/lead/{lead_id}/qualify",
            {
                "create_account": create_account,
                "create_contact": create_contact,
                "create_opportunity": create_opportunity,
            },
        )

    # -- Marketo
    def marketo_find_leads(self, field: str, value: Any) -> list[int]:
        return self._call("GET", "/marketo/leads", params={"field": field, "value": value})["ids"]

    def marketo_create_lead(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/marketo/leads", fields)

    def marketo_get_lead(self, lead_id: int) -> dict[str, Any]:
        return self._call("GET", f"/marketo/leads/{lead_id}")

    def marketo_update_lead(self, lead_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", f"/marketo/leads/{lead_id}", changes)

    def marketo_delete_lead(self, lead_id: int) -> None:
        self._call("DELETE", f"/marketo/leads/{lead_id}")

    def marketo_merge_leads(self, winner: int, losers: list[int]) -> dict[str, Any]:
        return self._call("POST", f"/marketo/leads/{winner}/merge", {"losers": losers})

    def marketo_count(self, object_name: str) -> int:
        return self._call("GET", f"/marketo/{object_name}", params={"limit": 0})["count"]

    def marketo_rows(self, object_name: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._call("GET", f"/marketo/{object_name}", params={"limit": limit})["rows"]
