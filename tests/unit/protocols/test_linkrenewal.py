"""The link renewal's dials (protocols/linkrenewal.py): round trips through
the dial frame, the certificate in pieces, and what a malformed renewal
gets."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from protocols import linkrenewal as lr
from protocols.dial import MAX_PARAM_VALUE, DialConnection, DialRequest, Role, decode_event, encode_event
from protocols.signals import NEED_DATA

NONCE = bytes(range(32))


def through_the_wire(request: DialRequest) -> DialRequest:
    """As the cluster reads it: encoded, then fed one byte at a time."""
    conn = DialConnection(Role.SERVER)
    for byte in encode_event(request):
        conn.receive_data(bytes([byte]))
    event = conn.next_event()
    assert event is not NEED_DATA
    return event


@pytest.mark.parametrize("size", [1, 700, MAX_PARAM_VALUE * 3 // 4, MAX_PARAM_VALUE * 3 // 4 + 1, lr.MAX_CERTIFICATE])
def test_a_renewal_round_trips_with_its_certificate_in_pieces(size):
    cert = bytes(i % 251 for i in range(size))
    request = lr.renew_request(cert, NONCE, b"sig" * 24)
    assert lr.is_link_request(request) and not lr.wants_challenge(request)
    got = lr.parse_renew(through_the_wire(request))
    assert got == lr.Renewal(certificate=cert, nonce=NONCE, signature=b"sig" * 24)


def test_a_certificate_too_large_for_a_dial_is_refused_before_sending():
    with pytest.raises(ValueError, match="does not fit"):
        lr.renew_request(b"x" * (lr.MAX_CERTIFICATE + 1), NONCE, b"s")


def test_the_challenge_round_trips():
    request = through_the_wire(lr.challenge_request())
    assert lr.is_link_request(request) and lr.wants_challenge(request)
    accept = decode_event(encode_event(lr.challenge_accept(NONCE)))
    assert lr.nonce_of(accept) == NONCE


def test_no_resource_can_be_named_like_the_link():
    from gateway.cluster.store.core import validate_name

    with pytest.raises(ValueError):
        validate_name("resource", lr.RESOURCE)


def test_the_proof_covers_the_nonce_and_the_certificate():
    base = lr.proof_message(NONCE, b"cert")
    assert lr.proof_message(bytes(32), b"cert") != base
    assert lr.proof_message(NONCE, b"cert2") != base
    assert base.startswith(b"wicket-mux link renewal v1\x00")


@pytest.mark.parametrize("params, message", [
    ({"link": "challenge"}, "'challenge' or 'renew'"),
    ({"link": "renew", "nonce": NONCE.hex(), "signature": "c2ln"}, "no certificate"),
    ({"link": "renew", "nonce": NONCE.hex(), "signature": "c2ln", "certificate.0": "!!"}, "not base64"),
    ({"link": "renew", "nonce": "abc", "signature": "c2ln", "certificate.0": "Y2VydA=="}, "64 hex digits"),
    ({"link": "renew", "nonce": NONCE.hex(), "certificate.0": "Y2VydA=="}, "no signature"),
    ({"link": "renew", "nonce": NONCE.hex(), "signature": "c2ln", "certificate.0": "Y2VydA==",
      "certificate.2": "Y2VydA=="}, "unexpected parameters in a renewal: certificate.2"),
    ({"link": "renew", "nonce": NONCE.hex(), "signature": "c2ln", "certificate.0": "Y2VydA==", "db_user": "x"},
     "unexpected parameters"),
])
def test_a_malformed_renewal_says_what_is_wrong(params, message):
    with pytest.raises(ValueError, match=message):
        lr.parse_renew(DialRequest(resource=lr.RESOURCE, params=params))


@given(st.dictionaries(st.sampled_from(["link", "nonce", "signature", "certificate.0", "certificate.1", "x"]),
                       st.text(max_size=80), max_size=6))
def test_any_parameters_parse_or_raise_value_error(params):
    try:
        lr.parse_renew(DialRequest(resource=lr.RESOURCE, params=params))
    except ValueError:
        pass
