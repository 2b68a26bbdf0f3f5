"""The idle cycle does not re-read what rarely changes (issue 13): the org's table metadata and the Marketo lead
describe come from the state store while fresh, are read again once the TTL passed or the mapping changed (a
field added to it is looked up at once), and an answer the checks refuse is not kept."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import duckdb
import pytest

from sync_pipeline.admin.validate import ValidationFailed, prepare, prepare_persons
from sync_pipeline.clients.dynamics import DynamicsClient
from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.config.model import SyncConfig, load_config
from sync_pipeline.engine.store.state import ensure_schema


def _with(config: SyncConfig, **sync: Any) -> SyncConfig:
    return config.model_copy(update={"sync": config.sync.model_copy(update=sync)})


def _without_lead_field(config: SyncConfig, marketo: str) -> SyncConfig:
    doc = config.model_dump()
    lead = next(e for e in doc["entities"] if e["name"] == "lead")
    lead["extra_fields"] = [f for f in lead["extra_fields"] if f["marketo"] != marketo]
    assert len(lead["extra_fields"]) < len(config.entity("lead").extra_fields)
    return SyncConfig.model_validate(doc)


@pytest.fixture
def clients(sandbox) -> Iterator[tuple[DynamicsClient, MarketoClient]]:
    d, m = sandbox.dynamics, sandbox.marketo
    dynamics = DynamicsClient(
        d.api_url, d.authority, d.client_id, d.client_secret, verify=str(sandbox.ca.ca_path)
    )
    marketo = MarketoClient(m.base_url, m.client_id, m.client_secret, verify=str(sandbox.ca.ca_path))
    yield dynamics, marketo
    dynamics.close()
    marketo.close()


def _spent(sandbox, route: str, action: Any) -> int:
    before = sandbox.calls().get(route, 0)
    action()
    return sandbox.calls().get(route, 0) - before


def test_org_metadata_is_read_once_per_ttl_and_again_when_the_mapping_changes(sandbox, clients) -> None:
    dynamics, _ = clients
    config = load_config()
    narrower = _without_lead_field(config, "fax")
    con = duckdb.connect()
    ensure_schema(con, config)
    batch = "dynamics.batch"

    def run(run_id: str, cfg: SyncConfig) -> SyncConfig:
        return prepare(run_id, cfg, dynamics, con)

    assert _spent(sandbox, batch, lambda: run("r1", narrower)) == 1
    assert _spent(sandbox, batch, lambda: run("r2", narrower)) == 0  # the next run: from the store
    # The same answer either way: option labels from the org.
    assert run("r2", narrower).model_dump() == prepare("r2b", narrower, dynamics).model_dump()
    # A field added to the mapping: read again at once, and the field is there.
    assert _spent(sandbox, batch, lambda: run("r3", config)) == 1
    assert any(f.dynamics == "fax" for f in run("r3", config).entity("lead").all_fields)
    assert _spent(sandbox, batch, lambda: run("r4", config)) == 0
    # After the TTL the org is asked again.
    con.execute("UPDATE response_cache SET stored_at = stored_at - ?", [timedelta(hours=2)])
    assert _spent(sandbox, batch, lambda: run("r5", config)) == 1
    # TTL 0: every run asks.
    uncached = _with(config, metadata_ttl_seconds=0)
    assert _spent(sandbox, batch, lambda: prepare("r6", uncached, dynamics, con)) == 1
    assert _spent(sandbox, batch, lambda: prepare("r7", uncached, dynamics, con)) == 1


def test_a_refused_describe_is_not_kept(sandbox, clients) -> None:
    _, marketo = clients
    config = load_config()
    con = duckdb.connect()
    ensure_schema(con, config)
    describe = "marketo.leads.describe2"
    assert _spent(sandbox, describe, lambda: prepare_persons("r1", config, marketo, con)) == 1
    assert _spent(sandbox, describe, lambda: prepare_persons("r2", config, marketo, con)) == 0
    # A mapped person field Marketo does not have: the run fails, and the next one asks Marketo again (the
    # field may have been created meanwhile).
    doc = config.model_dump()
    lead = next(e for e in doc["entities"] if e["name"] == "lead")
    lead["fields"].append({"marketo": "noSuchFieldAnywhere", "dynamics": "fax"})
    broken = SyncConfig.model_validate(doc)
    for run_id in ("r3", "r4"):
        with pytest.raises(ValidationFailed):
            prepare_persons(run_id, broken, marketo, con)
    assert (
        con.execute("SELECT count(*) FROM response_cache WHERE kind = 'marketo.describe2'").fetchone()[0] == 0
    )
    assert _spent(sandbox, describe, lambda: prepare_persons("r5", config, marketo, con)) == 1
