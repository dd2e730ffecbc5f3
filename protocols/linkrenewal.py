"""A multiplexed connection's certificate renewed in place, sans-I/O.

Why. The cluster lets a multiplexed connection (protocols/mux.py) live as
long as the certificate it was opened with, and so every session on it. A
gateway renews its certificate well before the end (a new key, a new
certificate, gateway/local/session.py); without this, the sessions open on
the old connection would still be cut when the old certificate ends. So the
gateway presents the renewed certificate on the connection it already has,
and the cluster, once satisfied, lets the connection and its sessions live
as long as the new one.

Wire (docs/wire.md, "Renewing a connection's certificate"). Two control
dials (an OPEN with FIN, whose REPLY is all) for the resource
:data:`RESOURCE`, which no resource can be named (names are
``[a-z0-9][a-z0-9._-]*``), so a cluster from before this refuses them as an
unknown resource and the gateway knows to open a new connection instead:

1. ``params = {"link": "challenge"}``; the cluster answers a DialAccept
   with ``params = {"nonce": <64 hex digits>}``: 32 random bytes, good for
   one answer on this connection within a short while.
2. ``params = {"link": "renew", "nonce": ..., "signature": <base64>,
   "certificate.0": <base64>, "certificate.1": ..., ...}``: the new
   certificate (DER, base64, in pieces of at most MAX_PARAM_VALUE
   characters, since a dial parameter is that long at most) and a signature
   by the new certificate's key over :func:`proof_message`. The cluster
   answers a DialAccept (``params = {"expires_at": ISO 8601}``) or a
   DialError saying why not.

What the signature proves. The nonce travels only inside this TLS
connection, and the cluster accepts each one once: a signature over it
shows that whoever holds this connection also holds the new private key,
now. (TLS 1.3's exporter, RFC 9266's ``tls-exporter`` channel binding,
would bind the proof to the connection without the first round trip, but
Python's ``ssl`` has no ``export_keying_material``, in 3.11 or later.) The
message starts with a context string, so the signature means nothing
anywhere else, and covers the certificate's digest, so it vouches for this
certificate only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final, Mapping

import attrs

from protocols.dial import MAX_PARAM_VALUE, MAX_PARAMS, DialAccept, DialRequest

__all__ = [
    "RESOURCE", "NONCE_BYTES", "MAX_CERTIFICATE", "Renewal",
    "is_link_request", "challenge_request", "challenge_accept", "nonce_of", "proof_message",
    "renew_request", "parse_renew", "renewed_accept", "wants_challenge",
]

#: The resource a link dial names: no resource can be called this.
RESOURCE: Final = "@link"
PARAM_LINK: Final = "link"
CHALLENGE: Final = "challenge"
RENEW: Final = "renew"
PARAM_NONCE: Final = "nonce"
PARAM_SIGNATURE: Final = "signature"
PARAM_EXPIRES_AT: Final = "expires_at"
_CERT_PREFIX: Final = "certificate."
#: The session id a link dial's DialAccept carries (it opens no session).
SESSION_ID: Final = "link"
NONCE_BYTES: Final = 32
#: The most DER a renewal may carry: what fits the dial's parameters
#: besides the nonce, the signature and ``link``.
MAX_CERTIFICATE: Final = (MAX_PARAMS - 3) * MAX_PARAM_VALUE * 3 // 4
MAX_SIGNATURE: Final = 512
_CONTEXT: Final = b"wicket-mux link renewal v1\x00"


@attrs.frozen(slots=True, kw_only=True)
class Renewal:
    """What a renew dial carries."""

    certificate: bytes  # DER
    nonce: bytes
    signature: bytes


def is_link_request(request: DialRequest) -> bool:
    return request.resource == RESOURCE


def wants_challenge(request: DialRequest) -> bool:
    return request.params.get(PARAM_LINK) == CHALLENGE


def challenge_request() -> DialRequest:
    return DialRequest(resource=RESOURCE, params={PARAM_LINK: CHALLENGE})


def challenge_accept(nonce: bytes) -> DialAccept:
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
    return DialAccept(session_id=SESSION_ID, params={PARAM_NONCE: nonce.hex()})


def nonce_of(accept: DialAccept) -> bytes:
    """The challenge in the cluster's answer; ValueError if it has none."""
    return _nonce(accept.params)


def proof_message(nonce: bytes, certificate: bytes) -> bytes:
    """What the new key signs: the context, the nonce, the certificate's
    SHA-256."""
    return _CONTEXT + nonce + hashlib.sha256(certificate).digest()


def renew_request(certificate: bytes, nonce: bytes, signature: bytes) -> DialRequest:
    if not 0 < len(certificate) <= MAX_CERTIFICATE:
        raise ValueError(f"a certificate of {len(certificate)} bytes does not fit a renewal "
                         f"(at most {MAX_CERTIFICATE})")
    text = base64.b64encode(certificate).decode("ascii")
    pieces = {f"{_CERT_PREFIX}{i}": text[start:start + MAX_PARAM_VALUE]
              for i, start in enumerate(range(0, len(text), MAX_PARAM_VALUE))}
    return DialRequest(resource=RESOURCE, params={
        PARAM_LINK: RENEW, PARAM_NONCE: nonce.hex(),
        PARAM_SIGNATURE: base64.b64encode(signature).decode("ascii"), **pieces})


def parse_renew(request: DialRequest) -> Renewal:
    """The renewal a renew dial carries; ValueError saying what is wrong."""
    params = request.params
    if params.get(PARAM_LINK) != RENEW:
        raise ValueError(f"a link dial's {PARAM_LINK!r} is {CHALLENGE!r} or {RENEW!r}")
    pieces = []
    for i in range(MAX_PARAMS):
        piece = params.get(f"{_CERT_PREFIX}{i}")
        if piece is None:
            break
        pieces.append(piece)
    known = {PARAM_LINK, PARAM_NONCE, PARAM_SIGNATURE} | {f"{_CERT_PREFIX}{i}" for i in range(len(pieces))}
    stray = sorted(set(params) - known)
    if stray:
        raise ValueError(f"unexpected parameters in a renewal: {', '.join(stray)}")
    if not pieces:
        raise ValueError("the renewal carries no certificate")
    certificate = _b64("the certificate", "".join(pieces))
    signature = _b64("the signature", params.get(PARAM_SIGNATURE, ""))
    if not 0 < len(signature) <= MAX_SIGNATURE:
        raise ValueError("the renewal carries no signature")
    return Renewal(certificate=certificate, nonce=_nonce(params), signature=signature)


def renewed_accept(expires_at: str) -> DialAccept:
    return DialAccept(session_id=SESSION_ID, params={PARAM_EXPIRES_AT: expires_at})


def _nonce(params: Mapping[str, str]) -> bytes:
    text = params.get(PARAM_NONCE, "")
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"the nonce must be {NONCE_BYTES * 2} hex digits")
    return nonce


def _b64(what: str, text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not base64") from None
