"""Issue 13's targets, evaluated from the merged benchmark record: each with its measured value and met/missed.

A target whose measurement is absent (a scale or scenario not run yet) is "not measured", never met.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

GIB_MB = 1024.0


def _sc(latest: dict[str, Any], scale: str, scenario: str) -> dict[str, Any] | None:
    return latest.get("scales", {}).get(scale, {}).get("scenarios", {}).get(scenario)


def _get(latest: dict[str, Any], scale: str, scenario: str, *path: str) -> Any:
    value: Any = _sc(latest, scale, scenario)
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _peak_rss(latest: dict[str, Any], scale: str) -> float | None:
    """The pipeline process's peak RSS over every scenario measured at ``scale``."""
    peaks = [
        sc["peak_rss_mb"]
        for sc in latest.get("scales", {}).get(scale, {}).get("scenarios", {}).values()
        if isinstance(sc, dict) and isinstance(sc.get("peak_rss_mb"), (int, float))
    ]
    return max(peaks) if peaks else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# (measure, scale label, how to read the value, bound, "max" (value <= bound) or "min" (value >= bound), unit)
Row = tuple[str, str, Callable[[dict[str, Any]], Any], float, str, str]


def _at(scale: str, scenario: str, *path: str) -> Callable[[dict[str, Any]], Any]:
    """Reads one measurement (``_get``) from the record it is given."""
    return lambda latest: _get(latest, scale, scenario, *path)


def _rows(latest: dict[str, Any]) -> list[Row]:
    rows: list[Row] = [
        (
            "initial copy, limits off, end to end",
            "large",
            _at("large", "initial", "records_per_second"),
            20_000,
            "min",
            "rec/s",
        )
    ]
    for scale in ("small", "medium", "large"):
        rows.append(
            (
                "pipeline CPU per 100k records, initial copy",
                scale,
                _at(scale, "initial", "cpu", "pipeline_per_100k_records"),
                3.0,
                "max",
                "s",
            )
        )
    rows += [
        (
            "peak RSS of the pipeline process",
            "large",
            lambda rec: _peak_rss(rec, "large"),
            GIB_MB,
            "max",
            "MB",
        ),
        (
            "peak RSS, large / medium",
            "large",
            lambda rec: _ratio(_peak_rss(rec, "large"), _peak_rss(rec, "medium")),
            1.2,
            "max",
            "x",
        ),
    ]
    for scale in ("small", "medium", "large"):
        rows.append(
            ("1,000 changes, incremental", scale, _at(scale, "incremental", "seconds"), 3.0, "max", "s")
        )
    rows += [
        (
            "1,000 changes, large / small",
            "large",
            lambda rec: _ratio(
                _get(rec, "large", "incremental", "seconds"), _get(rec, "small", "incremental", "seconds")
            ),
            1.5,
            "max",
            "x",
        ),
        (
            "Marketo calls, initial copy",
            "large",
            _at("large", "initial", "api", "marketo_calls"),
            1000,
            "max",
            "calls",
        ),
        (
            "Marketo calls to absorb the copy's echo (settle run)",
            "large",
            _at("large", "settle_after_initial", "api", "marketo_calls"),
            50,
            "max",
            "calls",
        ),
    ]
    for scale in ("small", "medium", "large"):
        rows += [
            ("idle cycle calls", scale, _at(scale, "idle", "api", "total"), 10, "max", "calls"),
            (
                "idle sensor tick calls",
                scale,
                _at(scale, "idle_sensor_tick", "http_calls"),
                3,
                "max",
                "calls",
            ),
        ]
    for scale in ("small", "medium", "large"):
        rows.append(
            (
                "realistic profile, time / floor (API budget or limits-off copy)",
                scale,
                _realistic_ratio(scale),
                1.10,
                "max",
                "x",
            )
        )
    rows.append(
        (
            "edit-to-other-side p95, daemon + sensor, realistic, steady edits",
            _freshness_scale(latest) or "any",
            _freshness_p95,
            60.0,
            "max",
            "s",
        )
    )
    return rows


def _realistic_ratio(scale: str) -> Callable[[dict[str, Any]], Any]:
    def read(latest: dict[str, Any]) -> Any:
        sc = _sc(latest, scale, "realistic")
        if sc is None:
            return None
        ratio = sc.get("vs_floor", sc.get("vs_budget_floor"))  # records before the floor had both bounds
        return float("inf") if ratio is None else ratio  # a 0 s floor: any run time is above 1.10x of it

    return read


def _freshness_scale(latest: dict[str, Any]) -> str | None:
    """The largest scale with a freshness run."""
    found = [scale for scale in latest.get("scales", {}) if _sc(latest, scale, "freshness") is not None]
    return found[-1] if found else None


def _freshness_p95(latest: dict[str, Any]) -> Any:
    """p95 of the freshness run of the largest scale measured; a lost edit in the top 5% makes it infinite."""
    scale = _freshness_scale(latest)
    if scale is None:
        return None
    p95 = _get(latest, scale, "freshness", "latency_seconds", "p95")
    return float("inf") if p95 is None else p95


def evaluate(latest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for measure, scale, read, bound, sense, unit in _rows(latest):
        value = read(latest)
        if value is None:
            status = "not measured"
        else:
            status = "met" if (value <= bound if sense == "max" else value >= bound) else "missed"
        out.append(
            {
                "measure": measure,
                "scale": scale,
                "value": value,
                "bound": bound,
                "sense": "<=" if sense == "max" else ">=",
                "unit": unit,
                "status": status,
            }
        )
    return out
