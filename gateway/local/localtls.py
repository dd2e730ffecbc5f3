"""TLS between local clients and the gateway (``--local-tls``).

Loopback traffic needs no encryption, but some clients insist
(``sslmode=require`` or ``verify-full`` in a shared connection string). The
gateway makes its own local CA once, in ``$WICKET_HOME`` (key 0600), and a
server certificate for localhost, 127.0.0.1 and ::1 from it; a client that
verifies points ``sslrootcert`` at the CA file the gateway prints.

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


def ensure_local_tls(home: Path) -> tuple[Path, Path, Path]:
    """(ca_cert, server_cert, server_key) paths, created or renewed as needed."""
    ensure_private_dir(home)
    now = pki.utcnow()
    ca = pki.CertificateAuthority.load_or_create(home, "local-ca", CA_NAME, now=now, permitted=LOCAL_NAMES)
    if pki.name_constraints(ca.cert) is None:  # made before the constraints: replace it
        (home / "local-ca.crt").unlink()
        ca = pki.CertificateAuthority.load_or_create(home, "local-ca", CA_NAME, now=now, permitted=LOCAL_NAMES)
    cert_path, key_path = home / "local-server.crt", home / "local-server.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _signed_by(cert, ca) and cert.not_valid_after_utc - now > dt.timedelta(days=7):
            return home / "local-ca.crt", cert_path, key_path
    key = pki.generate_key()
    cert = ca.issue_host_cert(key.public_key(), LOCAL_NAMES, now=now, days=90)
    pki.write_private(key_path, pki.key_to_pem(key))
    pki.write_public(cert_path, pki.cert_to_pem(cert))
    return home / "local-ca.crt", cert_path, key_path


def _signed_by(cert: x509.Certificate, ca: pki.CertificateAuthority) -> bool:
    """By this CA's key (a replaced CA keeps the same name)."""
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def local_server_context(home: Path, alpn: tuple[str, ...] = ()) -> tuple[ssl.SSLContext, Path]:
    ca_path, cert_path, key_path = ensure_local_tls(home)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Local clients are whatever libpq/driver the user has: accept TLS 1.2.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx, ca_path
