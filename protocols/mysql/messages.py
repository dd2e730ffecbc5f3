"""The connection-phase messages and the generic responses (OK, ERR, EOF).

Spec: MySQL Source Code Documentation, "Client/Server Protocol":
Connection Phase Packets (Protocol::HandshakeV10, Protocol::SSLRequest,
Protocol::HandshakeResponse41, Protocol::AuthSwitchRequest,
Protocol::AuthMoreData), Generic Response Packets (OK_Packet, ERR_Packet,
EOF_Packet); MariaDB Server docs, "Connection" (the extended capabilities in
the filler bytes) and "ERR_Packet" (progress reports).

Each message is a small frozen class with ``encode(...)`` returning its
payload (packets and sequence ids are :mod:`.packets`' business) and a
``decode(payload, ...)`` class method. Layouts that depend on capability
flags take them as an argument: what the *peer* said it can do, or what
both agreed. A bad message cannot be built (LocalProtocolError); a bad one
received is a RemoteProtocolError whose wire hint is ER_HANDSHAKE_ERROR
(1043) in the connection phase, ER_MALFORMED_PACKET (1835) otherwise.

Text fields are decoded as UTF-8 with ``surrogateescape``: lossless, so a
decoded message encodes back to the same bytes whatever charset the peer
used, and a name that is not UTF-8 never matches an RBAC rule by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import attrs

from protocols.errors import LocalProtocolError
from protocols.mysql.constants import (
    CLIENT_MYSQL, DEFAULT_CHARSET, SQLSTATE_OF, Capability, ErrorNumber, ServerStatus,
)
from protocols.mysql.packets import Reader, invalid, lenenc_bytes, lenenc_int, nul_bytes

__all__ = [
    "PROTOCOL_VERSION", "MAX_ATTRIBUTES_LENGTH", "text", "wire", "Handshake", "SSLRequest",
    "HandshakeResponse", "AuthSwitchRequest", "AuthMoreData", "OkPacket", "ErrPacket",
    "EofPacket", "is_eof", "ServerInfo", "StartTLS",
]

PROTOCOL_VERSION: Final = 10
#: The server's bound on the connection attributes block (64 KiB).
MAX_ATTRIBUTES_LENGTH: Final = 65536
_HANDSHAKE: Final = ErrorNumber.ER_HANDSHAKE_ERROR
_SSL_REQUEST_SIZE: Final = 32
_frozen = attrs.frozen(kw_only=True)


def text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def wire(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _caps(value: object) -> Capability:
    if isinstance(value, Capability):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        invalid("capabilities must be a Capability or a non-negative int")
    return Capability.of(value)


def _uint(bits: int):  # type: ignore[no-untyped-def]
    def check(_inst: object, attr: attrs.Attribute, value: object) -> None:  # type: ignore[type-arg]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
            invalid(f"{attr.name} must be an integer in 0..2^{bits}-1")
    return check


def _no_nul(_inst: object, attr: attrs.Attribute, value: object) -> None:  # type: ignore[type-arg]
    if value is not None and (not isinstance(value, str) or "\x00" in value):
        invalid(f"{attr.name} must be a string without NUL")


def _freeze(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    return None if value is None else MappingProxyType(dict(value))


def _capability_filler(caps: Capability) -> bytes:
    # MariaDB: with CLIENT_MYSQL clear, the filler's last 4 bytes are the
    # extended capabilities; a MySQL peer sends zeros there.
    return caps.mariadb_bits.to_bytes(4, "little")


# --- the server's greeting ---------------------------------------------------------


@_frozen
class StartTLS:
    """An event both roles hand out: switch this connection to TLS now.

    Client role (:mod:`.client`): send ``data_to_send()`` (the SSLRequest),
    run the TLS handshake, then call ``tls_started()``. Server role
    (:mod:`.server`): the client sent an SSLRequest and is already sending
    its ClientHello; call ``start_tls()`` for the bytes received so far and
    run the TLS handshake as the server. No answer precedes TLS in MySQL."""


@_frozen
class ServerInfo:
    """What a server says of itself in its handshake, minus the nonce: the
    upstream's values the gateway repeats to its clients (GUI tools and
    ORMs switch behaviour on the version string)."""

    server_version: str = attrs.field(validator=_no_nul)
    capabilities: Capability = attrs.field(converter=_caps)
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=_uint(8))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=_uint(16))
    connection_id: int = attrs.field(default=0, validator=_uint(32))


@_frozen
class Handshake:
    """Protocol::HandshakeV10, the server's first packet.

    ``auth_plugin_data`` is both parts of the plugin data as sent (a 20-byte
    scramble and MySQL's NUL); :attr:`scramble` is the nonce without it."""

    server_version: str = attrs.field(validator=_no_nul)
    connection_id: int = attrs.field(validator=_uint(32))
    auth_plugin_data: bytes = attrs.field(repr=False)
    capabilities: Capability = attrs.field(converter=_caps)
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=_uint(8))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=_uint(16))
    auth_plugin: str | None = attrs.field(default="mysql_native_password", validator=_no_nul)

    def __attrs_post_init__(self) -> None:
        if not 8 <= len(self.auth_plugin_data) <= 255:
            invalid("auth_plugin_data must be 8..255 bytes")
        if CLIENT_MYSQL in self.capabilities and self.capabilities.mariadb_bits:
            invalid("MariaDB's extended capabilities need CLIENT_MYSQL (bit 0) clear")
        if (self.auth_plugin is not None) != (Capability.PLUGIN_AUTH in self.capabilities):
            invalid("auth_plugin is given exactly when PLUGIN_AUTH is set")

    @property
    def scramble(self) -> bytes:
        data = self.auth_plugin_data
        return data[:-1] if data.endswith(b"\x00") else data

    @property
    def info(self) -> ServerInfo:
        return ServerInfo(server_version=self.server_version, capabilities=self.capabilities,
                          charset=self.charset, status=self.status,
                          connection_id=self.connection_id)

    @property
    def is_mariadb(self) -> bool:
        """A MariaDB 10.2+ server says so by clearing CLIENT_MYSQL."""
        return CLIENT_MYSQL not in self.capabilities

    def encode(self) -> bytes:
        caps, data = self.capabilities, self.auth_plugin_data
        out = bytearray([PROTOCOL_VERSION])
        out += nul_bytes(wire(self.server_version), "server_version")
        out += self.connection_id.to_bytes(4, "little") + data[:8] + b"\x00"
        out += (caps.mysql_bits & 0xFFFF).to_bytes(2, "little") + bytes([self.charset])
        out += self.status.to_bytes(2, "little") + (caps.mysql_bits >> 16).to_bytes(2, "little")
        out.append(len(data) if Capability.PLUGIN_AUTH in caps else 0)
        out += b"\x00" * 6 + _capability_filler(caps)
        if Capability.SECURE_CONNECTION in caps:
            out += data[8:].ljust(13, b"\x00")
        if self.auth_plugin is not None:
            out += nul_bytes(wire(self.auth_plugin), "auth_plugin")
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes) -> Handshake:
        reader = Reader(payload, "the server's handshake", _HANDSHAKE)
        version = reader.int1()
        if version != PROTOCOL_VERSION:
            reader.fail(f"protocol version {version} is not 10 (a server older than 3.21?)")
        server_version = text(reader.nul_bytes())
        connection_id = reader.int4()
        part1 = reader.raw(8)
        reader.skip(1)
        low = reader.int2()
        if reader.at_end():
            reader.fail("the server does not speak protocol 4.1")
        charset, status, high = reader.int1(), reader.int2(), reader.int2()
        data_length = reader.int1()
        reader.skip(6)
        extended = reader.int4()
        caps = low | high << 16
        if not caps & CLIENT_MYSQL.value:
            caps |= extended << 32
        capabilities = Capability.of(caps)
        part2 = b""
        if Capability.SECURE_CONNECTION in capabilities:
            part2 = reader.raw(max(13, data_length - 8))
        plugin = None
        if Capability.PLUGIN_AUTH in capabilities:
            plugin = text(reader.nul_or_rest())
        reader.end()
        if Capability.PROTOCOL_41 not in capabilities:
            reader.fail("the server does not speak protocol 4.1")
        return cls(server_version=server_version, connection_id=connection_id,
                   auth_plugin_data=part1 + part2, capabilities=capabilities, charset=charset,
                   status=status, auth_plugin=plugin)


