"""Typed client errors: callers branch on types and outcome kinds, which the clients derive from statuses/codes."""

from __future__ import annotations

import pytest

from sync_pipeline.clients import errors
from sync_pipeline.clients.dynamics import BatchResponse, DynamicsError
from sync_pipeline.clients.marketo import MarketoAuthError, MarketoTransientError, RecordResult


@pytest.mark.parametrize(
    "status, kind, cls, code",
    [
        (412, errors.CHANGED, errors.PreconditionFailed, "412"),
        (404, errors.GONE, errors.NotFound, "404"),
        (429, errors.FAILED, errors.Throttled, "0x80072321"),
        (400, errors.FAILED, errors.PermanentError, "0x80040203"),
        (503, errors.FAILED, errors.Transient, "0x80040216"),
    ],
)
def test_batch_part_errors_are_typed(status: int, kind: str, cls: type, code: str) -> None:
    part = BatchResponse(status, {}, {"error": {"code": code, "message": "no"}})
    error = part.error("accounts(1)")
    assert isinstance(error, cls) and isinstance(error, DynamicsError)
    assert errors.kind_of(error) == kind
    assert error.code == code and error.message == "accounts(1): no"


def test_a_successful_part_has_no_error() -> None:
    assert BatchResponse(204, {}, None).error("accounts(1)") is None
    assert errors.kind_of(None) == errors.OK


def test_marketo_record_outcomes_name_records_that_are_gone() -> None:
    assert RecordResult(0, "updated", 7).kind == errors.OK
    assert (
        RecordResult(0, "skipped", None, ({"code": "1004", "message": "Lead not found"},)).kind == errors.GONE
    )
    assert (
        RecordResult(0, "skipped", None, ({"code": "1013", "message": "Object not found"},)).kind
        == errors.GONE
    )
    assert (
        RecordResult(0, "skipped", None, ({"code": "1003", "message": "Invalid value"},)).kind
        == errors.FAILED
    )


def test_marketo_errors_are_the_shared_types() -> None:
    assert isinstance(MarketoAuthError("601", "token"), errors.AuthError)
    assert isinstance(MarketoTransientError("606", "rate"), errors.Transient)
