"""gateway.local.mysqlguard: what the guard holds back, answers and passes."""

from __future__ import annotations

import trio

from gateway.local.mysqlguard import MAX_HELD, Guard, socket_pair
from protocols.mysql import Capability, Command, ErrPacket
from tests.unit.protocols.mysql.session import MODERN, command, pkt, query


async def run_guard(chunks: list[bytes], allowed=("app",), caps: Capability = MODERN):
    """Feed the client's ``chunks`` through a guard; returns (what reached
    the cluster's side, what the client got back, the schemas asked about)."""
    client, client_far = socket_pair()
    inner, outer = socket_pair()
    asked: list[str] = []

    async def check(schema: str) -> str | None:
        asked.append(schema)
        return None if schema in allowed else f"access to {schema!r} denied"

    got_up, got_back = bytearray(), bytearray()
    guard = Guard(client_far, outer, check, caps)

    async def serve():
        await guard.run()
        await client_far.aclose()  # as the route does once the session is over

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        for chunk in chunks:
            await client.send_all(chunk)
        await client.send_eof()

        async def drain(stream, into):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                into += data

        nursery.start_soon(drain, client, got_back)
        await drain(inner, got_up)
        await inner.aclose()
    return bytes(got_up), bytes(got_back), asked


def err_of(data: bytes) -> ErrPacket:
    assert data[3] == 1  # the answer to a command is its packet 1
    return ErrPacket.decode(data[4:])


async def test_allowed_commands_pass_untouched():
    stream = query("select 1") + command(Command.INIT_DB, b"app") + query("use app") + command(Command.PING)
    up, back, asked = await run_guard([stream])
    assert up == stream and back == b"" and asked == ["app", "app"]


async def test_a_refused_switch_is_answered_and_never_passed():
    up, back, asked = await run_guard([command(Command.INIT_DB, b"secret"), query("select 1; USE `secret`")])
    assert up == b"" and asked == ["secret", "secret"]
    first = err_of(back)
    assert first.errno == 1044 and first.sqlstate == "42000" and "secret" in first.message


async def test_change_user_is_refused():
    up, back, _ = await run_guard([command(Command.CHANGE_USER, b"root\x00\x00")])
    assert up == b"" and err_of(back).errno == 1047


async def test_byte_by_byte_is_the_same():
    stream = query("select 1") + command(Command.INIT_DB, b"secret") + query("select 2")
    up, back, _ = await run_guard([stream[i:i + 1] for i in range(len(stream))])
    assert up == query("select 1") + query("select 2")
    assert err_of(back).errno == 1044


async def test_a_long_command_passes_unseen():
    long = query("use secret; " + "x" * MAX_HELD)
    up, back, asked = await run_guard([long[:1000], long[1000:]])
    assert up == long and back == b"" and asked == []


async def test_a_file_for_load_data_local_is_not_taken_for_commands():
    """With LOCAL_FILES, the guard follows the exchange: a file packet whose
    id wrapped to 0 and that starts like COM_INIT_DB passes."""
    caps = MODERN | Capability.LOCAL_FILES
    client, client_far = socket_pair()
    inner, outer = socket_pair()
    guard = Guard(client_far, outer, lambda schema: trio.lowlevel.checkpoint(), caps)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guard.run)
        await client.send_all(query("load data local infile 'f' into table t"))
        assert await inner.receive_some(65536) == query("load data local infile 'f' into table t")
        await inner.send_all(pkt(1, b"\xfbf"))  # the server asks for the file
        assert await client.receive_some(65536) == pkt(1, b"\xfbf")
        file_packets = b"".join(pkt((2 + i) & 0xFF, bytes([Command.INIT_DB]) + b"secret") for i in range(300))
        await client.send_all(file_packets + pkt((2 + 300) & 0xFF, b""))
        want = len(file_packets) + 4
        got = bytearray()
        while len(got) < want:
            got += await inner.receive_some(65536)
        assert bytes(got) == file_packets + pkt((2 + 300) & 0xFF, b"")
        nursery.cancel_scope.cancel()


async def test_a_name_that_is_not_utf8_is_refused_unasked():
    packets = [command(Command.INIT_DB, b"app\xff"), command(Command.QUERY, b"use `app\xfe`")]
    up, back, asked = await run_guard(packets, allowed=("app\ufffd",))
    assert up == b"" and asked == []
    assert err_of(back).errno == 1044 and "UTF-8" in err_of(back).message