# --- the client's answer -----------------------------------------------------------


def _response_head(caps: Capability, max_packet_size: int, charset: int) -> bytes:
    return (caps.mysql_bits.to_bytes(4, "little") + max_packet_size.to_bytes(4, "little")
            + bytes([charset]) + b"\x00" * 19 + _capability_filler(caps))


@_frozen
class SSLRequest:
    """Protocol::SSLRequest: the first 32 bytes of a HandshakeResponse41,
    with CLIENT_SSL; the TLS handshake follows at once, no answer comes."""

    capabilities: Capability = attrs.field(converter=_caps)
    max_packet_size: int = attrs.field(default=1 << 24, validator=_uint(32))
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=_uint(8))

    def __attrs_post_init__(self) -> None:
        if Capability.SSL not in self.capabilities:
            invalid("an SSLRequest sets CLIENT_SSL")

    def encode(self) -> bytes:
        return _response_head(self.capabilities, self.max_packet_size, self.charset)


def _attributes(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    if value is not None:
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            invalid("attributes must map str to str")
    return _freeze(value)


@_frozen
class HandshakeResponse:
    """Protocol::HandshakeResponse41.

    A field whose capability flag is clear is None; one whose flag is set is
    never None once decoded (a field a client leaves off the end reads as
    empty, as servers read it). ``capabilities`` decide the auth response's
    encoding: length-encoded (PLUGIN_AUTH_LENENC_CLIENT_DATA), one length
    byte (SECURE_CONNECTION) or NUL-terminated."""

    capabilities: Capability = attrs.field(converter=_caps)
    max_packet_size: int = attrs.field(default=1 << 24, validator=_uint(32))
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=_uint(8))
    username: str = attrs.field(validator=_no_nul)
    auth_response: bytes = attrs.field(default=b"", repr=False)
    database: str | None = attrs.field(default=None, validator=_no_nul)
    auth_plugin: str | None = attrs.field(default=None, validator=_no_nul)
    attributes: Mapping[str, str] | None = attrs.field(
        default=None, converter=_attributes, hash=False,
        repr=lambda m: "None" if m is None else repr(dict(m)))
    zstd_level: int | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        caps = self.capabilities
        if Capability.PROTOCOL_41 not in caps:
            invalid("a HandshakeResponse41 sets CLIENT_PROTOCOL_41")
        for value, flag in ((self.database, Capability.CONNECT_WITH_DB),
                            (self.auth_plugin, Capability.PLUGIN_AUTH),
                            (self.attributes, Capability.CONNECT_ATTRS),
                            (self.zstd_level, Capability.ZSTD_COMPRESSION_ALGORITHM)):
            if value is not None and flag not in caps:
                invalid(f"a field needs {flag.name}, which the capabilities lack")
        if self.zstd_level is not None and not 0 <= self.zstd_level <= 255:
            invalid("zstd_level must be 0..255")
        data = self.auth_response
        if Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA not in caps:
            if Capability.SECURE_CONNECTION in caps and len(data) > 255:
                invalid("an auth response over 255 bytes needs PLUGIN_AUTH_LENENC_CLIENT_DATA")
            if Capability.SECURE_CONNECTION not in caps and b"\x00" in data:
                invalid("a NUL-terminated auth response cannot contain NUL")

    def encode(self) -> bytes:
        caps = self.capabilities
        out = bytearray(_response_head(caps, self.max_packet_size, self.charset))
        out += nul_bytes(wire(self.username))
        if Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA in caps:
            out += lenenc_bytes(self.auth_response)
        elif Capability.SECURE_CONNECTION in caps:
            out += bytes([len(self.auth_response)]) + self.auth_response
        else:
            out += self.auth_response + b"\x00"
        if Capability.CONNECT_WITH_DB in caps:
            out += nul_bytes(wire(self.database or ""))
        if Capability.PLUGIN_AUTH in caps:
            out += nul_bytes(wire(self.auth_plugin or ""))
        if Capability.CONNECT_ATTRS in caps:
            block = b"".join(lenenc_bytes(wire(k)) + lenenc_bytes(wire(v))
                             for k, v in (self.attributes or {}).items())
            if len(block) > MAX_ATTRIBUTES_LENGTH:
                invalid(f"connection attributes over {MAX_ATTRIBUTES_LENGTH} bytes")
            out += lenenc_bytes(block)
        if Capability.ZSTD_COMPRESSION_ALGORITHM in caps:
            out.append(self.zstd_level or 0)
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes) -> SSLRequest | HandshakeResponse:
        """Either answer a client may open with: an SSLRequest is exactly the
        32-byte head, with CLIENT_SSL."""
        reader = Reader(payload, "the client's handshake response", _HANDSHAKE)
        low = reader.int4()
        if not low & Capability.PROTOCOL_41.value:  # HandshakeResponse320
            reader.fail("the client does not speak protocol 4.1")
        max_packet_size, charset = reader.int4(), reader.int1()
        reader.skip(19)
        caps = Capability.of(low | reader.int4() << 32)
        if reader.at_end():
            if Capability.SSL not in caps:
                reader.fail("a 32-byte response that is not an SSLRequest")
            return SSLRequest(capabilities=caps, max_packet_size=max_packet_size,
                              charset=charset)
        username = text(reader.nul_bytes())
        if Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA in caps:
            auth = reader.lenenc_bytes()
        elif Capability.SECURE_CONNECTION in caps:
            auth = reader.raw(reader.int1())
        else:
            auth = reader.nul_bytes()
        database = plugin = attributes = zstd = None
        if Capability.CONNECT_WITH_DB in caps:
            database = text(reader.nul_or_rest())
        if Capability.PLUGIN_AUTH in caps:
            plugin = text(reader.nul_or_rest())
        if Capability.CONNECT_ATTRS in caps:
            attributes = {}
            if not reader.at_end():
                attributes = _decode_attributes(reader.lenenc_bytes())
        if Capability.ZSTD_COMPRESSION_ALGORITHM in caps:
            zstd = 0 if reader.at_end() else reader.int1()
        reader.end()
        try:
            return cls(capabilities=caps, max_packet_size=max_packet_size, charset=charset,
                       username=username, auth_response=auth, database=database,
                       auth_plugin=plugin, attributes=attributes, zstd_level=zstd)
        except LocalProtocolError as exc:  # the class's own checks, on peer data
            reader.fail(exc.message)


