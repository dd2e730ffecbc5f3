"""A throwaway PKI for TLS tests: one CA, a server and a client certificate.

ECDSA P-256 throughout (fast to generate, what the cluster itself uses).
Python's ``ssl`` loads certificates and keys only from files, so everything is
written under a directory the caller owns (pytest's ``tmp_path``); the PEM
bytes are also kept in memory for tests that want them.

The contexts built here mirror the production wire (TLS 1.3 only, mutual,
ALPN) without importing ``gateway.identity``: these tests are about the
stream, not about how production contexts are configured.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import attrs
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "cluster.test"
ALPN = "wicket-test"


@attrs.frozen(slots=True, kw_only=True)
class TestPKI:
    __test__ = False  # not a pytest test class, despite the name

    ca_pem: bytes
    ca_file: Path
    server_chain: Path
    server_key: Path
    client_chain: Path
    client_key: Path
    client_cert_der: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path, *, client_name: str = "alice") -> TestPKI:
    """Create a CA plus server (for :data:`SERVER_NAME`) and client certs under
    ``directory``."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("wicket test CA"))
        .issuer_name(_name("wicket test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca_pem)

    paths: dict[str, Path] = {}
    client_der = b""
    for role, common_name in (("server", SERVER_NAME), ("client", client_name)):
        cert, key = _leaf(ca_cert, ca_key, common_name, server=role == "server", now=now)
        if role == "client":
            client_der = cert.public_bytes(serialization.Encoding.DER)
        chain = directory / f"{role}.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / f"{role}.key", key)
        paths[f"{role}_chain"] = chain
        paths[f"{role}_key"] = directory / f"{role}.key"
    return TestPKI(ca_pem=ca_pem, ca_file=directory / "ca.pem", client_cert_der=client_der,
                   **paths)


def server_context(
    pki: TestPKI,
    *,
    alpn: tuple[str, ...] = (ALPN,),
    require_client_cert: bool = True,
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    num_tickets: int = 2,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum_version
    ctx.load_cert_chain(pki.server_chain, pki.server_key)
    ctx.load_verify_locations(cafile=str(pki.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(list(alpn))
    ctx.num_tickets = num_tickets
    return ctx


def client_context(
    pki: TestPKI,
    *,
    alpn: tuple[str, ...] = (ALPN,),
    with_cert: bool = True,
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = minimum_version
    ctx.maximum_version = maximum_version
    ctx.load_verify_locations(cadata=pki.ca_pem.decode("ascii"))
    if with_cert:
        ctx.load_cert_chain(pki.client_chain, pki.client_key)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


async def read_until_eof(stream, max_bytes=None) -> bytes:
    """Everything ``stream`` sends until its EOF."""
    parts = []
    while data := await stream.receive_some(max_bytes):
        parts.append(data)
    return b"".join(parts)


async def read_until_reset(stream, max_bytes=None) -> bytes:
    """Everything ``stream`` sends until the connection is reset (a TCP
    RST, or a TLS stream whose socket was reset); a clean EOF fails the
    test, since it would tell a client that a cut stream was complete."""
    parts = []
    try:
        while data := await stream.receive_some(max_bytes):
            parts.append(data)
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ConnectionResetError):
            return b"".join(parts)
        raise AssertionError(f"not a reset: {exc!r} (cause {cause!r})") from exc
    raise AssertionError(f"a clean EOF after {sum(map(len, parts))} bytes, where a reset was due")


async def ask_and_answer(client, server, question: bytes, answer: bytes) -> bytes:
    """A half-closed exchange through a relay: the client sends ``question``
    and its EOF, the server reads to EOF, then sends ``answer`` and its EOF,
    which the client must read whole. Returns what the server read."""
    await client.send_all(question)
    await client.send_eof()
    got = await read_until_eof(server)
    await server.send_all(answer)
    await server.send_eof()
    assert await read_until_eof(client) == answer
    return got


async def read_exactly(stream, n: int) -> bytes:
    """Exactly ``n`` bytes from ``stream``; an early EOF fails the test."""
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


OPENSSL = shutil.which("openssl")


class SClient:
    """``openssl s_client`` connected with TLS 1.3 and the test PKI's client
    certificate: the one client that can send a KeyUpdate on demand (no
    Python API can). Start it with :func:`start_s_client`."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.shown = b""  # its stdout and stderr so far

    async def send(self, data: bytes) -> None:
        await self.proc.stdin.send_all(data)

    async def key_update(self, *, ask: bool) -> None:
        """Send a KeyUpdate (asking for the peer's, or not). The command
        must be a read of its own: s_client drops the rest of that read."""
        done = self.shown.count(b"KEYUPDATE")
        await self.send(b"K\n" if ask else b"k\n")
        await self.until_shown(b"KEYUPDATE", done + 1)

    async def until_shown(self, text: bytes, times: int = 1) -> None:
        while self.shown.count(text) < times:
            chunk = await self.proc.stdout.receive_some(65536)
            assert chunk, f"s_client ended before showing {text!r}: {self.shown[-300:]!r}"
            self.shown += chunk

    async def close(self) -> None:
        await self.proc.stdin.aclose()
        await self.proc.wait()


async def start_s_client(nursery: trio.Nursery, pki: TestPKI, port: int) -> SClient:
    proc = await nursery.start(functools.partial(
        trio.run_process,
        [OPENSSL or "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-servername", SERVER_NAME,
         "-CAfile", str(pki.ca_file), "-cert", str(pki.client_chain), "-key", str(pki.client_key),
         "-verify_return_error"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False))
    return SClient(proc)


TCP_REPAIR = 19  # linux/tcp.h


def vanish(sock) -> None:
    """Close ``sock`` (stdlib or trio, TCP) without a word to its peer: no
    FIN, no reset, as if its host had lost power. Its peer's connection looks
    open until it sends, and then meets a reset from this host's kernel,
    which knows the connection no more. (TCP_REPAIR mode closes silently; it
    needs CAP_NET_ADMIN, which the test machines' root has.)"""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    except PermissionError:
        why = "TCP_REPAIR needs CAP_NET_ADMIN: run the tests as root"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI runs them all
        pytest.skip(why)
    sock.close()


def memory_pair(pki: TestPKI, *, client_ctx: ssl.SSLContext | None = None,
                version: ssl.TLSVersion | None = None):
    """A handshaken (client, server) pair of SSLObjects over memory BIOs, each
    as the (obj, incoming, outgoing) triple a relay engine end takes.
    ``version``: the one protocol version both sides allow."""
    contexts = [client_ctx or client_context(pki), server_context(pki)]
    if version is not None:
        for ctx in contexts:
            ctx.minimum_version = ctx.maximum_version = version
    sides = []
    for context, server in zip(contexts, (False, True)):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_side=server,
                               server_hostname=None if server else SERVER_NAME)
        sides.append((obj, incoming, outgoing))
    done = [False, False]
    while not all(done):
        for i, (obj, _, outgoing) in enumerate(sides):
            try:
                obj.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            sides[1 - i][1].write(outgoing.read())
    return sides
