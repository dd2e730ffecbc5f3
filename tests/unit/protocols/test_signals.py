"""protocols.signals: one NEED_DATA, PAUSED and ConnectionClosed for every codec."""

from __future__ import annotations

import protocols
from protocols import dial, mux, signals
from protocols.postgres import frontend, messages, scram
import protocols.postgres as postgres


def test_every_module_hands_out_the_same_objects() -> None:
    for module in (protocols, dial, mux, postgres, messages, frontend, scram):
        assert getattr(module, "NEED_DATA") is signals.NEED_DATA, module.__name__
    for module in (protocols, dial, postgres, messages, frontend, scram):
        assert getattr(module, "PAUSED") is signals.PAUSED, module.__name__
        assert getattr(module, "Signal") is signals.Signal, module.__name__
    for module in (protocols, postgres, messages):
        assert getattr(module, "ConnectionClosed") is signals.ConnectionClosed


def test_signals_print_their_names() -> None:
    assert repr(signals.NEED_DATA) == str(signals.NEED_DATA) == "NEED_DATA"
    assert repr(signals.PAUSED) == "PAUSED"


def test_connection_closed_is_clean_unless_told() -> None:
    assert signals.ConnectionClosed().clean
    assert not signals.ConnectionClosed(clean=False).clean
    assert signals.ConnectionClosed() == signals.ConnectionClosed(clean=True)
