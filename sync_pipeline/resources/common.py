"""Helpers shared by the API resources."""

from __future__ import annotations

from typing import Any

from sync_pipeline.config.model import ConfigError


def build_client(factory: Any, *args: Any, **kwargs: Any) -> Any:
    """A client whose settings are invalid (e.g. a URL that is not http(s)) is a configuration error."""
    try:
        return factory(*args, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"{factory.__name__} settings: {exc}") from None
