"""Asset checks over the state store, evaluated by the push they describe: held records, duplicate persons,
referential integrity, rejected-record rate.

Each push declares its checks (``check_specs``) and reports them from the same step, on the DuckDB connection the
push just wrote through: a check is as fresh as the push, and a sync run pays no extra step per check (a step
costs ~10-20 ms of Dagster event bookkeeping; there were 24 of them). The blocking one (one person per record)
still keeps the Dynamics push from running when it fails with ERROR.
"""

from collections.abc import Callable
from typing import Any

import dagster as dg

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.plan.identity import QUARANTINE_BLOCK_FLOOR, QUARANTINE_BLOCK_SHARE
from sync_pipeline.engine.store.state import one_row

MAX_REJECTED_RATE = 0.05

# A check: its spec (without asset key) and how to evaluate it on an open state connection.
Check = tuple[dict[str, Any], Callable[[Any], dg.AssetCheckResult]]


def _checks(config: SyncConfig, e: Entity, system: str) -> list[Check]:
    """The checks of ``e``'s push to ``system``, in a stable order."""
    checks = [_held_records(e, system)]
    if system == "marketo":
        checks.append(_rejected_rate(e))
        if e.is_person:
            checks.append(_unique_person(config, e))
        for entity, field, target, what in REFERENCES:
            if e.name == entity and target in config.by_name:
                checks.append(_references(entity, field, target, what))
    return checks


REFERENCES = (
    ("contact", "externalCompanyId", "account", "contacts whose parent account is not in Dynamics"),
    (
        "opportunity",
        "externalCompanyId",
        "account",
        "opportunities whose customer account is not in Dynamics",
    ),
)


def push_check_specs(key: dg.AssetKey, config: SyncConfig, e: Entity, system: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(asset=key, **spec) for spec, _ in _checks(config, e, system)]


def push_check_results(con: Any, config: SyncConfig, e: Entity, system: str) -> list[dg.AssetCheckResult]:
    return [evaluate(con) for _, evaluate in _checks(config, e, system)]


def _held_records(e: Entity, system: str) -> Check:
    """On every push asset: not green while any record is held (a held record never syncs until released)."""
    from sync_pipeline.admin import report

    spec: dict[str, Any] = {
        "name": "no_held_records",
        "description": f"No `{e.name}` record bound for {system.title()} is held (failed past the retry "
        "limit, rejected or quarantined); `sync-pipeline errors` lists them with the reason.",
    }

    def check(con: Any) -> dg.AssetCheckResult:
        counts = report.failure_counts(con, e.name, system)
        sample = con.execute(
            f"""SELECT dynamics_id, code, message FROM failures WHERE entity = ? AND held
                AND {report.target_filter(system)} ORDER BY last_failed_at DESC LIMIT 10""",
            [e.name],
        ).fetchall()
        md: dict[str, dg.MetadataValue] = {
            "held": dg.MetadataValue.int(counts.held),
            "quarantined": dg.MetadataValue.int(counts.quarantined),
            "retrying": dg.MetadataValue.int(counts.retrying),
            "sample": dg.MetadataValue.md(
                "\n".join(f"- `{d}` {c}: {(m or '')[:200]}" for d, c, m in sample) or "none"
            ),
        }
        md.update({f"held/{k}": dg.MetadataValue.int(v) for k, v in counts.classes.items()})
        return dg.AssetCheckResult(
            check_name=spec["name"],
            passed=counts.held == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=md,
            description=None
            if not counts.held
            else f"{counts.held} held ({', '.join(f'{k}: {v}' for k, v in counts.classes.items())})",
        )

    return spec, check


def _rejected_rate(e: Entity) -> Check:
    spec: dict[str, Any] = {
        "name": "rejected_rate",
        "description": f"Held records of `{e.name}` stay under {MAX_REJECTED_RATE:.0%} of the synced ones.",
    }

    def check(con: Any) -> dg.AssetCheckResult:
        held = one_row(con, "SELECT count(*) FROM failures WHERE entity = ? AND held", [e.name])[0]
        synced = one_row(con, "SELECT count(*) FROM identity WHERE entity = ?", [e.name])[0]
        sample = con.execute(
            """SELECT dynamics_id, code, message FROM failures WHERE entity = ? AND held
                ORDER BY last_failed_at DESC LIMIT 10""",
            [e.name],
        ).fetchall()
        rate = held / max(1, synced + held)
        return dg.AssetCheckResult(
            check_name=spec["name"],
            passed=rate <= MAX_REJECTED_RATE,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "held": int(held),
                "synced": int(synced),
                "rate": float(rate),
                "sample": dg.MetadataValue.md("\n".join(f"- `{d}` {c}: {m}" for d, c, m in sample) or "none"),
            },
        )

    return spec, check