def _decode_attributes(block: bytes) -> dict[str, str]:
    if len(block) > MAX_ATTRIBUTES_LENGTH:
        Reader(b"", "the connection attributes", _HANDSHAKE).fail(
            f"over {MAX_ATTRIBUTES_LENGTH} bytes")
    reader = Reader(block, "the connection attributes", _HANDSHAKE)
    out: dict[str, str] = {}
    while not reader.at_end():
        key = text(reader.lenenc_bytes())
        out[key] = text(reader.lenenc_bytes())
    return out


# --- authentication exchange ---------------------------------------------------------


@_frozen
class AuthSwitchRequest:
    """Protocol::AuthSwitchRequest (0xFE): use ``plugin`` with ``data``."""

    plugin: str = attrs.field(validator=_no_nul)
    data: bytes = attrs.field(default=b"", repr=False)

    def encode(self) -> bytes:
        return b"\xfe" + nul_bytes(wire(self.plugin)) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> AuthSwitchRequest:
        reader = Reader(payload, "the AuthSwitchRequest", _HANDSHAKE)
        if reader.int1() != 0xFE:
            reader.fail("not an AuthSwitchRequest")
        if reader.at_end():
            reader.fail("an old-style switch to mysql_old_password, which is not supported")
        plugin = text(reader.nul_or_rest())
        return cls(plugin=plugin, data=reader.rest())


