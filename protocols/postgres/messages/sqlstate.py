"""SQLSTATEs: what a refusal or a protocol error says to a PostgreSQL client.

Spec: PostgreSQL Appendix A, "PostgreSQL Error Codes". The two directions
of the vocabulary live here: the SQLSTATE a typed :class:`ErrorCode` is
rendered as (a dial refusal reaching psql), and the ErrorCode an upstream
server's SQLSTATE means (a refusal the cluster turns into a dial error).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from protocols.errors import ErrorCode, RemoteProtocolError

__all__ = [
    "SqlState", "SQLSTATE_FOR_CODE", "error_code_for_sqlstate", "protocol_violation", "sqlstate_ok",
]


class SqlState:
    """The SQLSTATEs this package produces (PostgreSQL Appendix A)."""

    PROTOCOL_VIOLATION: Final = "08P01"
    CONNECTION_FAILURE: Final = "08006"
    CONNECTION_REJECTED: Final = "08004"  # sqlserver_rejected_establishment_of_sqlconnection
    FEATURE_NOT_SUPPORTED: Final = "0A000"
    INVALID_AUTHORIZATION: Final = "28000"
    INVALID_PASSWORD: Final = "28P01"
    INSUFFICIENT_PRIVILEGE: Final = "42501"
    INVALID_CATALOG_NAME: Final = "3D000"  # "database does not exist"
    TOO_MANY_CONNECTIONS: Final = "53300"
    CANNOT_CONNECT_NOW: Final = "57P03"
    INTERNAL_ERROR: Final = "XX000"


#: What the gateway answers a client with when a dial fails with a code and
#: carries no SQLSTATE of its own.
SQLSTATE_FOR_CODE: Final[Mapping[ErrorCode, str]] = MappingProxyType({
    ErrorCode.ACCESS_DENIED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.RESOURCE_NOT_FOUND: SqlState.INVALID_CATALOG_NAME,
    ErrorCode.CERT_EXPIRED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.CERT_INVALID: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.CERT_REQUIRED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.USER_LOCKED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.UPSTREAM_UNREACHABLE: SqlState.CONNECTION_FAILURE,
    ErrorCode.BAD_REQUEST: SqlState.PROTOCOL_VIOLATION,
    ErrorCode.UNSUPPORTED_VERSION: SqlState.FEATURE_NOT_SUPPORTED,
    ErrorCode.RATE_LIMITED: SqlState.TOO_MANY_CONNECTIONS,
    ErrorCode.INTERNAL_ERROR: SqlState.INTERNAL_ERROR,
})

_CODE_FOR_SQLSTATE: Final[Mapping[str, ErrorCode]] = MappingProxyType({
    SqlState.INVALID_CATALOG_NAME: ErrorCode.RESOURCE_NOT_FOUND,
    SqlState.TOO_MANY_CONNECTIONS: ErrorCode.RATE_LIMITED,
    SqlState.CANNOT_CONNECT_NOW: ErrorCode.UPSTREAM_UNREACHABLE,
    SqlState.INSUFFICIENT_PRIVILEGE: ErrorCode.ACCESS_DENIED,
    SqlState.FEATURE_NOT_SUPPORTED: ErrorCode.UNSUPPORTED_VERSION,
})


def error_code_for_sqlstate(sqlstate: str | None) -> ErrorCode:
    """The :class:`ErrorCode` closest to an upstream server's SQLSTATE, so a
    cluster can turn an upstream refusal into a typed dial error."""
    if sqlstate is None:
        return ErrorCode.INTERNAL_ERROR
    if sqlstate.startswith("28"):  # class 28: invalid authorization specification
        return ErrorCode.ACCESS_DENIED
    return _CODE_FOR_SQLSTATE.get(sqlstate, ErrorCode.INTERNAL_ERROR)


def protocol_violation(message: str) -> RemoteProtocolError:
    """The error for malformed peer input: BAD_REQUEST, SQLSTATE 08P01."""
    return RemoteProtocolError(message, code=ErrorCode.BAD_REQUEST,
                               wire_hint=SqlState.PROTOCOL_VIOLATION)


def sqlstate_ok(value: str) -> bool:
    """Whether ``value`` has a SQLSTATE's shape: five of 0-9 and A-Z."""
    return len(value) == 5 and all(c.isdigit() or "A" <= c <= "Z" for c in value)
