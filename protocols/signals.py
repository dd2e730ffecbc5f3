"""What a sans-I/O object's ``next_event()`` returns when it has no event.

Every protocol in this package answers ``next_event()`` the h11 way: an
event, or one of these signals. There is one set for the whole package, so a
caller that drives several codecs (the relay engine runs mux frames, dial
frames and audit parsers in one loop) compares against one object, whatever
module it imported the name from.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

__all__ = ["Signal", "NEED_DATA", "PAUSED", "ConnectionClosed"]


class Signal(enum.Enum):
    """What next_event() returns when it has no event."""

    #: Feed more bytes (or EOF, ``b""``), then ask again.
    NEED_DATA = "NEED_DATA"
    #: Nothing more to parse for now: an answer is owed (an SSLRequest's
    #: one byte, say), or the framed phase is over and what follows is
    #: ``trailing_data`` for whatever comes next.
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


NEED_DATA: Final = Signal.NEED_DATA
PAUSED: Final = Signal.PAUSED


@attrs.frozen(kw_only=True)
class ConnectionClosed:
    """The peer hung up (EOF). ``clean`` is False when that cut a message in
    half (parsers that treat a half message as an error raise instead)."""

    clean: bool = True
