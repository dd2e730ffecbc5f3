"""The untyped packets of the startup phase (the frontend's first words).

Spec: PostgreSQL docs, "Frontend/Backend Protocol", "Message Flow": Start-up,
SSL Session Encryption, GSSAPI Session Encryption, Canceling Requests in
Progress; "Message Formats": StartupMessage, SSLRequest, GSSENCRequest,
CancelRequest::

    untyped  := length:Int32 | code:Int32 | payload

``length`` counts itself; ``code`` is a protocol version (3.0 for a
StartupMessage) or one of the special request codes below.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Union

import attrs

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.postgres.messages.fields import (
    II, U32, UINT32, Reader, check_bytes, cstr, frozen, int_range, invalid, malformed, map_field,
)
from protocols.postgres.messages.sqlstate import SqlState

__all__ = [
    "PROTOCOL_3_0", "SSL_REQUEST_CODE", "GSSENC_REQUEST_CODE", "CANCEL_REQUEST_CODE",
    "MAX_STARTUP_PACKET", "MIN_CANCEL_KEY", "MAX_CANCEL_KEY",
    "SSLRequest", "GSSENCRequest", "CancelRequest", "StartupMessage", "StartupPacket",
    "decode_startup_packet", "parse_ssl_answer", "replication_requested",
]

PROTOCOL_3_0: Final = 3 << 16  # 196608: major 3, minor 0
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679  # 80877103
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680  # 80877104
CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678  # 80877102
# The server's own bound on the first packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10000
# Protocol 3.2 (PostgreSQL 18) made the cancel key variable: 4..256 bytes.
# Under 3.0 it is exactly 4, but accepting longer ones costs nothing.
MIN_CANCEL_KEY: Final = 4
MAX_CANCEL_KEY: Final = 256


@frozen
class SSLRequest:
    """Frontend: may I switch to TLS? The answer is one byte, S or N."""

    def encode(self) -> bytes:
        return II.pack(8, SSL_REQUEST_CODE)


@frozen
class GSSENCRequest:
    """Frontend: may I switch to GSSAPI encryption? Wicket always says N."""

    def encode(self) -> bytes:
        return II.pack(8, GSSENC_REQUEST_CODE)


@frozen
class CancelRequest:
    """Frontend, on a fresh connection: cancel what backend ``process_id`` runs."""

    process_id: int = attrs.field(validator=UINT32)
    secret_key: bytes = attrs.field(validator=check_bytes, repr=False)

    def __attrs_post_init__(self) -> None:
        if not MIN_CANCEL_KEY <= len(self.secret_key) <= MAX_CANCEL_KEY:
            invalid(f"secret_key must be {MIN_CANCEL_KEY}..{MAX_CANCEL_KEY} bytes long")

    def encode(self) -> bytes:
        return (II.pack(12 + len(self.secret_key), CANCEL_REQUEST_CODE)
                + U32.pack(self.process_id) + self.secret_key)


def _check_startup_params(inst: StartupMessage, _attr: object, value: Mapping[str, str]) -> None:
    # "user" is the one parameter the server insists on.
    if not value.get("user"):
        invalid("a StartupMessage needs a non-empty 'user' parameter")


@frozen
class StartupMessage:
    """Frontend: the first real packet, with the protocol version and the
    session parameters (``user``, ``database``, ``application_name``, ``options``,
    ``replication``, any run-time setting, and ``_pq_.*`` protocol options)."""

    parameters: Mapping[str, str] = map_field(validator=_check_startup_params)
    major: int = attrs.field(default=3, validator=int_range(0, 0xFFFF))
    minor: int = attrs.field(default=0, validator=int_range(0, 0xFFFF))

    @property
    def user(self) -> str:
        return self.parameters["user"]

    @property
    def database(self) -> str:
        """The database, which defaults to the user name (as the server does)."""
        return self.parameters.get("database") or self.user

    @property
    def application_name(self) -> str | None:
        return self.parameters.get("application_name")

    @property
    def options(self) -> str | None:
        """Command-line style options for the backend (``-c name=value``)."""
        return self.parameters.get("options")

    @property
    def replication(self) -> str | None:
        """``true``/``database``/... for a replication connection, else None."""
        return self.parameters.get("replication")

    @property
    def wants_replication(self) -> bool:
        return replication_requested(self.replication)

    @property
    def protocol_options(self) -> Mapping[str, str]:
        """The ``_pq_.*`` protocol extensions asked for (we support none)."""
        return MappingProxyType({k: v for k, v in self.parameters.items()
                                 if k.startswith("_pq_.")})

    def encode(self) -> bytes:
        body = bytearray(U32.pack((self.major << 16) | self.minor))
        for key, value in self.parameters.items():
            body += cstr(key) + cstr(value)
        body += b"\x00"
        if 4 + len(body) > MAX_STARTUP_PACKET:
            invalid(f"the StartupMessage would be {4 + len(body)} bytes; "
                     f"servers accept at most {MAX_STARTUP_PACKET}")
        return U32.pack(4 + len(body)) + bytes(body)


StartupPacket = Union[SSLRequest, GSSENCRequest, CancelRequest, StartupMessage]


def decode_startup_packet(payload: bytes) -> StartupPacket:
    """Decode the untyped first packet; ``payload`` follows the length field.

    Raises RemoteProtocolError: 08P01 if malformed, 0A000
    (``UNSUPPORTED_VERSION``) for a protocol other than 3.x, 28000 when the
    StartupMessage names no user.
    """
    if len(payload) < 4:
        malformed("invalid length of startup packet")
    (code,) = U32.unpack_from(payload)
    major, minor = code >> 16, code & 0xFFFF
    rest = payload[4:]
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if rest:
            malformed("invalid length of an SSLRequest or GSSENCRequest")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if not 4 + MIN_CANCEL_KEY <= len(rest) <= 4 + MAX_CANCEL_KEY:
            malformed("invalid length of a CancelRequest")
        (pid,) = U32.unpack_from(rest)
        return CancelRequest(process_id=pid, secret_key=rest[4:])
    if major != 3:
        raise RemoteProtocolError(
            f"unsupported frontend protocol {major}.{minor}: Wicket supports 3.0",
            code=ErrorCode.UNSUPPORTED_VERSION, wire_hint=SqlState.FEATURE_NOT_SUPPORTED,
        )
    reader = Reader(rest, "the StartupMessage")
    params: dict[str, str] = {}
    while True:
        name = reader.text()
        if not name:  # an empty name ends the list, and the packet
            break
        value = reader.text()
        if name in params:
            # Two readers that pick different duplicates (RBAC and the real
            # server, say) is how one request comes to mean two things.
            malformed("the StartupMessage repeats a parameter")
        params[name] = value
    if not reader.at_end():
        malformed("invalid startup packet layout: expected terminator as last byte")
    if not params.get("user"):
        raise RemoteProtocolError(
            "no PostgreSQL user name specified in startup packet",
            code=ErrorCode.ACCESS_DENIED, wire_hint=SqlState.INVALID_AUTHORIZATION,
        )
    return StartupMessage(parameters=params, major=major, minor=minor)


def parse_ssl_answer(answer: bytes, *, gssenc: bool = False) -> bool:
    """The server's one-byte reply to our SSLRequest (S or N), or with
    ``gssenc`` to our GSSENCRequest (G or N): True to go ahead. Anything else
    (an ErrorResponse, say) is a RemoteProtocolError. The caller must read
    exactly one byte: a byte more would be unencrypted data smuggled in ahead
    of the handshake (CVE-2021-23222)."""
    if answer == (b"G" if gssenc else b"S"):
        return True
    if answer == b"N":
        return False
    malformed("the server did not answer the encryption request as the protocol says")


def replication_requested(value: str | None) -> bool:
    """Whether a ``replication`` startup parameter asks for a replication
    connection (PostgreSQL reads false/off/no/0 as an ordinary one)."""
    return value is not None and value.lower() not in ("false", "off", "no", "0")
