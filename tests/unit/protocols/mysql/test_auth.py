"""protocols.mysql.auth: the client side of the auth plugins, checked against
the published algorithms written out step by step."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocols.errors import ErrorCode
from protocols.mysql import auth, ed25519
from tests.unit.protocols.feeding import malformed

NONCE = bytes(range(1, 21))


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def test_native_password() -> None:
    # Native Authentication: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))).
    sha1 = hashlib.sha1
    expected = xor(sha1(b"secret").digest(),
                   sha1(NONCE + sha1(sha1(b"secret").digest()).digest()).digest())
    assert auth.native_password(b"secret", NONCE + b"\x00") == expected
    assert len(expected) == 20 and auth.native_password(b"", NONCE) == b""
    # The server checks SHA1(reply XOR SHA1(nonce + stored)) == stored.
    stored = sha1(sha1(b"secret").digest()).digest()
    recovered = xor(expected, sha1(NONCE + stored).digest())
    assert sha1(recovered).digest() == stored


def test_caching_sha2_fast_auth_scramble() -> None:
    sha = hashlib.sha256
    expected = xor(sha(b"secret").digest(),
                   sha(sha(sha(b"secret").digest()).digest() + NONCE).digest())
    assert auth.caching_sha2_password(b"secret", NONCE) == expected
    assert auth.caching_sha2_password(b"", NONCE) == b""


def test_rsa_full_auth_decrypts_to_the_password_xor_the_nonce() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    sealed = auth.rsa_encrypt_password(b"a much longer password than the nonce", NONCE, pem)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    opened = key.decrypt(sealed, oaep)
    plain = bytes(b ^ NONCE[i % 20] for i, b in enumerate(opened))
    assert plain == b"a much longer password than the nonce\x00"


def test_rsa_refuses_keys_that_are_not_rsa_or_too_small() -> None:
    err = malformed(auth.rsa_encrypt_password, b"pw", NONCE, b"not a key")
    assert err.code is ErrorCode.UPSTREAM_UNREACHABLE and "RSA" in err.message
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = small.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert "too small" in malformed(auth.rsa_encrypt_password, b"p" * 100, NONCE, pem).message


def test_ed25519_signs_the_servers_nonce() -> None:
    nonce = b"N" * 32
    signature = auth.ed25519_password(b"secret", nonce)
    Ed25519PublicKey.from_public_bytes(ed25519.public_key(b"secret")).verify(signature, nonce)
    assert "32-byte" in malformed(auth.ed25519_password, b"secret", NONCE).message


@pytest.mark.parametrize("password", [b"", b"pw"])
def test_clear_password(password: bytes) -> None:
    assert auth.clear_password(password) == password + b"\x00"
