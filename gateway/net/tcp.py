"""TCP options for the connections that leave the machine.

A peer that vanishes without a FIN or a RST (its host crashed or lost power,
a laptop went to sleep, a NAT or load balancer forgot the flow) leaves a
connection that looks open forever: nothing is ever read from it again, and
nothing written to it is ever refused. On the cluster that would hold the
gateway's connection, every session on it and each session's upstream
connection (the database's backend too) without end; on the gateway, new
sessions would be sent into a connection nobody reads.

So every connection between the gateway and the cluster, and every upstream
connection the cluster opens, gets TCP keepalive: after
:data:`KEEPALIVE_IDLE` seconds without traffic the kernel sends a probe, every
:data:`KEEPALIVE_INTERVAL` seconds, and after :data:`KEEPALIVE_COUNT`
unanswered probes the connection fails with ``ETIMEDOUT`` (a reset, to the
relays: the session ends as aborted, see docs/wire.md). A peer that is only
quiet answers every probe from its kernel, and the probes keep idle flows
alive in NATs and load balancers (whose idle timeouts are minutes: 350 s on
an AWS NLB, 4 min on Azure's), so an idle session survives them.

Keepalive only probes an idle connection. Data that the peer never
acknowledges is retransmitted for about 15 minutes by default before the
kernel gives up, so the multiplexed gateway <-> cluster connection also gets
``TCP_USER_TIMEOUT`` (:data:`LINK_USER_TIMEOUT`): data unacknowledged for that
long, or a receive window shut for that long, ends it (and a new one is
opened for the next session), rather than every new session waiting on a
connection nobody reads. Both sides always read that connection
(docs/wire.md), so a window shut that long means a peer that is gone or
stuck. It is shorter than a session's wait for the cluster's answer (60 s):
sessions sent into a connection that no longer reaches anyone (the network
under it changed) end after 30 s rather than a minute, and the next ones go
over a new connection. (Those that never left this machine start again on
it; the others are reset, since a path that lost only what comes back times
out the same way, with the cluster acting on everything;
gateway/net/muxlink.py.) It also takes over from the
probe count on that connection: a quiet peer that vanished is given up
after one unanswered probe, when the second is due, 40 s after it went
quiet. A
connection that carries one session (the PostgreSQL route) and an upstream
connection do not get it: there a shut window is back-pressure from a
client or a server that reads slowly (a result paged in ``less``), which
may last as long as it likes.

The local side (a client on localhost) needs none of this: a loopback peer
cannot vanish without its kernel closing the connection.

A suspended machine is the gateway's everyday case of all this: a laptop
shut for lunch. While it sleeps the cluster's probes go unanswered, so within
a minute the cluster has let go of the connection; on waking, the gateway's end
still looks open, and its first new session would go into a connection that
the cluster answers with a reset at best, or, after a move to another
network, never answers at all. :func:`time_suspended` lets the gateway see
that it slept (``CLOCK_BOOTTIME`` counts the time spent suspended,
``CLOCK_MONOTONIC`` does not) and send new sessions over a new connection
instead (gateway/local/dialer.py).

The network can also change under an awake machine (another Wi-Fi, a VPN
coming up): the connection then stops getting answers, and each session
sent into it would wait for the user timeout. :func:`stalled` says so long
before: the kernel has waited out :data:`STALL_BACKOFF` retransmission
timeouts in a row, and nothing at all has come back for
:data:`STALL_SILENCE` seconds, which a working path, even a lossy one, all
but never shows. (The first alone is not enough: probing a window that a
live peer keeps shut backs off the same way, but each probe is answered.)
The gateway then sends new sessions over a new connection too.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import termios
import time

__all__ = ["KEEPALIVE_COUNT", "KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "LINK_USER_TIMEOUT", "SLEEP_LIMIT", "STALL_BACKOFF",
           "STALL_SILENCE", "TCP_CLOSE", "final_marks", "keep_alive", "peer_left", "stalled", "time_suspended",
           "unacknowledged", "written"]

#: Seconds without traffic before the first probe.
KEEPALIVE_IDLE = 30
#: Seconds between probes.
KEEPALIVE_INTERVAL = 10
#: Unanswered probes after which the connection fails (so a vanished peer is
#: noticed 30 + 6 x 10 = 90 s after the connection went quiet; 40 s on the
#: multiplexed connection, where LINK_USER_TIMEOUT decides).
KEEPALIVE_COUNT = 6
#: Seconds that data may stay unacknowledged (or the peer's window shut) on
#: the multiplexed gateway <-> cluster connection before it fails; shorter
#: than gateway/local/dialer.py's DIAL_TIMEOUT (see the module docstring).
LINK_USER_TIMEOUT = 30
#: Seconds of suspension after which a connection to the cluster is not
#: trusted with new sessions (see the module docstring).
SLEEP_LIMIT = 5.0

#: Retransmission timeouts in a row (tcpi_backoff) after which a connection
#: counts as no longer answered: 0.2 + 0.4 + 0.8 s at the least, with
#: nothing acknowledged.
STALL_BACKOFF = 3
#: Seconds without any acknowledgement (tcpi_last_ack_recv) that go with it.
STALL_SILENCE = 1.0

#: tcpi_state of a connection that is over for good (reset, or timed out):
#: linux/tcp_states.h.
TCP_CLOSE = 7
_TCP_CLOSE_WAIT = 8  # the peer's FIN arrived
# struct tcp_info: tcpi_backoff (u8), tcpi_last_ack_recv (u32, ms),
# tcpi_bytes_acked (u64, Linux >= 4.1) and where it ends.
_BACKOFF_AT = 4
_LAST_ACK_AT = 56
_ACKED_AT, _ACKED_END = 120, 128


def keep_alive(sock, *, user_timeout: float | None = None) -> None:
    """Turn on keepalive probing for ``sock`` (a stdlib or trio socket) and,
    with ``user_timeout`` (seconds), bound how long sent data may stay
    unacknowledged. A socket that already failed (reset meanwhile) is left
    as it is: its next read or write reports that."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if user_timeout is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    except OSError:
        pass


