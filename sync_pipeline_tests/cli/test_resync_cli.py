"""``sync-pipeline resync`` usage errors name the problem before anything is opened or called."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_pipeline.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (["--entity", "contact", "--field", "nope"], "'nope' not mapped"),
        (["--entity", "account", "--since", "last tuesday"], "expected a date"),
        (["--entity", "opportunity_role"], "resync 'opportunity'"),
        (["--entity", "nothing"], "not a configured entity"),
    ],
)
def test_usage_errors_name_the_problem(tmp_path: Path, args: list[str], message: str) -> None:
    state = tmp_path / "state.duckdb"
    result = CliRunner().invoke(main, ["resync", *args, "--state", str(state)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not state.exists()  # nothing was opened


def test_plan_all_is_documented_in_help() -> None:
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0 and "--all" in result.output
    result = CliRunner().invoke(main, ["resync", "--help"])
    assert result.exit_code == 0 and "--since" in result.output and "--field" in result.output
