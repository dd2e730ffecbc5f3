"""Certificate authorities and the certificates Wicket issues.

Theory of operation
-------------------
The cluster owns three CAs, created on first start and kept in its state
directory (private keys 0600):

* the **user CA** (X.509) signs *session certificates*: the gateway makes its
  own key pair, sends only the public key at login, and gets back a short-lived
  certificate whose subject is the user and whose identity extension
  (:data:`IDENTITY_OID`) carries who the holder is (user, roles, person or bot,
  cluster, traits) in a versioned JSON document;
* the **host CA** (X.509) signs the cluster's own TLS server certificate; its
  public key is what a gateway pins (``sha256:<hex of SubjectPublicKeyInfo>``);
* the **SSH user CA** (Ed25519) signs OpenSSH user certificates, and the
  **SSH host CA** host certificates for nodes that want them
  (gateway/identity/sshcerts.py).

All X.509 keys are ECDSA P-256: every TLS 1.3 stack and every database client
library accepts it, and signing is cheap (the cluster signs at every login).

Nothing here reads the clock: callers pass ``now`` so expiry is testable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Iterable

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.errors import ErrorCode

# An OID under the UUID arc (ITU-T X.667: 2.25.<uuid as integer>), which anyone
# may mint without registration. It names Wicket's identity extension.
IDENTITY_OID = x509.ObjectIdentifier("2.25.74579733335615979131985896489773067639")

#: The identity document's major version. A reader refuses a version it does
#: not know (the certificate is then ``cert_invalid``); additions that old
#: readers may ignore are new keys within the same version.
IDENTITY_VERSION = 1

_MAX_IDENTITY_BYTES = 16 * 1024
# Allow a little clock skew between the cluster that signs and the peer that
# checks: a certificate is valid from 1 minute before it was issued.
_BACKDATE = dt.timedelta(minutes=1)
#: Public: a certificate was issued this long after its not_before.
BACKDATE = _BACKDATE


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class CertError(Exception):
    """A certificate was refused. ``code`` is what the wire carries."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _freeze_traits(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    items = dict(value).items() if value else ()
    return tuple(sorted((str(k), tuple(str(x) for x in v)) for k, v in items))


@attrs.frozen(slots=True, kw_only=True)
class Identity:
    """Who holds a session certificate, as the cluster vouched at login."""

    user: str
    roles: tuple[str, ...] = attrs.field(converter=tuple)
    cluster: str
    kind: str = "person"  # "person" or "bot"
    # Role-derived allowances (logins, db users, db names...) for later routes.
    traits: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(
        default=(), converter=_freeze_traits
    )
    not_before: dt.datetime
    not_after: dt.datetime
    # When the user last proved who they are (password/TOTP); renewals never
    # outlive that login's maximum session.
    auth_time: dt.datetime | None = None
    serial: int = 0
    # The user's certificate generation at issue: the cluster refuses a
    # certificate whose generation is below the user's current one (a lock,
    # a new password or a removal revoked it). Absent (0) before any.
    generation: int = 0
    # A bot's certificate: the instance (one join) it belongs to and its
    # place in that instance's renewal lineage (gateway/cluster/bots.py).
    instance: str = ""
    renewal: int = 0

    def to_document(self) -> bytes:
        doc = {
            "v": IDENTITY_VERSION,
            "user": self.user,
            "roles": list(self.roles),
            "cluster": self.cluster,
            "kind": self.kind,
            "traits": {k: list(v) for k, v in self.traits},
        }
        if self.auth_time is not None:
            doc["auth_time"] = int(self.auth_time.timestamp())
        if self.generation:
            doc["gen"] = self.generation
        if self.instance:
            doc["bot"] = {"instance": self.instance, "renewal": self.renewal}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    def remaining(self, now: dt.datetime) -> dt.timedelta:
        return self.not_after - now


# --- small DER helpers: the extension value is a DER UTF8String of JSON ------


def _der_utf8string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x0c" + length + data


