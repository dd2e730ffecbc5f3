"""asyncssh's per-packet costs, taken off the gateway's SSH connections.

The gateway's terminated SSH mode (gateway/local/ssh_asyncio.py) decrypts
and re-encrypts every byte of a bridged session in asyncssh, in one
thread: what asyncssh pays per packet (32 KiB of scp) on each leg bounds
the mode's throughput. :func:`lighten` replaces, on one connection, the
steps whose cost the profile showed (benchmarks/README.md, "Terminated
mode's scp"), with the same bytes on the wire; it falls back to asyncssh's
own code outside the steady state (key exchange, rekeying, any cipher but
AES-GCM) and steps aside with a warning where asyncssh's internals are not
what it expects. Importing this module also makes two process-wide changes
with the same bytes and the same log as asyncssh's own: AES-GCM decryption
with one copy fewer, and the packet log formatted only at debug level 3.

Every function here lives in the asyncio world (asyncssh's callbacks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from typing import Any, Callable

with warnings.catch_warnings():
    # asyncssh still imports DSA support, which cryptography deprecates.
    warnings.simplefilter("ignore")
    import asyncssh
    from asyncssh.encryption import GCMEncryption as _GCMEncryption
    from asyncssh.logging import SSHLogger as _SSHLogger
    from asyncssh.packet import SSHPacketLogger as _SSHPacketLogger
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM

__all__ = ["Cork", "lighten"]

log = logging.getLogger("wicket.proxy.ssh")

#: SSH_MSG_IGNORE (RFC 4253 §11.2) and SSH_MSG_CHANNEL_DATA (RFC 4254 §5.2).
_MSG_IGNORE, _MSG_CHANNEL_DATA = 2, 94


class _InputBuffer:
    """What asyncssh has read and not yet parsed (``SSHConnection._inpbuf``),
    with the operations it uses on the ``bytes`` it keeps there: ``len``,
    truth, ``+=``, ``find`` and slices. asyncssh takes a packet off the front
    with ``buf = buf[n:]`` twice per packet, which copies all that is left:
    with a 256 KiB read holding eight 32 KiB packets, each byte was copied
    about eight times before it was decrypted. Here the tail slice moves an
    offset; a slice with an end (what asyncssh keeps) is a ``bytes`` as
    before, and ``+=`` copies only a partial packet left over. (asyncio)"""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes = b"", pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def __bool__(self) -> bool:
        return len(self.data) > self.pos

    def __bytes__(self) -> bytes:
        return self.data[self.pos:]

    def __iadd__(self, more: bytes) -> "_InputBuffer":
        if self.pos >= len(self.data):
            return _InputBuffer(bytes(more))
        return _InputBuffer(self.data[self.pos:] + more)

    def __getitem__(self, key: slice) -> Any:
        start, stop = key.start or 0, key.stop
        if key.step is not None or start < 0 or (stop is not None and stop < 0):
            return bytes(self)[key]
        if stop is None:
            return _InputBuffer(self.data, min(self.pos + start, len(self.data)))
        return self.data[self.pos + start:self.pos + stop]

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        found = self.data.find(sub, self.pos + start, len(self.data) if end is None else self.pos + end)
        return found - self.pos if found >= 0 else -1


#: The asyncssh internals :func:`lighten` replaces or reads (asyncssh 2.24).
_LIGHTENED = ("send_packet", "_send", "data_received", "_inpbuf", "_auth_complete", "_keepalive_timer",
              "_keepalive_interval", "_set_keepalive_timer", "_reset_keepalive_timer", "_keepalive_timer_callback",
              "_kex_complete", "_rekey_bytes_sent", "_rekey_bytes", "_rekey_seconds", "_rekey_time", "_compressor",
              "_send_encryption", "_send_enchdrlen", "_send_blocksize", "_send_seq")


def _send_sealed(conn: Any, args: tuple[bytes, ...], handler: Any) -> bool:
    """(asyncio) asyncssh's ``send_packet`` for a channel's data under
    AES-GCM, with three copies of the data where it makes ten (the
    payload joined, padded and framed in separate concatenations; the
    sealed packet sliced from its tag and joined to it again): the same
    bytes on the wire (RFC 5647 as OpenSSH does it: the length is the
    associated data, padding random). False, and nothing sent, when the
    connection is anywhere but its steady state (key exchange, a rekey
    due, compression, another cipher): asyncssh's own method then does it."""
    encryption = conn._send_encryption
    if (type(encryption) is not _GCMEncryption or not (conn._kex_complete and conn._auth_complete)
            or conn._compressor is not None or conn._rekey_bytes_sent >= conn._rekey_bytes
            or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)):
        return False
    size = 1 + sum(map(len, args))
    blocksize = conn._send_blocksize
    padlen = -(conn._send_enchdrlen + size) % blocksize
    if padlen < 4:
        padlen += blocksize
    packet = b"".join((bytes((padlen, _MSG_CHANNEL_DATA)), *args, os.urandom(padlen)))
    header = len(packet).to_bytes(4, "big")
    cipher = encryption._cipher
    sealed = _AESGCM(cipher._key).encrypt(cipher._iv, packet, header)
    cipher._update_iv()
    seq = conn._send_seq
    conn._send(header + sealed)
    conn._send_seq = (seq + 1) & 0xFFFFFFFF
    conn._rekey_bytes_sent += len(packet)
    if _SSHLogger._debug_level >= 3:
        (handler or conn).log_sent_packet(_MSG_CHANNEL_DATA, seq, bytes((_MSG_CHANNEL_DATA,)) + b"".join(args))
    return True