@_frozen
class AuthMoreData:
    """Protocol::AuthMoreData (0x01): more bytes for the current plugin."""

    data: bytes

    def encode(self) -> bytes:
        return b"\x01" + self.data

    @classmethod
    def decode(cls, payload: bytes) -> AuthMoreData:
        reader = Reader(payload, "the AuthMoreData", _HANDSHAKE)
        if reader.int1() != 0x01:
            reader.fail("not an AuthMoreData")
        return cls(data=reader.rest())


# --- generic responses ---------------------------------------------------------------


@_frozen
class OkPacket:
    """OK_Packet (0x00; 0xFE when it ends a result set under
    CLIENT_DEPRECATE_EOF). ``session_state`` is the raw session state
    information, present when ``status`` has SESSION_STATE_CHANGED."""

    affected_rows: int = attrs.field(default=0, validator=_uint(64))
    last_insert_id: int = attrs.field(default=0, validator=_uint(64))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=_uint(16))
    warnings: int = attrs.field(default=0, validator=_uint(16))
    info: bytes = b""
    session_state: bytes | None = None
    header: int = attrs.field(default=0x00)

    def __attrs_post_init__(self) -> None:
        if self.header not in (0x00, 0xFE):
            invalid("an OK packet's header is 0x00 or 0xFE")
        if (self.session_state is not None) != bool(
                self.status & ServerStatus.SESSION_STATE_CHANGED):
            invalid("session_state is given exactly when SESSION_STATE_CHANGED is set")

    def encode(self, capabilities: Capability) -> bytes:
        out = bytearray([self.header])
        out += lenenc_int(self.affected_rows) + lenenc_int(self.last_insert_id)
        out += self.status.to_bytes(2, "little") + self.warnings.to_bytes(2, "little")
        if Capability.SESSION_TRACK in capabilities:
            if self.info or self.session_state is not None:
                out += lenenc_bytes(self.info)
            if self.session_state is not None:
                out += lenenc_bytes(self.session_state)
        else:
            out += self.info
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes, capabilities: Capability) -> OkPacket:
        reader = Reader(payload, "the OK packet")
        header = reader.int1()
        if header not in (0x00, 0xFE):
            reader.fail("not an OK packet")
        affected, insert_id = reader.lenenc_int(), reader.lenenc_int()
        status, warnings = reader.int2(), reader.int2()
        state = None
        if Capability.SESSION_TRACK in capabilities:
            info = b"" if reader.at_end() else reader.lenenc_bytes()
            if status & ServerStatus.SESSION_STATE_CHANGED:
                state = reader.lenenc_bytes()
            reader.end()
        else:
            info = reader.rest()
            status &= ~ServerStatus.SESSION_STATE_CHANGED
        return cls(affected_rows=affected, last_insert_id=insert_id, status=status,
                   warnings=warnings, info=info, session_state=state, header=header)