def time_suspended() -> float:
    """Seconds this machine has spent suspended since it booted. Only
    differences mean anything: compare with an earlier reading."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)


def _info(sock) -> bytes | None:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _ACKED_END)
    except OSError:
        return None  # not TCP (a test's AF_UNIX pair)
    return info if len(info) >= _ACKED_END else None


def _acked(info: bytes) -> int:
    return int.from_bytes(info[_ACKED_AT:_ACKED_END], sys.byteorder)


def written(sock) -> int | None:
    """Where the bytes written to ``sock`` so far end, counted as
    :func:`final_marks` counts: acknowledged ones plus those the
    kernel still holds (SIOCOUTQ). None if the socket cannot say."""
    info = _info(sock)
    queued = unacknowledged(sock)
    return None if info is None or queued is None else _acked(info) + queued


def unacknowledged(sock) -> int | None:
    """Bytes written to ``sock`` that its peer's kernel has not acknowledged
    yet, sent or not (SIOCOUTQ); None if the socket cannot say."""
    return _ioctl_int(sock, termios.TIOCOUTQ)


def unread(sock) -> int | None:
    """Bytes that arrived on ``sock`` and wait to be read (SIOCINQ); None
    if the socket cannot say."""
    return _ioctl_int(sock, termios.FIONREAD)


_SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes written, not sent yet


def _ioctl_int(sock, request: int) -> int | None:
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), request, bytes(4)), sys.byteorder, signed=True)
    except OSError:
        return None


def final_marks(sock) -> tuple[int, int] | None:
    """For a connection that is over for good (TCP state CLOSE: a reset came,
    or it timed out), ``(acknowledged, sent)``: where the bytes its peer's
    kernel acknowledged end, and where the bytes TCP ever handed down to be
    sent end (snd_nxt: acknowledged + SIOCOUTQ - SIOCOUTQNSD; the kernel
    keeps both counts after the end). Nothing past either can still arrive.
    ``sent`` may count a packet that was dropped below TCP (a driver, a
    tunnel): a count too high, the safe way. None while the connection lives
    (more may yet be sent and acknowledged), or if the socket cannot say."""
    info = _info(sock)
    if info is None or info[0] != TCP_CLOSE:
        return None
    queued, unsent = unacknowledged(sock), _ioctl_int(sock, _SIOCOUTQNSD)
    if queued is None or unsent is None:
        return None
    acked = _acked(info)
    return acked, acked + queued - unsent


def stalled(sock) -> bool:
    """Whether ``sock``'s connection has stopped getting answers: the kernel
    has waited out :data:`STALL_BACKOFF` retransmission timeouts in a row,
    with nothing acknowledged for :data:`STALL_SILENCE` seconds (see the
    module docstring). False if the socket cannot say."""
    info = _info(sock)
    return (info is not None and info[_BACKOFF_AT] >= STALL_BACKOFF
            and int.from_bytes(info[_LAST_ACK_AT:_LAST_ACK_AT + 4], sys.byteorder) >= STALL_SILENCE * 1000)


def peer_left(sock, *, eof: bool) -> bool:
    """Whether the peer is gone: it reset the connection, or, with ``eof``,
    sent its FIN (for a peer that never half-closes before it has its
    answer, such as a PostgreSQL client; one that closes a TLS connection
    sends a close_notify first, so the FIN is read from the connection's
    state, not from the bytes). ``sock``: a socket, or anything with
    ``fileno()`` and ``getsockopt`` (a trio socket). Takes no byte."""
    info = _info(sock)
    if info is not None:
        state = info[0]
        return state == TCP_CLOSE or (eof and state == _TCP_CLOSE_WAIT)
    # Not TCP (a test's AF_UNIX pair): ask the socket, without taking a byte.
    own = isinstance(sock, socket.socket)
    s = sock if own else socket.socket(fileno=os.dup(sock.fileno()))
    try:
        data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:  # reset (or no longer usable): gone either way
        return True
    finally:
        if not own:
            s.close()
    return eof and not data
