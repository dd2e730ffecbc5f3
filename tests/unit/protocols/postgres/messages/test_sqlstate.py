"""protocols.postgres.messages.sqlstate: the SQLSTATE <-> ErrorCode vocabulary."""

from __future__ import annotations


import pytest

from protocols.errors import ErrorCode
from protocols.postgres import messages as m
from protocols.postgres.messages import SqlState

def test_every_code_has_a_sqlstate() -> None:
    assert set(m.SQLSTATE_FOR_CODE) == set(ErrorCode)


@pytest.mark.parametrize("sqlstate, code", [
    ("28000", ErrorCode.ACCESS_DENIED),
    ("28P01", ErrorCode.ACCESS_DENIED),
    ("42501", ErrorCode.ACCESS_DENIED),
    ("3D000", ErrorCode.RESOURCE_NOT_FOUND),
    ("53300", ErrorCode.RATE_LIMITED),
    ("57P03", ErrorCode.UPSTREAM_UNREACHABLE),
    ("0A000", ErrorCode.UNSUPPORTED_VERSION),
    ("XX000", ErrorCode.INTERNAL_ERROR),
    (None, ErrorCode.INTERNAL_ERROR),
])
def test_error_code_for_sqlstate(sqlstate: str | None, code: ErrorCode) -> None:
    assert m.error_code_for_sqlstate(sqlstate) is code


def test_protocol_violation() -> None:
    exc = m.protocol_violation("bad")
    assert exc.code is ErrorCode.BAD_REQUEST and exc.wire_hint == SqlState.PROTOCOL_VIOLATION
