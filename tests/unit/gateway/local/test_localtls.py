"""gateway/local/localtls.py: the gateway's local CA vouches for the
loopback names only (X.509 name constraints), and OpenSSL holds it to them."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.identity import pki
from gateway.local import localtls


def _handshake(ca_path, cert_pem: bytes, key_pem: bytes, server_name: str, tmp_path) -> None:
    """A TLS handshake in memory: a client trusting only ``ca_path`` and
    checking ``server_name``, a server presenting the given certificate."""
    (tmp_path / "s.crt").write_bytes(cert_pem)
    (tmp_path / "s.key").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    client_ctx = ssl.create_default_context(cafile=str(ca_path))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # a handshake is a few flights
        done = 0
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if done == 2:
            return
    raise AssertionError("the handshake did not finish")


def test_the_local_ca_is_constrained_to_the_loopback_names(tmp_path):
    ca_path, cert_path, key_path = localtls.ensure_local_tls(tmp_path / "home")
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    ext = ca_cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical and ext.value.excluded_subtrees is None
    assert set(ext.value.permitted_subtrees) == {
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
        x509.IPAddress(ipaddress.ip_network("::1/128")),
    }
    # Its own server certificate passes, for each loopback name.
    for name in ("localhost", "127.0.0.1", "::1"):
        _handshake(ca_path, cert_path.read_bytes(), key_path.read_bytes(), name, tmp_path)


def test_a_certificate_for_another_name_from_its_key_is_refused(tmp_path):
    home = tmp_path / "home"
    ca_path, _, _ = localtls.ensure_local_tls(home)
    ca = pki.CertificateAuthority.load_or_create(home, "local-ca", localtls.CA_NAME, now=pki.utcnow())
    key = pki.generate_key()
    forged = ca.issue_host_cert(key.public_key(), ["bank.example"], now=pki.utcnow())
    with pytest.raises(ssl.SSLError, match="(?i)permitted subtree violation|name constraints"):
        _handshake(ca_path, pki.cert_to_pem(forged), pki.key_to_pem(key), "bank.example", tmp_path)


def test_a_local_ca_from_before_the_constraints_is_replaced(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    old = pki.CertificateAuthority.load_or_create(home, "local-ca", localtls.CA_NAME, now=pki.utcnow())
    assert pki.name_constraints(old.cert) is None
    key = pki.generate_key()  # and the server certificate it issued
    pki.write_private(home / "local-server.key", pki.key_to_pem(key))
    pki.write_public(home / "local-server.crt", pki.cert_to_pem(
        old.issue_host_cert(key.public_key(), localtls.LOCAL_NAMES, now=pki.utcnow(), days=90)))
    ca_path, cert_path, _ = localtls.ensure_local_tls(home)
    new = x509.load_pem_x509_certificate(ca_path.read_bytes())
    assert pki.name_constraints(new) is not None and new != old.cert
    x509.load_pem_x509_certificate(cert_path.read_bytes()).verify_directly_issued_by(new)  # issued again
    assert localtls.ensure_local_tls(home)[0].read_bytes() == ca_path.read_bytes()  # stable from then on


def test_the_local_client_certificate_is_private_for_client_auth_and_kept(tmp_path):
    cert_path, key_path = localtls.ensure_local_client_cert(tmp_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "local-ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # never a server's
    # The server context asks for it, verified against the local CA.
    ctx, _ = localtls.local_server_context(tmp_path, client_certs=True)
    assert ctx.verify_mode is ssl.CERT_OPTIONAL
    again = localtls.ensure_local_client_cert(tmp_path)
    assert again == (cert_path, key_path)
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == cert  # kept, not reissued


def test_the_client_pem_is_the_certificate_and_key_private_and_follows_a_renewal(tmp_path):
    pem = localtls.ensure_local_client_pem(tmp_path)
    cert_path, key_path = localtls.ensure_local_client_cert(tmp_path)
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600
    assert pem.read_bytes() == cert_path.read_bytes() + key_path.read_bytes()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(pem)  # one file, as MongoDB clients take it
    cert_path.unlink()  # a renewal: a new certificate and key
    localtls.ensure_local_client_pem(tmp_path)
    assert pem.read_bytes() == cert_path.read_bytes() + key_path.read_bytes()
