"""What every codec test here shares: the three ways a case is fed (whole,
one byte at a time, and whole with trailing data behind it), and hypothesis
settings that do not vary from run to run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import settings

from protocols.errors import RemoteProtocolError
from protocols.signals import NEED_DATA, ConnectionClosed

#: Deterministic and without a database: a failure shows again on the next run.
fuzz = settings(derandomize=True, database=None, deadline=None, max_examples=300)

FEEDS = ("whole", "bytewise")


def split(data: bytes, how: str) -> list[bytes]:
    """``data`` as the chunks a feed of kind ``how`` delivers (no empty chunk:
    ``b""`` means EOF)."""
    if how == "whole":
        return [data] if data else []
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    raise AssertionError(how)


def malformed(fn: Callable[..., object], *args: object) -> RemoteProtocolError:
    """The RemoteProtocolError ``fn(*args)`` raises (the test fails if none)."""
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    return info.value


def pump(receiver: Any, chunks: Iterable[bytes]) -> list[object]:
    """Feed each chunk to ``receiver`` (anything with receive_data and
    next_event), draining next_event() after each; the events, up to and
    including a ConnectionClosed."""
    events: list[object] = []
    for chunk in chunks:
        receiver.receive_data(chunk)
        while (event := receiver.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
    return events
