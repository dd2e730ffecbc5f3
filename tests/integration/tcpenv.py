"""What the tcp route tests share: clients over loopback, a refusal as the
client sees it, TLS to the cluster without a certificate, a login over the API
from a chosen loopback address."""

from __future__ import annotations

import contextlib
import errno
import json
import re
import socket
import ssl

import trio

from tests.unit.tlsutil import read_until_reset


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def roundtrip(port: int, payload: bytes) -> bytes:
    async with await connect(port) as s:
        await s.send_all(payload)
        await s.send_eof()
        out = bytearray()
        async for chunk in s:
            out += chunk
        return bytes(out)


@contextlib.contextmanager
def unverified_tls(cluster, alpn: str, timeout: float | None = None):
    """A TLS connection to the cluster that checks nothing and presents no
    certificate: what an anonymous peer can do."""
    host, port = cluster.address.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection((host, int(port)), timeout=timeout) as raw, ctx.wrap_socket(raw) as s:
        yield s


async def refused(port: int) -> bool:
    """The gateway reset the connection without relaying anything. A session
    that cannot start is an abort, never a clean (empty) end; our send may
    meet the reset already (EPIPE), and so may our EOF (ENOTCONN: after a
    reset, where after a clean end it would succeed). On a busy machine the
    reset may even come before trio has seen the connect finish: the
    connect itself then fails with it."""
    try:
        got = await roundtrip(port, b"hello")
    except OSError as exc:
        group = exc.__cause__
        if isinstance(group, ExceptionGroup) and group.subgroup(ConnectionResetError) is not None:
            return True
        raise
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, (ConnectionResetError, BrokenPipeError)):
            return True
        if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOTCONN:
            return True
        raise
    raise AssertionError(f"a clean end after {got!r}, where a reset was due")


async def until_reset(stream) -> None:
    """Read until the gateway resets the connection, as it does to a cut
    session; a clean EOF fails the test."""
    await read_until_reset(stream, 100)


def _login_from(cluster, source: str, user: str, password: str, totp_code: str | None = None) -> tuple[int, dict]:
    """A login over the API from the loopback address ``source``: (status, answer)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    body = {"user": user, "password": password, "public_key": key}
    if totp_code is not None:
        body["totp_code"] = totp_code
    payload = json.dumps(body).encode()
    host, port = cluster.address.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0)) as raw, \
            ctx.wrap_socket(raw) as s:
        s.sendall(b"POST /v1/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % len(payload) + payload)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", answer, re.I).group(1)):
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    head, body_bytes = answer.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body_bytes)
