"""How fast the sandbox is: generating + bulk-loading an org, and paging Dynamics tables over HTTP.

The sandbox runs in a process of its own (as in the demo and the end-to-end tests), so the paging client
here does not share a GIL with the server. The generator rate is what that process measured while
populating. Paging reads every row of ``lead`` and ``contact`` with 5,000-row pages, selecting every
column, with a bearer token obtained through msal from the sandbox's identity endpoint: exactly what the
pipeline's Dynamics client does against the real service.
"""

from __future__ import annotations

import json
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msal
import requests
from rich.console import Console
from rich.table import Table

from sync_pipeline.sandbox.runner import spawn_sandbox
from sync_pipeline.sandbox.schema import load_schema

PAGE_SIZE = 5000
PAGED_TABLES = ("lead", "contact")
# What a person sync typically selects (the native sync's mapped fields), against every column.
SYNC_COLUMNS = (
    "firstname",
    "lastname",
    "fullname",
    "emailaddress1",
    "jobtitle",
    "telephone1",
    "mobilephone",
    "address1_line1",
    "address1_city",
    "address1_stateorprovince",
    "address1_postalcode",
    "address1_country",
    "companyname",
    "statecode",
    "statuscode",
    "donotemail",
    "new_synctomkto",
    "_ownerid_value",
    "_parentcustomerid_value",
    "createdon",
    "modifiedon",
)


def dynamics_token(settings: dict[str, str]) -> str:
    session = requests.Session()
    # Without this, requests prefers REQUESTS_CA_BUNDLE from the environment over session.verify.
    session.trust_env = False
    session.verify = settings["SYNC_CA_BUNDLE"]
    with session:
        app = msal.ConfidentialClientApplication(
            settings["DYNAMICS_CLIENT_ID"],
            client_credential=settings["DYNAMICS_CLIENT_SECRET"],
            authority=settings["DYNAMICS_AUTHORITY"],
            http_client=session,
            instance_discovery=False,
        )
        result = app.acquire_token_for_client(scopes=[settings["DYNAMICS_URL"].rstrip("/") + "/.default"])
    if "access_token" not in result:
        raise RuntimeError(
            f"sandbox identity refused the benchmark's token request: "
            f"{result.get('error')}: {result.get('error_description')}"
        )
    return result["access_token"]


def page_table(
    client: httpx.Client, base_url: str, table: str, columns: str = "all", page_size: int = PAGE_SIZE
) -> dict[str, Any]:
    """Read every row of ``table``; ``columns`` is "all" or "sync" (:data:`SYNC_COLUMNS` it has)."""
    t = load_schema().tables[table]
    wire = t.wire_columns()
    selected = wire if columns == "all" else [t.primary_id] + [c for c in SYNC_COLUMNS if c in wire]
    url: str | None = f"{base_url.rstrip('/')}/api/data/v9.2/{t.entity_set}?$select={','.join(selected)}"
    headers = {"Prefer": f"odata.maxpagesize={page_size}"}
    rows = pages = size = 0
    started = time.perf_counter()
    while url:
        resp = client.get(url, headers=headers)
        if resp.status_code != 200:
            raise RuntimeError(f"paging {t.entity_set}: HTTP {resp.status_code}: {resp.text[:300]}")
        size += len(resp.content)
        body = resp.json()
        rows += len(body["value"])
        pages += 1
        url = body.get("@odata.nextLink")
    seconds = time.perf_counter() - started
    return {
        "table": table,
        "columns": f"{columns} ({len(selected)})",
        "rows": rows,
        "pages": pages,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds) if seconds else None,
        "megabytes": round(size / 1e6, 1),
    }


def run_benchmark(
    scale: str = "small",
    seed: int = 0,
    tls: bool = False,
    out: Path | None = None,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        remote = spawn_sandbox(state_dir or Path(tmp), scale=scale, seed=seed, tls=tls, timeout=900)
        try:
            settings = remote.settings()
            populated = remote.populated or {}
            records = sum(populated.get("counts", {}).values())
            seconds = populated.get("seconds") or 0.0
            token = dynamics_token(settings)
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=settings["SYNC_CA_BUNDLE"])
            with httpx.Client(
                verify=verify,
                timeout=120,
                trust_env=False,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    "OData-MaxVersion": "4.0",
                    "OData-Version": "4.0",
                },
            ) as client:
                paging = [
                    page_table(client, settings["DYNAMICS_URL"], table, columns)
                    for columns in ("all", "sync")
                    for table in PAGED_TABLES
                ]
        finally:
            remote.stop()
    total_rows = sum(p["rows"] for p in paging)
    total_seconds = sum(p["seconds"] for p in paging)
    results = {
        "scale": scale,
        "seed": seed,
        "tls": tls,
        "page_size": PAGE_SIZE,
        "generator": {
            "records": records,
            "seconds": seconds,
            "records_per_second": round(records / seconds) if seconds else None,
        },
        "paging": paging,
        "paging_total": {
            "rows": total_rows,
            "seconds": round(total_seconds, 3),
            "rows_per_second": round(total_rows / total_seconds) if total_seconds else None,
        },
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results


def print_results(console: Console, results: dict[str, Any]) -> None:
    table = Table(
        title=f"sandbox rates at scale {results['scale']!r} ({results['page_size']:,} rows/page, "
        f"TLS {'on' if results['tls'] else 'off'})"
    )
    for col in ("measure", "rows", "pages", "seconds", "rows/s"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    gen = results["generator"]
    table.add_row(
        "generate + bulk-load",
        f"{gen['records']:,}",
        "",
        f"{gen['seconds']:.2f}",
        f"{gen['records_per_second'] or 0:,}",
    )
    for p in results["paging"]:
        table.add_row(
            f"page {p['table']}, {p['columns']} columns",
            f"{p['rows']:,}",
            str(p["pages"]),
            f"{p['seconds']:.2f}",
            f"{p['rows_per_second'] or 0:,}",
        )
    total = results["paging_total"]
    table.add_row(
        "paging, all tables",
        f"{total['rows']:,}",
        "",
        f"{total['seconds']:.2f}",
        f"{total['rows_per_second'] or 0:,}",
    )
    console.print(table)
