"""MariaDB's client_ed25519 signature, with Python integers over edwards25519.

Spec: RFC 8032 section 5.1 (Ed25519: encoding, point arithmetic, signing);
MariaDB's ``plugin/auth_ed25519`` (``ref10/sign.c``, ``crypto_sign``) and
the MariaDB docs, "Authentication Plugin - ed25519".

Theory of operation
-------------------
Standard Ed25519 derives its secret from ``SHA-512(seed)`` where the seed
is 32 bytes. MariaDB's plugin hashes the *password itself*, whatever its
length: ``az = SHA-512(password)``; the secret scalar ``a`` is ``az[0:32]``
clamped (RFC 8032 5.1.5), the nonce prefix is ``az[32:64]``, and the rest is
RFC 8032 5.1.6 unchanged::

    A = [a]B                      (the "password hash" MariaDB stores, base64)
    r = SHA-512(az[32:64] || M) mod L
    R = [r]B
    S = (r + SHA-512(R || A || M) * a) mod L
    signature = R || S            (64 bytes; M is the server's 32-byte nonce)

The stdlib has no Ed25519 and ``cryptography``'s takes a 32-byte seed, not
an ``az``: it agrees with this module only for 32-byte passwords, which the
tests use as a cross-check, beside MariaDB's published ``ed25519_password``
value and ``cryptography``'s verifier (a signature is a standard Ed25519
signature under ``A``).

Points are in extended homogeneous coordinates (X, Y, Z, T), x = X/Z,
y = Y/Z, xy = T/Z, with the unified addition formula of RFC 8032 5.1.4 (it
also doubles). Nothing here is constant-time: Python integers are not. The
secret is a password the cluster holds in its own memory anyway; do not
reuse this module where a timing observer is a threat.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["public_key", "sign"]

_P: Final = 2**255 - 19
_L: Final = 2**252 + 27742317777372353535851937790883648493
_D: Final = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1: Final = pow(2, (_P - 1) // 4, _P)

_Point = tuple[int, int, int, int]


def _recover_x(y: int, sign: int) -> int:
    # RFC 8032 5.1.3: x^2 = (y^2 - 1) / (d y^2 + 1).
    u = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(u, (_P + 3) // 8, _P)
    if (x * x - u) % _P:
        x = x * _SQRT_M1 % _P
    if x & 1 != sign:
        x = _P - x
    return x


_BY: Final = 4 * pow(5, _P - 2, _P) % _P
_BX: Final = _recover_x(_BY, 0)
_BASE: Final[_Point] = (_BX, _BY, 1, _BX * _BY % _P)
_IDENTITY: Final[_Point] = (0, 1, 1, 0)


def _add(p: _Point, q: _Point) -> _Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _doublings(point: _Point, count: int) -> list[_Point]:
    out = [point]
    for _ in range(count - 1):
        out.append(_add(out[-1], out[-1]))
    return out


#: [2^i]B for every bit a reduced or clamped scalar can have: a scalar
#: multiple of B is then one addition per set bit, no doublings.
_BASE_POWERS: Final = _doublings(_BASE, 256)


def _multiply(scalar: int) -> _Point:
    """[scalar]B, for 0 <= scalar < 2^256."""
    result = _IDENTITY
    for power in _BASE_POWERS:
        if not scalar:
            break
        if scalar & 1:
            result = _add(result, power)
        scalar >>= 1
    return result


def _encode(point: _Point) -> bytes:
    # RFC 8032 5.1.2: y, with the low bit of x in the top bit.
    z_inv = pow(point[2], _P - 2, _P)
    x, y = point[0] * z_inv % _P, point[1] * z_inv % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _secret(password: bytes) -> tuple[int, bytes]:
    az = hashlib.sha512(password).digest()
    scalar = bytearray(az[:32])
    scalar[0] &= 248
    scalar[31] &= 127
    scalar[31] |= 64
    return int.from_bytes(scalar, "little"), az[32:]


def _hash_int(*parts: bytes) -> int:
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little") % _L


def public_key(password: bytes) -> bytes:
    """``A``, the 32 bytes whose unpadded base64 MariaDB stores for an
    ed25519 account (``ed25519_password('...')``)."""
    a, _ = _secret(password)
    return _encode(_multiply(a))


def sign(password: bytes, message: bytes) -> bytes:
    """The 64-byte signature of ``message`` (the server's nonce) that
    MariaDB's client_ed25519 plugin sends for ``password``."""
    a, prefix = _secret(password)
    key = _encode(_multiply(a))
    r = _hash_int(prefix, message)
    big_r = _encode(_multiply(r))
    s = (r + _hash_int(big_r, key, message) * a) % _L
    return big_r + s.to_bytes(32, "little")
