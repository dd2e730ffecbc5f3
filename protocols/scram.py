"""SCRAM (RFC 5802), shared by every protocol that logs in with it:
PostgreSQL (SCRAM-SHA-256, RFC 7677) and MongoDB (SCRAM-SHA-1 and
SCRAM-SHA-256). The client side (the cluster's upstream logins), the
server side (a gateway's local credential), and RFC 4013 SASLprep.

Theory of operation
-------------------
:class:`ScramClient` is one exchange, without channel binding (the gs2
header is ``n,,``), in three calls in a fixed order: :meth:`client_first`,
:meth:`client_final` with the server's first message, and
:meth:`verify_server_final` with its last one, which checks the server's
signature: a server that does not know the password (an impostor) cannot
make the login succeed. How the password is prepared is the protocol's
business (PostgreSQL: SASLprep with libpq's fallback; MongoDB SCRAM-SHA-1:
an MD5 digest; MongoDB SCRAM-SHA-256: SASLprep): the client takes the bytes
PBKDF2 is fed. So is how a malformed server message is reported: the
caller passes ``error``, which makes the RemoteProtocolError (with its
protocol's wire hint) that is raised. Calls out of order raise
LocalProtocolError.

PBKDF2 runs inside :meth:`client_final` (4096 iterations by default, about
a millisecond); ``max_iterations`` bounds what a hostile server can ask for.

:class:`ScramServer` is the other half, for a password the caller holds
(its salt and iteration count the caller's too): :meth:`server_first`
with the client's first message, :meth:`server_final` with its proof,
which raises unless the proof shows the client knows the password (checked
in constant time), and returns the server's signature.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from collections.abc import Callable
from typing import Final

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["saslprep", "ScramClient", "ScramServer", "DEFAULT_MAX_ITERATIONS", "HASHES"]

DEFAULT_MAX_ITERATIONS: Final = 1_000_000  # servers' defaults are 4096 (PostgreSQL) to 15000
#: The hash of each mechanism this client speaks.
HASHES: Final = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
_GS2_HEADER: Final = b"n,,"  # no channel binding, no authzid (RFC 5802 section 7)
_ERROR_VALUE = re.compile(r"[a-z0-9-]{1,64}")


def _default_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=ErrorCode.UPSTREAM_UNREACHABLE)


# --- password preparation -------------------------------------------------------


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep, as PostgreSQL and MongoDB apply it to passwords:
    unassigned code points are prohibited (the "stored strings" profile).
    Raises ValueError for a string SASLprep rejects."""
    if all(" " <= ch <= "~" for ch in text):
        return text  # printable ASCII: every step is the identity
    # 1. Map: non-ASCII spaces to SPACE, "commonly mapped to nothing" to nothing.
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch
                     for ch in text if not stringprep.in_table_b1(ch))
    # 2. Normalize with NFKC. The server hashed the verifier with its own,
    # current Unicode tables, so current ones match it best.
    out = unicodedata.normalize("NFKC", mapped)
    # 3. Prohibit (RFC 4013 section 2.3), and 2.5: unassigned code points.
    for ch in out:
        if (stringprep.in_table_c12(ch) or stringprep.in_table_c21_c22(ch)
                or stringprep.in_table_c3(ch) or stringprep.in_table_c4(ch)
                or stringprep.in_table_c5(ch) or stringprep.in_table_c6(ch)
                or stringprep.in_table_c7(ch) or stringprep.in_table_c8(ch)
                or stringprep.in_table_c9(ch) or stringprep.in_table_a1(ch)):
            raise ValueError("the string has a character SASLprep prohibits")
    # 4. Bidirectional text (RFC 3454 section 6).
    if any(stringprep.in_table_d1(ch) for ch in out):
        if any(stringprep.in_table_d2(ch) for ch in out):
            raise ValueError("the string mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("right-to-left text must start and end right-to-left")
    return out


# --- SCRAM ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str, error: Callable[[str], RemoteProtocolError]) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise error(f"the server's SCRAM {what} is not valid base64") from None


def _hmac(key: bytes, data: bytes, digest: str) -> bytes:
    return hmac.new(key, data, digest).digest()


def _valid_nonce(nonce: str) -> bool:
    # RFC 5802: printable ASCII except ",".
    return bool(nonce) and all("!" <= ch <= "~" and ch != "," for ch in nonce)


class _ScramStep(enum.Enum):
    FIRST = "FIRST"
    FINAL = "FINAL"
    VERIFY = "VERIFY"
    DONE = "DONE"
    FAILED = "FAILED"


class _Exchange:
    """What both halves share: the step they are at."""

    _step: _ScramStep

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._step.name}>"

    @property
    def done(self) -> bool:
        """True once the other side has proved it knows the password."""
        return self._step is _ScramStep.DONE

    def _advance(self, expected: _ScramStep, then: _ScramStep) -> None:
        if self._step is not expected:
            raise LocalProtocolError(f"SCRAM step out of order (at {self._step.name})")
        self._step = then


