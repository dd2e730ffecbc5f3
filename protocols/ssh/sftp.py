"""The SFTP file operations of a relayed sftp subsystem, for the audit.

Theory of operation
-------------------
SFTP (draft-ietf-secsh-filexfer-02, the version OpenSSH speaks: 3) is a
request/response protocol inside an SSH channel: each packet is
``uint32 length, byte type, uint32 request-id, ...``. :class:`SftpAuditor`
is shown the client's bytes and the server's as they are relayed, in
whatever chunks, and keeps only what a file operation's record needs:

* an OPEN's path and flags until its HANDLE reply, then, per handle, the
  path and the bytes READ (counted from the DATA replies) and WRITTEN
  (counted from the WRITE requests' lengths, never kept);
* REMOVE, RENAME, MKDIR, RMDIR, SYMLINK, SETSTAT: their paths until the
  STATUS reply says whether they worked.

It yields :class:`FileEvent` when a handle is closed (``op = "file"``,
with the bytes each way) or a path operation is answered. Everything is
bounded: a packet's kept prefix (:data:`KEEP`; a WRITE's data is skipped by
its length), the requests waiting for replies and the open handles
(:data:`MAX_PENDING`; past that the oldest are forgotten, counted in
``dropped``). Malformed input raises :class:`RemoteProtocolError`; the
caller then stops auditing, and the session goes on.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Final, Iterator

import attrs

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.framing import FrameLayout, FrameSplitter

#: What OpenSSH's sftp-server takes (SFTP_MAX_MSG_LENGTH), with room.
MAX_PACKET: Final = 1024 * 1024
#: Bytes of a packet's body kept: ids, handles and two paths.
KEEP: Final = 2 * 4096 + 64
MAX_PENDING: Final = 1024
MAX_PATH_SHOWN: Final = 4096

SFTP_PACKET: Final = FrameLayout(name="SFTP packet", header=">IB", length_field=0, kind_field=1, uncounted=4,
                                 min_length=1, max_length=MAX_PACKET)

OPEN, CLOSE, READ, WRITE, SETSTAT = 3, 4, 5, 6, 9
REMOVE, MKDIR, RMDIR, RENAME, SYMLINK = 13, 14, 15, 18, 20
STATUS, HANDLE, DATA = 101, 102, 103
_PATH_OPS: Final = {REMOVE: "remove", MKDIR: "mkdir", RMDIR: "rmdir", RENAME: "rename", SYMLINK: "symlink",
                    SETSTAT: "setstat"}
_TWO_PATHS: Final = {RENAME, SYMLINK}
_REQUESTS: Final = frozenset({OPEN, CLOSE, READ, WRITE, *_PATH_OPS})
_REPLIES: Final = frozenset({STATUS, HANDLE, DATA})
#: A WRITE's id, handle (at most 256 bytes), offset and data length.
_WRITE_HEAD: Final = 4 + 4 + 256 + 8 + 4
#: SSH_FXF_* open flags.
FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC = 0x1, 0x2, 0x4, 0x8, 0x10


def _error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=ErrorCode.BAD_REQUEST)


@attrs.frozen(slots=True, kw_only=True)
class FileEvent:
    """One audited file operation. ``op``: ``file`` (an opened file, closed:
    ``mode`` says how it was opened, ``bytes_read``/``bytes_written`` what
    moved) or a path operation (``remove``, ``rename``...; ``ok`` is the
    server's answer, ``to`` a rename's or symlink's second path)."""

    op: str
    path: str
    to: str | None = None
    mode: str | None = None
    ok: bool | None = None
    bytes_read: int = 0
    bytes_written: int = 0

    def fields(self) -> dict:
        out = {"op": self.op, "path": self.path}
        for key in ("to", "mode", "ok"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.op == "file":
            out["bytes_read"], out["bytes_written"] = self.bytes_read, self.bytes_written
        return out


@attrs.define(slots=True)
class _Handle:
    path: str
    mode: str
    read: int = 0
    written: int = 0


class _Reader:
    """The fields of one kept packet body, in order."""

    def __init__(self, body: bytes) -> None:
        self.body, self.pos = body, 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.body):
            raise _error("SFTP packet too short")
        (value,) = struct.unpack_from(">I", self.body, self.pos)
        self.pos += 4
        return value

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.body):
            raise _error("SFTP string runs past its packet (or past what is kept of it)")
        value = self.body[self.pos:self.pos + n]
        self.pos += n
        return value


