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
