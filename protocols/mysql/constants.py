"""MySQL/MariaDB protocol constants: capability and status flags, commands,
error numbers and their SQLSTATEs.

Spec: MySQL Source Code Documentation, "Client/Server Protocol":
Capabilities Flags, SERVER_STATUS_flags_enum, Text Protocol (COM_*); MariaDB
Server docs, "Client/Server Protocol", "Connection" (the extended
capabilities MariaDB sends in the handshake's filler bytes). Error numbers
are the servers' own (``mysqld_error.h``), client-side ones ``errmsg.h``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from protocols.errors import ErrorCode

__all__ = [
    "Capability", "ServerStatus", "Command", "ErrorNumber", "SQLSTATE_OF",
    "ERRNO_FOR_CODE", "MAX_PAYLOAD", "DEFAULT_CHARSET", "UTF8MB4_GENERAL_CI",
    "is_client_errno", "CLIENT_MYSQL",
]

#: A packet's payload is at most this long; one this long is continued by
#: the next packet ("Sending More Than 16Mb").
MAX_PAYLOAD: Final = 2**24 - 1
#: utf8mb4_general_ci, what MySQL 5.7 / MariaDB clients default to.
UTF8MB4_GENERAL_CI: Final = 45
DEFAULT_CHARSET: Final = UTF8MB4_GENERAL_CI


class Capability(enum.Flag):
    """Capabilities Flags: the low 32 bits are MySQL's; bits 32..63 are
    MariaDB's extended capabilities, carried in the handshake's and the
    handshake response's filler when the server clears ``CLIENT_MYSQL``
    (which is ``LONG_PASSWORD``'s bit)."""

    LONG_PASSWORD = 1 << 0  # MariaDB: CLIENT_MYSQL (cleared by MariaDB 10.2+ servers)
    FOUND_ROWS = 1 << 1
    LONG_FLAG = 1 << 2
    CONNECT_WITH_DB = 1 << 3
    NO_SCHEMA = 1 << 4
    COMPRESS = 1 << 5
    ODBC = 1 << 6
    LOCAL_FILES = 1 << 7
    IGNORE_SPACE = 1 << 8
    PROTOCOL_41 = 1 << 9
    INTERACTIVE = 1 << 10
    SSL = 1 << 11
    IGNORE_SIGPIPE = 1 << 12
    TRANSACTIONS = 1 << 13
    RESERVED = 1 << 14
    SECURE_CONNECTION = 1 << 15
    MULTI_STATEMENTS = 1 << 16
    MULTI_RESULTS = 1 << 17
    PS_MULTI_RESULTS = 1 << 18
    PLUGIN_AUTH = 1 << 19
    CONNECT_ATTRS = 1 << 20
    PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
    CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
    SESSION_TRACK = 1 << 23
    DEPRECATE_EOF = 1 << 24
    OPTIONAL_RESULTSET_METADATA = 1 << 25
    ZSTD_COMPRESSION_ALGORITHM = 1 << 26
    QUERY_ATTRIBUTES = 1 << 27
    MULTI_FACTOR_AUTHENTICATION = 1 << 28
    CAPABILITY_EXTENSION = 1 << 29
    SSL_VERIFY_SERVER_CERT = 1 << 30
    REMEMBER_OPTIONS = 1 << 31
    # MariaDB's extended capabilities.
    MARIADB_PROGRESS = 1 << 32
    MARIADB_COM_MULTI = 1 << 33
    MARIADB_STMT_BULK_OPERATIONS = 1 << 34
    MARIADB_EXTENDED_METADATA = 1 << 35
    MARIADB_CACHE_METADATA = 1 << 36
    MARIADB_BULK_UNIT_RESULTS = 1 << 37

    @classmethod
    def of(cls, value: int) -> Capability:
        """Bits as received: unknown ones are dropped, not an error (a newer
        peer may set bits we do not know)."""
        return cls(value & _KNOWN)

    @property
    def mysql_bits(self) -> int:
        return self.value & 0xFFFFFFFF

    @property
    def mariadb_bits(self) -> int:
        return self.value >> 32


_KNOWN: Final = sum(flag.value for flag in Capability)
#: MariaDB's name for bit 0: set by MySQL servers and old MariaDB ones.
CLIENT_MYSQL: Final = Capability.LONG_PASSWORD


class ServerStatus(enum.IntFlag):
    """SERVER_STATUS_flags_enum (OK, EOF and the handshake carry it)."""

    IN_TRANS = 0x0001
    AUTOCOMMIT = 0x0002
    MORE_RESULTS_EXISTS = 0x0008
    NO_GOOD_INDEX_USED = 0x0010
    NO_INDEX_USED = 0x0020
    CURSOR_EXISTS = 0x0040
    LAST_ROW_SENT = 0x0080
    DB_DROPPED = 0x0100
    NO_BACKSLASH_ESCAPES = 0x0200
    METADATA_CHANGED = 0x0400
    QUERY_WAS_SLOW = 0x0800
    PS_OUT_PARAMS = 0x1000
    IN_TRANS_READONLY = 0x2000
    SESSION_STATE_CHANGED = 0x4000


class Command(enum.IntEnum):
    """The first byte of a command-phase packet (Text and Utility Commands,
    Prepared Statements)."""

    SLEEP = 0x00
    QUIT = 0x01
    INIT_DB = 0x02
    QUERY = 0x03
    FIELD_LIST = 0x04
    CREATE_DB = 0x05
    DROP_DB = 0x06
    REFRESH = 0x07
    SHUTDOWN = 0x08
    STATISTICS = 0x09
    PROCESS_INFO = 0x0A
    CONNECT = 0x0B
    PROCESS_KILL = 0x0C
    DEBUG = 0x0D
    PING = 0x0E
    TIME = 0x0F
    DELAYED_INSERT = 0x10
    CHANGE_USER = 0x11
    BINLOG_DUMP = 0x12
    TABLE_DUMP = 0x13
    CONNECT_OUT = 0x14
    REGISTER_SLAVE = 0x15
    STMT_PREPARE = 0x16
    STMT_EXECUTE = 0x17
    STMT_SEND_LONG_DATA = 0x18
    STMT_CLOSE = 0x19
    STMT_RESET = 0x1A
    SET_OPTION = 0x1B
    STMT_FETCH = 0x1C
    DAEMON = 0x1D
    BINLOG_DUMP_GTID = 0x1E
    RESET_CONNECTION = 0x1F
    CLONE = 0x20
    SUBSCRIBE_GROUP_REPLICATION_STREAM = 0x21
    MARIADB_STMT_BULK_EXECUTE = 0xFA
    MARIADB_MULTI = 0xFE


class ErrorNumber(enum.IntEnum):
    """The error numbers Wicket puts in ERR packets or wire hints."""

    ER_CON_COUNT_ERROR = 1040
    ER_HANDSHAKE_ERROR = 1043
    ER_DBACCESS_DENIED_ERROR = 1044
    ER_ACCESS_DENIED_ERROR = 1045
    ER_UNKNOWN_COM_ERROR = 1047
    ER_BAD_DB_ERROR = 1049
    ER_NET_PACKET_TOO_LARGE = 1153
    ER_NOT_SUPPORTED_YET = 1235
    ER_NET_READ_ERROR = 1158
    ER_NET_PACKETS_OUT_OF_ORDER = 1156
    ER_NOT_SUPPORTED_AUTH_MODE = 1251
    ER_MALFORMED_PACKET = 1835
    ER_SECURE_TRANSPORT_REQUIRED = 3159
    ER_ACCOUNT_HAS_BEEN_LOCKED = 3118
    ER_MUST_CHANGE_PASSWORD_LOGIN = 1862
    ER_USER_LIMIT_REACHED = 1226
    ER_INTERNAL_ERROR = 1815
    ER_CONNECT_TO_FOREIGN_DATA_SOURCE = 1429
    # Client-side numbers (errmsg.h): what a client library says itself.
    # Wire hints only, never in an ERR packet: MariaDB's protocol reserves
    # 2000-2999 and 5000-5999 for clients and calls such an ERR malformed.
    CR_CONN_HOST_ERROR = 2003
    CR_SERVER_LOST = 2013
    CR_VERSION_ERROR = 2007

    @property
    def sqlstate(self) -> str:
        return SQLSTATE_OF.get(self, "HY000")


#: The SQLSTATE a server sends with each number (HY000 when not listed).
SQLSTATE_OF: Final[Mapping[int, str]] = MappingProxyType({
    ErrorNumber.ER_CON_COUNT_ERROR: "08004",
    ErrorNumber.ER_HANDSHAKE_ERROR: "08S01",
    ErrorNumber.ER_DBACCESS_DENIED_ERROR: "42000",
    ErrorNumber.ER_ACCESS_DENIED_ERROR: "28000",
    ErrorNumber.ER_UNKNOWN_COM_ERROR: "08S01",
    ErrorNumber.ER_BAD_DB_ERROR: "42000",
    ErrorNumber.ER_NET_PACKET_TOO_LARGE: "08S01",
    ErrorNumber.ER_NOT_SUPPORTED_YET: "42000",
    ErrorNumber.ER_NET_READ_ERROR: "08S01",
    ErrorNumber.ER_NET_PACKETS_OUT_OF_ORDER: "08S01",
    ErrorNumber.ER_NOT_SUPPORTED_AUTH_MODE: "08004",
    ErrorNumber.ER_USER_LIMIT_REACHED: "42000",
})

def is_client_errno(errno: int) -> bool:
    """Whether ``errno`` is a client library's own (never sent in an ERR)."""
    return 2000 <= errno <= 2999 or 5000 <= errno <= 5999


#: What a typed refusal (the dial's ErrorCode) becomes in an ERR packet.
ERRNO_FOR_CODE: Final[Mapping[ErrorCode, ErrorNumber]] = MappingProxyType({
    ErrorCode.ACCESS_DENIED: ErrorNumber.ER_ACCESS_DENIED_ERROR,
    ErrorCode.RESOURCE_NOT_FOUND: ErrorNumber.ER_BAD_DB_ERROR,
    ErrorCode.CERT_EXPIRED: ErrorNumber.ER_ACCESS_DENIED_ERROR,
    ErrorCode.CERT_INVALID: ErrorNumber.ER_ACCESS_DENIED_ERROR,
    ErrorCode.CERT_REQUIRED: ErrorNumber.ER_ACCESS_DENIED_ERROR,
    ErrorCode.USER_LOCKED: ErrorNumber.ER_ACCOUNT_HAS_BEEN_LOCKED,
    ErrorCode.UPSTREAM_UNREACHABLE: ErrorNumber.ER_CONNECT_TO_FOREIGN_DATA_SOURCE,
    ErrorCode.BAD_REQUEST: ErrorNumber.ER_HANDSHAKE_ERROR,
    ErrorCode.UNSUPPORTED_VERSION: ErrorNumber.ER_NOT_SUPPORTED_AUTH_MODE,
    ErrorCode.RATE_LIMITED: ErrorNumber.ER_CON_COUNT_ERROR,
    ErrorCode.INTERNAL_ERROR: ErrorNumber.ER_INTERNAL_ERROR,
})
