"""``sync-pipeline demo``: the whole story on the local sandbox, in a couple of minutes.

Starts the sandbox with a generated org, runs the initial copy (the ``sync`` job over every partition),
makes edits on both sides, runs incremental syncs, shows what moved and checks that both sides agree.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sync_pipeline.cli.extras import require

console = Console()


@dataclass
class Scenario:
    name: str
    check: Callable[[], bool]
    expected: str


def _one(rows: list[tuple]) -> Any:
    return rows[0][0] if rows else None


@click.command()
@click.option(
    "--scale",
    type=click.Choice(["tiny", "small"]),
    default="tiny",
    show_default=True,
    help="Size of the generated org.",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the generated org.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(".state/demo"),
    show_default=True,
    help="Where the sandbox, the state store and the Dagster instance of the demo live (wiped first).",
)
def demo(scale: str, seed: int, state_dir: Path) -> None:
    """Run the sync end to end against the local sandbox and show that both sides agree."""
    require("demo", "sandbox")
    import dagster as dg

    from sync_pipeline import runs
    from sync_pipeline.engine.store import state as state_mod
    from sync_pipeline.sandbox.runner import Sandbox

    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    started = time.perf_counter()
    with console.status("Starting the sandbox (Dataverse + Entra ID over HTTPS, Marketo REST) ..."):
        sb = Sandbox(state_dir / "sandbox", seed=seed).start()
        counts = sb.populate(scale, seed=seed)
    console.print(
        f"[bold]Sandbox[/] Dynamics {sb.dynamics.api_url}  Marketo {sb.marketo.base_url}  "
        f"generated {sum(counts.values()):,} records ({scale})"
    )
    # The sandbox's settings go to the run as resource values (never into os.environ), its store next to it.
    settings = sb.settings()
    spec = runs.connection(state_path=str(state_dir / "sync.duckdb"))
    # In-memory instance: the demo is about the sync; `dagster dev` keeps history for real deployments.
    instance = dg.DagsterInstance.ephemeral()

    def query(sql: str, params: list | None = None) -> list[tuple]:
        with state_mod.connect(state_dir / "sync.duckdb") as con:
            return con.execute(sql, params or []).fetchall()

    def run(label: str, scope: str) -> None:
        t = time.perf_counter()
        with console.status(f"{label} ..."):
            result = runs.run_sync(instance, scope=scope, raise_on_error=False, spec=spec, settings=settings)
        status = "[green]ok[/]" if result.success else "[red]FAILED[/]"
        writes = query("SELECT count(*) FROM ledger WHERE run_id = ?", [result.run_id])[0][0]
        console.print(
            f"{label}: {status} in {time.perf_counter() - t:.1f}s, {writes:,} field writes "
            f"(run {result.run_id[:8]})"
        )
        if not result.success:
            raise click.ClickException(f"{label} failed; see run {result.run_id} in the Dagster UI")

    try:
        keys = runs.partition_keys(spec)
        run(
            f"Initial copy: backfill of {len(keys)} daily partitions ({keys[0]} .. {keys[-1]}) in one run",
            "all",
        )
        _print_counts(sb)
        scenarios = _make_edits(sb, query)
        run("Incremental sync 1", "latest")
        run("Incremental sync 2 (absorbs the echoes of our own writes)", "latest")
        _print_moves(query)
        failed = _print_scenarios(scenarios)
        differences = _compare(sb, state_dir)
    finally:
        sb.stop()
    console.print(
        f"Done in {time.perf_counter() - started:.0f}s. State: {state_dir} (open it with "
        "`sync-pipeline status --state ...`)."
    )
    if failed or differences:
        raise SystemExit(1)


def _print_counts(sb: Any) -> None:
    t = Table(title="After the initial copy", show_lines=False)
    t.add_column("Dynamics table")
    t.add_column("rows", justify="right")
    t.add_column("Marketo object")
    t.add_column("records", justify="right")
    for dyn, mkto in (
        ("systemuser", "salesPerson"),
        ("account", "company"),
        ("lead", "lead"),
        ("contact", None),
        ("opportunity", "opportunity"),
        (None, "opportunityRole"),
        ("team", "dynamicsTeam_c"),
        ("teammembership", "dynamicsTeamMember_c"),
        ("new_project", "project_c"),
    ):
        t.add_row(
            dyn or "",
            f"{sb.dynamics_count(dyn):,}" if dyn else "",
            mkto or "",
            f"{sb.marketo_count(mkto):,}" if mkto else "",
        )
    console.print(t)


def _linked(query: Callable, entity: str, n: int, exclude: set[str]) -> list[tuple[str, int]]:
    rows = query(
        f"""SELECT i.dynamics_id, CAST(i.marketo_id AS BIGINT) FROM identity i
                     JOIN d_{entity} d ON d.id = i.dynamics_id
                     WHERE i.entity = ? AND i.state = 'active' AND NOT d.deleted AND d.sync_flag IS DISTINCT FROM false
                     ORDER BY i.dynamics_id""",
        [entity],
    )
    out = [r for r in rows if r[0] not in exclude][:n]
    exclude.update(r[0] for r in out)
    return out


def _make_edits(sb: Any, query: Callable) -> list[Scenario]:
    used: set[str] = set()
    (c1, p1), (c2, p2), (c3, p3), (c4, p4), (c5, p5) = _linked(query, "contact", 5, used)
    (l1, q1), (l2, q2), (l3, q3), (l4, q4) = _linked(query, "lead", 4, used)
    open_leads = {r[0] for r in query("SELECT id FROM d_lead WHERE f_leadStatus = 'Open'")}
    l4 = next((lid for lid, _ in _linked(query, "lead", 50, used) if lid in open_leads), l4)
    q4 = int(_one(query("SELECT marketo_id FROM identity WHERE entity = 'lead' AND dynamics_id = ?", [l4])))
    count_persons = sb.marketo_count("lead")

    sb.dynamics_update("contact", c1, {"telephone1": "+1 555 0101"})
    sb.marketo_update_lead(q1, {"title": "VP Marketing (set in Marketo)"})
    sb.dynamics_update("contact", c2, {"jobtitle": "CTO (Dynamics)"})
    sb.marketo_update_lead(p2, {"title": "CTO (Marketo)"})
    sb.dynamics_update("lead", l2, {"jobtitle": "Buyer (Dynamics)"})
    sb.marketo_update_lead(q2, {"title": "Buyer (Marketo)"})
    sb.dynamics_update("contact", c3, {"mobilephone": "+1 555 0303"})
    sb.marketo_update_lead(p3, {"city": "Lisbon"})
    sb.dynamics_delete("contact", c4)
    sb.marketo_delete_lead(q3)
    sb.dynamics_update("contact", c5, {"new_synctomkto": False, "telephone1": "+1 555 0505"})
    created = sb.qualify_lead(l4, create_account=False, create_contact=True, create_opportunity=False)
    new_contact = next(v for k, v in created.items() if "contact" in k)
    newcomer = sb.marketo_create_lead(
        {"email": "new.person@example.org", "firstName": "Nora", "lastName": "Newcomer", "leadScore": 80}
    )
    newcomer_id = int(newcomer["id"])
    console.print(
        "Edits: 2 one-sided updates, 2 conflicting updates, 1 person edited on both sides in different "
        "fields, 1 Dynamics delete, 1 Marketo delete, 1 sync-filter flip, 1 lead qualification, "
        "1 new Marketo person"
    )

    def mk(pid: int, field: str) -> Any:
        try:
            return sb.marketo_get_lead(pid).get(field)
        except KeyError:
            return None

    def dyn(table: str, rid: str | None, col: str) -> Any:
        try:
            return sb.dynamics_get(table, rid).get(col) if rid else None
        except KeyError:
            return None

    return [
        Scenario(
            "Dynamics -> Marketo update",
            lambda: mk(p1, "phone") == "+1 555 0101",
            "Marketo phone = +1 555 0101",
        ),
        Scenario(
            "Marketo -> Dynamics update",
            lambda: dyn("lead", l1, "jobtitle") == "VP Marketing (set in Marketo)",
            "Dynamics lead jobtitle from Marketo",
        ),
        Scenario(
            "Conflict on a contact: Dynamics wins",
            lambda: (
                mk(p2, "title") == "CTO (Dynamics)" and dyn("contact", c2, "jobtitle") == "CTO (Dynamics)"
            ),
            "both sides 'CTO (Dynamics)'",
        ),
        Scenario(
            "Conflict on a lead: Marketo wins",
            lambda: mk(q2, "title") == "Buyer (Marketo)" and dyn("lead", l2, "jobtitle") == "Buyer (Marketo)",
            "both sides 'Buyer (Marketo)'",
        ),
        Scenario(
            "Different fields on both sides: both kept (field-level merge)",
            lambda: (
                mk(p3, "mobilePhone") == "+1 555 0303" and dyn("contact", c3, "address1_city") == "Lisbon"
            ),
            "Marketo mobile + Dynamics city",
        ),
        Scenario(
            "Dynamics delete flags the person",
            lambda: mk(p4, "dynamicsIsDeleted") is True,
            "dynamicsIsDeleted = true, person kept",
        ),
        Scenario(
            "Marketo delete is tombstoned, not re-created",
            lambda: (
                _one(query("SELECT state FROM identity WHERE entity='lead' AND dynamics_id=?", [l3]))
                == "tombstoned"
                and not sb.marketo_find_leads("dynamicsId", l3)
            ),
            "no person for the lead",
        ),
        Scenario(
            "Sync filter No stops updates",
            lambda: mk(p5, "phone") != "+1 555 0505",
            "Marketo phone unchanged",
        ),
        Scenario(
            "Qualification keeps one person",
            lambda: (
                _one(
                    query(
                        "SELECT marketo_id FROM identity WHERE entity='contact' AND dynamics_id=?",
                        [str(new_contact).lower()],
                    )
                )
                == str(q4)
                and mk(q4, "dynamicsType") == "Contact"
            ),
            "contact linked to the lead's person",
        ),
        Scenario(
            "No duplicate persons",
            lambda: sb.marketo_count("lead") == count_persons,
            f"{count_persons} persons before (1 created in Marketo, 1 deleted there)",
        ),
        Scenario(
            "New Marketo person becomes a Dynamics lead",
            lambda: (
                bool(mk(newcomer_id, "dynamicsId"))
                and dyn("lead", mk(newcomer_id, "dynamicsId"), "lastname") == "Newcomer"
            ),
            "lead created, dynamicsId written back",
        ),
    ]


def _print_moves(query: Callable) -> None:
    t = Table(title="What moved (ledger, all runs)")
    for col in ("entity", "to", "operation", "rule", "records", "fields"):
        t.add_column(col, justify="right" if col in ("records", "fields") else "left")
    for (
        row
    ) in query("""SELECT entity, target, op, split_part(rule, ':', 1) || CASE WHEN rule LIKE 'conflict:%'
                               THEN ':' || split_part(rule, ':', 2) ELSE '' END, count(DISTINCT dynamics_id), count(*)
                        FROM ledger GROUP BY ALL ORDER BY 1, 2, 3, 4"""):
        t.add_row(*[str(v) for v in row[:4]], f"{row[4]:,}", f"{row[5]:,}")
    console.print(t)


def _print_scenarios(scenarios: list[Scenario]) -> int:
    t = Table(title="Rules, checked on both sandboxes")
    t.add_column("scenario")
    t.add_column("expected")
    t.add_column("result")
    failed = 0
    for s in scenarios:
        ok = bool(s.check())
        failed += not ok
        t.add_row(s.name, s.expected, "[green]ok[/]" if ok else "[red]FAILED[/]")
    console.print(t)
    return failed


def _compare(sb: Any, state_dir: Path) -> int:
    from sync_pipeline.admin.verify import compare
    from sync_pipeline.clients.dynamics import DynamicsClient
    from sync_pipeline.clients.marketo import MarketoClient
    from sync_pipeline.config.model import load_config

    s = sb.settings()
    dyn = DynamicsClient(
        s["DYNAMICS_URL"],
        s["DYNAMICS_AUTHORITY"],
        s["DYNAMICS_CLIENT_ID"],
        s["DYNAMICS_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
    )
    mkto = MarketoClient(
        s["MARKETO_BASE_URL"], s["MARKETO_CLIENT_ID"], s["MARKETO_CLIENT_SECRET"], verify=s["SYNC_CA_BUNDLE"]
    )
    with console.status("Comparing both systems field by field under the mapping ..."):
        diffs = compare(load_config(os.environ.get("SYNC_CONFIG")), dyn, mkto, state_dir / "sync.duckdb")
    if not diffs:
        console.print("[bold green]Both sides agree[/]: no difference except those the rules dictate.")
        return 0
    t = Table(title=f"{len(diffs)} differences")
    for col in ("entity", "dynamics id", "marketo id", "field", "dynamics", "marketo"):
        t.add_column(col)
    for d in diffs[:30]:
        t.add_row(
            *[
                str(getattr(d, a))
                for a in ("entity", "dynamics_id", "marketo_id", "field", "dynamics_value", "marketo_value")
            ]
        )
    console.print(t)
    return len(diffs)