class Cork:
    """The writes a bridge's connections make while one of them handles
    what it read go out together, one ``send`` per connection, when it
    returns: a 256 KiB read of the client's holds eight 32 KiB packets,
    each of which asyncssh would otherwise ``send`` to the node's socket on
    its own (and the link's thread would wake for). Writes made anywhere
    else (a task, a timer) go out at once, as before; so does a disconnect
    (asyncssh aborts the socket only later, from the loop). (asyncio)"""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: dict[Callable[[bytes], None], list[bytes]] = {}

    def wrap(self, conn: Any) -> None:
        send, receive = conn._send, conn.data_received

        def corked_send(data: bytes) -> None:
            if self.depth:
                chunks = self.pending.get(send)
                if chunks is None:
                    self.pending[send] = [data]
                else:
                    chunks.append(data)
            else:
                send(data)

        def corked_receive(data: bytes, datatype: Any = None) -> None:
            self.depth += 1
            try:
                receive(data)
            finally:
                self.depth -= 1
                if not self.depth and self.pending:
                    self.flush()

        conn._send, conn.data_received = corked_send, corked_receive

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for send, chunks in pending.items():
            send(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def lighten(conn: Any, cork: Cork | None = None) -> None:
    """(asyncio) Take per-packet costs of asyncssh's off one of its
    connections (``conn``, as its owner's ``connection_made`` sees it,
    before the key exchange); ``cork``: its writes are gathered with the
    other connections' of the bridge (:class:`Cork`). These are paid per
    packet, i.e. per 32 KiB of scp, on each leg: a relay of bulk data
    feels them.

    * Once encrypting, asyncssh sends an empty SSH_MSG_IGNORE ahead of every
      packet: RFC 4251 §9.3.1's countermeasure for CBC, whose IV is the
      previous ciphertext block. That is one more AES-GCM call and one more
      ``send`` for every data packet, and one more packet for the peer.
      Neither leg offers CBC (:data:`LOCAL_CIPHERS`, :data:`NODE_CIPHERS`:
      AES-GCM, chacha20-poly1305, AES-CTR), so these are dropped; a CBC
      cipher, were one ever negotiated, would keep them.
    * It copies what is left of each read twice per packet parsed
      (:class:`_InputBuffer`, which does not), and each data packet it
      sends ten times (:func:`_send_sealed`, three).
    * It sends each packet to the socket as it is made (:class:`Cork`
      gathers what one read causes).
    * Its keepalive timer is cancelled and set again for every chunk read.
      Under trio-asyncio each new timer is a handle through the loop's
      queue, and a cancelled one stays in its timer heap for the whole
      30 s (tens of thousands in a long scp). Here a chunk only stamps the
      time; the one timer, when it fires, sets itself again for what is left
      of the interval unless the peer has been quiet that long. Keepalives
      go out as before: after ``ssh_asyncio.KEEPALIVE`` without a byte from the peer.
    """
    if not all(hasattr(conn, name) for name in _LIGHTENED):
        log.warning("ssh_asyncssh_internals_changed asyncssh=%s action=%s", asyncssh.__version__,
                    "scp through this gateway is slower with this asyncssh; tell Wicket's maintainers")
        return
    loop = asyncio.get_running_loop()
    send_packet = conn.send_packet
    expire = conn._keepalive_timer_callback
    last = [0.0]

    def send(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == _MSG_CHANNEL_DATA and _send_sealed(conn, args, handler):
            return
        if pkttype != _MSG_IGNORE or (conn.get_extra_info("send_cipher") or "").endswith("-cbc"):
            send_packet(pkttype, *args, handler=handler)

    def received() -> None:  # asyncssh's _reset_keepalive_timer
        if conn._auth_complete:
            last[0] = loop.time()
            if conn._keepalive_timer is None:
                conn._set_keepalive_timer()

    def check() -> None:  # asyncssh's _keepalive_timer_callback
        quiet = loop.time() - last[0]
        if 0 < conn._keepalive_interval and quiet < conn._keepalive_interval:
            conn._keepalive_timer = loop.call_later(conn._keepalive_interval - quiet, check)
        else:
            expire()

    conn.send_packet = send
    conn._reset_keepalive_timer = received
    conn._keepalive_timer_callback = check
    conn._inpbuf = _InputBuffer(bytes(conn._inpbuf))
    if cork is not None:
        cork.wrap(conn)


def _gcm_decrypt_packet(self: Any, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes) -> bytes | None:
    """asyncssh's ``GCMEncryption.decrypt_packet`` with one copy of the
    packet where it makes two (the body, then body and tag)."""
    cipher = self._cipher
    try:
        data = _AESGCM(cipher._key).decrypt(cipher._iv, b"".join((first[header_len:], rest, mac)), first[:header_len])
    except InvalidTag:
        data = None
    cipher._update_iv()
    return data


def _log_packet(self: Any, *args: Any) -> None:
    """asyncssh's packet log (a debug level 3 line), which formats its
    message for every packet sent and received before the logger drops it:
    done only at that level."""
    if _SSHLogger._debug_level >= 3:
        _unlogged(self, *args)


# Process-wide, both the same bytes and the same log as asyncssh's own; this
# module is the gateway's only user of asyncssh (its tests' clients too: the
# same for them).
_unlogged = _SSHPacketLogger._log_packet
_SSHPacketLogger._log_packet = _log_packet
if hasattr(_GCMEncryption, "decrypt_packet") and hasattr(asyncssh.crypto.cipher.GCMCipher, "_update_iv"):
    _GCMEncryption.decrypt_packet = _gcm_decrypt_packet
