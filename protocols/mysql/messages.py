"""The connection-phase messages (OK, ERR and EOF are :mod:`.generic`).

Spec: MySQL Source Code Documentation, "Client/Server Protocol":
Connection Phase Packets (Protocol::HandshakeV10, Protocol::SSLRequest,
Protocol::HandshakeResponse41, Protocol::AuthSwitchRequest,
Protocol::AuthMoreData); MariaDB Server docs, "Connection" (the extended
capabilities in the filler bytes).

Each message is a small frozen class with ``encode(...)`` returning its
payload (packets and sequence ids are :mod:`.packets`' business) and a
``decode(payload, ...)`` class method. Layouts that depend on capability
flags take them as an argument: what the *peer* said it can do, or what
both agreed. A bad message cannot be built (LocalProtocolError); a bad one
received is a RemoteProtocolError whose wire hint is ER_HANDSHAKE_ERROR
(1043). Text is decoded as :mod:`.fields` says (lossless).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import attrs

from protocols.errors import LocalProtocolError
from protocols.mysql.constants import (
    CLIENT_MYSQL, DEFAULT_CHARSET, Capability, ErrorNumber, ServerStatus,
)
from protocols.mysql.fields import frozen, no_nul, text, to_capabilities, uint, wire
from protocols.mysql.packets import Reader, invalid, lenenc_bytes, nul_bytes

__all__ = [
    "PROTOCOL_VERSION", "MAX_ATTRIBUTES_LENGTH", "Handshake", "SSLRequest",
    "HandshakeResponse", "AuthSwitchRequest", "AuthMoreData", "ServerInfo", "StartTLS",
]

PROTOCOL_VERSION: Final = 10
#: The server's bound on the connection attributes block (64 KiB).
MAX_ATTRIBUTES_LENGTH: Final = 65536
_HANDSHAKE: Final = ErrorNumber.ER_HANDSHAKE_ERROR
_SSL_REQUEST_SIZE: Final = 32
def _freeze(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    return None if value is None else MappingProxyType(dict(value))


def _capability_filler(caps: Capability) -> bytes:
    # MariaDB: with CLIENT_MYSQL clear, the filler's last 4 bytes are the
    # extended capabilities; a MySQL peer sends zeros there.
    return caps.mariadb_bits.to_bytes(4, "little")


# --- the server's greeting ---------------------------------------------------------


@frozen
class StartTLS:
    """An event both roles hand out: switch this connection to TLS now.

    Client role (:mod:`.client`): send ``data_to_send()`` (the SSLRequest),
    run the TLS handshake, then call ``tls_started()``. Server role
    (:mod:`.server`): the client sent an SSLRequest and is already sending
    its ClientHello; call ``start_tls()`` for the bytes received so far and
    run the TLS handshake as the server. No answer precedes TLS in MySQL."""


@frozen
class ServerInfo:
    """What a server says of itself in its handshake, minus the nonce: the
    upstream's values the gateway repeats to its clients (GUI tools and
    ORMs switch behaviour on the version string)."""

    server_version: str = attrs.field(validator=no_nul)
    capabilities: Capability = attrs.field(converter=to_capabilities)
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=uint(8))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=uint(16))
    connection_id: int = attrs.field(default=0, validator=uint(32))
    #: The plugin the greeting names (mysql_native_password, or MySQL 8's
    #: caching_sha2_password), None when the server has no PLUGIN_AUTH.
    auth_plugin: str | None = attrs.field(default=None, validator=no_nul)


@frozen
class Handshake:
    """Protocol::HandshakeV10, the server's first packet.

    ``auth_plugin_data`` is both parts of the plugin data as sent (a 20-byte
    scramble and MySQL's NUL); :attr:`scramble` is the nonce without it."""

    server_version: str = attrs.field(validator=no_nul)
    connection_id: int = attrs.field(validator=uint(32))
    auth_plugin_data: bytes = attrs.field(repr=False)
    capabilities: Capability = attrs.field(converter=to_capabilities)
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=uint(8))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=uint(16))
    auth_plugin: str | None = attrs.field(default="mysql_native_password", validator=no_nul)

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
                          connection_id=self.connection_id, auth_plugin=self.auth_plugin)

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


@frozen
class SSLRequest:
    """Protocol::SSLRequest: the first 32 bytes of a HandshakeResponse41,
    with CLIENT_SSL; the TLS handshake follows at once, no answer comes."""

    capabilities: Capability = attrs.field(converter=to_capabilities)
    max_packet_size: int = attrs.field(default=1 << 24, validator=uint(32))
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=uint(8))

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


@frozen
class HandshakeResponse:
    """Protocol::HandshakeResponse41.

    A field whose capability flag is clear is None; one whose flag is set is
    never None once decoded (a field a client leaves off the end reads as
    empty, as servers read it). ``capabilities`` decide the auth response's
    encoding: length-encoded (PLUGIN_AUTH_LENENC_CLIENT_DATA), one length
    byte (SECURE_CONNECTION) or NUL-terminated."""

    capabilities: Capability = attrs.field(converter=to_capabilities)
    max_packet_size: int = attrs.field(default=1 << 24, validator=uint(32))
    charset: int = attrs.field(default=DEFAULT_CHARSET, validator=uint(8))
    username: str = attrs.field(validator=no_nul)
    auth_response: bytes = attrs.field(default=b"", repr=False)
    database: str | None = attrs.field(default=None, validator=no_nul)
    auth_plugin: str | None = attrs.field(default=None, validator=no_nul)
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


@frozen
class AuthSwitchRequest:
    """Protocol::AuthSwitchRequest (0xFE): use ``plugin`` with ``data``."""

    plugin: str = attrs.field(validator=no_nul)
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


@frozen
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
