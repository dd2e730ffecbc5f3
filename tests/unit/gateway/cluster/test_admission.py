"""gateway/cluster/admission.py: connections per address before they
authenticate, capped, with one log line per episode."""

from __future__ import annotations

import logging

from gateway.cluster.admission import AddressSlots


def test_an_address_at_its_cap_is_refused_and_others_are_not(caplog):
    slots = AddressSlots(limit=2)
    held = [slots.take("192.0.2.1"), slots.take("192.0.2.1")]
    with caplog.at_level(logging.INFO, logger="wicket.cluster"):
        assert slots.take("192.0.2.1") is None and slots.take("192.0.2.1") is None
        assert slots.take("192.0.2.2") is not None
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # once per episode
        held[0].release()
        held[0].release()  # idempotent: an authenticated connection releases early, then ends
        assert slots.held("192.0.2.1") == 1
        again = slots.take("192.0.2.1")
        assert again is not None
        again.release()
        held[1].release()
    assert slots.held("192.0.2.1") == 0
    assert "connections_refused_ended client_host=192.0.2.1 refused=2" in caplog.text
