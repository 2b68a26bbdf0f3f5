"""OData v4 ``$filter`` / ``$orderby`` / ``$select`` for the Dataverse sandbox.

``compile_filter(text, types)`` parses a filter into a predicate over row dicts. ``types`` maps each
property a query may name to its kind (``string guid number bool datetime``); unknown properties and
operand types that do not match (``leadid eq 'abc'``, ``statecode eq '1'``) are rejected the way
Dataverse rejects them, so a client bug shows up in the sandbox rather than in production.

Grammar: ``or``/``and``/``not``, parentheses, ``eq ne gt ge lt le`` between a property and a literal,
``contains/startswith/endswith(prop,'text')``. Literals: ``'str''ing'`` (doubled quote escapes), ``null``,
``true``/``false``, numbers, GUIDs, unquoted ISO date-times/dates. String comparisons are case-insensitive.
Date-times in rows are ISO UTC strings with whole seconds and a ``Z`` (the store writes them that way).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Row = dict[str, Any]
Predicate = Callable[[Row], bool]


class ODataError(ValueError):
    """A query the service refuses (HTTP 400); ``message`` is what Dataverse would say."""

    code = "0x80060888"


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<unterminated>'(?:[^']|'')*$)
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)
  | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-]))
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\w:]))
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDlLfF]?(?![\w.]))
  | (?P<enum>[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+'(?:[^']|'')*')
  | (?P<name>[A-Za-z_][\w.]*(?:/[A-Za-z_]\w*)*)
  | (?P<punct>[(),])
""",
    re.VERBOSE,
)

_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}
_FUNCS = {"contains", "startswith", "endswith"}


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ODataError(f"Syntax error at position {pos} in '{text}'.")
        kind = m.lastgroup or ""
        if kind == "unterminated":
            raise ODataError(f"There is an unterminated string literal at position {pos} in '{text}'.")
        if kind != "ws":
            tokens.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    return tokens


