"""Seeded, per-endpoint fault injection for the sandbox servers.

A fault plan maps route names (or glob patterns such as ``marketo.*``) to a rate and a weighted list of
fault kinds. Draws come from one ``random.Random(seed)`` per injector, so a seeded test sees the same
faults for the same sequence of calls. Every injected fault is counted, per route and per kind.

Kinds understood by every service: ``status`` (plain HTTP error), ``html`` (an HTML error page from a
"proxy"), ``drop`` (connection closed without a response), ``latency`` (delay, then answer normally),
``timeout`` (long delay, then 504), ``truncated`` and ``malformed`` (broken JSON bodies). Services add
their own: Dynamics ``throttle`` (429 + Retry-After), ``unauthorized`` (401); Marketo ``code`` (an API
error code such as 601/602/604/606/615 inside an HTTP 200 body) and ``partial`` (record-level failures).
"""

from __future__ import annotations

import fnmatch
import random
import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 500
    code: str = ""  # service error code, e.g. Marketo "606"
    seconds: float = 0.0  # latency / timeout / Retry-After


@dataclass
class FaultRule:
    pattern: str
    rate: float
    faults: list[tuple[Fault, float]]  # (fault, weight)
    remaining: int | None = None  # stop after this many injections (None = unlimited)


@dataclass
class FaultInjector:
    seed: int = 0
    rules: list[FaultRule] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    enabled: bool = True

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def configure(self, seed: int, rules: list[FaultRule]) -> None:
        with self._lock:
            self.seed, self.rules = seed, list(rules)
            self._rng = random.Random(seed)
            self.injected.clear()

    def add(
        self, pattern: str, rate: float, *faults: Fault | tuple[Fault, float], count: int | None = None
    ) -> FaultRule:
        weighted = [(f, 1.0) if isinstance(f, Fault) else f for f in faults]
        rule = FaultRule(pattern, rate, weighted, count)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def draw(self, route: str) -> Fault | None:
        if not self.enabled or not self.rules:
            return None
        with self._lock:
            for rule in self.rules:
                if rule.remaining == 0 or not fnmatch.fnmatchcase(route, rule.pattern):
                    continue
                if self._rng.random() >= rule.rate:
                    return None
                fault = self._rng.choices([f for f, _ in rule.faults], [w for _, w in rule.faults])[0]
                if rule.remaining is not None:
                    rule.remaining -= 1
                self.injected[f"{route}:{fault.kind}{fault.code or ''}"] += 1
                return fault
        return None

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())
