"""The demo's and the tests' MongoDB wire server: mongoeco's AsyncMongoEcoProxyServer,
with the tests' own TLS terminator in front of it.

This script runs in mongoeco's own virtual environment (Python >= 3.13,
made by gateway/local/mongoserver.py), never in the project's: it imports
mongoeco and asyncio, nothing of Wicket's.

    python mongoeco_server.py --user app [--tls-cert C --tls-key K [--tls-ca CA]] [--compressors zlib]

The user's password comes from the environment (``MONGOECO_PASSWORD``),
never the command line (process titles are public). Once listening it
prints one JSON line on stdout: ``{"port": N, "tls_port": M or null}``,
then serves until stdin closes or it is signalled.

What the wrapper changes in mongoeco 4.11, all on this side of the wire
(the gateway must cope with real servers, not with these quirks):

* cursor ids start above 2**32 and always go out as BSON int64 (0 too),
  as a real server's do: the Node.js driver and mongosh refuse a 32-bit
  cursor id;
* an int64 cursor id in ``getMore``/``killCursors`` is handed to the
  cursor store as the integer it keys on;
* ``buildinfo`` (lower case, which real servers accept) is renamed
  ``buildInfo``, the only spelling mongoeco knows;
* inserting a document with a non-numeric ``_id`` skips a scan of the
  whole collection (``_patch_unique_scan``), which made inserts quadratic;
* an error reply without a ``code`` gets the one a real server would send
  (``CommandFailed``, 125): drivers read ``code`` to classify errors;
* with ``--compressors zlib``, OP_COMPRESSED as mongod does it
  (mongodb/specifications ``source/compression/OP_COMPRESSED.md``), which
  mongoeco lacks: the hello agrees to zlib when the client offers it, a
  compressed request (zlib or noop) is opened and handed on, and its reply
  goes back compressed the same way. The first compressed request of each
  connection is logged on stderr (``compressed_request``), so a test can
  tell compression went end to end.

The TLS terminator is a plain asyncio relay: it accepts TLS and pipes the
bytes to mongoeco's plain port. With ``--tls-ca`` it stands in for what
mongoeco lacks, X.509 authentication: it requires a client certificate
signed by that CA (as a server with ``tlsCAFile`` does), answers
``authenticate`` with MONGODB-X509 on ``$external`` for a certificate whose
CN is the user (mongod maps the subject to a ``$external`` user), and logs
the connection in to mongoeco as that user before piping on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import sys
import zlib
from pathlib import Path

import bson

from bson.int64 import Int64

# The wrapper's own SCRAM login (for the X.509 stand-in) is Wicket's codec:
# pure Python, no dependency but attrs, which mongoeco brings.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mongoeco.core.bson_scalars import BsonInt64
from mongoeco.engines import memory
from mongoeco.wire import AsyncMongoEcoProxyServer
from mongoeco.wire import auth as wire_auth
from mongoeco.wire import cursors as wire_cursors
from mongoeco.wire import handshake as wire_handshake
from mongoeco.wire import protocol as wire_protocol
from mongoeco.wire import proxy as wire_proxy

CURSOR_ID_BASE = 1 << 33
COMMAND_FAILED = 125


def _patch_cursor_ids() -> None:
    original = wire_cursors.WireCursorStore.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._next_cursor_id = CURSOR_ID_BASE

    wire_cursors.WireCursorStore.__init__ = __init__


def _patch_unique_scan() -> None:
    """mongoeco's wire path inserts one document per engine call, and for
    a single document it scans the whole collection for an equal ``_id``
    (numeric ids compare across int/long/double/decimal), on top of the
    exact hashed lookup it does first: every insert is O(collection), an
    insert_many of 1,000 takes 10 s. For an ``_id`` with no number in it
    the hashed lookup is already exact, so the scan is skipped."""
    engine = memory.MemoryEngine
    original = engine._ensure_unique_indexes

    def _ensure_unique_indexes(self, db_name, coll_name, candidate, **kwargs):
        if kwargs.get("scan_payload_id") and not memory.id_contains_numeric_value(candidate.get("_id")):
            kwargs["scan_payload_id"] = False
        return original(self, db_name, coll_name, candidate, **kwargs)

    engine._ensure_unique_indexes = _ensure_unique_indexes


def _plain(value):
    """A cursor id as mongoeco's cursor store keys it (it decodes an int64
    as a wrapper it then refuses)."""
    return value.value if isinstance(value, BsonInt64) else value


def _patch_commands() -> None:
    """Rename ``buildinfo``; give code-less error replies a code."""
    executor = wire_proxy.WireCommandExecutor
    build = executor._build_request_context

    def _build_request_context(self, body, **kwargs):
        name = next(iter(body), None) if isinstance(body, dict) else None
        if name == "buildinfo":
            body = {("buildInfo" if k == "buildinfo" else k): v for k, v in body.items()}
        elif name == "getMore":
            body = {**body, "getMore": _plain(body["getMore"])}
        elif name == "killCursors" and isinstance(body.get("cursors"), list):
            body = {**body, "cursors": [_plain(c) for c in body["cursors"]]}
        return build(self, body, **kwargs)

    executor._build_request_context = _build_request_context
    server = wire_proxy.AsyncMongoEcoProxyServer
    render = server._render_wire_result

    def _render_wire_result(self, header, request_id, state):
        result = state.result
        if isinstance(result, dict) and not result.get("ok") and result.get("code") is None:
            result["code"], result["codeName"] = COMMAND_FAILED, "CommandFailed"
        cursor = result.get("cursor") if isinstance(result, dict) else None
        if isinstance(cursor, dict) and type(cursor.get("id")) is int:
            cursor["id"] = Int64(cursor["id"])  # even 0: drivers read it as an int64 element
        return render(self, header, request_id, state)

    server._render_wire_result = _render_wire_result


OP_COMPRESSED, NOOP, ZLIB = 2012, 0, 2
_COMPRESSED = struct.Struct("<iiB")  # originalOpcode, uncompressedSize, compressorId


def _patch_compression(compressors: tuple[str, ...]) -> None:
    """OP_COMPRESSED with ``compressors`` (only zlib is known here); see the module doc."""
    hello = wire_handshake.WireHandshakeService.build_hello_response

    def build_hello_response(self, *, command_name, body, connection):
        response = hello(self, command_name=command_name, body=body, connection=connection)
        offered = body.get("compression") if isinstance(body, dict) else None
        agreed = [c for c in offered if c in compressors] if isinstance(offered, list) else []
        if agreed:
            response["compression"] = agreed
        return response

    wire_handshake.WireHandshakeService.build_hello_response = build_hello_response
    server = wire_proxy.AsyncMongoEcoProxyServer
    dispatch = server._dispatch_wire_request
    logged: set[int] = set()

    async def _dispatch_wire_request(self, header, payload, *, connection):
        if header.op_code != OP_COMPRESSED:
            return await dispatch(self, header, payload, connection=connection)
        original, size, compressor = _COMPRESSED.unpack_from(payload)
        data = payload[_COMPRESSED.size:]
        if compressor == ZLIB and "zlib" in compressors:
            data = zlib.decompress(data)
        elif compressor != NOOP:
            raise wire_proxy.WireProtocolError(f"unsupported compressor {compressor}", fatal=True)
        if len(data) != size:
            raise wire_proxy.WireProtocolError("uncompressedSize does not match", fatal=True)
        if connection.connection_id not in logged:
            logged.add(connection.connection_id)
            print(f"compressed_request connection={connection.connection_id} op={original} "
                  f"compressor={compressor}", file=sys.stderr, flush=True)
        inner = wire_protocol.MessageHeader(16 + len(data), header.request_id, header.response_to, original)
        response = await dispatch(self, inner, data, connection=connection)
        if response is None:
            return None
        length, request_id, response_to, op_code = _HEADER.unpack_from(response)
        body = response[16:]
        packed = zlib.compress(body) if compressor == ZLIB else body
        head = _COMPRESSED.pack(op_code, len(body), compressor)
        return _HEADER.pack(16 + len(head) + len(packed), request_id, response_to, OP_COMPRESSED) + head + packed

    server._dispatch_wire_request = _dispatch_wire_request


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def _tls_terminator(plain_port: int):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", plain_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    return handle


# -- MONGODB-X509, as mongod does it, for mongoeco (which has no X.509) -----------------

_HEADER = struct.Struct("<iiii")


async def _message(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readexactly(16)
        length = _HEADER.unpack(head)[0]
        if not 16 <= length <= 48_000_000:
            return None
        return head + await reader.readexactly(length - 16)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _op_msg_body(message: bytes) -> dict | None:
    _, _, _, op_code = _HEADER.unpack_from(message)
    if op_code != 2013 or message[20] != 0:
        return None
    return bson.decode(message[21:21 + int.from_bytes(message[21:25], "little")])


def _reply(request: bytes, body: dict) -> bytes:
    request_id = _HEADER.unpack_from(request)[1]
    payload = b"\x00\x00\x00\x00\x00" + bson.encode(body)
    return _HEADER.pack(16 + len(payload), 0, request_id, 2013) + payload


async def _scram_login(reader, writer, user: str, password: str) -> bool:
    """Log in to mongoeco over its wire with SCRAM-SHA-256 (the wrapper's
    own login, standing for the X.509 user)."""
    from protocols.mongodb.scram import ScramLogin, ScramLoginError

    login = ScramLogin(username=user, password=password)
    body = login.start()
    request_id = 1000
    try:
        while body is not None:
            request_id += 1
            payload = b"\x00\x00\x00\x00\x00" + bson.encode(body)
            writer.write(_HEADER.pack(16 + len(payload), request_id, 0, 2013) + payload)
            await writer.drain()
            answer = await _message(reader)
            if answer is None:
                return False
            body = login.step(_op_msg_body(answer) or {})
    except ScramLoginError:
        return False
    return True


def _x509_terminator(plain_port: int, user: str, password: str):
    """TLS that requires a client certificate (verified against --tls-ca,
    as mongod's tlsCAFile); ``authenticate`` with MONGODB-X509 on
    ``$external`` succeeds when the certificate's CN is ``user``, and the
    connection to mongoeco is then logged in as that user. Commands before
    it (a hello) pass through."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert = writer.get_extra_info("peercert") or {}
        subject = dict(pair[0] for pair in cert.get("subject", ()))
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", plain_port)
        except OSError:
            writer.close()
            return
        while True:
            message = await _message(reader)
            if message is None:
                writer.close()
                up_writer.close()
                return
            body = _op_msg_body(message) or {}
            if next(iter(body), None) != "authenticate":
                up_writer.write(message)
                await up_writer.drain()
                answer = await _message(up_reader)
                if answer is None:
                    writer.close()
                    return
                writer.write(answer)
                await writer.drain()
                continue
            dn = f"CN={subject.get('commonName', '')}"
            if (body.get("mechanism") == "MONGODB-X509" and body.get("$db") == "$external"
                    and subject.get("commonName") == user and await _scram_login(up_reader, up_writer, user,
                                                                               password)):
                writer.write(_reply(message, {"dbname": "$external", "user": dn, "ok": 1.0}))
                await writer.drain()
                break
            writer.write(_reply(message, {"ok": 0.0, "errmsg": f"Could not find user \"{dn}\" for db "
                                                             f"\"$external\"", "code": 11,
                                          "codeName": "UserNotFound"}))
            await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    return handle


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--user", required=True)
    parser.add_argument("--mechanisms", default="SCRAM-SHA-256,SCRAM-SHA-1")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-ca", help="require client certificates signed by this CA")
    parser.add_argument("--compressors", default="", help="OP_COMPRESSED with these (zlib), as mongod's "
                                                          "net.compression.compressors")
    args = parser.parse_args()
    password = os.environ.get("MONGOECO_PASSWORD")
    if not password:
        parser.error("MONGOECO_PASSWORD must hold the user's password")
    _patch_cursor_ids()
    _patch_commands()
    _patch_unique_scan()
    if args.compressors:
        _patch_compression(tuple(c for c in args.compressors.split(",") if c))
    user = wire_auth.WireAuthUser(username=args.user, password=password,
                                  mechanisms=tuple(args.mechanisms.split(",")),
                                  roles=({"role": "root", "db": "admin"},))
    server = AsyncMongoEcoProxyServer(port=0, auth_users=(user,))
    address = await server.start()
    tls_port = None
    tls_server = None
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        handler = _tls_terminator(address.port)
        if args.tls_ca:
            ctx.load_verify_locations(cafile=args.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
            handler = _x509_terminator(address.port, args.user, password)
        tls_server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
        tls_port = tls_server.sockets[0].getsockname()[1]
    print(json.dumps({"port": address.port, "tls_port": tls_port}), flush=True)
    # Serve until the test closes our stdin (or kills us).
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: done.set() if not os.read(sys.stdin.fileno(), 4096) else None)
    await done.wait()
    if tls_server is not None:
        tls_server.close()
    await server.close()


if __name__ == "__main__":
    asyncio.run(main())
