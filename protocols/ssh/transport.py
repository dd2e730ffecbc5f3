"""The plaintext start of an SSH connection, read for the server's host key.

Theory of operation
-------------------
An SSH connection starts in the clear (RFC 4253): each side sends a
version line (§4.2; a server may send other lines first), then binary
packets without encryption or MAC (§6) until NEWKEYS: each side's KEXINIT
(§7.1) lists its key exchange methods, the client's first one the server
also lists is the method (§7.1), and the server's reply to the client's
key exchange message carries the server's public host key, ``K_S``, as its
first field: SSH_MSG_KEXDH_REPLY / SSH_MSG_KEX_ECDH_REPLY (31; RFC 4253
§8, RFC 5656 §4, and the hybrid post-quantum methods) or, for the group
exchange, SSH_MSG_KEX_DH_GEX_REPLY (33; RFC 4419 §3, where 31 is the
group).

:class:`KexWatcher` is fed both directions as they are relayed and yields
:class:`HostKeySeen` once, before the reply is forwarded: the cluster
compares ``K_S`` with the node's registered host key (or checks the
certificate it is against the host CA) and cuts the stream on a mismatch,
so a client never gets to talk to an impostor. The signature over the
exchange hash, which proves the server holds the key, is the SSH
client's to check (the cluster has no share of the secret); the two checks
together are the node's proof. Nothing is kept once the key is seen; the
rest of the stream (encrypted) is not looked at.

Bounds: a version line is at most 255 bytes (§4.2), a server sends at most
:data:`MAX_PRELUDE_LINES` lines before it, a packet is at most
:data:`MAX_PACKET` bytes (OpenSSH's own limit); anything else is a
:class:`RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.framing import FrameLayout, FrameSplitter

MAX_LINE: Final = 255
MAX_PRELUDE_LINES: Final = 32
MAX_PACKET: Final = 256 * 1024

#: uint32 packet_length (what follows it), byte padding_length (RFC 4253 §6).
SSH_PACKET: Final = FrameLayout(name="SSH packet", header=">IB", length_field=0, kind_field=1, uncounted=4,
                                min_length=5, max_length=MAX_PACKET, wire_hint="protocol_error")

MSG_DISCONNECT: Final = 1
MSG_KEXINIT: Final = 20
MSG_NEWKEYS: Final = 21
MSG_KEX_REPLY: Final = 31  # KEXDH_REPLY, KEX_ECDH_REPLY (and GEX's GROUP)
MSG_KEX_DH_GEX_REPLY: Final = 33

#: Key exchange methods whose server reply is message 31 (RFC 4253 §8,
#: RFC 5656 §4, RFC 8731, RFC 9142, and OpenSSH's hybrid methods), by prefix.
_REPLY_31: Final = ("curve25519-sha256", "curve448-sha512", "ecdh-sha2-", "diffie-hellman-group1-sha1",
                    "diffie-hellman-group14-", "diffie-hellman-group15-", "diffie-hellman-group16-",
                    "diffie-hellman-group17-", "diffie-hellman-group18-", "sntrup761x25519-sha512",
                    "mlkem768x25519-sha256", "mlkem768nistp256-sha256", "mlkem1024nistp384-sha384")
_GEX: Final = "diffie-hellman-group-exchange-"


def _error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=ErrorCode.BAD_REQUEST, wire_hint="protocol_error")


@attrs.frozen(slots=True, kw_only=True)
class HostKeySeen:
    """The server's host key blob (``K_S``: an SSH public key or host
    certificate in wire form) and the key exchange it came with."""

    blob: bytes
    kex: str
    server_version: str


def _string(payload: bytes, offset: int) -> tuple[bytes, int]:
    """An SSH ``string`` (RFC 4251 §5) at ``offset``: its bytes and the offset after it."""
    if offset + 4 > len(payload):
        raise _error("SSH string runs past its packet")
    (n,) = struct.unpack_from(">I", payload, offset)
    end = offset + 4 + n
    if end > len(payload):
        raise _error("SSH string runs past its packet")
    return payload[offset + 4:end], end


def kex_methods(payload: bytes) -> list[str]:
    """The kex_algorithms name-list of a KEXINIT payload (type byte included)."""
    names, _ = _string(payload, 1 + 16)
    try:
        text = names.decode("ascii")
    except UnicodeDecodeError:
        raise _error("KEXINIT name-list is not ASCII") from None
    return [n for n in text.split(",") if n]


def reply_message(kex: str) -> int:
    """Which server message carries K_S for key exchange method ``kex``."""
    if kex.startswith(_GEX):
        return MSG_KEX_DH_GEX_REPLY
    if kex.startswith(_REPLY_31):
        return MSG_KEX_REPLY
    raise _error(f"key exchange method {kex[:64]!r} is not one whose host key Wicket can check")


class KexWatcher:
    """See the module docstring. Feed :meth:`client_data` and
    :meth:`server_data` with every chunk relayed each way (before it is
    forwarded); :meth:`server_data` returns a :class:`HostKeySeen` once.
    ``done`` is then true and further bytes are not looked at."""

    def __init__(self) -> None:
        self._client = _Reader("client", prelude_allowed=False)
        self._server = _Reader("server", prelude_allowed=True)
        self._client_kex: list[str] | None = None
        self._server_kex: list[str] | None = None
        self.done = False
        self.seen: HostKeySeen | None = None

    def client_data(self, data: bytes) -> None:
        if self.done or self._client_kex is not None:
            return  # all it needs of the client is its KEXINIT
        for payload in self._client.feed(data):
            if payload[0] == MSG_KEXINIT:
                self._client_kex = kex_methods(payload)
                return

    def server_data(self, data: bytes) -> HostKeySeen | None:
        if self.done:
            return None
        for payload in self._server.feed(data):
            kind = payload[0]
            if kind == MSG_KEXINIT:
                if self._server_kex is not None:
                    raise _error("a second KEXINIT before the host key")
                self._server_kex = kex_methods(payload)
            elif kind == MSG_DISCONNECT or kind == MSG_NEWKEYS:
                # Gone, or keys changed without a reply we know: nothing to see.
                raise _error("the server ended the key exchange before sending its host key")
            elif kind in (MSG_KEX_REPLY, MSG_KEX_DH_GEX_REPLY) and self._server_kex is not None:
                kex = self.kex()
                if kind != reply_message(kex):
                    continue  # GEX's group (31) before its reply (33)
                blob, _ = _string(payload, 1)
                self.done = True
                self.seen = HostKeySeen(blob=blob, kex=kex, server_version=self._server.version or "")
                return self.seen
        return None

    def kex(self) -> str:
        """The key exchange method both KEXINITs agree on (RFC 4253 §7.1)."""
        if self._client_kex is None or self._server_kex is None:
            raise _error("a key exchange reply before both sides' KEXINIT")
        offered = set(self._server_kex)
        for name in self._client_kex:
            if name in offered:
                return name
        raise _error("the two sides share no key exchange method")


class _Reader:
    """One direction of the plaintext start: its version line (and, for a
    server, the lines before it), then binary packets as payloads."""

    def __init__(self, name: str, *, prelude_allowed: bool) -> None:
        self.name = name
        self.buffer = ReceiveBuffer(MAX_PACKET + 8)
        self.splitter = FrameSplitter(SSH_PACKET)
        self.version: str | None = None
        self.prelude_left = MAX_PRELUDE_LINES if prelude_allowed else 0

    def feed(self, data: bytes):
        """The payloads (type byte first) of the packets ``data`` completes."""
        self.buffer.feed(data)
        while self.version is None:
            line = self._line()
            if line is None:
                return
            if line.startswith(b"SSH-"):
                if not line.startswith(b"SSH-2.0-") and not line.startswith(b"SSH-1.99-"):
                    raise _error(f"the {self.name} speaks {line[:16]!r}, not SSH 2.0")
                self.version = line.decode("ascii", "replace")
            elif self.prelude_left:
                self.prelude_left -= 1
            else:
                raise _error(f"the {self.name} sent no SSH version line")
        while True:
            frame = self.splitter.read_frame(self.buffer)
            if frame is None:
                return
            packet_length = frame.body_length + 1  # the padding_length byte is in the header
            padding = frame.kind  # padding_length
            payload_length = packet_length - 1 - padding
            if padding < 4 or payload_length < 1:
                raise _error(f"{self.name} SSH packet with {padding} bytes of padding in {packet_length}")
            yield frame.body[:payload_length]

    def _line(self) -> bytes | None:
        """The next line without its CR LF (or LF), or None while incomplete."""
        head = self.buffer.peek(min(len(self.buffer), MAX_LINE))
        if head is None:
            return None
        end = head.find(b"\n")
        if end < 0:
            if len(head) >= MAX_LINE:
                raise _error(f"the {self.name}'s version line is longer than {MAX_LINE} bytes")
            return None
        self.buffer.consume_exactly(end + 1)
        self.buffer.commit()
        return head[:end].rstrip(b"\r")
