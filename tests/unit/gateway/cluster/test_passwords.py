"""Tests for gateway.cluster.passwords: Argon2id hashes, policy, TOTP."""

from __future__ import annotations

import base64
import re
import urllib.parse

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from gateway.cluster import passwords
from gateway.cluster.passwords import (
    DUMMY_HASH,
    MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
    InvalidPasswordHash,
    burn_password_time,
    check_password_policy,
    hash_password,
    needs_rehash,
    new_totp_secret,
    totp_uri,
    verify_password,
    verify_totp,
)

PASSWORD = "correct horse battery staple"
RFC_SECRET = b"12345678901234567890"  # RFC 6238 appendix B, SHA1 key


def _phc(m=19456, t=2, p=1, salt=b"s" * 16, digest=b"d" * 32, v=19) -> str:
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    return f"$argon2id$v={v}$m={m},t={t},p={p}${b64(salt)}${b64(digest)}"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(PASSWORD)


# --- hashing -------------------------------------------------------------------


def test_hash_is_phc_argon2id_with_owasp_params(stored: str) -> None:
    assert re.fullmatch(
        r"\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}", stored
    )


def test_verify_right_and_wrong(stored: str) -> None:
    assert verify_password(stored, PASSWORD) is True
    assert verify_password(stored, PASSWORD + " ") is False
    assert verify_password(stored, "") is False


def test_salt_is_random() -> None:
    assert hash_password(PASSWORD) != hash_password(PASSWORD)


def test_interoperates_with_cryptography_phc(stored: str) -> None:
    # Our encoding is the standard one: cryptography's own verifier agrees...
    Argon2id.verify_phc_encoded(PASSWORD.encode(), stored)
    # ...and we verify what cryptography encodes.
    theirs = Argon2id(
        salt=b"0123456789abcdef", length=32, iterations=2, lanes=1, memory_cost=19456
    ).derive_phc_encoded(PASSWORD.encode())
    assert verify_password(theirs, PASSWORD)


def test_unicode_is_normalised() -> None:
    # U+FB01 (the "fi" ligature) and "fi" are the same password under NFKC;
    # precomposed and combining accents likewise.
    encoded = hash_password("\ufb01ne caf\u00e9 passphrase")
    assert verify_password(encoded, "fine cafe\u0301 passphrase")


def test_hash_password_refuses_empty_and_oversized() -> None:
    with pytest.raises(ValueError, match="empty"):
        hash_password("")
    with pytest.raises(ValueError, match="longer than"):
        hash_password("x" * (MAX_PASSWORD_CHARS + 1))
    with pytest.raises(TypeError):
        hash_password(b"bytes")  # type: ignore[arg-type]


def test_absurdly_long_candidate_is_just_wrong(stored: str) -> None:
    assert verify_password(stored, "x" * (10 * MAX_PASSWORD_CHARS)) is False


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plaintext-password",
        "$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "$argon2id$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "$argon2id$v=19$t=2,m=19456,p=1$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "$argon2id$v=19$m=19456,t=2,p=1$c2Fsd!Nhb$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        # 23 characters but stray low bits in the last one: not canonical.
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdAx$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        # 21 characters: no byte string has this length in base64.
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0ZGlnZXN0ZGlnZ",
        _phc() + "$extra",
        _phc() + "\n",
        _phc(v=16),
        "$argon2id$v=19$m=" + "9" * 600 + ",t=2,p=1$c2FsdA$ZGln",
    ],
)
def test_malformed_hash_rejected(encoded: str) -> None:
    with pytest.raises(InvalidPasswordHash):
        verify_password(encoded, PASSWORD)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"m": 10 * 1024 * 1024},  # 10 GiB: must be refused before allocating
        {"m": 262145},
        {"m": 7},  # below 8 KiB per lane
        {"m": 64, "p": 16},  # below 8 KiB per lane
        {"t": 0},
        {"t": 1000},
        {"m": 262144, "t": 16},  # each alone in range, together too much work
        {"p": 0},
        {"p": 64},
        {"salt": b"short"},
        {"salt": b"s" * 65},
        {"digest": b"d" * 8},
        {"digest": b"d" * 65},
    ],
)
def test_absurd_params_rejected(kwargs: dict) -> None:
    with pytest.raises(InvalidPasswordHash) as info:
        verify_password(_phc(**kwargs), PASSWORD)
    # The message names the problem but never carries the hash.
    assert base64.b64encode(b"d" * 32).decode().rstrip("=") not in str(info.value)


def test_invalid_hash_is_a_value_error() -> None:
    assert issubclass(InvalidPasswordHash, ValueError)


def test_other_valid_params_still_verify() -> None:
    # Parameters come from the string, so hashes made with older or newer
    # settings keep working.
    encoded = Argon2id(
        salt=b"an-older-salt!!!", length=24, iterations=1, lanes=2, memory_cost=1024
    ).derive_phc_encoded(PASSWORD.encode())
    assert verify_password(encoded, PASSWORD)
    assert needs_rehash(encoded)


def test_needs_rehash(stored: str) -> None:
    assert needs_rehash(stored) is False
    assert needs_rehash(_phc(t=1)) is True  # weaker: upgraded at the next login
    assert needs_rehash(_phc(t=3)) is False  # stronger: never downgraded
    assert needs_rehash("garbage") is True


