"""Password hashing, password policy and TOTP for cluster logins.

Theory of operation
-------------------
Passwords are stored as Argon2id hashes (RFC 9106) in PHC string form::

    $argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>

(standard base64 without padding). The parameters live in the string, so the
defaults below can be raised later: old hashes still verify with the
parameters they were made with, and :func:`needs_rehash` tells the login path
to re-hash on the next successful login. The defaults are OWASP's minimum for
Argon2id (19 MiB, 2 passes, 1 lane): about 40 ms of one core per attempt.

A stored hash is input too. A corrupt or tampered row must not be able to make
a login allocate gigabytes or spin for minutes, so :func:`verify_password`
parses the string itself and bounds every parameter before deriving anything.

Login must not reveal whether a user exists by how long it takes, so a login
for an unknown user calls :func:`burn_password_time`, which does the same
work as a real check, against :data:`DUMMY_HASH`.

Every hash costs ~19 MiB while it runs and blocks a thread for tens of
milliseconds: async callers run these functions in a worker thread
(``trio.to_thread.run_sync``) behind a ``CapacityLimiter`` so that a burst of
logins cannot exhaust memory.

Passwords are Unicode-normalised (NFKC, as NIST SP 800-63B section 5.1.1.2
advises) before hashing and before the policy counts characters, so the same
password typed on two keyboards that compose characters differently matches.

TOTP follows RFC 6238 with what authenticator apps assume when a provisioning
URI says nothing else: HMAC-SHA1, 6 digits, 30 second steps. Nothing here
reads the clock: callers pass ``now``.
"""

from __future__ import annotations

import base64
import hmac
import math
import re
import secrets
import unicodedata
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.twofactor.totp import TOTP

__all__ = [
    "DUMMY_HASH",
    "InvalidPasswordHash",
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "TOTP_DIGITS",
    "TOTP_STEP_SECONDS",
    "burn_password_time",
    "check_password_policy",
    "hash_password",
    "needs_rehash",
    "new_totp_secret",
    "totp_uri",
    "verify_password",
    "verify_totp",
]

# --- Argon2id ------------------------------------------------------------------

# OWASP Password Storage Cheat Sheet, Argon2id minimum configuration.
MEMORY_KIB = 19456
TIME_COST = 2
LANES = 1
SALT_BYTES = 16
HASH_BYTES = 32

# Bounds for parameters read back from a stored hash. Generous enough for
# several rounds of future hardening (256 MiB, or 27x today's work), small
# enough that a corrupt row costs at most about a second and 256 MiB.
_MAX_MEMORY_KIB = 256 * 1024
_MAX_TIME_COST = 16
_MAX_WORK = 1024 * 1024  # memory (KiB) x passes
_MAX_LANES = 16
_SALT_BYTES_RANGE = (8, 64)  # 8 is RFC 9106's minimum salt
_HASH_BYTES_RANGE = (16, 64)
_MAX_ENCODED_CHARS = 512

_ARGON2_VERSION = 19  # 0x13, the only version cryptography implements

_PHC_RE = re.compile(
    r"\$argon2id\$v=(?P<v>[0-9]{1,3})"
    r"\$m=(?P<m>[0-9]{1,10}),t=(?P<t>[0-9]{1,10}),p=(?P<p>[0-9]{1,10})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<hash>[A-Za-z0-9+/]+)",
    re.ASCII,
)


class InvalidPasswordHash(ValueError):
    """A stored password hash cannot be used (corrupt, foreign or absurd).

    The message never contains the hash itself. A login that meets this must
    fail (and the operator should reset that user's password).
    """


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    # The character set was checked by the regex. Only the canonical encoding
    # is accepted (no stray trailing bits), as the PHC string format asks, so
    # one hash has exactly one spelling.
    if len(text) % 4 != 1:  # no byte string encodes to this length
        data = base64.b64decode(text + "=" * (-len(text) % 4))
        if _b64encode(data) == text:
            return data
    raise InvalidPasswordHash(f"password hash has a malformed {what}")


def _normalize(password: str) -> bytes:
    if not isinstance(password, str):
        raise TypeError(f"password must be str, not {type(password).__name__}")
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _derive(password: bytes, salt: bytes, *, m: int, t: int, p: int, length: int) -> bytes:
    kdf = Argon2id(salt=salt, length=length, iterations=t, lanes=p, memory_cost=m)
    return kdf.derive(password)


