"""The gateway's watch over a MySQL session whose commands need a word first.

Theory of operation
-------------------
A MySQL session is normally relayed byte for byte by the relay engine. When
the user's roles allow this db user only some databases (the cluster says
so in its accept: ``mysql.guard``), a switch of database must be checked
before the server sees it, and a refusal must leave the session usable: an
ERR for that command, nothing else. The engine cannot hold a command back,
so such a session runs through :class:`Guard` instead: the client's socket
stays in trio, the stream gets one end of a socket pair, and two tasks
copy between them. Client -> cluster, the guard follows the packets (a
command is the packet with sequence id 0 after a complete one); of each
command it looks at the first byte only, and holds back

* COM_INIT_DB and a COM_QUERY that is a ``USE`` (after comments, or in a
  multi-statement): it asks the cluster first (a control dial with the db
  user and the database: RBAC decides exactly as for a dial); allowed, the
  command goes on; refused, the client gets ERR 1044 (42000) with the
  role's words, and the server never sees it;
* COM_CHANGE_USER: a session is one db user's, chosen at connect time, so
  the client gets ERR 1047 saying to connect again as the other user.

Where a role allows LOAD DATA LOCAL, a file's packets follow the server's
request with ids that wrap past 0: the guard then follows the session
with the codec's auditors (protocols/mysql/commands.py, responses.py) to
tell them from commands.

The cluster's auditor enforces the same (it ends a session where a
refused switch reaches it): the guard is what keeps the session usable.
A command is held whole only up to :data:`MAX_HELD` bytes; a longer one
goes on unseen (the cluster still checks it). Responses are copied as they
come; the guard answers only while no response is pending (clients do
not pipeline a switch of database).
"""

from __future__ import annotations

import logging
import socket
from typing import Awaitable, Callable

import trio

from gateway.net.relay import RelayCounters
from protocols.errors import ProtocolError
from protocols.mysql import (
    NEED_DATA, Capability, Command, CommandAuditor, CommandTracker, ErrPacket, ResponseAuditor, encode_packets,
)
from protocols.mysql.constants import ErrorNumber
from protocols.mysql.statements import use_targets

log = logging.getLogger("wicket.proxy.mysql")

READ = 65536
#: Commands longer than this are passed on without a look.
MAX_HELD = 64 * 1024
_LOOKED_AT = frozenset({Command.INIT_DB, Command.QUERY, Command.CHANGE_USER})

NOT_UTF8 = "database names must be UTF-8 through Wicket"
#: check(schema) -> None if allowed, else why not (the role's words).
Check = Callable[[str], Awaitable[str | None]]


