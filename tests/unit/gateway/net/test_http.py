"""gateway/net/http.py: the bounds on what a peer can send."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.net.http import MAX_HEAD, HTTPClient, HTTPError, Response, serve_http


async def _answer_with(body: bytes) -> HTTPError:
    """The error an HTTPClient raises for a canned error answer."""
    client_end, server_end = trio.testing.memory_stream_pair()
    head = (b"HTTP/1.1 429 Too Many\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    async with trio.open_nursery() as nursery:
        async def server() -> None:
            await server_end.receive_some()
            await server_end.send_all(head + body)

        nursery.start_soon(server)
        with pytest.raises(HTTPError) as err:
            await HTTPClient(client_end, "x").request("GET", "/v1/health")
    return err.value


@pytest.mark.parametrize(("number", "seen"), [
    (b"30", 30.0), (b"1e400", None), (b"1" + b"0" * 400, None), (b"-1", None), (b"true", None), (b'"5"', None),
])
async def test_a_retry_after_from_the_network_is_checked(number, seen):
    err = await _answer_with(b'{"error":{"code":"rate_limited","message":"slow down","retry_after":%s}}' % number)
    assert err.code == "rate_limited" and err.retry_after == seen


async def _serve_one(raw: bytes, chunk: int | None = None) -> bytes:
    """What serve_http answers to ``raw``, sent whole or ``chunk`` bytes at a time."""
    client_end, server_end = trio.testing.memory_stream_pair()

    async def handler(request):
        return Response(status=200, body={"path": request.path})

    async def server() -> None:
        async with server_end:  # the caller of serve_http closes the stream
            await serve_http(server_end, handler)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        step = chunk or len(raw)
        for i in range(0, len(raw), step):
            await client_end.send_all(raw[i:i + step])
        await client_end.send_eof()
        answer = bytearray()
        with trio.fail_after(10):
            while chunk_in := await client_end.receive_some():
                answer += chunk_in
    return bytes(answer)


def _request(head_size: int, body: bytes = b"") -> bytes:
    start = b"POST /v1/health HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n" % len(body)
    padding = head_size - len(start) - len(b"x-pad: \r\n\r\n")
    return start + b"x-pad: " + b"a" * padding + b"\r\n\r\n" + body


@pytest.mark.parametrize("chunk", [None, 4096])
async def test_a_head_over_16_kib_is_refused_however_it_arrives(chunk):
    raw = _request(20 * 1024, b"{}")
    assert len(raw) < 65536  # one read of the server's
    answer = await _serve_one(raw, chunk)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


async def test_a_head_of_16_kib_with_its_body_in_the_same_read_is_served():
    answer = await _serve_one(_request(MAX_HEAD, b"{}"))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]


async def _keep_alive_client(client_end, every: float, limit: int) -> int:
    """Send a health request every ``every`` seconds on one connection
    until it is closed; how many were answered."""
    answered = 0
    for _ in range(limit):
        try:
            await client_end.send_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        except trio.BrokenResourceError:
            return answered
        data = await client_end.receive_some()
        if not data:
            return answered
        answered += 1
        if b"connection: close" in data.lower():
            return answered
        await trio.sleep(every)
    return answered


@pytest.mark.parametrize(("every", "max_requests", "expected"), [(25.0, 1000, 12), (0.0, 5, 5)])
async def test_a_keep_alive_connection_has_a_lifetime_and_a_request_budget(autojump_clock, every, max_requests,
                                                                          expected):
    client_end, server_end = trio.testing.memory_stream_pair()

    async def handler(request):
        return Response(status=200, body={"status": "ok"})

    async def server() -> None:
        async with server_end:
            await serve_http(server_end, handler, max_requests=max_requests, max_lifetime=300.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        start = trio.current_time()
        assert await _keep_alive_client(client_end, every, 10_000) == expected
        assert trio.current_time() - start <= 300.0
