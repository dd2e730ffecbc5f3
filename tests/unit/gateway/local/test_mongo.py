"""gateway.local.mongo: where the hello values a route answers with come
from (the last accept, or a hello probe when none are known or they are
stale), on trio's mock clock, with the cluster's control dial played by
the test."""

from __future__ import annotations

import trio
import trio.testing

from gateway.local.mongo import HELLO_MAX_AGE, MongoProxy, _MongoClient
from gateway.local.profile import Profile
from protocols.dial import DialError
from protocols.errors import ErrorCode
from protocols.mongodb import HELLO_PROBE, hello_params

SERVER = hello_params({"maxWireVersion": 21, "maxMessageSizeBytes": 48_000_000}, ["zlib"])
REFUSED = DialError(code=ErrorCode.UPSTREAM_UNREACHABLE, message="the server is down")


def route(tmp_path, answers: list) -> tuple[MongoProxy, list]:
    """A route whose control dials get ``answers`` in turn (params, or a
    DialError refused as DatabaseRoute.control refuses: through the
    phase's turn_away); the dials' params, as sent."""
    profile = Profile(home=tmp_path, cluster_addr="127.0.0.1:1", cluster_name="test", user="alice",
                      ca_pin="sha256:00")
    proxy = MongoProxy(profile, "mongo", db_user="app", dialer=object())
    sent: list = []

    async def control(phase, params):
        sent.append(dict(params))
        await trio.sleep(1)  # the cluster's round trip
        answer = answers.pop(0)
        if isinstance(answer, DialError):
            await phase.turn_away(answer, None)
            return None
        return answer

    proxy.control = control
    return proxy, sent


def phase(proxy: MongoProxy) -> _MongoClient:
    client = _MongoClient(proxy, None, "127.0.0.1:5", may_control=True)
    client.params = {"db_user": "app"}
    return client


def test_a_cold_route_probes_once_for_every_connection_waiting(tmp_path):
    proxy, sent = route(tmp_path, [SERVER])

    async def main():
        got = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(_fetch, proxy, got)
        return got

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sent == [{"db_user": "app", HELLO_PROBE: "hello"}]  # the session's db user, for the roles
    values = [g for g in got if isinstance(g, dict)]
    assert len(values) == 3 and all(v["maxWireVersion"] == 21 for v in values)
    assert values[0]["compression"] == ["zlib"]


async def _fetch(proxy: MongoProxy, got: list) -> None:
    got.append(await proxy.hello_values(phase(proxy)))


def test_values_older_than_the_bound_are_probed_again_and_an_accept_refreshes_them(tmp_path):
    newer = {**SERVER, "hello.maxWireVersion": "25"}
    proxy, sent = route(tmp_path, [SERVER, newer])

    async def main():
        first = await proxy.hello_values(phase(proxy))
        await trio.sleep(HELLO_MAX_AGE - 2)
        proxy.learn(SERVER)  # a session's accept
        await trio.sleep(HELLO_MAX_AGE - 1)
        kept = await proxy.hello_values(phase(proxy))  # fresh from the accept
        await trio.sleep(2)
        refreshed = await proxy.hello_values(phase(proxy))
        return first, kept, refreshed

    first, kept, refreshed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(sent) == 2
    assert first["maxWireVersion"] == kept["maxWireVersion"] == 21 and refreshed["maxWireVersion"] == 25


def test_a_refused_probe_is_held_for_the_connection_and_given_to_those_that_waited(tmp_path):
    proxy, sent = route(tmp_path, [REFUSED, SERVER])

    async def main():
        phases = [phase(proxy) for _ in range(3)]
        results: dict = {}

        async def fetch(i):
            results[i] = await proxy.hello_values(phases[i])

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(fetch, i)
        later = phase(proxy)
        return phases, results, await proxy.hello_values(later)

    phases, results, later = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert results == {0: None, 1: None, 2: None}
    assert [p.held for p in phases] == [(REFUSED, None)] * 3  # told by each, outside the lock
    assert not any(p.holding for p in phases)
    assert len(sent) == 2 and later["maxWireVersion"] == 21  # a later connection probes anew


def test_a_live_connection_keeps_its_values_when_a_refresh_is_refused(tmp_path):
    proxy, sent = route(tmp_path, [SERVER, REFUSED])

    async def main():
        client = phase(proxy)
        values = await client._fresh(None)
        await trio.sleep(HELLO_MAX_AGE / 2)
        same = await client._fresh(values)  # checked recently: no probe
        await trio.sleep(HELLO_MAX_AGE)
        kept = await client._fresh(values)  # stale: probed, refused, kept
        return values, same, kept, client.held

    values, same, kept, held = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert values is same is kept and held is None
    assert len(sent) == 2
