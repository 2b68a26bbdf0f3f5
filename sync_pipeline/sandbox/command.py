"""``sync-pipeline sandbox`` and ``python -m sync_pipeline.sandbox``: run both sandboxes in the foreground.

It lives in the sandbox package (the sandbox imports no production code; the CLI registers this command).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from sync_pipeline.sandbox.generator import SCALES
from sync_pipeline.sandbox.runner import PROFILES, Sandbox
from sync_pipeline.sandbox.schema import SandboxConfigError, load_schema

PORT_NAMES = ("dynamics", "identity", "marketo", "admin")


def parse_ports(text: str) -> dict[str, int]:
    """``dynamics=8001,identity=8002,marketo=8003,admin=8004`` (any subset; unnamed ones are free ports)."""
    ports: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in PORT_NAMES or not value.isdigit() or not 0 <= int(value) < 65536:
            raise click.BadParameter(
                f"{item!r}: expected NAME=PORT with NAME one of {', '.join(PORT_NAMES)}", param_hint="--ports"
            )
        ports[name] = int(value)
    return ports


def _write_settings(path: Path, sandbox: Sandbox) -> None:
    """Atomically, so a process waiting for the file never reads half of it; 0600: it holds secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "pid": os.getpid(),
        "profile": sandbox.profile,
        "tls": sandbox.tls,
        "settings": sandbox.settings(),
        "populated": sandbox.populated,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".settings-")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def _print_banner(console: Console, sandbox: Sandbox) -> None:
    settings = sandbox.settings()
    table = Table(title="sync-pipeline sandbox", show_lines=False)
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    for key, value in settings.items():
        table.add_row(key, value)
    if sandbox.populated:
        counts = sandbox.populated["counts"]
        table.add_row(
            "populated",
            f"{sandbox.populated['scale']} (seed {sandbox.populated['seed']}): "
            f"{sum(counts.values()):,} rows in {sandbox.populated['seconds']} s",
        )
        table.add_row("rows", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    console.print(table)
    # Plain echo: rich would wrap long lines and break copy-paste into a shell.
    click.echo("\n# Point the pipeline at this sandbox:")
    for key, value in settings.items():
        click.echo(f"export {key}={_shell_quote(value)}")
    console.print("\nRunning; Ctrl-C stops.", style="bold")


def _shell_quote(value: str) -> str:
    return (
        value
        if value and all(c.isalnum() or c in "-_./:@=+," for c in value)
        else "'" + value.replace("'", "'\\''") + "'"
    )


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            stop.set()


def _watch_stdin(stop: threading.Event) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    stop.set()


@click.command("sandbox")
@click.option(
    "--scale",
    type=click.Choice(list(SCALES)),
    default=None,
    help="Populate both systems with a synthetic org of this size.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the synthetic org and fault plans."
)
@click.option(
    "--tls/--no-tls",
    default=False,
    show_default=True,
    help="Serve the Dynamics and Marketo APIs over HTTPS too (identity is always HTTPS).",
)
@click.option(
    "--profile",
    type=click.Choice(PROFILES),
    default="off",
    show_default=True,
    help="API limits: off, or the real services' (rate limits, quotas, concurrency).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".state/sandbox"),
    show_default=True,
    help="Where the CA and the settings file live.",
)
@click.option(
    "--ports",
    default="",
    metavar="NAME=PORT,...",
    help="Fixed ports: dynamics, identity, marketo, admin (default: free ports).",
)
@click.option(
    "--settings-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the settings (URLs, credentials) as JSON here once serving.",
)
@click.option("--latency", type=float, default=0.0, show_default=True, help="Seconds added to every request.")
@click.option(
    "--schema",
    "schema_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Your org's shape: custom tables and columns, option sets, the sync-filter column present or "
    "not, Marketo fields and custom objects (example: docs/sandbox-schema.example.yaml).",
)
@click.option("--quiet", is_flag=True, help="Do not print the banner.")
@click.option("--parent-pid", type=int, default=None, hidden=True)
@click.option("--stop-on-stdin-eof", is_flag=True, hidden=True)
def sandbox(
    scale: str | None,
    seed: int,
    tls: bool,
    profile: str,
    state_dir: Path,
    ports: str,
    settings_file: Path | None,
    latency: float,
    schema_file: Path | None,
    quiet: bool,
    parent_pid: int | None,
    stop_on_stdin_eof: bool,
) -> None:
    """Run the Dynamics 365 and Marketo sandboxes on loopback until Ctrl-C."""
    port_map = parse_ports(ports)
    try:
        schema = load_schema(schema_file) if schema_file else None
    except SandboxConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--schema") from None
    console = Console(stderr=False)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid, stop), daemon=True).start()
    if stop_on_stdin_eof:
        threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    # Absolute paths in what it prints (SYNC_CA_BUNDLE): the exports work from any folder.
    sb = Sandbox(
        state_dir.resolve(),
        profile=profile,
        tls=tls,
        seed=seed,
        latency_seconds=latency,
        dynamics_port=port_map.get("dynamics", 0),
        identity_port=port_map.get("identity", 0),
        marketo_port=port_map.get("marketo", 0),
        admin_port=port_map.get("admin", 0),
        schema=schema,
    )
    with sb:
        if scale:
            if not quiet:
                console.print(f"Populating the sandbox at scale {scale!r} (seed {seed})...")
            sb.populate(scale, seed)
        if settings_file is not None:
            _write_settings(settings_file, sb)
        if not quiet:
            _print_banner(console, sb)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            if settings_file is not None:
                settings_file.unlink(missing_ok=True)