def _encode(*, m: int, t: int, p: int, salt: bytes, digest: bytes) -> str:
    return (
        f"$argon2id$v={_ARGON2_VERSION}$m={m},t={t},p={p}"
        f"${_b64encode(salt)}${_b64encode(digest)}"
    )


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """Return (m, t, p, salt, hash) from a PHC string, or raise InvalidPasswordHash."""
    if not isinstance(encoded, str) or len(encoded) > _MAX_ENCODED_CHARS:
        raise InvalidPasswordHash("password hash is not an argon2id PHC string")
    match = _PHC_RE.fullmatch(encoded)
    if match is None:
        raise InvalidPasswordHash("password hash is not an argon2id PHC string")
    if int(match["v"]) != _ARGON2_VERSION:
        raise InvalidPasswordHash(f"password hash has unsupported argon2 version {match['v']}")
    m, t, p = int(match["m"]), int(match["t"]), int(match["p"])
    if not 1 <= p <= _MAX_LANES:
        raise InvalidPasswordHash(f"password hash has out-of-range lanes p={p}")
    if not 8 * p <= m <= _MAX_MEMORY_KIB:
        raise InvalidPasswordHash(f"password hash has out-of-range memory m={m}")
    if not 1 <= t <= _MAX_TIME_COST or m * t > _MAX_WORK:
        raise InvalidPasswordHash(f"password hash has out-of-range passes t={t}")
    salt = _b64decode(match["salt"], "salt")
    digest = _b64decode(match["hash"], "digest")
    if not _SALT_BYTES_RANGE[0] <= len(salt) <= _SALT_BYTES_RANGE[1]:
        raise InvalidPasswordHash(f"password hash has a {len(salt)}-byte salt")
    if not _HASH_BYTES_RANGE[0] <= len(digest) <= _HASH_BYTES_RANGE[1]:
        raise InvalidPasswordHash(f"password hash has a {len(digest)}-byte digest")
    return m, t, p, salt, digest


