"""OpenSSH certificates the cluster signs, and the lines OpenSSH reads.

The cluster keeps two SSH CAs beside its X.509 ones (Ed25519, created on
first start, private keys 0600; gateway/identity/pki.py loads them):

* the **SSH user CA** signs short-lived *user certificates*: a node's
  sshd trusts it with ``TrustedUserCAKeys`` and lets the holder in as any
  login the certificate lists among its principals
  (PROTOCOL.certkeys in OpenSSH's sources; sshd_config(5));
* the **SSH host CA** signs *host certificates* for nodes that want them:
  a client that trusts it with an ``@cert-authority`` known_hosts line
  (sshd(8), "SSH_KNOWN_HOSTS FILE FORMAT") needs no per-node host key.

Nothing here reads the clock or does I/O: callers pass the times and the
keys. Public keys travel as OpenSSH's one-line form
(``ssh-ed25519 AAAA... comment``).
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Iterable

import attrs
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    SSHCertificate,
    SSHCertificateBuilder,
    SSHCertificateType,
)

#: A user certificate is valid from this long before it is signed (clock
#: skew between the cluster and a node).
BACKDATE = dt.timedelta(minutes=1)
#: What a session's user certificate lets its holder do on the node
#: (PROTOCOL.certkeys, "Extensions"). X11 forwarding and ~/.ssh/rc are left
#: out; agent forwarding is added only where a role allows it.
USER_EXTENSIONS = ("permit-port-forwarding", "permit-pty")
AGENT_FORWARDING = "permit-agent-forwarding"
#: Principals per certificate: sshd reads at most 256 (SSHKEY_CERT_MAX_PRINCIPALS).
MAX_PRINCIPALS = 256
#: Bounds on a public key line from the network.
MAX_KEY_LINE = 8 * 1024

SSHPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class SSHKeyError(ValueError):
    """A public key line that OpenSSH would not take (the message says why)."""


def public_key_line(key, comment: str = "") -> str:
    """``ssh-ed25519 AAAA... comment`` for a public (or private) key."""
    if hasattr(key, "public_key"):
        key = key.public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    return f"{line} {comment}" if comment else line


def parse_public_key(line: str, what: str = "public key") -> SSHPublicKey:
    """A public key from its OpenSSH line; :class:`SSHKeyError` naming
    ``what`` if it is not one (certificates are refused: a key is wanted)."""
    if not isinstance(line, str) or not line.strip() or len(line) > MAX_KEY_LINE:
        raise SSHKeyError(f"{what}: expected one OpenSSH public key line (ssh-ed25519 AAAA...)")
    fields = line.split()
    if len(fields) < 2:
        raise SSHKeyError(f"{what}: expected `TYPE BASE64 [COMMENT]`, as in a .pub file")
    try:
        key = serialization.load_ssh_public_key(f"{fields[0]} {fields[1]}".encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise SSHKeyError(f"{what}: not an OpenSSH public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise SSHKeyError(f"{what}: an RSA key of {key.key_size} bits is too weak (2048 at least)")
    return key


def fingerprint(key) -> str:
    """``SHA256:...`` as ssh-keygen -l prints it."""
    import base64
    import hashlib

    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


@attrs.frozen(slots=True, kw_only=True)
class UserCertRequest:
    """What goes into a user certificate."""

    #: The key id: shown in the node's auth log ("Accepted publickey for
    #: root ... ID wicket:alice:serial"), so sshd's log names the person.
    key_id: str
    principals: tuple[str, ...] = attrs.field(converter=tuple)
    not_before: dt.datetime
    not_after: dt.datetime
    extensions: tuple[str, ...] = USER_EXTENSIONS


def sign_user_cert(ca: ed25519.Ed25519PrivateKey, public_key: SSHPublicKey, request: UserCertRequest
                   ) -> SSHCertificate:
    """A user certificate for ``public_key``. A certificate with no principal
    would let its holder in as *any* login (PROTOCOL.certkeys), so none is
    signed: :class:`SSHKeyError`."""
    if not request.principals:
        raise SSHKeyError("a user certificate needs at least one login (principal)")
    if len(request.principals) > MAX_PRINCIPALS:
        raise SSHKeyError(f"at most {MAX_PRINCIPALS} logins fit in a certificate")
    builder = (
        SSHCertificateBuilder()
        .public_key(public_key)
        .serial(secrets.randbits(64))
        .type(SSHCertificateType.USER)
        .key_id(request.key_id.encode())
        .valid_principals([p.encode() for p in request.principals])
        .valid_after(int((request.not_before - BACKDATE).timestamp()))
        .valid_before(int(request.not_after.timestamp()))
    )
    for name in sorted(request.extensions):  # sorted, as the wire format wants
        builder = builder.add_extension(name.encode(), b"")
    return builder.sign(ca)


def sign_host_cert(ca: ed25519.Ed25519PrivateKey, public_key: SSHPublicKey, *, names: Iterable[str],
                   key_id: str, not_before: dt.datetime, not_after: dt.datetime) -> SSHCertificate:
    """A host certificate for a node's host key, valid for ``names`` (the
    names clients type: ``web-1.cluster``)."""
    names = [n.encode() for n in dict.fromkeys(names)]
    if not names:
        raise SSHKeyError("a host certificate needs at least one host name")
    return (
        SSHCertificateBuilder()
        .public_key(public_key)
        .serial(secrets.randbits(64))
        .type(SSHCertificateType.HOST)
        .key_id(key_id.encode())
        .valid_principals(names)
        .valid_after(int((not_before - BACKDATE).timestamp()))
        .valid_before(int(not_after.timestamp()))
        .sign(ca)
    )


def cert_line(cert: SSHCertificate, comment: str = "") -> str:
    line = cert.public_bytes().decode("ascii")
    return f"{line} {comment}" if comment else line


def cert_blob(cert: SSHCertificate) -> bytes:
    """The certificate's wire form (what an ssh-agent is given)."""
    import base64

    return base64.b64decode(cert.public_bytes().split()[1])


