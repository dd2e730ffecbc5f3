"""A small JSON-over-HTTP/1.1 layer on h11, both ends.

The cluster's API is a handful of JSON endpoints; h11 does the protocol, this
module only moves its bytes over a trio stream, with every input bounded:
heads to :data:`MAX_HEAD` (h11's ``max_incomplete_event_size`` bounds only a
head that is still incomplete; one that arrives whole in a read is measured
here), bodies by ``max_body``, and time by the caller's deadlines
(``fail_after`` around each request read).
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

import attrs
import h11
import trio

MAX_BODY = 64 * 1024
MAX_HEAD = 16 * 1024
#: Requests and seconds one keep-alive connection is served (then closed).
MAX_REQUESTS = 100
MAX_LIFETIME = 300.0
READ_CHUNK = 64 * 1024


class HTTPError(Exception):
    """A request could not be completed; ``status`` is sent back (server) or
    was received (client)."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


@attrs.frozen(slots=True, kw_only=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            value = json.loads(self.body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise HTTPError(400, "bad_request", "the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise HTTPError(400, "bad_request", "the request body must be a JSON object")
        return value


@attrs.frozen(slots=True, kw_only=True)
class Response:
    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(READ_CHUNK))


async def _read_head(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    """The next request or response head (or ConnectionClosed), refused
    with 431 if it is over MAX_HEAD bytes, however it arrived: h11 checks
    only a head it is still waiting for, so a whole one in a single read
    would pass."""
    held = len(conn.trailing_data[0])  # bytes already in h11's buffer (pipelined)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_CHUNK)
            held += len(data)
            conn.receive_data(data)
            continue
        if isinstance(event, (h11.Request, h11.Response)) and held - len(conn.trailing_data[0]) > MAX_HEAD:
            raise HTTPError(431, "bad_request", f"HTTP head larger than {MAX_HEAD} bytes")
        return event


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, limit: int) -> bytes:
    parts, size = [], 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise HTTPError(413, "bad_request", f"body larger than {limit} bytes")
            parts.append(event.data)
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return b"".join(parts)


def _encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def serve_http(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    request_timeout: float = 30.0,
    max_requests: int = MAX_REQUESTS,
    max_lifetime: float = MAX_LIFETIME,
) -> None:
    """Serve keep-alive requests on ``stream`` until the peer is done, at
    most ``max_requests`` of them and for at most ``max_lifetime`` seconds:
    a connection that sends a request now and then must not hold one of
    the server's descriptors for ever. The last answer says
    ``connection: close``; a client opens a new connection for more."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    end = trio.current_time() + max_lifetime
    for served in range(max_requests):
        left = end - trio.current_time()
        if left <= 0:
            return
        try:
            with trio.fail_after(min(request_timeout, left)):
                event = await _read_head(conn, stream)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request)
                body = await _read_body(conn, stream, MAX_BODY)
            request = Request(
                method=event.method.decode("ascii"),
                path=event.target.decode("ascii", "replace"),
                headers={k.decode().lower(): v.decode("latin-1") for k, v in event.headers},
                body=body,
            )
            try:
                response = await handler(request)
            except HTTPError as exc:
                response = error_response(exc)
        except h11.RemoteProtocolError as exc:
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            response = error_response(HTTPError(exc.error_status_hint, "bad_request", "malformed HTTP request"))
        except HTTPError as exc:
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            # The peer may still be mid-body: answer, then close.
            response = error_response(exc)
            await _send_response(conn, stream, response, close=True)
            return
        except trio.TooSlowError:
            return
        close = (response.status >= 400 and conn.their_state != h11.DONE) or served + 1 == max_requests \
            or trio.current_time() >= end
        try:
            # A peer that never reads our answer must not hold us forever.
            with trio.fail_after(request_timeout):
                await _send_response(conn, stream, response, close=close)
        except trio.TooSlowError:
            return
        if close or conn.our_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _send_response(conn: h11.Connection, stream, response: Response, *, close: bool) -> None:
    # bytes go as they are (a Prometheus scrape, a probe's text), with the
    # content-type the response names; anything else as JSON.
    raw = isinstance(response.body, bytes)
    payload = response.body if raw else _encode(response.body)
    named = any(k.lower() == "content-type" for k, _ in response.headers)
    headers = [
        *([] if named else [("content-type", "text/plain; charset=utf-8" if raw else "application/json")]),
        ("content-length", str(len(payload))),
        ("cache-control", "no-store"),
        *response.headers,
    ]
    if close:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
    await stream.send_all(data)


def error_response(exc: HTTPError) -> Response:
    headers: tuple[tuple[str, str], ...] = ()
    body: dict[str, Any] = {"error": {"code": exc.code, "message": exc.message}}
    if exc.retry_after is not None:
        headers = (("retry-after", str(int(exc.retry_after + 0.999))),)
        body["error"]["retry_after"] = exc.retry_after
    return Response(status=exc.status, body=body, headers=headers)


class HTTPClient:
    """Requests over one already-connected stream, keep-alive."""

    def __init__(self, stream: trio.abc.Stream, host: str) -> None:
        self._stream = stream
        self._host = host
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send a JSON request; return the decoded JSON body of a 2xx answer,
        raise :class:`HTTPError` with the server's error code otherwise."""
        if self._conn.our_state is h11.DONE:
            self._conn.start_next_cycle()
        payload = b"" if body is None else _encode(body)
        headers = [("host", self._host), ("content-length", str(len(payload))), ("accept", "application/json")]
        if payload:
            headers.append(("content-type", "application/json"))
        data = self._conn.send(h11.Request(method=method, target=path, headers=headers))
        data += self._conn.send(h11.Data(data=payload)) if payload else b""
        data += self._conn.send(h11.EndOfMessage())
        await self._stream.send_all(data)
        event = await _read_head(self._conn, self._stream)
        if isinstance(event, h11.ConnectionClosed):
            raise HTTPError(502, "internal_error", "the cluster closed the connection without answering")
        assert isinstance(event, h11.Response)
        raw = await _read_body(self._conn, self._stream, 4 * 1024 * 1024)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            raise HTTPError(event.status_code, "internal_error", "the cluster answered with invalid JSON") from None
        if 200 <= event.status_code < 300:
            return value
        err = value.get("error", {}) if isinstance(value, dict) else {}
        raise HTTPError(
            event.status_code,
            str(err.get("code", "internal_error")),
            str(err.get("message", f"HTTP {event.status_code}")),
            retry_after=_seconds(err.get("retry_after")),
        )


def _seconds(value: Any) -> float | None:
    """A delay the peer sent, if it is a sane one (JSON numbers are
    unbounded: ``1e400`` is infinity); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
        return None
    return float(value)
