"""A production install (no ``[sandbox]``/``[bench]`` extras) keeps a working CLI; the commands that need an
extra say which one to install."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from sync_pipeline.cli.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI in a fresh interpreter where the extras' modules cannot be imported (as after
# `pip install sync-pipeline`), and reports each command's exit code and message.
PROBE = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now fails as if it were not installed
from click.testing import CliRunner
from sync_pipeline.cli import main
out = {{}}
for args in {commands!r}:
    result = CliRunner().invoke(main, args)
    out[args[0]] = [result.exit_code, result.output]
print(json.dumps(out))
"""


def _probe(blocked: tuple[str, ...], commands: list[list[str]]) -> dict[str, list]:
    code = PROBE.format(blocked=blocked, commands=commands)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_the_extras_the_commands_that_need_them_name_the_extra(tmp_path) -> None:
    blocked = EXTRAS["sandbox"] + EXTRAS["bench"]
    out = _probe(
        blocked,
        [
            ["sandbox", "--state-dir", str(tmp_path / "sb")],
            ["demo"],
            ["bench", "--scale", "tiny"],
            ["bench-sandbox"],
            ["plan", "--help"],
        ],
    )
    for command, extra in (
        ("sandbox", "sandbox"),
        ("demo", "sandbox"),
        ("bench", "sandbox"),
        ("bench-sandbox", "sandbox"),
    ):
        code, output = out[command]
        assert code == 1 and f"pip install 'sync-pipeline[{extra}]'" in output, (command, output)
    # Production commands are unaffected.
    assert out["plan"][0] == 0 and "Usage" in out["plan"][1]
    assert not (tmp_path / "sb").exists()


def test_the_bench_names_its_own_extra_when_only_that_is_missing() -> None:
    out = _probe(("psutil",), [["bench", "--scale", "tiny"]])
    code, output = out["bench"]
    assert code == 1 and "psutil" in output and "pip install 'sync-pipeline[bench]'" in output, output


def test_extras_declared_in_pyproject_match_what_the_cli_checks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = {dep.split("==")[0].lower() for dep in project["dependencies"]}
    extras = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        pinned = {dep.split("==")[0].lower() for dep in extras[extra]}
        for module in modules:
            assert module in pinned, (extra, module)
            assert module not in direct, f"{module} is an optional extra, not a production dependency"
    assert "sync-pipeline[sandbox,bench]" in extras["dev"]
