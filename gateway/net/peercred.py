"""Which local user is on the other end of a connection to the gateway.

A gateway acts with its owner's identity, so a connection from another
local user must not get a session (issue: any local user could connect to a
person's localhost port and act as that person). The kernel knows who owns
every socket:

* a unix socket's peer: ``SO_PEERCRED`` (the connecting process's uid);
* a loopback TCP peer: the kernel's socket table. The client's own socket
  is the one whose local address is our peer address and whose remote
  address is our local address; a ``SOCK_DIAG_BY_FAMILY`` request over
  netlink (``NETLINK_SOCK_DIAG``, no privilege needed, the same facts as
  ``/proc/net/tcp``) looks up exactly that socket by its four-tuple and
  answers with its owner's uid, in one round trip to the kernel whatever
  the number of sockets on the machine.

A peer on another host has no local uid: :func:`peer_uid` says None, and
whether such peers may connect at all is the listener's business
(``--allow-non-loopback``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading

import attrs

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2 head: family, protocol, ext, pad, states
_ID_PORTS = struct.Struct("!HH")  # inet_diag_sockid: sport, dport (big-endian), then src[16], dst[16]
_ID_TAIL = struct.Struct("=III")  # if, cookie[2]
_NO_COOKIE = 0xFFFFFFFF
_UID_OFFSET = 4 + 48 + 12  # inet_diag_msg: 4 bytes, the sockid, expires/rqueue/wqueue, then uid
_UCRED = struct.Struct("=iII")  # pid, uid, gid

_local = threading.local()


class PeerUnknown(Exception):
    """The kernel could not say who the peer is (it left, or the lookup
    failed); a connection whose owner is unknown is refused."""


def _netlink() -> socket.socket:
    nl = getattr(_local, "netlink", None)
    if nl is None:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        nl.settimeout(1.0)  # the kernel answers at once; this only bounds a surprise
        _local.netlink = nl
    return nl


def _plain(addr: tuple) -> tuple[int, str, int]:
    """(family, host, port) with a v4-mapped IPv6 address as the IPv4
    address it is (a dual-stack listener sees an AF_INET client that way)."""
    host, port = addr[0], addr[1]
    if ":" not in host:
        return socket.AF_INET, host, port
    if host.startswith("::ffff:") and "." in host:
        return socket.AF_INET, host[7:], port
    return socket.AF_INET6, host, port


def is_loopback(addr: tuple) -> bool:
    family, host, _port = _plain(addr)
    if family == socket.AF_INET:
        return host.startswith("127.")
    return ipaddress.ip_address(host.split("%")[0]).is_loopback


def _tcp_owner(family: int, src: str, sport: int, dst: str, dport: int) -> int:
    """The uid owning the TCP socket whose local end is src:sport and
    remote end dst:dport."""
    sockid = (_ID_PORTS.pack(sport, dport) + socket.inet_pton(family, src).ljust(16, b"\0")
              + socket.inet_pton(family, dst).ljust(16, b"\0") + _ID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE))
    request = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    nl = _netlink()
    seq = getattr(_local, "seq", 0) + 1
    _local.seq = seq
    try:
        nl.send(_NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + request)
        while True:
            data = nl.recv(8192)
            length, kind, _flags, got_seq, _pid = _NLMSG.unpack_from(data)
            if got_seq == seq:
                break  # an answer to an earlier, timed-out question is skipped
    except OSError as exc:
        _local.netlink = None
        nl.close()
        raise PeerUnknown(f"the kernel's socket table could not be read: {exc.strerror or exc}") from None
    if kind == NLMSG_ERROR:
        errno = -struct.unpack_from("=i", data, _NLMSG.size)[0]
        raise PeerUnknown(f"the connecting socket is gone ({os.strerror(errno)})")
    if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSG.size + _UID_OFFSET + 4:
        raise PeerUnknown("an unexpected answer from the kernel's socket table")
    return struct.unpack_from("=I", data, _NLMSG.size + _UID_OFFSET)[0]


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process on the other end of ``sock``; None for a peer
    on another host. Raises :class:`PeerUnknown` if the kernel cannot say."""
    try:
        local = sock.getsockname()
        if isinstance(local, (str, bytes)):  # a unix socket (sock.family costs an enum lookup)
            _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            return uid
        peer = sock.getpeername()
    except OSError as exc:
        raise PeerUnknown(f"the client left ({exc.strerror})") from None
    if not is_loopback(peer):
        return None
    family, peer_host, peer_port = _plain(peer)
    _family, local_host, local_port = _plain(local)
    return _tcp_owner(family, peer_host, peer_port, local_host, local_port)


@attrs.frozen(slots=True, kw_only=True)
class LocalUsers:
    """Which local users may use a gateway's listener: by default only the
    gateway's own uid (root's too: it can read the key anyway)."""

    uids: frozenset[int] = attrs.field(factory=lambda: frozenset({os.getuid()}))
    anyone: bool = False

    def refusal(self, sock: socket.socket) -> str | None:
        """Why the peer of ``sock`` may not use this gateway, or None."""
        if self.anyone:
            return None
        try:
            uid = peer_uid(sock)
        except PeerUnknown as exc:
            return f"the connecting local user could not be determined: {exc}"
        if uid is None or uid in self.uids or uid == 0:
            return None
        return (f"this Wicket gateway belongs to uid {os.getuid()}, and connections from other local users "
                f"(uid {uid}) act with its identity; run your own `wicket login` and gateway, or the owner "
                f"may start it with --allow-uid {uid}")