def hash_password(password: str) -> str:
    """Hash *password* with Argon2id and a fresh random salt; return a PHC string.

    Enforces only what hashing needs (non-empty, at most
    :data:`MAX_PASSWORD_CHARS`); call :func:`check_password_policy` first for
    passwords chosen by people.
    """
    raw = _normalize(password)
    if not raw:
        raise ValueError("password must not be empty")
    if len(raw.decode("utf-8")) > MAX_PASSWORD_CHARS:  # characters, not bytes
        raise ValueError(f"password is longer than {MAX_PASSWORD_CHARS} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _derive(raw, salt, m=MEMORY_KIB, t=TIME_COST, p=LANES, length=HASH_BYTES)
    return _encode(m=MEMORY_KIB, t=TIME_COST, p=LANES, salt=salt, digest=digest)


def verify_password(encoded: str, password: str) -> bool:
    """True if *password* matches the PHC string *encoded*.

    Raises :class:`InvalidPasswordHash` if *encoded* is malformed or its
    parameters are out of bounds (checked before any memory is allocated).
    The comparison is constant-time.
    """
    m, t, p, salt, expected = _parse(encoded)
    raw = _normalize(password)
    # A password that could never have been set is wrong; skip the hash. This
    # reveals nothing about the user (unknown users take the same shortcut in
    # burn_password_time) and stops a multi-megabyte "password" costing CPU.
    if len(raw) > 4 * MAX_PASSWORD_CHARS:
        return False
    actual = _derive(raw, salt, m=m, t=t, p=p, length=len(expected))
    return hmac.compare_digest(actual, expected)


def needs_rehash(encoded: str) -> bool:
    """True if *encoded* was made with weaker parameters than today's
    defaults (less memory or time, a shorter salt or digest).

    The login path re-hashes the password it just verified when this is true,
    so raising the defaults upgrades users as they log in. A stronger hash
    (made by a newer version, or by hand) is left alone: never downgraded.
    """
    try:
        m, t, p, salt, digest = _parse(encoded)
    except InvalidPasswordHash:
        return True
    return m < MEMORY_KIB or t < TIME_COST or len(salt) < SALT_BYTES or len(digest) < HASH_BYTES


# A well-formed hash with today's parameters that no password matches in
# practice (its digest is all zeros, a 2**-256 chance). Verifying against it
# costs exactly what verifying a real user's hash costs.
DUMMY_HASH = _encode(
    m=MEMORY_KIB, t=TIME_COST, p=LANES, salt=b"wicket-no-user!!", digest=bytes(HASH_BYTES)
)


def burn_password_time(password: str) -> None:
    """Spend exactly the time (and memory) of one :func:`verify_password`.

    For a login naming an unknown user, so that the response time does not
    tell an attacker which user names exist::

        user = store.get_user(name)
        if user is None:
            burn_password_time(password)  # then fail as for a wrong password
    """
    verify_password(DUMMY_HASH, password)


# --- policy --------------------------------------------------------------------

# NIST SP 800-63B asks for at least 8 characters and at least 64 allowed. This
# gateway guards production databases and shells, so 12: long enough that a
# passphrase is the natural choice, short enough that people do not write it
# down. The maximum only bounds input size; 1024 fits any passphrase or
# password-manager output.
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024


def check_password_policy(password: str) -> None:
    """Raise ValueError with a message for a person if *password* is not acceptable.

    Length is counted in characters after NFKC normalisation. Control
    characters are refused: they cannot be typed reliably at a prompt and are
    usually a paste accident. No composition rules (NIST advises against them).
    """
    text = unicodedata.normalize("NFKC", password) if isinstance(password, str) else None
    if text is None:
        raise TypeError(f"password must be str, not {type(password).__name__}")
    if len(text) < MIN_PASSWORD_CHARS:
        raise ValueError(
            f"password is too short: use at least {MIN_PASSWORD_CHARS} characters "
            "(a few unrelated words make a good one)"
        )
    if len(text) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password is too long: use at most {MAX_PASSWORD_CHARS} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise ValueError("password must not contain control characters (tab, newline, ...)")
    if len(set(text)) == 1:
        raise ValueError("password must not be one character repeated")


# --- TOTP (RFC 6238) -----------------------------------------------------------

TOTP_DIGITS = 6
TOTP_STEP_SECONDS = 30
TOTP_SECRET_BYTES = 20  # RFC 4226 section 4 recommends 160 bits for HMAC-SHA1
# Accept the previous and next step as well: phone clocks drift and people
# type slowly (RFC 6238 section 5.2 recommends at most one step of skew).
_TOTP_SKEW_STEPS = 1
_TOTP_CODE_RE = re.compile(r"[0-9]{%d}" % TOTP_DIGITS, re.ASCII)


def new_totp_secret() -> bytes:
    """A fresh random TOTP secret (20 bytes)."""
    return secrets.token_bytes(TOTP_SECRET_BYTES)


def _totp(secret: bytes) -> TOTP:
    # cryptography refuses keys under 128 bits by default, which is what we want.
    return TOTP(secret, TOTP_DIGITS, SHA1(), TOTP_STEP_SECONDS)


def totp_uri(secret: bytes, account: str, issuer: str) -> str:
    """The ``otpauth://totp/...`` provisioning URI an authenticator app scans.

    Follows the Key URI format authenticator apps implement: the label is
    ``issuer:account`` and the issuer is repeated as a parameter. A colon in
    the issuer would make the label ambiguous, so it is refused.
    """
    if not issuer or ":" in issuer:
        raise ValueError("TOTP issuer must be non-empty and contain no ':'")
    if not account:
        raise ValueError("TOTP account name must not be empty")
    _totp(secret)  # validate the key length before it goes into a QR code
    label = f"{quote(issuer, safe='')}:{quote(account, safe='')}"
    query = urlencode(
        {
            "secret": base64.b32encode(secret).decode("ascii").rstrip("="),
            "issuer": issuer,
            "algorithm": "SHA1",
            "digits": TOTP_DIGITS,
            "period": TOTP_STEP_SECONDS,
        },
        quote_via=quote,
    )
    return f"otpauth://totp/{label}?{query}"


def verify_totp(secret: bytes, code: str, *, now: float, last_step: int | None) -> int | None:
    """Check a TOTP *code* at time *now*; return the matched time step or None.

    Codes for the current step and one step either side are accepted. A step
    at or before *last_step* (the step of the last accepted code) is refused,
    so a code seen over a shoulder or in a log cannot be replayed. The caller
    stores the returned step atomically (``Store.set_totp_last_step``) and
    must refuse the login if that store says another login got there first.

    Spaces in *code* are ignored (apps display ``123 456``).
    """
    if not isinstance(now, (int, float)) or not math.isfinite(now) or now < 0:
        raise ValueError("now must be a finite, non-negative epoch time")
    candidate = code.replace(" ", "") if isinstance(code, str) else ""
    if _TOTP_CODE_RE.fullmatch(candidate) is None:
        return None
    given = candidate.encode("ascii")
    totp = _totp(secret)
    current = int(now // TOTP_STEP_SECONDS)
    matched: int | None = None
    # Check every window step, with no early exit, so timing does not reveal
    # which step (or whether a replayed step) matched.
    for step in range(current - _TOTP_SKEW_STEPS, current + _TOTP_SKEW_STEPS + 1):
        if step < 0:
            continue
        ok = hmac.compare_digest(totp.generate(step * TOTP_STEP_SECONDS), given)
        fresh = last_step is None or step > last_step
        if ok and fresh:
            matched = step  # ascending, so the latest matching step wins
    return matched