class ScramClient(_Exchange):
    """The client half of one SCRAM exchange (RFC 5802) with ``mechanism``'s
    hash; ``password`` is the prepared password, the bytes PBKDF2 is fed.

    Call :meth:`client_first`, then :meth:`client_final` with the server's
    first message, then :meth:`verify_server_final` with its last one.
    Server messages that are malformed, or a signature that does not verify,
    raise what ``error`` makes of a message; calls out of order raise
    LocalProtocolError.
    """

    def __init__(self, password: bytes, *, mechanism: str, username: str = "",
                 nonce: str | None = None, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                 error: Callable[[str], RemoteProtocolError] = _default_error) -> None:
        if mechanism not in HASHES:
            raise ValueError(f"unknown SCRAM mechanism {mechanism!r}")
        if nonce is None:
            nonce = _b64(secrets.token_bytes(18))
        if not _valid_nonce(nonce):
            raise ValueError("a SCRAM nonce is printable ASCII without ','")
        self.mechanism = mechanism
        self._digest = HASHES[mechanism]
        self._error = error
        self._password = password
        name = username.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={name},r={nonce}".encode("utf-8")
        self._nonce = nonce
        self._max_iterations = max_iterations
        self._step = _ScramStep.FIRST
        self._server_signature = b""

    def client_first(self) -> bytes:
        """The client-first-message (the SASLInitialResponse's data)."""
        self._advance(_ScramStep.FIRST, _ScramStep.FINAL)
        return _GS2_HEADER + self._client_first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """The client-final-message, with our proof, for ``server_first``."""
        self._advance(_ScramStep.FINAL, _ScramStep.FAILED)
        try:
            text = server_first.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error("the server's first SCRAM message is not UTF-8") from None
        parts = text.split(",")
        if parts[0].startswith("m="):
            raise self._error("the server demands a SCRAM extension we do not know")
        if len(parts) < 3 or not (parts[0].startswith("r=") and parts[1].startswith("s=")
                                  and parts[2].startswith("i=")):
            raise self._error("the server's first SCRAM message is malformed")
        nonce = parts[0][2:]
        if (not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce)
                or not _valid_nonce(nonce)):
            raise self._error("the server's SCRAM nonce does not extend ours")
        salt = _unb64(parts[1][2:], "salt", self._error)
        iterations = parts[2][2:]
        if not salt:
            raise self._error("the server's SCRAM salt is empty")
        if not (iterations.isascii() and iterations.isdigit()) or not (
                1 <= int(iterations) <= self._max_iterations):
            raise self._error(f"the server's SCRAM iteration count is not an integer "
                                  f"in 1..{self._max_iterations}")
        digest = self._digest
        salted = hashlib.pbkdf2_hmac(digest, self._password, salt, int(iterations))
        client_key = _hmac(salted, b"Client Key", digest)
        stored_key = hashlib.new(digest, client_key).digest()
        without_proof = f"c={_b64(_GS2_HEADER)},r={nonce}".encode("ascii")
        auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        signature = _hmac(stored_key, auth_message, digest)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = _hmac(_hmac(salted, b"Server Key", digest), auth_message,
                                       digest)
        self._step = _ScramStep.VERIFY
        return without_proof + b",p=" + _b64(proof).encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server-final-message; raises unless it proves the server
        knows the password."""
        self._advance(_ScramStep.VERIFY, _ScramStep.FAILED)
        try:
            text = server_final.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error("the server's final SCRAM message is not UTF-8") from None
        first = text.split(",")[0]
        if first.startswith("e="):
            value = first[2:]
            shown = value if _ERROR_VALUE.fullmatch(value) else "(unprintable)"
            raise self._error(f"the server ended SCRAM with an error: {shown}")
        if not first.startswith("v="):
            raise self._error("the server's final SCRAM message is malformed")
        if not hmac.compare_digest(_unb64(first[2:], "signature", self._error),
                                   self._server_signature):
            raise self._error(
                "the server's SCRAM signature is wrong: it does not know the password "
                "(a misconfigured or impostor server)"
            )
        self._step = _ScramStep.DONE




class ScramServer(_Exchange):
    """The server half of one SCRAM exchange for ``password`` (prepared, the
    bytes PBKDF2 is fed), with our ``salt``, ``iterations`` and nonce part.
    A malformed client message or a wrong proof raises what ``error`` makes
    of a message; calls out of order raise LocalProtocolError."""

    def __init__(self, password: bytes, *, mechanism: str, salt: bytes, iterations: int,
                 nonce: str | None = None,
                 error: Callable[[str], RemoteProtocolError] = _default_error) -> None:
        if mechanism not in HASHES:
            raise ValueError(f"unknown SCRAM mechanism {mechanism!r}")
        if nonce is None:
            nonce = _b64(secrets.token_bytes(18))
        if not _valid_nonce(nonce) or not salt or iterations < 1:
            raise ValueError("a SCRAM server needs a nonce, a salt and a positive iteration count")
        self.mechanism = mechanism
        self._digest = HASHES[mechanism]
        self._password, self._salt, self._iterations, self._our_nonce = password, salt, iterations, nonce
        self._error = error
        self._step = _ScramStep.FIRST
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = ""
        #: The user name the client gave in its first message (SASLprep is the caller's).
        self.username = ""

    def server_first(self, client_first: bytes) -> bytes:
        """The server-first-message for the client's first message."""
        self._advance(_ScramStep.FIRST, _ScramStep.FAILED)
        try:
            text = client_first.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error("the client's first SCRAM message is not UTF-8") from None
        if not (text.startswith("n,") or text.startswith("y,")):
            raise self._error("the client asks for SCRAM channel binding, which this server does not offer")
        header_end = text.find(",", 2)
        bare = text[header_end + 1:] if header_end >= 0 else ""
        parts = bare.split(",")
        if len(parts) < 2 or not parts[0].startswith("n=") or not parts[1].startswith("r="):
            raise self._error("the client's first SCRAM message is malformed")
        if any(part.startswith("m=") for part in parts[2:3]):
            raise self._error("the client demands a SCRAM extension we do not know")
        client_nonce = parts[1][2:]
        if not _valid_nonce(client_nonce):
            raise self._error("the client's SCRAM nonce is not printable ASCII")
        self.username = parts[0][2:].replace("=2C", ",").replace("=3D", "=")
        self._client_first_bare = bare.encode("utf-8")
        self._nonce = client_nonce + self._our_nonce
        self._server_first = f"r={self._nonce},s={_b64(self._salt)},i={self._iterations}".encode("ascii")
        self._step = _ScramStep.FINAL
        return self._server_first

    def server_final(self, client_final: bytes) -> bytes:
        """The server-final-message (our signature) once the client's proof
        checks; raises if it does not."""
        self._advance(_ScramStep.FINAL, _ScramStep.FAILED)
        try:
            text = client_final.decode("ascii")
        except UnicodeDecodeError:
            raise self._error("the client's final SCRAM message is not ASCII") from None
        without_proof, sep, proof_text = text.rpartition(",p=")
        parts = without_proof.split(",")
        if not sep or len(parts) < 2 or not parts[0].startswith("c=") or not parts[1].startswith("r="):
            raise self._error("the client's final SCRAM message is malformed")
        if parts[1][2:] != self._nonce:
            raise self._error("the client's SCRAM nonce is not this exchange's")
        proof = _unb64(proof_text, "proof", self._error)
        digest = self._digest
        salted = hashlib.pbkdf2_hmac(digest, self._password, self._salt, self._iterations)
        stored_key = hashlib.new(digest, _hmac(salted, b"Client Key", digest)).digest()
        auth_message = (self._client_first_bare + b"," + self._server_first + b","
                        + without_proof.encode("ascii"))
        signature = _hmac(stored_key, auth_message, digest)
        if len(proof) != len(signature):
            raise self._error("authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.new(digest, client_key).digest(), stored_key):
            raise self._error("authentication failed")
        self._step = _ScramStep.DONE
        server_signature = _hmac(_hmac(salted, b"Server Key", digest), auth_message, digest)
        return b"v=" + _b64(server_signature).encode("ascii")
