"""gateway/local/ssh_lighten.py's lightening of asyncssh's per-packet path:
the receive buffer that does not copy what is left, no SSH_MSG_IGNORE
ahead of every packet, keepalives only after a quiet interval. Real
asyncssh connections over loopback TCP, under plain asyncio."""

import asyncio
import hashlib
import time
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.local import ssh_lighten
from gateway.local.ssh_lighten import _InputBuffer, lighten

send_sealed = ssh_lighten._send_sealed

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import asyncssh


# -- the receive buffer -----------------------------------------------------------

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.binary(max_size=64)),
    st.tuples(st.just("head"), st.integers(0, 80)),
    st.tuples(st.just("tail"), st.integers(0, 80)),
    st.tuples(st.just("middle"), st.integers(0, 40), st.integers(0, 80)),
    st.tuples(st.just("find"), st.binary(min_size=1, max_size=2), st.integers(0, 10), st.integers(0, 80)),
), max_size=60)


@given(ops)
@settings(max_examples=300, deadline=None)
def test_the_buffer_answers_as_the_bytes_asyncssh_kept_there(steps):
    """Every operation asyncssh's SSHConnection uses on its ``_inpbuf``."""
    plain, ours = b"", _InputBuffer()
    for step in steps:
        if step[0] == "add":
            plain += step[1]
            ours += step[1]
        elif step[0] == "head":
            assert ours[:step[1]] == plain[:step[1]]
        elif step[0] == "tail":
            plain, ours = plain[step[1]:], ours[step[1]:]
        elif step[0] == "middle":
            assert ours[step[1]:step[2]] == plain[step[1]:step[2]]
        else:
            assert ours.find(step[1], step[2], step[3]) == plain.find(step[1], step[2], step[3])
        assert len(ours) == len(plain) and bool(ours) == bool(plain) and bytes(ours) == plain


def test_a_tail_slice_moves_an_offset_and_copies_nothing():
    data = bytes(range(256)) * 1024
    rest = _InputBuffer(data)[100:]
    assert rest.data is data and rest.pos == 100 and rest[:3] == data[100:103]
    assert (rest[len(data):]).pos == len(data)  # past the end: empty, as bytes would be
    assert not rest[10**6:]


# -- real connections ------------------------------------------------------------------


class _Open(asyncssh.SSHServer):
    """No authentication (the test's own loopback), every connection kept,
    sessions that keep what they receive."""

    def __init__(self, conns: list, sink: list) -> None:
        self.conns, self.sink = conns, sink

    def connection_made(self, conn) -> None:
        self.conns.append(conn)

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self):
        return _Sink(self.sink)


class _Sink(asyncssh.SSHServerSession):
    def __init__(self, sink: list) -> None:
        self.sink = sink

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data, datatype) -> None:
        self.sink.append(data)

    def eof_received(self) -> bool:
        self.sink.append(None)
        return False


class _Lightened(asyncssh.SSHClient):
    def connection_made(self, conn) -> None:
        lighten(conn)


async def _pair(cipher: str = "aes128-gcm@openssh.com", **client_options):
    """An asyncssh server and a lightened client on loopback: (client
    connection, the server's connections, what its sessions got)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    conns, sink = [], []
    server = await asyncssh.create_server(lambda: _Open(conns, sink), "127.0.0.1", 0, server_host_keys=[key],
                                          encoding=None, encryption_algs=[cipher])
    port = server.sockets[0].getsockname()[1]
    conn, _ = await asyncssh.create_connection(_Lightened, "127.0.0.1", port, known_hosts=None, username="u",
                                               client_keys=None, agent_path=None, config=None, **client_options)
    return server, conn, conns, sink


async def _until(what, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not what():
        if time.monotonic() > end:
            raise AssertionError("not in time")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                    "chacha20-poly1305@openssh.com", "aes128-ctr"])
def test_a_lightened_connection_sends_each_packet_once_with_no_ignore_ahead(cipher, monkeypatch):
    """AES-GCM's data packets are sealed by the gateway's own path (the
    unmodified server reads them), the others by asyncssh's."""
    sealed = []

    def counted(conn, args, handler):
        done = send_sealed(conn, args, handler)
        sealed.append(done)
        return done

    monkeypatch.setattr(ssh_lighten, "_send_sealed", counted)

    async def main():
        server, conn, conns, sink = await _pair(cipher)
        chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None)
        await _until(lambda: conns and conns[0]._auth_complete)
        first = conns[0]._recv_seq
        payload = hashlib.sha256(b"x").digest() * 1024  # 32 KiB: one packet each
        for _ in range(64):
            chan.write(payload)
        chan.write_eof()
        await _until(lambda: sink and sink[-1] is None)
        received = conns[0]._recv_seq - first
        conn.close()
        server.close()
        assert b"".join(sink[:-1]) == payload * 64
        # 64 data packets and an EOF, and no IGNORE before each (asyncssh
        # alone sends one ahead of every packet: 130 here).
        assert 65 <= received < 80, received
        assert sealed.count(True) == (64 if "gcm" in cipher else 0), sealed

    asyncio.run(main())


@pytest.mark.parametrize("peer_answers", [True, False])
def test_keepalives_go_out_after_a_quiet_interval_and_a_silent_peer_is_dropped(peer_answers):
    async def main():
        server, conn, conns, sink = await _pair(keepalive_interval=0.2, keepalive_count_max=2)
        await _until(lambda: conns and conns[0]._auth_complete)
        asked = []
        peer = conns[0]
        answer = peer._process_keepalive_at_openssh_dot_com_global_request

        def keepalive(packet):
            asked.append(time.monotonic())
            if peer_answers:
                return answer(packet)
            return None  # no reply: the client counts it unanswered

        peer._process_keepalive_at_openssh_dot_com_global_request = keepalive
        if peer_answers:
            await _until(lambda: len(asked) >= 4)
            assert not conn.is_closed()
        else:
            # The first request is never answered (and holds up the
            # server's queue of global requests): after count_max more
            # quiet intervals, the client gives up.
            await asyncio.wait_for(conn.wait_closed(), 20)
            assert asked
        conn.close()
        server.close()

    asyncio.run(main())