def _parse_der_utf8string(der: bytes) -> bytes:
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("not a DER UTF8String")
    first = der[1]
    if first < 0x80:
        length, start = first, 2
    else:
        nbytes = first & 0x7F
        if not 1 <= nbytes <= 3:
            raise ValueError("bad DER length")
        length, start = int.from_bytes(der[2 : 2 + nbytes], "big"), 2 + nbytes
    if start + length != len(der):
        raise ValueError("DER length does not match")
    return der[start:]


# --- keys ---------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def public_key_pin(public_key) -> str:
    """``sha256:<hex>`` over the DER SubjectPublicKeyInfo, as kubeadm pins."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def cert_fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def acceptable_session_key(public_key: object) -> bool:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return True
    return isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)


def sign_possession(key, message: bytes) -> bytes:
    """A session key's signature over ``message``: proof that its holder
    has the private key (protocols/linkrenewal.py)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_possession(public_key: object, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is :func:`sign_possession`'s by the private half
    of ``public_key`` (a session key: :func:`acceptable_session_key`)."""
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def normalize_pin(pin: str) -> str:
    """Accept ``sha256:HEX`` (any case, optional colons in the hex)."""
    algo, sep, digest = pin.strip().partition(":")
    if not sep or algo.lower() != "sha256":
        raise ValueError("a CA pin looks like sha256:<64 hex digits>")
    digest = digest.replace(":", "").lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("a CA pin looks like sha256:<64 hex digits>")
    return "sha256:" + digest


# --- CAs ----------------------------------------------------------------------


@attrs.frozen(slots=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)

    @property
    def pin(self) -> str:
        return public_key_pin(self.cert.public_key())

    @property
    def pem(self) -> bytes:
        return cert_to_pem(self.cert)

    @classmethod
    def create(cls, common_name: str, *, now: dt.datetime, years: int = 10,
               permitted: Iterable[str] | None = None) -> "CertificateAuthority":
        """A new self-signed CA. ``permitted``: the only names (DNS names
        and IP addresses) it may vouch for, as X.509 name constraints
        (RFC 5280 §4.2.1.10, critical): a copy of its key then cannot
        pass for any other server with a client that trusts it."""
        key = generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = x509.CertificateBuilder()
        if permitted is not None:
            builder = builder.add_extension(
                x509.NameConstraints(permitted_subtrees=[_subtree(n) for n in permitted], excluded_subtrees=None),
                critical=True,
            )
        cert = (
            builder
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load_or_create(
        cls, directory: Path, stem: str, common_name: str, *, now: dt.datetime,
        permitted: Iterable[str] | None = None,
    ) -> "CertificateAuthority":
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        if cert_path.exists() and key_path.exists():
            _check_private_mode(key_path)
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return cls(cert, key)
        ca = cls.create(common_name, now=now, permitted=permitted)
        write_private(key_path, key_to_pem(ca.key))
        write_public(cert_path, ca.pem)
        return ca

    def _builder(self, subject: x509.Name, public_key, not_before, not_after):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def issue_session_cert(self, public_key, identity: Identity) -> x509.Certificate:
        """Sign a session certificate carrying ``identity`` for ``public_key``."""
        if not acceptable_session_key(public_key):
            raise CertError(ErrorCode.BAD_REQUEST, "session keys must be ECDSA P-256 or Ed25519")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, identity.user),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster),
            ]
        )
        return (
            self._builder(subject, public_key, identity.not_before, identity.not_after)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            # Not critical: OpenSSL refuses a chain with an unknown critical
            # extension, and the identity is meaningful only to Wicket anyway.
            .add_extension(
                x509.UnrecognizedExtension(
                    IDENTITY_OID, _der_utf8string(identity.to_document())
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_client_cert(self, public_key, common_name: str, *, now: dt.datetime,
                          ttl: dt.timedelta) -> x509.Certificate:
        """A plain client certificate (CN only), e.g. for a database's
        ``cert`` authentication as ``common_name``."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return (
            self._builder(subject, public_key, now - _BACKDATE, now + ttl)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_host_cert(
        self, public_key, names: Iterable[str], *, now: dt.datetime, days: int = 365, client: bool = False
    ) -> x509.Certificate:
        """Sign the cluster's TLS server certificate for ``names`` (DNS or IP);
        ``client``: a TLS client certificate instead (the gateway's local
        clients, ``--local-tls-client-cert``)."""
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys(names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        first = next(iter(names), "wicket-cluster")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)])
        return (
            self._builder(subject, public_key, now - _BACKDATE, now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False
            )
            .sign(self.key, hashes.SHA256())
        )


