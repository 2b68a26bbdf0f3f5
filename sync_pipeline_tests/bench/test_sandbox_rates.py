from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from sync_pipeline.cli import main
from sync_pipeline.sandbox.generator import SCALES


def test_bench_sandbox_at_tiny_reports_rates(tmp_path: Path) -> None:
    out = tmp_path / "rates.json"
    result = CliRunner().invoke(main, ["bench-sandbox", "--scale", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "generate + bulk-load" in result.output and "page lead" in result.output
    results = json.loads(out.read_text())
    tiny = SCALES["tiny"]
    assert results["generator"]["records"] > tiny.leads + tiny.contacts
    assert results["generator"]["records_per_second"] > 0
    assert len(results["paging"]) == 4  # lead and contact, all columns and the sync's columns
    for p in results["paging"]:
        assert p["rows"] == {"lead": tiny.leads, "contact": tiny.contacts}[p["table"]]
        assert p["pages"] == 1 and p["rows_per_second"] > 0
