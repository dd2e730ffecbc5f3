"""TLS between local clients and the gateway (``--local-tls``).

Loopback traffic needs no encryption, but some clients insist
(``sslmode=require`` or ``verify-full`` in a shared connection string). The
gateway makes its own local CA once, in ``$WICKET_HOME`` (key 0600), and a
server certificate for localhost, 127.0.0.1 and ::1 from it; a client that
verifies points ``sslrootcert`` at the CA file the gateway prints.

With ``--local-tls-client-cert`` the gateway also requires a client
certificate of that CA: it issues one in ``$WICKET_HOME``
(``local-client.crt``, key ``local-client.key`` 0600, in the 0700 home),
which the owner's clients name as ``sslcert``/``sslkey``. Another local user
cannot read the key, so cannot use the gateway even if it can reach its
port.

The CA carries X.509 name constraints for exactly those names: a user who
trusts it trusts it for nothing else, so its key, if it leaked, could not
impersonate any other server to them. A CA made before that (without the
constraints) is replaced by a new one in the same files.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from gateway.identity import pki
from gateway.private_files import ensure_private_dir

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
CA_NAME = "Wicket local gateway CA"


def local_ca_path(home: Path) -> Path:
    """Where the local CA's certificate is (made by :func:`ensure_local_tls`)."""
    return home / "local-ca.crt"


def local_client_pem_path(home: Path) -> Path:
    """Where the local clients' certificate and key are, in one PEM (made by
    :func:`ensure_local_client_pem`)."""
    return home / "local-client.pem"


def ensure_local_tls(home: Path) -> tuple[Path, Path, Path]:
    """(ca_cert, server_cert, server_key) paths, created or renewed as needed."""
    ensure_private_dir(home)
    now = pki.utcnow()
    ca = pki.CertificateAuthority.load_or_create(home, "local-ca", CA_NAME, now=now, permitted=LOCAL_NAMES)
    if pki.name_constraints(ca.cert) is None:  # made before the constraints: replace it
        local_ca_path(home).unlink()
        ca = pki.CertificateAuthority.load_or_create(home, "local-ca", CA_NAME, now=now, permitted=LOCAL_NAMES)
    cert_path, key_path = home / "local-server.crt", home / "local-server.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _signed_by(cert, ca) and cert.not_valid_after_utc - now > dt.timedelta(days=7):
            return local_ca_path(home), cert_path, key_path
    key = pki.generate_key()
    cert = ca.issue_host_cert(key.public_key(), LOCAL_NAMES, now=now, days=90)
    pki.write_private(key_path, pki.key_to_pem(key))
    pki.write_public(cert_path, pki.cert_to_pem(cert))
    return local_ca_path(home), cert_path, key_path


def ensure_local_client_cert(home: Path) -> tuple[Path, Path]:
    """(client_cert, client_key) paths of the local clients' certificate,
    created or renewed as needed (90 days; renewed with a week left)."""
    ensure_local_tls(home)
    now = pki.utcnow()
    ca = pki.CertificateAuthority.load_or_create(home, "local-ca", CA_NAME, now=now, permitted=LOCAL_NAMES)
    cert_path, key_path = home / "local-client.crt", home / "local-client.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _signed_by(cert, ca) and cert.not_valid_after_utc - now > dt.timedelta(days=7):
            return cert_path, key_path
    key = pki.generate_key()
    # Named "localhost": the CA's name constraints allow nothing else.
    cert = ca.issue_host_cert(key.public_key(), ("localhost",), now=now, days=90, client=True)
    pki.write_private(key_path, pki.key_to_pem(key))
    pki.write_public(cert_path, pki.cert_to_pem(cert))
    return cert_path, key_path


def ensure_local_client_pem(home: Path) -> Path:
    """The local clients' certificate and key in one PEM file (0600), for
    clients that take them so (MongoDB's ``tlsCertificateKeyFile``)."""
    cert_path, key_path = ensure_local_client_cert(home)
    pem_path = local_client_pem_path(home)
    combined = cert_path.read_bytes() + key_path.read_bytes()
    if not pem_path.exists() or pem_path.read_bytes() != combined:
        pki.write_private(pem_path, combined)
    return pem_path


def _signed_by(cert: x509.Certificate, ca: pki.CertificateAuthority) -> bool:
    """By this CA's key (a replaced CA keeps the same name)."""
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def local_server_context(home: Path, alpn: tuple[str, ...] = (), *,
                         client_certs: bool = False) -> tuple[ssl.SSLContext, Path]:
    """The local TLS server context and the CA's path. ``client_certs``:
    verify a client certificate when one is sent (it must be the local
    CA's); the route refuses a client without one in its own protocol,
    which a failed handshake could not."""
    ca_path, cert_path, key_path = ensure_local_tls(home)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Local clients are whatever libpq/driver the user has: accept TLS 1.2.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    if client_certs:
        ctx.load_verify_locations(ca_path)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx, ca_path
