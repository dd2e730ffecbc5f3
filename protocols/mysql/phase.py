"""What both roles of the connection phase share (:mod:`.client` logging in
upstream, :mod:`.server` greeting a local client): one bounded receive
buffer, one :class:`~.packets.PacketChannel` (the phase is one exchange, so
one sequence counter serves both directions), an outbox drained by
``data_to_send()``, a state, and poisoning: after a RemoteProtocolError
every ``next_event()`` raises it again."""

from __future__ import annotations

import enum
from typing import ClassVar, Generic, NoReturn, TypeVar

from protocols.buffer import BufferedReceiver, ReceiveBuffer
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mysql.packets import PacketChannel

__all__ = ["ConnectionPhase"]

StateT = TypeVar("StateT", bound=enum.Enum)


class ConnectionPhase(BufferedReceiver, Generic[StateT]):
    """The plumbing of a connection-phase state machine; the subclass names
    its ``_DONE`` and ``_ERROR`` states."""

    _DONE: ClassVar[enum.Enum]
    _ERROR: ClassVar[enum.Enum]

    def __init__(self, state: StateT, *, max_message_size: int, peer: str) -> None:
        self._channel = PacketChannel(max_packet=max_message_size, what=peer)
        # Unparsed bytes: a couple of messages at most.
        self._buffer = ReceiveBuffer(2 * (max_message_size + 4))
        self._outbox = bytearray()
        self._state = state
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def state(self) -> StateT:
        return self._state

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def _send(self, payload: bytes) -> None:
        self._outbox += self._channel.write(payload)

    def _poison(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._state = self._ERROR  # type: ignore[assignment]

    def _raise_if_poisoned(self) -> None:
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint) from err

    def _poison_and_raise(self, exc: RemoteProtocolError) -> NoReturn:
        self._poison(exc)
        raise exc

    def _expect(self, state: StateT, call: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"{call}() is not allowed in state {self._state.name}")

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes the peer sent after the connection phase (the session's
        first, to relay), and whether EOF was seen."""
        if self._state is not self._DONE:
            raise LocalProtocolError("no trailing data before the connection phase is over")
        return self._buffer.peek(len(self._buffer)) or b"", self._eof