def _unique_person(config: SyncConfig, e: Entity) -> Check:
    persons = ", ".join(f"'{p.name}'" for p in config.persons)
    spec: dict[str, Any] = {
        "name": "one_person_per_record",
        "blocking": True,
        "description": "No Marketo person is linked to two live Dynamics records, and no Dynamics record "
        "owns two Marketo persons. A record with such damage is quarantined (held with "
        "the reason; the rest keeps syncing): the check warns with the count. It fails "
        f"with ERROR, blocking what runs downstream, only when the damage spans the run: "
        f"more than {QUARANTINE_BLOCK_FLOOR} quarantined records and more than "
        f"{QUARANTINE_BLOCK_SHARE:.0%} of the linked ones.",
    }

    def check(con: Any) -> dg.AssetCheckResult:
        shared = one_row(
            con,
            f"""SELECT count(*) FROM (SELECT marketo_id FROM identity
            WHERE entity IN ({persons}) AND state = 'active' GROUP BY marketo_id HAVING count(*) > 1)""",
        )[0]
        twins = one_row(
            con,
            """SELECT count(*) FROM (SELECT f_dynamicsId FROM m_person
            WHERE NOT deleted AND f_dynamicsId IS NOT NULL GROUP BY f_dynamicsId HAVING count(*) > 1)""",
        )[0]
        linked = one_row(
            con, "SELECT count(*) FROM identity WHERE entity = ? AND state = 'active'", [e.name]
        )[0]
        by_code = dict(
            con.execute(
                """SELECT code, count(*) FROM failures WHERE entity = ?
                AND target = 'quarantine' AND held GROUP BY code""",
                [e.name],
            ).fetchall()
        )
        sample = con.execute(
            """SELECT dynamics_id, code, message FROM failures WHERE entity = ?
            AND target = 'quarantine' ORDER BY last_failed_at DESC, dynamics_id LIMIT 10""",
            [e.name],
        ).fetchall()
        quarantined = int(sum(by_code.values()))
        spans_run = quarantined > max(QUARANTINE_BLOCK_FLOOR, QUARANTINE_BLOCK_SHARE * linked)
        metadata: dict = {
            "quarantined": quarantined,
            "linked": int(linked),
            "persons_shared": int(shared),
            "dynamics_ids_twice": int(twins),
            "block_threshold": int(max(QUARANTINE_BLOCK_FLOOR, QUARANTINE_BLOCK_SHARE * linked)),
            "sample": dg.MetadataValue.md("\n".join(f"- `{d}` {c}: {m}" for d, c, m in sample) or "none"),
        }
        metadata.update(
            {f"quarantined/{code.split(':', 1)[-1]}": int(n) for code, n in sorted(by_code.items())}
        )
        return dg.AssetCheckResult(
            check_name=spec["name"],
            passed=quarantined == 0 and shared == 0 and twins == 0,
            severity=dg.AssetCheckSeverity.ERROR if spans_run else dg.AssetCheckSeverity.WARN,
            metadata=metadata,
        )

    return spec, check


def _references(entity: str, field: str, target: str, what: str) -> Check:
    spec: dict[str, Any] = {
        "name": f"{field}_references_{target}",
        "description": f"Referential integrity: {what}.",
    }

    def check(con: Any) -> dg.AssetCheckResult:
        dangling = one_row(
            con,
            f"""SELECT count(*) FROM d_{entity} x WHERE NOT x.deleted
            AND x.f_{field} IS NOT NULL AND x.f_{field} NOT IN (SELECT id FROM d_{target} WHERE NOT deleted)""",
        )[0]
        total = one_row(con, f"SELECT count(*) FROM d_{entity} WHERE NOT deleted")[0]
        return dg.AssetCheckResult(
            check_name=spec["name"],
            passed=dangling == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"dangling": int(dangling), "rows": int(total)},
        )

    return spec, check
