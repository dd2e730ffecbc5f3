"""Client-side authentication plugins: what a client answers a server's nonce with.

Spec: MySQL Source Code Documentation, "Client/Server Protocol",
Authentication Methods: Native Authentication (mysql_native_password),
Caching_sha2_password information, Clear text client plugin; MySQL
Reference Manual, "Caching SHA-2 Pluggable Authentication" (RSA key pair
based password exchange); MariaDB docs, "Authentication Plugin - ed25519"
(see :mod:`.ed25519`).

Every function is pure: password and nonce in, bytes to send out. Which
plugin may run when (never a cleartext password without TLS) is the login
state machine's business (:mod:`.client`). An empty password answers with
an empty response, as the reference clients do.
"""

from __future__ import annotations

import hashlib
from typing import Final

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.mysql import ed25519
from protocols.mysql.constants import ErrorNumber

__all__ = [
    "NATIVE_PASSWORD", "CACHING_SHA2_PASSWORD", "CLIENT_ED25519", "CLEAR_PASSWORD",
    "SHA256_PASSWORD", "SCRAMBLE_LENGTH", "REQUEST_PUBLIC_KEY", "FAST_AUTH_SUCCESS",
    "PERFORM_FULL_AUTH", "native_password", "caching_sha2_password", "rsa_encrypt_password",
    "ed25519_password", "clear_password",
]

NATIVE_PASSWORD: Final = "mysql_native_password"
CACHING_SHA2_PASSWORD: Final = "caching_sha2_password"
CLIENT_ED25519: Final = "client_ed25519"
CLEAR_PASSWORD: Final = "mysql_clear_password"
SHA256_PASSWORD: Final = "sha256_password"
SCRAMBLE_LENGTH: Final = 20

# caching_sha2_password's one-byte messages (in AuthMoreData, or from the client).
REQUEST_PUBLIC_KEY: Final = b"\x02"
FAST_AUTH_SUCCESS: Final = b"\x03"
PERFORM_FULL_AUTH: Final = b"\x04"
_ED25519_NONCE: Final = 32


def _xor(data: bytes, key: bytes) -> bytes:
    return bytes(a ^ key[i % len(key)] for i, a in enumerate(data))


def _nonce(scramble: bytes) -> bytes:
    # The handshake's plugin data is 20 bytes and MySQL's NUL.
    return scramble[:SCRAMBLE_LENGTH]


def native_password(password: bytes, scramble: bytes) -> bytes:
    """mysql_native_password: SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password)))."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password).digest()
    stage2 = hashlib.sha1(stage1).digest()
    return _xor(stage1, hashlib.sha1(_nonce(scramble) + stage2).digest())


def caching_sha2_password(password: bytes, scramble: bytes) -> bytes:
    """caching_sha2_password's fast-auth scramble:
    SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce)."""
    if not password:
        return b""
    stage1 = hashlib.sha256(password).digest()
    stage2 = hashlib.sha256(stage1).digest()
    return _xor(stage1, hashlib.sha256(stage2 + _nonce(scramble)).digest())


def rsa_encrypt_password(password: bytes, scramble: bytes, public_key_pem: bytes) -> bytes:
    """Full authentication without TLS: (password + NUL) XOR the nonce
    (repeated), encrypted with the server's RSA public key, OAEP padding
    with SHA-1 (servers since 8.0.5). A key that does not load is the
    server's fault: RemoteProtocolError."""
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: PLC0415

    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, rsa.RSAPublicKey):
        raise RemoteProtocolError("the server's public key is not an RSA key in PEM",
                                  code=ErrorCode.UPSTREAM_UNREACHABLE,
                                  wire_hint=int(ErrorNumber.ER_HANDSHAKE_ERROR))
    message = _xor(password + b"\x00", _nonce(scramble))
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(),
                        label=None)
    try:
        return key.encrypt(message, oaep)
    except ValueError:
        raise RemoteProtocolError("the server's RSA key is too small for the password",
                                  code=ErrorCode.UPSTREAM_UNREACHABLE,
                                  wire_hint=int(ErrorNumber.ER_HANDSHAKE_ERROR)) from None


def ed25519_password(password: bytes, nonce: bytes) -> bytes:
    """MariaDB client_ed25519: the 64-byte signature of the server's 32-byte
    nonce (MariaDB's own key derivation; see :mod:`.ed25519`)."""
    if len(nonce) != _ED25519_NONCE:
        raise RemoteProtocolError(f"client_ed25519 wants a {_ED25519_NONCE}-byte nonce, "
                                  f"the server sent {len(nonce)}",
                                  code=ErrorCode.UPSTREAM_UNREACHABLE,
                                  wire_hint=int(ErrorNumber.ER_HANDSHAKE_ERROR))
    return ed25519.sign(password, nonce)


def clear_password(password: bytes) -> bytes:
    """mysql_clear_password (and caching_sha2's full auth over TLS): the
    password and a NUL. Only ever over TLS."""
    return password + b"\x00"
