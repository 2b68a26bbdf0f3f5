"""Asset checks over the state store: held records, duplicate persons, referential integrity, rejected-record rate."""

import dagster as dg

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.connection.keys import asset_key, pool
from sync_pipeline.connection.resources import bound, required_keys
from sync_pipeline.engine.plan.identity import QUARANTINE_BLOCK_FLOOR, QUARANTINE_BLOCK_SHARE
from sync_pipeline.engine.store.state import one_row

MAX_REJECTED_RATE = 0.05


def build_checks(conn: str, config: SyncConfig) -> list[dg.AssetChecksDefinition]:
    checks = []
    for e in config.entities:
        checks.append(_held_records(conn, e, "marketo"))
        if e.is_person:
            checks.append(_held_records(conn, e, "dynamics"))
        checks.append(_rejected_rate(conn, e))
        if e.is_person:
            checks.append(_unique_person(conn, config, e))
    if "contact" in config.by_name and "account" in config.by_name:
        checks.append(
            _references(
                conn,
                "contact",
                "externalCompanyId",
                "account",
                "contacts whose parent account is not in Dynamics",
            )
        )
    if "opportunity" in config.by_name and "account" in config.by_name:
        checks.append(
            _references(
                conn,
                "opportunity",
                "externalCompanyId",
                "account",
                "opportunities whose customer account is not in Dynamics",
            )
        )
    return checks


def _held_records(conn: str, e: Entity, system: str) -> dg.AssetChecksDefinition:
    """On every push asset: not green while any record is held (a held record never syncs until released)."""
    from sync_pipeline.admin import report

    @dg.asset_check(
        asset=asset_key(conn, e.name, "push", system),
        name="no_held_records",
        pool=pool(conn),
        required_resource_keys=required_keys(conn, "state"),
        description=f"No `{e.name}` record bound for {system.title()} is held (failed past the retry "
        "limit, rejected or quarantined); `sync-pipeline errors` lists them with the reason.",
    )
    def check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        state = bound(context, conn)[0]
        with state.connect() as con:
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
            passed=counts.held == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=md,
            description=None
            if not counts.held
            else f"{counts.held} held ({', '.join(f'{k}: {v}' for k, v in counts.classes.items())})",
        )

    return check


def _rejected_rate(conn: str, e: Entity) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset_key(conn, e.name, "push"),
        name="rejected_rate",
        pool=pool(conn),
        required_resource_keys=required_keys(conn, "state"),
        description=f"Held records of `{e.name}` stay under {MAX_REJECTED_RATE:.0%} of the synced ones.",
    )
    def check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        state = bound(context, conn)[0]
        with state.connect() as con:
            held = one_row(con, "SELECT count(*) FROM failures WHERE entity = ? AND held", [e.name])[0]
            synced = one_row(con, "SELECT count(*) FROM identity WHERE entity = ?", [e.name])[0]
            sample = con.execute(
                """SELECT dynamics_id, code, message FROM failures WHERE entity = ? AND held
                                    ORDER BY last_failed_at DESC LIMIT 10""",
                [e.name],
            ).fetchall()
        rate = held / max(1, synced + held)
        return dg.AssetCheckResult(
            passed=rate <= MAX_REJECTED_RATE,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "held": int(held),
                "synced": int(synced),
                "rate": float(rate),
                "sample": dg.MetadataValue.md("\n".join(f"- `{d}` {c}: {m}" for d, c, m in sample) or "none"),
            },
        )

    return check


def _unique_person(conn: str, config: SyncConfig, e: Entity) -> dg.AssetChecksDefinition:
    persons = ", ".join(f"'{p.name}'" for p in config.persons)

    @dg.asset_check(
        asset=asset_key(conn, e.name, "push"),
        name="one_person_per_record",
        pool=pool(conn),
        required_resource_keys=required_keys(conn, "state"),
        blocking=True,
        description="No Marketo person is linked to two live Dynamics records, and no Dynamics record "
        "owns two Marketo persons. A record with such damage is quarantined (held with "
        "the reason; the rest keeps syncing): the check warns with the count. It fails "
        f"with ERROR, blocking what runs downstream, only when the damage spans the run: "
        f"more than {QUARANTINE_BLOCK_FLOOR} quarantined records and more than "
        f"{QUARANTINE_BLOCK_SHARE:.0%} of the linked ones.",
    )
    def check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        state = bound(context, conn)[0]
        with state.connect() as con:
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
            passed=quarantined == 0 and shared == 0 and twins == 0,
            severity=dg.AssetCheckSeverity.ERROR if spans_run else dg.AssetCheckSeverity.WARN,
            metadata=metadata,
        )

    return check


def _references(conn: str, entity: str, field: str, target: str, what: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset_key(conn, entity, "push"),
        name=f"{field}_references_{target}",
        pool=pool(conn),
        required_resource_keys=required_keys(conn, "state"),
        description=f"Referential integrity: {what}.",
    )
    def check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        state = bound(context, conn)[0]
        with state.connect() as con:
            dangling = one_row(
                con,
                f"""SELECT count(*) FROM d_{entity} x WHERE NOT x.deleted
                AND x.f_{field} IS NOT NULL AND x.f_{field} NOT IN (SELECT id FROM d_{target} WHERE NOT deleted)""",
            )[0]
            total = one_row(con, f"SELECT count(*) FROM d_{entity} WHERE NOT deleted")[0]
        return dg.AssetCheckResult(
            passed=dangling == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"dangling": int(dangling), "rows": int(total)},
        )

    return check
