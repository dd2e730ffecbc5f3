"""protocols.mysql.phase: the plumbing both connection-phase roles share,
through a minimal subclass."""

from __future__ import annotations

import enum

import pytest

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mysql.phase import ConnectionPhase
from tests.unit.protocols.feeding import malformed


class _S(enum.Enum):
    BUSY = "BUSY"
    DONE = "DONE"
    ERROR = "ERROR"


class Echo(ConnectionPhase[_S]):
    _DONE = _S.DONE
    _ERROR = _S.ERROR

    def __init__(self) -> None:
        super().__init__(_S.BUSY, max_message_size=8, peer="peer")

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        self._poison(exc)

    def step(self) -> bytes | None:
        self._raise_if_poisoned()
        payload = self._channel.read(self._buffer)
        if payload is not None:
            self._send(payload)
            self._state = _S.DONE
        return payload


def test_outbox_sequence_and_trailing_data() -> None:
    echo = Echo()
    with pytest.raises(LocalProtocolError):
        _ = echo.trailing_data
    with pytest.raises(LocalProtocolError):
        echo._expect(_S.DONE, "finish")
    echo.receive_data(b"\x02\x00\x00\x00hi" + b"more")
    assert echo.step() == b"hi" and echo.state is _S.DONE
    assert echo.data_to_send() == b"\x02\x00\x00\x01hi" and echo.data_to_send() == b""
    assert echo.trailing_data == (b"more", False)


def test_poisoned_stays_poisoned() -> None:
    echo = Echo()
    echo.receive_data(b"\x00" * 40)  # over the buffer's bound
    assert echo.state is _S.ERROR
    first = malformed(echo.step)
    assert malformed(echo.step).message == first.message
    with pytest.raises(RemoteProtocolError):
        echo._poison_and_raise(RemoteProtocolError("again"))
