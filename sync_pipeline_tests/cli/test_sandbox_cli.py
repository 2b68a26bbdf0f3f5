from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from sync_pipeline.cli import main
from sync_pipeline.sandbox.command import parse_ports


def test_sandbox_help_lists_its_options() -> None:
    result = CliRunner().invoke(main, ["sandbox", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--scale", "--seed", "--tls", "--profile", "--state-dir", "--ports", "--settings-file"):
        assert option in result.output
    assert "tiny|small|medium|large" in result.output and "--parent-pid" not in result.output


def test_ports_parse_and_bad_ports_are_named() -> None:
    assert parse_ports("dynamics=8001, marketo=8003") == {"dynamics": 8001, "marketo": 8003}
    assert parse_ports("") == {}
    for bad in ("dynamics", "web=80", "admin=99999", "identity=x"):
        with pytest.raises(click.BadParameter, match=bad.split("=")[0]):
            parse_ports(bad)


def test_bad_scale_is_refused_before_anything_starts(tmp_path) -> None:
    result = CliRunner().invoke(main, ["sandbox", "--scale", "huge", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "huge" in result.output
    assert not any(tmp_path.iterdir())


def test_the_printed_settings_hold_absolute_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sandbox", "--state-dir", "sb", "--stop-on-stdin-eof"], input="")
    assert result.exit_code == 0, result.output
    bundle = next(line for line in result.output.splitlines() if line.startswith("export SYNC_CA_BUNDLE="))
    path = bundle.split("=", 1)[1].strip("'\"")
    assert path.startswith(str(tmp_path / "sb")) and path.endswith(".pem"), bundle
