"""SFTP file operations read from a relayed sftp subsystem, for the audit:
whole, one byte at a time, with trailing data, and fuzzed."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import RemoteProtocolError
from protocols.ssh.sftp import MAX_PENDING, FileEvent, SftpAuditor


def s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def pkt(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(body), kind) + body


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


ATTRS = u32(0)
CLIENT = b"".join([
    pkt(1, u32(3)),  # INIT
    pkt(3, u32(1) + s(b"/tmp/up.bin") + u32(0x1A) + ATTRS),  # OPEN write|creat|trunc
    pkt(6, u32(2) + s(b"h1") + struct.pack(">Q", 0) + s(b"x" * 70000)),  # WRITE
    pkt(6, u32(3) + s(b"h1") + struct.pack(">Q", 70000) + s(b"y" * 30)),
    pkt(4, u32(4) + s(b"h1")),  # CLOSE
    pkt(3, u32(5) + s(b"/etc/hostname") + u32(0x1) + ATTRS),  # OPEN read
    pkt(5, u32(6) + s(b"h2") + struct.pack(">Q", 0) + u32(32768)),  # READ
    pkt(4, u32(7) + s(b"h2")),
    pkt(18, u32(8) + s(b"/tmp/a") + s(b"/tmp/b")),  # RENAME
    pkt(13, u32(9) + s(b"/root/nope")),  # REMOVE
    pkt(3, u32(10) + s(b"/root/secret") + u32(0x1) + ATTRS),  # an OPEN that fails
])
SERVER = b"".join([
    pkt(2, u32(3)),  # VERSION
    pkt(102, u32(1) + s(b"h1")),  # HANDLE
    pkt(101, u32(2) + u32(0) + s(b"") + s(b"")),  # STATUS ok
    pkt(101, u32(3) + u32(0) + s(b"") + s(b"")),
    pkt(101, u32(4) + u32(0) + s(b"") + s(b"")),
    pkt(102, u32(5) + s(b"h2")),
    pkt(103, u32(6) + s(b"hostname\n")),  # DATA
    pkt(101, u32(7) + u32(0) + s(b"") + s(b"")),
    pkt(101, u32(8) + u32(0) + s(b"") + s(b"")),
    pkt(101, u32(9) + u32(2) + s(b"No such file") + s(b"")),
    pkt(101, u32(10) + u32(3) + s(b"Permission denied") + s(b"")),
])
EXPECTED = [
    FileEvent(op="file", path="/tmp/up.bin", mode="write", bytes_written=70030),
    FileEvent(op="file", path="/etc/hostname", mode="read", bytes_read=9),
    FileEvent(op="rename", path="/tmp/a", to="/tmp/b", ok=True),
    FileEvent(op="remove", path="/root/nope", ok=False),
    FileEvent(op="open", path="/root/secret", mode="read", ok=False),
]


def run(step: int | None) -> list[FileEvent]:
    """Interleaved as a real session is: each request, then its reply."""
    a = SftpAuditor()
    events = []
    c_packets, s_packets = _split(CLIENT), _split(SERVER)
    for i in range(max(len(c_packets), len(s_packets))):
        for data, feed in ((c_packets, a.client_data), (s_packets, a.server_data)):
            if i < len(data):
                chunk = data[i]
                for j in range(0, len(chunk), step or len(chunk)):
                    events += feed(chunk[j:j + (step or len(chunk))])
    return events


def _split(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(stream):
        (n,) = struct.unpack_from(">I", stream, pos)
        out.append(stream[pos:pos + 4 + n])
        pos += 4 + n
    return out


@pytest.mark.parametrize("step", [None, 1, 5, 4096])
def test_file_operations(step):
    assert run(step) == EXPECTED


def test_whole_streams_with_trailing_data():
    a = SftpAuditor()
    events = []
    # requests first, then replies, each stream in one go: the open's handle
    # is unknown while its writes go by, so they are not counted.
    events += a.client_data(CLIENT + b"\x00\x00")
    events += a.server_data(SERVER + b"\x00")
    assert [e.op for e in events] == ["rename", "remove", "open"]


def test_fields_for_the_audit():
    assert EXPECTED[0].fields() == {"op": "file", "path": "/tmp/up.bin", "mode": "write", "bytes_read": 0,
                                    "bytes_written": 70030}
    assert EXPECTED[2].fields() == {"op": "rename", "path": "/tmp/a", "to": "/tmp/b", "ok": True}


def test_pending_requests_are_bounded():
    a = SftpAuditor()
    for i in range(MAX_PENDING + 10):
        list(a.client_data(pkt(13, u32(i) + s(b"/x"))))
    assert a.dropped == 10
    assert list(a.server_data(pkt(101, u32(0) + u32(0) + s(b"") + s(b"")))) == []  # forgotten
    assert [e.path for e in a.server_data(pkt(101, u32(MAX_PENDING + 9) + u32(0) + s(b"") + s(b"")))] == ["/x"]


@pytest.mark.parametrize("data", [
    pkt(13, u32(1) + u32(100) + b"short"),
    pkt(6, u32(2) + s(b"h") + struct.pack(">Q", 0) + u32(999) + b"x"),
    struct.pack(">IB", 2 << 20, 3),
])
def test_malformed_requests_are_remote_errors(data):
    with pytest.raises(RemoteProtocolError):
        list(SftpAuditor().client_data(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=2048))
def test_random_bytes_never_crash(client, server):
    a = SftpAuditor()
    for feed, data in ((a.client_data, client), (a.server_data, server)):
        try:
            list(feed(data))
        except RemoteProtocolError:
            pass
