"""protocols.mysql.dialparams: the server's handshake values on the dial."""

from __future__ import annotations

import pytest

from protocols.dial import DialAccept
from protocols.mysql import Capability, ServerInfo, UpstreamLogin
from protocols.mysql import dialparams as dp
from tests.unit.protocols.mysql.session import pkt

INFO = ServerInfo(server_version="5.5.5-10.11.19-MariaDB", capabilities=Capability.PROTOCOL_41 | Capability.SSL,
                  charset=45, status=2, connection_id=77, auth_plugin="mysql_native_password")


def test_round_trip_through_a_dial_accept():
    params = dp.server_params(INFO)
    assert all(isinstance(v, str) for v in params.values())
    assert DialAccept(session_id="s", params=params).params == params
    assert dp.server_info_of(params) == INFO


@pytest.mark.parametrize("broken", [
    {}, {dp.SERVER_CAPS: "x"}, {dp.SERVER_CHARSET: "300"}, {dp.STATUS: "-1"}, {dp.VERSION: "a\x00b"},
])
def test_missing_or_bad_values_are_none(broken):
    params = {**dp.server_params(INFO), **broken} if broken else {}
    assert dp.server_info_of(params) is None


def test_what_the_cluster_follows_is_offered_and_nothing_else():
    info = ServerInfo(server_version="5.5.5-10.11.19-MariaDB", capabilities=INFO.capabilities
                      | Capability.MARIADB_CACHE_METADATA | Capability.MARIADB_PROGRESS, charset=45, status=2)
    params = dp.server_params(info)
    assert params[dp.FOLLOWS] == str(Capability.MARIADB_CACHE_METADATA.value)
    assert dp.server_info_of(params) == info
    # An older cluster does not say: the gateway does not offer what that
    # cluster's auditor could not follow, and keeps the rest.
    older = {k: v for k, v in params.items() if k != dp.FOLLOWS}
    learnt = dp.server_info_of(older)
    assert learnt is not None
    assert learnt.capabilities == info.capabilities & ~Capability.MARIADB_CACHE_METADATA


def test_the_login_tells_the_servers_handshake_before_its_verdict():
    from protocols.mysql import Handshake
    login = UpstreamLogin(user="app")
    assert login.server_info is None
    greeting = Handshake(server_version="8.0.36", connection_id=9, auth_plugin_data=b"a" * 20 + b"\x00",
                         capabilities=Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
                         | Capability.PLUGIN_AUTH, auth_plugin="mysql_native_password")
    login.receive_data(pkt(0, greeting.encode()))
    login.next_event()
    assert login.server_info == greeting.info