def normalize_datetime(text: str) -> str:
    """Any ISO-8601 date/date-time -> the store's canonical ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    value = text.strip()
    if len(value) == 10:
        value += "T00:00:00Z"
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _literal(tok: _Tok, text: str) -> tuple[str, Any]:
    """(kind, python value) of a literal token."""
    if tok.kind == "string":
        return "string", tok.text[1:-1].replace("''", "'")
    if tok.kind in ("datetime", "date"):
        try:
            return "datetime", normalize_datetime(tok.text)
        except ValueError:
            raise ODataError(
                f"The date-time literal '{tok.text}' at position {tok.pos} is not valid."
            ) from None
    if tok.kind == "guid":
        return "guid", tok.text.lower()
    if tok.kind == "number":
        raw = tok.text.rstrip("mMdDlLfF")
        return "number", float(raw) if any(c in raw for c in ".eE") else int(raw)
    if tok.kind == "enum":  # Microsoft.Dynamics.CRM.OwnershipTypes'UserOwned' (enum member by name)
        type_name, _, member = tok.text.partition("'")
        return "enum", (type_name.rsplit(".", 1)[-1], member[:-1].replace("''", "'"))
    if tok.kind == "name" and tok.text in ("null", "true", "false"):
        return ("null", None) if tok.text == "null" else ("bool", tok.text == "true")
    raise ODataError(f"Expected a literal at position {tok.pos} in '{text}', found '{tok.text}'.")


_EDM = {
    "string": "Edm.String",
    "guid": "Edm.Guid",
    "number": "Edm.Int32",
    "bool": "Edm.Boolean",
    "datetime": "Edm.DateTimeOffset",
    "null": "null",
    "enum": "Edm.Enum",
}
_ORDER_OPS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
_OP_KIND = {
    "eq": "Equal",
    "ne": "NotEqual",
    "gt": "GreaterThan",
    "ge": "GreaterThanOrEqual",
    "lt": "LessThan",
    "le": "LessThanOrEqual",
}


def _comparison(prop: str, op: str, value: Any) -> Predicate:
    if value is None:
        return (lambda r: r.get(prop) is None) if op == "eq" else (lambda r: r.get(prop) is not None)
    if op == "eq":
        return lambda r: r.get(prop) == value
    if op == "ne":
        return lambda r: r.get(prop) != value
    fn = _ORDER_OPS[op]
    return lambda r: (v := r.get(prop)) is not None and fn(v, value)


def _string_comparison(prop: str, op: str, value: str) -> Predicate:
    folded = value.casefold()
    if op in ("eq", "ne"):
        want = op == "eq"
        return lambda r: ((v := r.get(prop)) is not None and v.casefold() == folded) is want
    fn = _ORDER_OPS[op]
    return lambda r: (v := r.get(prop)) is not None and fn(v.casefold(), folded)


class _Parser:
    def __init__(self, text: str, types: dict[str, str], entity: str):
        self.text, self.types, self.entity = text, types, entity
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, text: str | None = None) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise ODataError(f"Unexpected end of expression in '{self.text}'.")
        if text is not None and tok.text != text:
            raise ODataError(f"Expected '{text}' at position {tok.pos} in '{self.text}', found '{tok.text}'.")
        self.i += 1
        return tok

    def parse(self) -> Predicate:
        if not self.toks:
            raise ODataError("The $filter expression is empty.")
        pred = self.or_expr()
        tok = self.peek()
        if tok is not None:
            raise ODataError(f"Syntax error at position {tok.pos} in '{self.text}': unexpected '{tok.text}'.")
        return pred

    def or_expr(self) -> Predicate:
        parts = [self.and_expr()]
        while (tok := self.peek()) is not None and tok.text == "or":
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def and_expr(self) -> Predicate:
        parts = [self.not_expr()]
        while (tok := self.peek()) is not None and tok.text == "and":
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def not_expr(self) -> Predicate:
        tok = self.peek()
        if tok is not None and tok.text == "not":
            self.take()
            inner = self.not_expr()
            return lambda r: not inner(r)
        return self.primary()

    def prop(self, tok: _Tok) -> tuple[str, str]:
        if tok.kind != "name" or tok.text in ("null", "true", "false", "and", "or", "not"):
            raise ODataError(
                f"Expected a property name at position {tok.pos} in '{self.text}', found '{tok.text}'."
            )
        kind = self.types.get(tok.text)
        if kind is None:
            raise ODataError(
                f"Could not find a property named '{tok.text}' on type "
                f"'Microsoft.Dynamics.CRM.{self.entity}'."
            )
        return tok.text, kind

    def primary(self) -> Predicate:
        tok = self.take()
        if tok.text == "(":
            inner = self.or_expr()
            self.take(")")
            return inner
        if (
            tok.kind == "name"
            and tok.text.lower() in _FUNCS
            and (nxt := self.peek()) is not None
            and nxt.text == "("
        ):
            return self.function(tok.text.lower())
        name, kind = self.prop(tok)
        op_tok = self.take()
        if op_tok.text not in _COMPARE:
            raise ODataError(
                f"Syntax error at position {op_tok.pos} in '{self.text}': expected a comparison "
                f"operator, found '{op_tok.text}'."
            )
        lit_kind, value = _literal(self.take(), self.text)
        if kind == "enum" and lit_kind in ("enum", "string"):
            # Enum properties compare by member name; a plain string literal is accepted for the member too.
            kind, lit_kind = "string", "string"
            value = value[1] if isinstance(value, tuple) else value
        if kind in ("label", "collection", "complex", "managed"):
            raise ODataError(
                f"The property '{name}' of type 'Microsoft.Dynamics.CRM.{self.entity}' cannot be used "
                f"in $filter; filter on a primitive property (e.g. '{name}/Value')."
            )
        if lit_kind != "null" and lit_kind != kind:
            raise ODataError(
                f"A binary operator with incompatible types was detected. Found operand types "
                f"'{_EDM[kind]}' and '{_EDM[lit_kind]}' for operator kind "
                f"'{_OP_KIND[op_tok.text]}'."
            )
        if kind == "string" and value is not None:
            return _string_comparison(name, op_tok.text, value)
        return _comparison(name, op_tok.text, value)

    def function(self, fn: str) -> Predicate:
        self.take("(")
        name, kind = self.prop(self.take())
        self.take(",")
        lit_kind, value = _literal(self.take(), self.text)
        self.take(")")
        if kind != "string" or lit_kind != "string":
            raise ODataError(f"The function '{fn}' requires string arguments; '{name}' is {_EDM[kind]}.")
        needle = value.casefold().strip("%")
        if fn == "contains":
            return lambda r: (v := r.get(name)) is not None and needle in v.casefold()
        if fn == "startswith":
            return lambda r: (v := r.get(name)) is not None and v.casefold().startswith(needle)
        return lambda r: (v := r.get(name)) is not None and v.casefold().endswith(needle)


def compile_filter(text: str, types: dict[str, str], entity: str) -> Predicate:
    return _Parser(text, types, entity).parse()


def parse_orderby(text: str, types: dict[str, str], entity: str) -> list[tuple[str, bool]]:
    """``"modifiedon desc,leadid"`` -> [("modifiedon", True), ("leadid", False)] (name, descending)."""
    result = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise ODataError(f"Syntax error in $orderby '{text}' near '{part.strip()}'.")
        if words[0] not in types:
            raise ODataError(
                f"Could not find a property named '{words[0]}' on type 'Microsoft.Dynamics.CRM.{entity}'."
            )
        result.append((words[0], len(words) == 2 and words[1].lower() == "desc"))
    return result


def parse_select(text: str, types: dict[str, str], entity: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in types:
            raise ODataError(
                f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{entity}'."
            )
    return names