class Guard:
    """Relays ``client`` <-> ``inner`` (the socket-pair end the stream's
    socket is joined to), holding back what needs a word; see the module
    docstring. ``check`` asks the cluster about a database."""

    def __init__(self, client: trio.abc.Stream, inner: trio.SocketStream, check: Check,
                 capabilities: Capability) -> None:
        self.client, self.inner, self.check = client, inner, check
        # With LOCAL INFILE a file's packets follow the server's request,
        # their ids wrapping past 0: following the session (the codec's
        # auditors, joined by a tracker) tells them from commands.
        self._tracker: CommandTracker | None = None
        if Capability.LOCAL_FILES in capabilities:
            self._tracker = CommandTracker(capabilities)
            self._commands, self._responses = CommandAuditor(self._tracker), ResponseAuditor(self._tracker)
        self.counters = RelayCounters()
        self._buf = bytearray()
        self._continues = False  # the last packet was a full one: the next continues it
        self._pending = 0  # bytes of a passing packet still to come
        self._send_lock = trio.Lock()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._down, nursery.cancel_scope)
            await self._up()
            nursery.cancel_scope.cancel()

    async def _down(self, scope: trio.CancelScope) -> None:
        """Cluster -> client, as it comes."""
        try:
            while True:
                data = await self.inner.receive_some(READ)
                if not data:
                    break
                self.counters.b_to_a += len(data)
                if self._tracker is not None:
                    _follow(self._responses, data)  # before the client can answer a file request
                async with self._send_lock:
                    await self.client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _up(self) -> None:
        """Client -> cluster, a packet at a time where a command needs a look."""
        try:
            while True:
                data = await self.client.receive_some(READ)
                if not data:
                    await self.inner.send_eof()
                    return
                self.counters.a_to_b += len(data)
                self._buf += data
                await self._forward()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _forward(self) -> None:
        buf = self._buf
        out = bytearray()
        while len(buf) >= 4:
            length, seq = int.from_bytes(buf[:3], "little"), buf[3]
            command = buf[4] if len(buf) > 4 else None
            starts = seq == 0 and not self._continues and not (self._tracker and self._tracker.infile)
            if starts and length and length <= MAX_HELD and (command is None or command in _LOOKED_AT):
                if len(buf) < 4 + length:
                    break  # the whole command first
                payload = bytes(buf[4:4 + length])
                del buf[:4 + length]
                self._continues = False
                refusal = await self._refusal(payload) if payload[0] in _LOOKED_AT else None
                if refusal is None:
                    out += length.to_bytes(3, "little") + bytes([seq]) + payload
                    continue
                if out:
                    await self._send_up(out)
                    out.clear()
                async with self._send_lock:
                    await self.client.send_all(encode_packets(refusal.encode(), 1)[0])
                continue
            # Anything else passes as it comes: a partial packet too.
            take = min(len(buf), 4 + length)
            out += buf[:take]
            del buf[:take]
            if take < 4 + length:  # the rest of this packet arrives later: count it off
                self._pending = 4 + length - take
                await self._send_up(out)
                await self._pass_rest()
                out = bytearray()
            self._continues = length == 0xFFFFFF
        if out:
            await self._send_up(out)

    async def _pass_rest(self) -> None:
        """Forward the rest of a packet that did not arrive whole, unseen."""
        while self._pending:
            data = await self.client.receive_some(min(READ, self._pending))
            if not data:
                raise trio.BrokenResourceError("the client left in the middle of a packet")
            self.counters.a_to_b += len(data)
            self._pending -= len(data)
            await self._send_up(data)

    async def _send_up(self, data) -> None:
        if self._tracker is not None:
            _follow(self._commands, bytes(data))
        await self.inner.send_all(data)

    async def _refusal(self, payload: bytes) -> ErrPacket | None:
        command = payload[0]
        if command == Command.CHANGE_USER:
            return ErrPacket.of(ErrorNumber.ER_UNKNOWN_COM_ERROR,
                                "COM_CHANGE_USER is not supported through Wicket: a session is one db user's; "
                                "connect again as the other user")
        if command == Command.INIT_DB:
            targets = [payload[1:].decode("utf-8", "replace")]
        else:
            targets = use_targets(payload[1:].decode("utf-8", "replace"))
        for schema in targets:
            # Bytes that are not UTF-8 are named one way here and another by
            # the server: refused rather than checked under a guessed name.
            why = NOT_UTF8 if "\ufffd" in schema else await self.check(schema)
            if why is not None:
                log.info("mysql_use_refused schema=%r reason=%r", schema, why)
                return ErrPacket.of(ErrorNumber.ER_DBACCESS_DENIED_ERROR,
                                    f"{why}; ask a cluster administrator for a role that allows it")
        return None


def _follow(auditor, data: bytes) -> None:
    """Feed ``data`` to one of the session's auditors (its events are the
    cluster's business; here only the tracker's state counts)."""
    try:
        auditor.receive_data(data)
        while auditor.next_event() is not NEED_DATA:
            pass
    except ProtocolError as exc:
        raise trio.BrokenResourceError(f"the MySQL session could not be followed: {exc.message}") from None


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair: the end for the relay engine, the end for the guard."""
    a, b = socket.socketpair()
    return (trio.SocketStream(trio.socket.from_stdlib_socket(a)),
            trio.SocketStream(trio.socket.from_stdlib_socket(b)))
