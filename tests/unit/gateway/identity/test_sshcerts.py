"""SSH certificates the cluster signs: what OpenSSH reads back out of them."""

import datetime as dt
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import SSHCertificateType

from gateway.identity import sshcerts

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.timezone.utc)


def _request(**kw):
    base = dict(key_id="wicket:test:alice:1f", principals=("root", "deploy"), not_before=NOW,
                not_after=NOW + dt.timedelta(hours=1))
    base.update(kw)
    return sshcerts.UserCertRequest(**base)


def test_a_user_certificate_carries_principals_times_key_id_and_extensions():
    ca = ed25519.Ed25519PrivateKey.generate()
    key = ed25519.Ed25519PrivateKey.generate()
    cert = sshcerts.sign_user_cert(ca, key.public_key(), _request())
    back = sshcerts.load_cert(sshcerts.cert_line(cert, "a comment"))
    back.verify_cert_signature()
    assert back.type is SSHCertificateType.USER
    assert back.valid_principals == [b"root", b"deploy"]
    assert back.key_id == b"wicket:test:alice:1f"
    assert back.valid_after == int((NOW - sshcerts.BACKDATE).timestamp())
    assert sshcerts.cert_valid_before(back) == NOW + dt.timedelta(hours=1)
    assert set(back.extensions) == {b"permit-pty", b"permit-port-forwarding"}
    assert back.critical_options == {}
    assert sshcerts.public_key_line(back.signature_key()) == sshcerts.public_key_line(ca)


def test_a_certificate_without_a_principal_is_never_signed():
    # OpenSSH would let such a certificate in as any login.
    ca = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(sshcerts.SSHKeyError, match="at least one login"):
        sshcerts.sign_user_cert(ca, ca.public_key(), _request(principals=()))
    with pytest.raises(sshcerts.SSHKeyError, match="at most 256"):
        sshcerts.sign_user_cert(ca, ca.public_key(), _request(principals=[f"u{i}" for i in range(257)]))


@pytest.mark.parametrize("make", [
    lambda: ed25519.Ed25519PrivateKey.generate(),
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
], ids=["ed25519", "ecdsa", "rsa"])
def test_public_key_lines_round_trip(make):
    key = make()
    line = sshcerts.public_key_line(key, "me@host")
    assert line.endswith(" me@host")
    parsed = sshcerts.parse_public_key(line)
    assert sshcerts.public_key_line(parsed) == sshcerts.public_key_line(key)
    assert sshcerts.fingerprint(parsed).startswith("SHA256:")


@pytest.mark.parametrize("line, message", [
    ("", "expected one OpenSSH public key line"),
    ("ssh-ed25519", "TYPE BASE64"),
    ("ssh-ed25519 not-base64!", "not an OpenSSH public key"),
    ("x" * 9000, "expected one OpenSSH public key line"),
    (None, "expected one OpenSSH public key line"),
])
def test_bad_public_key_lines_are_named(line, message):
    with pytest.raises(sshcerts.SSHKeyError, match=message):
        sshcerts.parse_public_key(line, "host_key")


def test_weak_rsa_keys_are_refused():
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(sshcerts.SSHKeyError, match="1024 bits is too weak"):
        sshcerts.parse_public_key(sshcerts.public_key_line(weak))


def test_host_certificates_and_known_hosts_lines():
    ca = ed25519.Ed25519PrivateKey.generate()
    host = ed25519.Ed25519PrivateKey.generate()
    cert = sshcerts.sign_host_cert(ca, host.public_key(), names=["web-1.test", "web-1.test"], key_id="web-1",
                                   not_before=NOW, not_after=NOW + dt.timedelta(days=30))
    assert cert.type is SSHCertificateType.HOST and cert.valid_principals == [b"web-1.test"]
    key_line = sshcerts.public_key_line(host, "comment")
    assert sshcerts.known_host_line(["web-1.test"], key_line) == "web-1.test " + " ".join(key_line.split()[:2])
    assert sshcerts.cert_authority_line(["*.test"], key_line).startswith("@cert-authority *.test ssh-ed25519 ")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_ssh_keygen_reads_our_user_certificate(tmp_path):
    ca = ed25519.Ed25519PrivateKey.generate()
    key = ed25519.Ed25519PrivateKey.generate()
    cert = sshcerts.sign_user_cert(ca, key.public_key(), _request(not_after=dt.datetime.now(dt.timezone.utc)
                                                                  + dt.timedelta(hours=1)))
    path = tmp_path / "id-cert.pub"
    path.write_text(sshcerts.cert_line(cert) + "\n")
    shown = subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    assert "ssh-ed25519-cert-v01@openssh.com user certificate" in shown
    assert 'Key ID: "wicket:test:alice:1f"' in shown