def _subtree(name: str) -> x509.GeneralName:
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return x509.DNSName(name)
    return x509.IPAddress(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"))


def name_constraints(cert: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_private_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
        )


# --- reading a session certificate back ----------------------------------------


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """Parse the identity of a session certificate (no signature check)."""
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
    except x509.ExtensionNotFound:
        raise CertError(ErrorCode.CERT_INVALID, "certificate has no Wicket identity") from None
    raw = ext.value.value
    if len(raw) > _MAX_IDENTITY_BYTES:
        raise CertError(ErrorCode.CERT_INVALID, "identity extension is too large")
    try:
        doc = json.loads(_parse_der_utf8string(raw))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        if doc.get("v") != IDENTITY_VERSION:
            raise CertError(
                ErrorCode.CERT_INVALID,
                f"identity version {doc.get('v')!r} is not supported (this build reads "
                f"{IDENTITY_VERSION}); upgrade wicket or log in again",
            )
        return Identity(
            user=_str(doc["user"]),
            roles=tuple(_str(r) for r in doc["roles"]),
            cluster=_str(doc["cluster"]),
            kind=_str(doc.get("kind", "person")),
            traits={_str(k): [_str(x) for x in v] for k, v in doc.get("traits", {}).items()},
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            auth_time=_timestamp(doc.get("auth_time")),
            serial=cert.serial_number,
            generation=_generation(doc.get("gen", 0)),
            **_bot_lineage(doc.get("bot")),
        )
    except CertError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CertError(ErrorCode.CERT_INVALID, f"identity extension is malformed: {exc}") from None


def _bot_lineage(value: object) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError("bot must be an object")
    return {"instance": _str(value.get("instance")), "renewal": _generation(value.get("renewal"))}


def _generation(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise TypeError("gen must be a non-negative integer")
    return value


def _timestamp(value: object) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("auth_time must be an integer")
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def check_validity(identity: Identity, now: dt.datetime) -> None:
    if now < identity.not_before - _BACKDATE:
        raise CertError(ErrorCode.CERT_INVALID, "session certificate is not valid yet (check clocks)")
    if now >= identity.not_after:
        raise CertError(
            ErrorCode.CERT_EXPIRED,
            # What happened only: the gateway, or the API, adds the next step.
            f"session certificate for {identity.user} expired at {identity.not_after:%Y-%m-%d %H:%M:%SZ}",
        )


def verify_session_cert(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, now: dt.datetime
) -> Identity:
    """Full check without TLS: signed by ``ca_cert``, in its validity window,
    and carrying a readable identity. (On a TLS listener OpenSSL checks the
    chain; :func:`identity_from_cert` and :func:`check_validity` do the rest.)"""
    if cert.issuer != ca_cert.subject:
        raise CertError(ErrorCode.CERT_INVALID, "certificate was not issued by this cluster's user CA")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        raise CertError(ErrorCode.CERT_INVALID, "certificate signature does not verify") from None
    identity = identity_from_cert(cert)
    check_validity(identity, now)
    return identity


# --- SSH user CA --------------------------------------------------------------


def load_or_create_ssh_ca(directory: Path, stem: str = "ssh_user_ca",
                          comment: str = "wicket-ssh-user-ca") -> ed25519.Ed25519PrivateKey:
    key_path, pub_path = directory / stem, directory / f"{stem}.pub"
    if key_path.exists():
        _check_private_mode(key_path)
        return serialization.load_ssh_private_key(key_path.read_bytes(), None)
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_public(pub_path, pub + b" " + comment.encode() + b"\n")
    return key
