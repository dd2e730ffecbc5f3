"""The hand-off frame: what the cluster gives the gateway before a
terminated SSH session's first byte from the node.

In terminated mode the gateway is the SSH client to the node. It puts a
public key of a key pair it keeps in memory on the dial
(``ssh.public_key``); the cluster signs it as a user certificate for the
dial's login only, and sends, right behind its accept and before the
node's bytes, one frame::

    length:u32be   JSON: {"v": 1, "certificate": "ssh-ed25519-cert-v01@openssh.com AAAA...",
                          "host": "web-1.prod", "known_hosts": ["web-1.prod ssh-ed25519 AAAA..."]}

``host`` is the name the known_hosts lines are for; ``agent_forwarding``
(optional, false when absent) says whether the user's roles let ``ssh -A``
reach the node (the certificate then carries ``permit-agent-forwarding``).
Everything after the frame is the node's SSH stream. The version rule is the dial's
(docs/wire.md): a reader refuses a ``v`` it does not know; additions old
readers may ignore are new keys within the same version.
"""

from __future__ import annotations

import json
import struct
from typing import Final

import attrs

from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.framing import FrameLayout, FrameSplitter
from protocols.signals import NEED_DATA

HANDOFF_VERSION: Final = 1
#: A certificate with 256 principals and a handful of host keys fit well.
MAX_HANDOFF: Final = 64 * 1024
MAX_KNOWN_HOSTS: Final = 64

HANDOFF_FRAME: Final = FrameLayout(name="ssh hand-off frame", header=">I", length_field=0, uncounted=4,
                                   min_length=2, max_length=MAX_HANDOFF)


def _lines(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_KNOWN_HOSTS \
            or not all(isinstance(v, str) and v and "\n" not in v for v in value):
        raise ValueError(f"known_hosts must be a list of at most {MAX_KNOWN_HOSTS} single lines")
    return tuple(value)


def _line(value: object) -> str:
    if not isinstance(value, str) or not value or "\n" in value or "\r" in value:
        raise ValueError("expected one non-empty line")
    return value


@attrs.frozen(slots=True, kw_only=True)
class Handoff:
    certificate: str = attrs.field(converter=_line)
    host: str = attrs.field(converter=_line)
    known_hosts: tuple[str, ...] = attrs.field(converter=_lines)
    agent_forwarding: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


def encode_handoff(handoff: Handoff) -> bytes:
    body = json.dumps({"v": HANDOFF_VERSION, "certificate": handoff.certificate, "host": handoff.host,
                       "known_hosts": list(handoff.known_hosts), "agent_forwarding": handoff.agent_forwarding},
                      separators=(",", ":")).encode()
    if len(body) > MAX_HANDOFF:
        raise LocalProtocolError(f"hand-off frame of {len(body)} bytes exceeds {MAX_HANDOFF}")
    return struct.pack(">I", len(body)) + body


class HandoffReader:
    """Reads the one hand-off frame: feed bytes with :meth:`receive_data`,
    then :meth:`next_event` is the :class:`Handoff` (or ``NEED_DATA``);
    ``trailing_data`` is what came after it (the node's first bytes)."""

    def __init__(self) -> None:
        self._buffer = ReceiveBuffer(MAX_HANDOFF + 4)
        self._splitter = FrameSplitter(HANDOFF_FRAME)
        self._done: Handoff | None = None

    def receive_data(self, data: bytes) -> None:
        if self._done is not None:
            raise LocalProtocolError("the hand-off frame was read already; the rest is trailing_data")
        if not data:
            raise RemoteProtocolError("the stream ended before the cluster's hand-off frame",
                                      code=ErrorCode.BAD_REQUEST)
        self._buffer.feed(data)

    def next_event(self) -> Handoff | object:
        if self._done is not None:
            return self._done
        frame = self._splitter.read_frame(self._buffer)
        if frame is None:
            return NEED_DATA
        try:
            doc = json.loads(frame.body)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            if doc.get("v") != HANDOFF_VERSION:
                raise RemoteProtocolError(f"hand-off frame version {doc.get('v')!r} is not {HANDOFF_VERSION}: "
                                          f"upgrade wicket", code=ErrorCode.UNSUPPORTED_VERSION)
            self._done = Handoff(certificate=doc.get("certificate"), host=doc.get("host"),
                                 known_hosts=doc.get("known_hosts"),
                                 agent_forwarding=doc.get("agent_forwarding", False))
        except RemoteProtocolError:
            raise
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(f"malformed hand-off frame: {exc}", code=ErrorCode.BAD_REQUEST) from None
        return self._done

    def needed(self) -> int:
        """How many more bytes complete the frame (0 once it is read), so a
        reader of a socket can take exactly those and leave the node's bytes
        where they are."""
        if self._done is not None:
            return 0
        head = self._buffer.peek(4)
        if head is None:
            return 4 - len(self._buffer)
        size = HANDOFF_FRAME.frame_size(HANDOFF_FRAME.length_of(head), MAX_HANDOFF)
        return max(0, size - len(self._buffer))

    @property
    def trailing_data(self) -> bytes:
        """What came after the frame (only once it was read)."""
        if self._done is None:
            raise LocalProtocolError("the hand-off frame has not been read yet")
        rest = self._buffer.consume_exactly(len(self._buffer)) if self._buffer else b""
        self._buffer.commit()
        return bytes(rest or b"")
