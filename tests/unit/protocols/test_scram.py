"""protocols.scram: the SCRAM client core PostgreSQL and MongoDB share
(SASLprep and SCRAM-SHA-256 are also tested through protocols.postgres.scram)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.scram import HASHES, ScramClient
from tests.unit.protocols.feeding import fuzz

# RFC 5802 section 5: SCRAM-SHA-1, user "user", password "pencil".
NONCE = "fyko+d2lbbFgONRv9qkxdawL"
SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
CLIENT_FINAL = (b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                b"p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


def sha1_client(**kwargs: object) -> ScramClient:
    return ScramClient(b"pencil", mechanism="SCRAM-SHA-1", username="user", nonce=NONCE,
                       **kwargs)  # type: ignore[arg-type]


def test_the_rfc_5802_sha1_example() -> None:
    client = sha1_client()
    assert client.client_first() == b"n,,n=user,r=" + NONCE.encode()
    assert client.client_final(SERVER_FIRST) == CLIENT_FINAL
    client.verify_server_final(SERVER_FINAL)
    assert client.done and client.mechanism == "SCRAM-SHA-1"
    assert repr(client) == "<ScramClient DONE>"


def test_a_caller_chooses_the_error() -> None:
    def mongo_error(message: str) -> RemoteProtocolError:
        return RemoteProtocolError(message, code=ErrorCode.UPSTREAM_UNREACHABLE, wire_hint=18)

    client = sha1_client(error=mongo_error)
    client.client_first()
    client.client_final(SERVER_FIRST)
    with pytest.raises(RemoteProtocolError) as info:
        client.verify_server_final(b"v=" + b"A" * 28)
    assert info.value.wire_hint == 18 and "signature is wrong" in info.value.message
    client = sha1_client()
    client.client_first()
    with pytest.raises(RemoteProtocolError) as info:
        client.client_final(b"r=" + NONCE.encode() + b"x,s=!!!,i=1")
    assert info.value.code is ErrorCode.UPSTREAM_UNREACHABLE and "base64" in info.value.message


def test_mechanisms_and_order() -> None:
    assert HASHES == {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
    with pytest.raises(ValueError):
        ScramClient(b"pw", mechanism="SCRAM-MD5")
    with pytest.raises(LocalProtocolError):
        sha1_client().client_final(SERVER_FIRST)


def test_the_server_half_checks_the_proof_in_both_directions() -> None:
    from protocols.scram import ScramClient, ScramServer

    for mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        client = ScramClient(b"pencil", mechanism=mechanism, username="u=,x")
        server = ScramServer(b"pencil", mechanism=mechanism, salt=b"salt", iterations=4096)
        client.verify_server_final(server.server_final(client.client_final(server.server_first(
            client.client_first()))))
        assert client.done and server.done and server.username == "u=,x"
    impostor = ScramClient(b"pen", mechanism="SCRAM-SHA-256", username="u")
    server = ScramServer(b"pencil", mechanism="SCRAM-SHA-256", salt=b"salt", iterations=4096)
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        server.server_final(impostor.client_final(server.server_first(impostor.client_first())))
    assert not server.done


@fuzz
@given(st.binary(max_size=120), st.binary(max_size=200))
def test_the_server_half_takes_any_bytes_with_a_remote_error(first: bytes, final: bytes) -> None:
    from protocols.scram import ScramServer

    server = ScramServer(b"pencil", mechanism="SCRAM-SHA-256", salt=b"salt", iterations=1)
    try:
        server.server_first(first)
        server.server_final(final)
    except RemoteProtocolError:
        return
    raise AssertionError("a random proof verified")