def load_cert(line: str | bytes) -> SSHCertificate:
    data = line.encode("ascii") if isinstance(line, str) else line
    fields = data.split()
    if len(fields) < 2:
        raise SSHKeyError("expected an OpenSSH certificate line")
    try:
        return serialization.load_ssh_public_identity(b" ".join(fields[:2]))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SSHKeyError(f"not an OpenSSH certificate ({exc})") from None


def cert_valid_before(cert: SSHCertificate) -> dt.datetime:
    return dt.datetime.fromtimestamp(cert.valid_before, dt.timezone.utc)


def known_host_line(patterns: Iterable[str], key_line: str) -> str:
    """A known_hosts line pinning ``key_line`` (TYPE BASE64) for ``patterns``."""
    return f"{','.join(patterns)} {' '.join(key_line.split()[:2])}"


def cert_authority_line(patterns: Iterable[str], ca_line: str) -> str:
    """An ``@cert-authority`` known_hosts line: host certificates that
    ``ca_line`` signed are trusted for ``patterns``."""
    return "@cert-authority " + known_host_line(patterns, ca_line)


def host_cert_problem(blob: bytes, ca_line: str, host: str, *, now: dt.datetime) -> str | None:
    """Why the wire-form host key ``blob`` is not a valid host certificate
    of the CA ``ca_line`` for ``host`` at ``now`` (None: it is one)."""
    import base64
    import struct

    if len(blob) < 4:
        return "the host key is malformed"
    (n,) = struct.unpack_from(">I", blob)
    key_type = blob[4:4 + n]
    if not key_type.endswith(b"-cert-v01@openssh.com"):
        return "the node showed a plain host key, not a host certificate"
    try:
        cert = serialization.load_ssh_public_identity(key_type + b" " + base64.b64encode(blob))
        cert.verify_cert_signature()
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        return f"the host certificate does not verify ({exc})"
    if cert.type is not SSHCertificateType.HOST:
        return "the certificate is not a host certificate"
    if public_key_line(cert.signature_key()).split()[:2] != ca_line.split()[:2]:
        return "the host certificate was signed by another CA"
    if host.encode() not in cert.valid_principals:
        return f"the host certificate is not for {host}"
    stamp = int(now.timestamp())
    if not cert.valid_after <= stamp < cert.valid_before:
        return "the host certificate is not valid now"
    return None