def test_dummy_hash_costs_the_same_and_never_matches() -> None:
    # Same parameters as a fresh hash, so verifying it takes as long.
    assert needs_rehash(DUMMY_HASH) is False
    assert burn_password_time(PASSWORD) is None
    assert burn_password_time("") is None
    assert verify_password(DUMMY_HASH, "wicket-no-user!!") is False


# --- policy --------------------------------------------------------------------


def test_policy_accepts_a_passphrase() -> None:
    check_password_policy(PASSWORD)
    check_password_policy("a" * (MIN_PASSWORD_CHARS - 1) + "b")
    check_password_policy("ab" * (MAX_PASSWORD_CHARS // 2))
    check_password_policy("пароль-пароль-пароль")


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("", "too short"),
        ("x" * (MIN_PASSWORD_CHARS - 2) + "y", "too short"),
        ("ab" * (MAX_PASSWORD_CHARS // 2) + "c", "too long"),
        ("correct horse\tbattery", "control characters"),
        ("correct horse battery\n", "control characters"),
        ("a" * 20, "repeated"),
    ],
)
def test_policy_refuses(password: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_password_policy(password)


def test_policy_counts_normalised_characters() -> None:
    # Six U+FB03 ("ffi") ligatures are 18 characters after NFKC.
    check_password_policy("\ufb03" * 6)
    with pytest.raises(TypeError):
        check_password_policy(None)  # type: ignore[arg-type]


def test_policy_message_does_not_echo_the_password() -> None:
    with pytest.raises(ValueError) as info:
        check_password_policy("hunter2")
    assert "hunter2" not in str(info.value)


# --- TOTP ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "code8"),
    [  # RFC 6238 appendix B, SHA1 column; we use the last six digits.
        (59, "94287082"),
        (1111111109, "07081804"),
        (1111111111, "14050471"),
        (1234567890, "89005924"),
        (2000000000, "69279037"),
        (20000000000, "65353130"),
    ],
)
def test_totp_rfc6238_vectors(t: int, code8: str) -> None:
    assert verify_totp(RFC_SECRET, code8[-6:], now=t, last_step=None) == t // 30


def test_totp_skew_of_one_step_either_way() -> None:
    code = "287082"  # step 1 (t = 30..59)
    assert verify_totp(RFC_SECRET, code, now=59 + 30, last_step=None) == 1  # phone behind
    assert verify_totp(RFC_SECRET, code, now=59 - 30, last_step=None) == 1  # phone ahead
    assert verify_totp(RFC_SECRET, code, now=59 + 60, last_step=None) is None
    assert verify_totp(RFC_SECRET, code, now=0, last_step=None) is not None  # step 0 +1
    assert verify_totp(RFC_SECRET, code, now=59 + 90, last_step=None) is None


def test_totp_two_steps_away_refused() -> None:
    t = 1111111111
    step = t // 30
    code = "050471"
    assert verify_totp(RFC_SECRET, code, now=(step + 2) * 30, last_step=None) is None
    assert verify_totp(RFC_SECRET, code, now=(step - 2) * 30 + 29, last_step=None) is None


def test_totp_replay_refused() -> None:
    assert verify_totp(RFC_SECRET, "287082", now=59, last_step=None) == 1
    assert verify_totp(RFC_SECRET, "287082", now=59, last_step=1) is None
    assert verify_totp(RFC_SECRET, "287082", now=59, last_step=5) is None
    assert verify_totp(RFC_SECRET, "287082", now=59, last_step=0) == 1


def test_totp_wrong_and_malformed_codes() -> None:
    assert verify_totp(RFC_SECRET, "287083", now=59, last_step=None) is None
    assert verify_totp(RFC_SECRET, "287 082", now=59, last_step=None) == 1
    for bad in ("", "28708", "2870820", "28708a", "\u0662\u0668\u0667\u0660\u0668\u0662", None):
        assert verify_totp(RFC_SECRET, bad, now=59, last_step=None) is None  # type: ignore[arg-type]


def test_totp_needs_a_sane_clock() -> None:
    for now in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            verify_totp(RFC_SECRET, "287082", now=now, last_step=None)


def test_new_totp_secret() -> None:
    a, b = new_totp_secret(), new_totp_secret()
    assert len(a) == 20 and a != b


def test_totp_uri() -> None:
    uri = totp_uri(RFC_SECRET, "alice@example.com", "Wicket Prod")
    parsed = urllib.parse.urlsplit(uri)
    assert (parsed.scheme, parsed.netloc) == ("otpauth", "totp")
    assert urllib.parse.unquote(parsed.path) == "/Wicket Prod:alice@example.com"
    query = dict(urllib.parse.parse_qsl(parsed.query))
    assert query == {
        "secret": "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
        "issuer": "Wicket Prod",
        "algorithm": "SHA1",
        "digits": "6",
        "period": "30",
    }
    assert base64.b32decode(query["secret"]) == RFC_SECRET


def test_totp_uri_refuses_ambiguous_labels_and_weak_keys() -> None:
    with pytest.raises(ValueError, match="issuer"):
        totp_uri(RFC_SECRET, "alice", "Evil:Corp")
    with pytest.raises(ValueError, match="account"):
        totp_uri(RFC_SECRET, "", "Wicket")
    with pytest.raises(ValueError):
        totp_uri(b"short", "alice", "Wicket")


def test_module_exports() -> None:
    for name in passwords.__all__:
        assert hasattr(passwords, name)
