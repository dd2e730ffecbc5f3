"""protocols.mysql.constants: capability bits, error numbers and SQLSTATEs."""

from __future__ import annotations

from protocols.errors import ErrorCode
from protocols.mysql.constants import (
    ERRNO_FOR_CODE, SQLSTATE_OF, Capability, ErrorNumber, ServerStatus, is_client_errno,
)


def test_capabilities_split_into_mysql_and_mariadb_halves() -> None:
    caps = Capability.PROTOCOL_41 | Capability.MARIADB_PROGRESS | Capability.MARIADB_CACHE_METADATA
    assert caps.mysql_bits == 1 << 9 and caps.mariadb_bits == 0b10001
    assert Capability.DEPRECATE_EOF.value == 0x01000000
    assert Capability.QUERY_ATTRIBUTES.value == 0x08000000


def test_unknown_bits_are_dropped_not_refused() -> None:
    assert Capability.of((1 << 63) | (1 << 40) | 0x200) is Capability.PROTOCOL_41
    assert Capability.of(0) == Capability(0)


def test_error_numbers_carry_the_servers_sqlstates() -> None:
    assert ErrorNumber.ER_ACCESS_DENIED_ERROR.sqlstate == "28000"
    assert ErrorNumber.ER_BAD_DB_ERROR.sqlstate == "42000"
    assert ErrorNumber.ER_HANDSHAKE_ERROR.sqlstate == "08S01"
    assert ErrorNumber.CR_CONN_HOST_ERROR.sqlstate == "HY000"
    assert all(len(state) == 5 for state in SQLSTATE_OF.values())
    assert ServerStatus.SESSION_STATE_CHANGED == 0x4000


def test_every_refusal_code_has_an_error_number() -> None:
    assert set(ERRNO_FOR_CODE) == set(ErrorCode)
    assert ERRNO_FOR_CODE[ErrorCode.ACCESS_DENIED] == 1045
    assert ERRNO_FOR_CODE[ErrorCode.UPSTREAM_UNREACHABLE] == 1429
    assert not any(is_client_errno(errno) for errno in ERRNO_FOR_CODE.values())
    assert is_client_errno(ErrorNumber.CR_SERVER_LOST) and not is_client_errno(1045)