@_frozen
class ErrPacket:
    """ERR_Packet (0xFF). ``sqlstate`` is None when the server left out the
    '#' marker (before PROTOCOL_41, or some early handshake errors)."""

    errno: int = attrs.field(validator=_uint(16))
    sqlstate: str | None = "HY000"
    message: str = ""

    def __attrs_post_init__(self) -> None:
        if self.sqlstate is not None and not (len(self.sqlstate) == 5 and
                                              self.sqlstate.isascii()):
            invalid("a SQLSTATE is 5 ASCII characters")
        if self.errno == 0xFFFF:
            invalid("error number 0xFFFF is MariaDB's progress report, not an error")

    @classmethod
    def of(cls, errno: int, message: str) -> ErrPacket:
        """An ERR with the SQLSTATE servers send with ``errno``."""
        return cls(errno=errno, sqlstate=SQLSTATE_OF.get(errno, "HY000"), message=message)

    def encode(self) -> bytes:
        marker = b"" if self.sqlstate is None else b"#" + self.sqlstate.encode("ascii")
        return b"\xff" + self.errno.to_bytes(2, "little") + marker + wire(self.message)

    @classmethod
    def decode(cls, payload: bytes) -> ErrPacket:
        reader = Reader(payload, "the ERR packet")
        if reader.int1() != 0xFF:
            reader.fail("not an ERR packet")
        errno = reader.int2()
        if errno == 0xFFFF:
            reader.fail("a progress report where an error was due")
        sqlstate = None
        if reader.peek() == 0x23:  # '#'
            reader.skip(1)
            raw = reader.raw(5)
            if not raw.isascii():
                reader.fail("the SQLSTATE is not ASCII")
            sqlstate = raw.decode("ascii")
        return cls(errno=errno, sqlstate=sqlstate, message=text(reader.rest()))


@_frozen
class EofPacket:
    """EOF_Packet (0xFE, under 9 bytes)."""

    warnings: int = attrs.field(default=0, validator=_uint(16))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=_uint(16))

    def encode(self) -> bytes:
        return b"\xfe" + self.warnings.to_bytes(2, "little") + self.status.to_bytes(2, "little")

    @classmethod
    def decode(cls, payload: bytes) -> EofPacket:
        if not is_eof(payload):
            Reader(payload, "the EOF packet").fail("not an EOF packet")
        reader = Reader(payload[1:], "the EOF packet")
        packet = cls(warnings=reader.int2(), status=reader.int2())
        reader.end()
        return packet


def is_eof(payload: bytes) -> bool:
    """0xFE in a packet under 9 bytes is an EOF (a longer one is a row or a
    length-encoded integer): the spec's own test."""
    return payload[:1] == b"\xfe" and len(payload) < 9
