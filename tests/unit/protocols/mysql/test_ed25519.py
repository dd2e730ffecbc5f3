"""protocols.mysql.ed25519: MariaDB's client_ed25519 signature."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.mysql import ed25519
from tests.unit.protocols.feeding import fuzz

#: Pure-Python curve arithmetic costs milliseconds a signature.
slow_fuzz = settings(fuzz, max_examples=60)


def test_mariadb_published_password_hash() -> None:
    # MariaDB docs, "Authentication Plugin - ed25519": SELECT ed25519_password("secret").
    key = ed25519.public_key(b"secret")
    published = "ZIgUREUg5PVgQ6LskhXmO+eZLS0nC8be6HPjYWR4YJY"
    assert base64.b64encode(key).decode().rstrip("=") == published


def test_rfc8032_vector_for_a_32_byte_password() -> None:
    # RFC 8032 section 7.1, TEST 1: with a 32-byte password MariaDB's
    # derivation is standard Ed25519 with that password as the seed.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    assert ed25519.public_key(seed) == bytes.fromhex(
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    assert ed25519.sign(seed, b"") == bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


@slow_fuzz
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=64))
def test_agrees_with_cryptography_for_32_byte_passwords(password: bytes, message: bytes) -> None:
    key = Ed25519PrivateKey.from_private_bytes(password)
    assert ed25519.sign(password, message) == key.sign(message)


@slow_fuzz
@given(st.binary(max_size=80), st.binary(min_size=32, max_size=32))
def test_cryptography_verifies_every_signature(password: bytes, nonce: bytes) -> None:
    signature = ed25519.sign(password, nonce)
    assert len(signature) == 64
    Ed25519PublicKey.from_public_bytes(ed25519.public_key(password)).verify(signature, nonce)