def _path(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= MAX_PATH_SHOWN else text[:MAX_PATH_SHOWN] + "..."


def _mode(flags: int) -> str:
    if flags & FXF_WRITE:
        return "append" if flags & FXF_APPEND else "write"
    return "read"


class _Bounded(OrderedDict):
    """Insertion-ordered, at most MAX_PENDING entries (the oldest go)."""

    def __init__(self, owner: "SftpAuditor") -> None:
        super().__init__()
        self.owner = owner

    def put(self, key, value) -> None:
        self[key] = value
        if len(self) > MAX_PENDING:
            self.popitem(last=False)
            self.owner.dropped += 1


class SftpAuditor:
    """See the module docstring."""

    def __init__(self) -> None:
        # A WRITE is kept up to its data (id, handle, offset, length); a
        # DATA reply up to its data's length; nothing else is kept at all.
        self._client = FrameSplitter(SFTP_PACKET, keep=lambda kind, n: (min(n, _WRITE_HEAD) if kind == WRITE else
                                                                        min(n, KEEP) if kind in _REQUESTS else None))
        self._server = FrameSplitter(SFTP_PACKET, keep=lambda kind, n: (min(n, 8) if kind == DATA else
                                                                        min(n, KEEP) if kind in _REPLIES else None))
        self._requests = _Bounded(self)  # request id -> (type, path, to, flags | handle)
        self._handles = _Bounded(self)  # handle -> _Handle
        self.dropped = 0

    def client_data(self, data: bytes) -> Iterator[FileEvent]:
        """The client's bytes (requests); the events they complete."""
        for frame in self._client.feed(data):
            if frame.kind in _REQUESTS:
                event = self._request(frame.kind, frame.body, frame.body_length)
                if event is not None:
                    yield event

    def server_data(self, data: bytes) -> Iterator[FileEvent]:
        """The server's bytes (replies); the events they complete."""
        for frame in self._server.feed(data):
            if frame.kind in _REPLIES:
                event = self._reply(frame.kind, frame.body, frame.body_length)
                if event is not None:
                    yield event

    def _request(self, kind: int, body: bytes, length: int) -> FileEvent | None:
        r = _Reader(body)
        rid = r.u32()
        if kind == OPEN:
            path = _path(r.string())
            self._requests.put(rid, (OPEN, path, None, r.u32()))
        elif kind == CLOSE:
            handle = self._handles.pop(r.string(), None)
            if handle is not None:
                return FileEvent(op="file", path=handle.path, mode=handle.mode, bytes_read=handle.read,
                                 bytes_written=handle.written)
        elif kind == READ:
            handle = r.string()
            if handle in self._handles:
                self._requests.put(rid, (READ, None, None, handle))
        elif kind == WRITE:
            handle_raw = r.string()
            handle = self._handles.get(handle_raw)
            r.pos += 8  # offset
            data_length = r.u32()
            if r.pos + data_length != length:
                raise _error("SFTP WRITE whose data length does not match its packet")
            if handle is not None:
                handle.written += data_length
        else:
            first = _path(r.string())
            second = _path(r.string()) if kind in _TWO_PATHS else None
            self._requests.put(rid, (kind, first, second, None))
        return None

    def _reply(self, kind: int, body: bytes, length: int) -> FileEvent | None:
        r = _Reader(body)
        request = self._requests.pop(r.u32(), None)
        if request is None:
            return None
        op, path, to, extra = request
        if kind == HANDLE and op == OPEN:
            self._handles.put(r.string(), _Handle(path=path, mode=_mode(extra)))
        elif kind == DATA and op == READ:
            handle = self._handles.get(extra)
            if handle is not None:
                handle.read += max(0, length - 8)  # id and the data's length field
        elif kind == STATUS and op in _PATH_OPS:
            code = r.u32()
            return FileEvent(op=_PATH_OPS[op], path=path, to=to, ok=code == 0)
        elif kind == STATUS and op == OPEN:
            code = r.u32()
            return FileEvent(op="open", path=path, mode=_mode(extra), ok=code == 0)
        return None
