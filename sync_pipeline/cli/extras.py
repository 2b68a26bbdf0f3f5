"""Commands that need an optional extra (``pip install 'sync-pipeline[sandbox]'`` / ``[bench]``).

A production install has neither: the sandbox needs ``cryptography`` (its CA), the benchmark ``psutil`` and
``matplotlib``. Such a command then fails with the extra to install, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click

# The modules each extra brings (pyproject.toml, [project.optional-dependencies]) that a production install
# may lack (the bench's `requests` always comes with dagster and msal).
EXTRAS: dict[str, tuple[str, ...]] = {
    "sandbox": ("cryptography",),
    "bench": ("psutil", "matplotlib"),
}


def _message(command: str, extra: str, missing: list[str]) -> str:
    return (
        f"`sync-pipeline {command}` needs the optional '{extra}' dependencies ({', '.join(missing)} not "
        f"installed): pip install 'sync-pipeline[{extra}]'"
    )


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(command: str, *extras: str) -> None:
    """Raise a :class:`click.ClickException` naming the first extra whose modules are not installed."""
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            raise click.ClickException(_message(command, extra, missing))


def optional_command(module: str, attr: str, extra: str) -> click.Command:
    """The click command ``module.attr``; if its module cannot import for want of ``extra``, a stand-in of
    the same name that says which extra to install (so the rest of the CLI still works)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in EXTRAS[extra]:
            raise
        message = _message(attr.replace("_", "-"), extra, [root])

    def unavailable(**_: Any) -> None:
        raise click.ClickException(message)

    return click.Command(
        attr.replace("_", "-"),
        callback=unavailable,
        help=f"(needs the '{extra}' extra)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
