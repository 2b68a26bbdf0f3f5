"""Run the Dynamics and Marketo sandboxes together, in this process or in a process of their own.

:class:`Sandbox` owns one shared :class:`Clock`, one CA (the identity endpoint is always HTTPS: msal
refuses other authorities), both services and the admin API (:mod:`sync_pipeline.sandbox.admin`).
Its methods are the operations the admin API exposes, so code written against a :class:`Sandbox` works
against a :class:`RemoteSandbox` (from :func:`spawn_sandbox`) too.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

from sync_pipeline.sandbox.admin import AdminClient, make_admin_app
from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics import DynamicsSandbox
from sync_pipeline.sandbox.faults import Fault, FaultRule
from sync_pipeline.sandbox.generator import populate as generate_into
from sync_pipeline.sandbox.http import App, Request, Response, SandboxServer
from sync_pipeline.sandbox.marketo import MarketoSandbox
from sync_pipeline.sandbox.schema import SandboxSchema, load_schema
from sync_pipeline.sandbox.tls import SandboxCA

PROFILES = ("off", "realistic")
LOOPBACK = "127.0.0.1"


def parse_fault_rules(rules: Iterable[dict[str, Any] | FaultRule]) -> list[FaultRule]:
    """Rules as JSON-able dicts: ``{"pattern": "marketo.*", "rate": 0.2, "count": 5 (optional),
    "faults": [{"kind": "code", "code": "606", "weight": 1}, {"kind": "status", "status": 503}]}``."""
    parsed = []
    for n, spec in enumerate(rules):
        if isinstance(spec, FaultRule):
            parsed.append(spec)
            continue
        try:
            faults = [
                (
                    Fault(
                        f["kind"],
                        int(f.get("status", 500)),
                        str(f.get("code", "")),
                        float(f.get("seconds", 0.0)),
                    ),
                    float(f.get("weight", 1.0)),
                )
                for f in spec["faults"]
            ]
            rate = float(spec["rate"])
            pattern = str(spec["pattern"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"fault rule {n} ({spec!r}): needs pattern, rate and faults[].kind ({exc})"
            ) from None
        if not 0.0 <= rate <= 1.0 or not faults:
            raise ValueError(f"fault rule {n} ({pattern}): rate must be in [0, 1] and faults non-empty")
        count = spec.get("count")
        parsed.append(FaultRule(pattern, rate, faults, None if count is None else int(count)))
    return parsed


class Sandbox:
    def __init__(
        self,
        state_dir: str | Path,
        *,
        profile: str = "off",
        tls: bool = False,
        seed: int = 0,
        host: str = LOOPBACK,
        dynamics_port: int = 0,
        identity_port: int = 0,
        marketo_port: int = 0,
        admin_port: int = 0,
        latency_seconds: float = 0.0,
        schema: SandboxSchema | None = None,
    ):
        if profile not in PROFILES:
            raise ValueError(f"sandbox profile {profile!r}: choose one of {', '.join(PROFILES)}")
        if latency_seconds < 0:
            raise ValueError(f"sandbox latency_seconds must be >= 0, got {latency_seconds}")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.tls, self.seed, self.host, self.profile = tls, seed, host, profile
        self.ports = {
            "dynamics": dynamics_port,
            "identity": identity_port,
            "marketo": marketo_port,
            "admin": admin_port,
        }
        self.schema = schema or load_schema()
        self.clock = Clock()
        self.ca = SandboxCA.create(self.state_dir / "tls")
        self.dynamics = DynamicsSandbox(self.schema, clock=self.clock, limits=self._limits("dynamics"))
        self.marketo = MarketoSandbox(self.schema, clock=self.clock, limits=self._limits("marketo"))
        self.admin_app = make_admin_app(self)
        self._admin: SandboxServer | None = None
        self._ui_user: str | None = None
        self.populated: dict[str, Any] | None = None  # scale, seed, counts, seconds of the last populate
        if latency_seconds:
            for app in self.apps():
                _add_latency(app, latency_seconds)

    def __repr__(self) -> str:
        state = "running" if self._admin else "stopped"
        return f"Sandbox({str(self.state_dir)!r}, profile={self.profile!r}, tls={self.tls}, {state})"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Sandbox:
        server_ctx = self.ca.server_context()
        self.dynamics.start(
            self.host,
            identity_ssl=server_ctx,
            api_ssl=server_ctx if self.tls else None,
            api_port=self.ports["dynamics"],
            identity_port=self.ports["identity"],
        )
        try:
            self.marketo.start(self.host, ssl=server_ctx if self.tls else None, port=self.ports["marketo"])
            self._admin = SandboxServer(self.admin_app, LOOPBACK, self.ports["admin"]).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.dynamics.stop()
            self.marketo.stop()
        finally:
            if self._admin is not None:
                self._admin.stop()
                self._admin = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def apps(self) -> list[App]:
        return [self.dynamics.identity_app, self.dynamics.api_app, self.marketo.app]

    @property
    def admin_url(self) -> str:
        if self._admin is None:
            raise RuntimeError("sandbox is not started")
        return self._admin.url

    def settings(self) -> dict[str, str]:
        """The environment the pipeline reads, pointing at this sandbox."""
        return {
            "DYNAMICS_URL": self.dynamics.api_url,
            "DYNAMICS_AUTHORITY": self.dynamics.authority,
            "DYNAMICS_TENANT_ID": self.dynamics.tenant_id,
            "DYNAMICS_CLIENT_ID": self.dynamics.client_id,
            "DYNAMICS_CLIENT_SECRET": self.dynamics.client_secret,
            "DYNAMICS_ORGANIZATION_ID": self.dynamics.organization_id,
            "MARKETO_BASE_URL": self.marketo.base_url,
            "MARKETO_CLIENT_ID": self.marketo.client_id,
            "MARKETO_CLIENT_SECRET": self.marketo.client_secret,
            "MARKETO_MUNCHKIN_ID": self.marketo.munchkin_id,
            "SYNC_CA_BUNDLE": str(self.ca.ca_path),
            "SANDBOX_ADMIN_URL": self.admin_url,
        }

    # ------------------------------------------------------------------ data
    def populate(self, scale: str, seed: int | None = None) -> dict[str, int]:
        """Add a synthetic org (see :mod:`.generator`); the same seed again rewrites the same Dynamics rows."""
        seed = self.seed if seed is None else int(seed)
        started = time.perf_counter()
        counts = generate_into(
            self.dynamics.store,
            self.marketo.store,
            scale,
            seed=seed,
            now=self.clock.now(),
            schema=self.schema,
        )
        self.populated = {
            "scale": scale,
            "seed": seed,
            "counts": counts,
            "seconds": round(time.perf_counter() - started, 3),
        }
        self._ui_user = None
        return counts

    # ------------------------------------------------------------------ counters, faults, limits, time
    def calls(self) -> dict[str, int]:
        merged: Counter[str] = Counter()
        for app in self.apps():
            merged.update(app.calls)
        return dict(merged)

    def reset_calls(self) -> None:
        for app in self.apps():
            app.calls.clear()

    def faults(self, rules: Iterable[dict[str, Any] | FaultRule], seed: int = 0) -> None:
        """Replace the fault plan of every app; each rule goes to the apps that have a matching route."""
        parsed = parse_fault_rules(rules)
        for app in self.apps():
            names = [r.name for r in app.routes]
            mine = [
                FaultRule(r.pattern, r.rate, list(r.faults), r.remaining)
                for r in parsed
                if any(fnmatch.fnmatchcase(n, r.pattern) for n in names)
            ]
            app.faults.configure(seed, mine)

    def clear_faults(self) -> None:
        for app in self.apps():
            app.faults.clear()

    def faults_injected(self) -> dict[str, int]:
        merged: Counter[str] = Counter()
        for app in self.apps():
            merged.update(app.faults.injected)
        return dict(merged)

    def set_profile(self, profile: str) -> None:
        if profile not in PROFILES:
            raise ValueError(f"sandbox profile {profile!r}: choose one of {', '.join(PROFILES)}")
        self.profile = profile
        self.dynamics.limits = dict(self._limits("dynamics") or {})  # DynamicsSandbox reads it per request
        self.marketo.set_limits(self._limits("marketo"))

    def _limits(self, service: str) -> dict[str, Any] | None:
        if self.profile == "off":
            return None
        try:
            return dict(self.schema.raw["limits"][self.profile][service])
        except KeyError:
            raise ValueError(f"sandbox config: limits.{self.profile}.{service} is missing") from None

    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def now(self) -> str:
        return self.clock.now().isoformat()

    # ------------------------------------------------------------------ Dynamics, as a user in the CRM UI
    def ui_user(self) -> str | None:
        """An enabled, interactive user (not the admin, not an application user) who makes "UI" edits."""
        if self._ui_user is None:
            for user in self.dynamics.store.rows("systemuser"):
                if (
                    user.get("accessmode", 0) == 0
                    and not user.get("isdisabled")
                    and not user.get("applicationid")
                ):
                    self._ui_user = user["systemuserid"]
                    break
        return self._ui_user

    def dynamics_count(self, table: str) -> int:
        return self.dynamics.store.count(table)

    def dynamics_rows(self, table: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.dynamics.store.rows(table)
        return list(islice(rows, limit))

    def dynamics_get(self, table: str, record_id: str) -> dict[str, Any]:
        row = self.dynamics.store.get(table, record_id)
        if row is None:
            raise KeyError(f"Dynamics {table} {record_id} not found")
        return row

    def dynamics_insert(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        return self.dynamics.store.insert(table, row, modified_by=self.ui_user())

    def dynamics_update(self, table: str, record_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self.dynamics.store.update(table, record_id, changes, modified_by=self.ui_user())

    def dynamics_delete(self, table: str, record_id: str) -> None:
        self.dynamics.store.delete(table, record_id)

    def qualify_lead(
        self,
        lead_id: str,
        create_account: bool = True,
        create_contact: bool = True,
        create_opportunity: bool = False,
    ) -> dict[str, str]:
        return self.dynamics.store.qualify_lead(
            lead_id, create_account, create_contact, create_opportunity, modified_by=self.ui_user()
        )

    def dynamics_merge(
        self, table: str, target_id: str, subordinate_id: str, update_content: dict[str, Any] | None = None
    ) -> None:
        """A user merges two rows in Dynamics (the ``Merge`` action): the subordinate is deactivated."""
        self.dynamics.store.merge(
            table, target_id, subordinate_id, update_content, modified_by=self.ui_user()
        )

    # ------------------------------------------------------------------ Marketo, as a marketer in the UI
    def marketo_find_leads(self, field: str, value: Any) -> list[int]:
        return self.marketo.store.find_leads(field, value)

    def marketo_create_lead(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self.marketo.store.create_lead(fields, source="UI")

    def marketo_get_lead(self, lead_id: int) -> dict[str, Any]:
        lead = self.marketo.store.get_lead(lead_id)
        if lead is None:
            raise KeyError(f"Marketo lead {lead_id} not found")
        return lead

    def marketo_update_lead(self, lead_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        self.marketo_get_lead(lead_id)
        return self.marketo.store.update_lead(lead_id, changes, source="UI")

    def marketo_delete_lead(self, lead_id: int) -> None:
        self.marketo_get_lead(lead_id)
        self.marketo.store.delete_lead(lead_id)

    def marketo_merge_leads(self, winner: int, losers: list[int]) -> dict[str, Any]:
        return self.marketo.store.merge_leads(winner, losers)

    def marketo_count(self, object_name: str) -> int:
        return self.marketo.store.count(object_name)

    def marketo_rows(self, object_name: str, limit: int = 100) -> list[dict[str, Any]]:
        source = (
            self.marketo.store.leads()
            if object_name in ("lead", "leads")
            else self.marketo.store.objects(object_name)
        )
        return list(islice(source, limit))


def _add_latency(app: App, seconds: float) -> None:
    """Delay every request to ``app`` (a slow network), before its own checks run."""
    inner = app.before

    def before(req: Request) -> Response | None:
        time.sleep(seconds)
        return inner(req)

    app.before = before


# --------------------------------------------------------------------------------------------------
# A sandbox in its own process


class RemoteSandbox(AdminClient):
    """Handle on a sandbox process started by :func:`spawn_sandbox`; stopping it ends the process."""

    def __init__(self, process: subprocess.Popen[bytes], info: dict[str, Any], log_path: Path):
        super().__init__(info["settings"]["SANDBOX_ADMIN_URL"])
        self.process, self.info, self.log_path = process, info, log_path

    def __repr__(self) -> str:
        return f"RemoteSandbox(pid={self.process.pid}, admin={self.admin_url!r})"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def populated(self) -> dict[str, Any] | None:
        return self.info.get("populated")

    def settings(self) -> dict[str, str]:
        return dict(self.info["settings"])

    def stop(self, timeout: float = 10.0) -> int:
        """Close the process's stdin (its signal to stop), then wait; escalate if it hangs."""
        self.close()
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                return self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(5)

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def spawn_sandbox(
    state_dir: str | Path,
    scale: str | None = None,
    seed: int = 0,
    profile: str = "off",
    tls: bool = False,
    *,
    latency_seconds: float = 0.0,
    ports: dict[str, int] | None = None,
    timeout: float = 300.0,
    schema: str | Path | None = None,
) -> RemoteSandbox:
    """Start ``python -m sync_pipeline.sandbox`` in its own process and wait until it serves.

    The child stops when its stdin closes (our pipe: ``stop()``, or this process dying) or when its
    parent pid changes, so a killed test run never leaves a sandbox behind.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    settings_file = state_dir / "sandbox-settings.json"
    settings_file.unlink(missing_ok=True)
    log_path = state_dir / "sandbox.log"
    cmd = [
        sys.executable,
        "-m",
        "sync_pipeline.sandbox",
        "--state-dir",
        str(state_dir),
        "--settings-file",
        str(settings_file),
        "--seed",
        str(seed),
        "--profile",
        profile,
        "--latency",
        str(latency_seconds),
        "--quiet",
        "--parent-pid",
        str(os.getpid()),
        "--stop-on-stdin-eof",
    ]
    if scale:
        cmd += ["--scale", scale]
    if tls:
        cmd.append("--tls")
    if schema:
        cmd += ["--schema", str(schema)]
    if ports:
        cmd += ["--ports", ",".join(f"{k}={v}" for k, v in ports.items())]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not settings_file.exists():
        if process.poll() is not None:
            raise RuntimeError(
                f"sandbox process exited with code {process.returncode} before serving; "
                f"last output:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError(f"sandbox process did not serve within {timeout:.0f} s; see {log_path}")
        time.sleep(0.05)
    return RemoteSandbox(process, json.loads(settings_file.read_text()), log_path)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
