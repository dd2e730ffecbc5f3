"""gateway.cluster.dial: how a session's end is put on record."""

from __future__ import annotations

import datetime as dt

import pytest
import trio.testing

from gateway.cluster import config as cfg
from gateway.cluster.core import Cluster
from gateway.cluster.dial import run_session
from gateway.cluster.postgres import PgSessionAuditor
from gateway.cluster.routekind import Opened
from gateway.identity import pki

RESET = "upstream: send_eof failed: Transport endpoint is not connected"
TERMINATE = b"X\x00\x00\x00\x04"


@pytest.mark.parametrize("client_said, error, reason", [
    # The server resets once it has read Terminate: our FIN (or
    # close_notify) met the reset. The client ended the session.
    (TERMINATE, RESET, "closed"),
    (TERMINATE, "upstream: receive failed: Connection reset by peer", "closed"),
    (b"", RESET, RESET),  # no goodbye: the server went away
    (TERMINATE, "gateway: receive failed: Connection reset by peer", "gateway: receive failed: "
                                                                      "Connection reset by peer"),
    (TERMINATE, None, "closed"),
])
async def test_the_servers_reset_after_the_clients_terminate_is_a_clean_end(tmp_path, client_said, error, reason):
    cluster = Cluster.open(cfg.from_dict({"cluster": {"state_dir": str(tmp_path / "state")}}))
    try:
        session = cluster.new_session("alice", "pg", "postgres")
        auditor = PgSessionAuditor(cluster, session)
        now = pki.utcnow()
        identity = pki.Identity(user="alice", roles=("dev",), cluster=cluster.config.name,
                                not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
        upstream, _ = trio.testing.memory_stream_pair()

        async def relay(counters) -> str | None:
            auditor.from_client(b"Q\x00\x00\x00\x0dselect 1\x00" + client_said)
            return error

        opened = Opened(upstream=upstream, tap_client=auditor.from_client, said_goodbye=auditor.said_goodbye)
        await run_session(cluster, session, opened, identity, "127.0.0.1:1", relay)
        [ended] = [fields for event, _, fields, _ in cluster._audit_pending if event == "session.end"]
        assert ended["reason"] == reason
    finally:
        cluster.close()


@pytest.mark.parametrize("client_said, error, reason", [
    # MySQL's COM_QUIT: the server closes at once, often with a reset our
    # FIN meets. The session ends as the client's quit.
    (b"\x01\x00\x00\x00\x01", RESET, "quit"),
    (b"\x01\x00\x00\x00\x01", "upstream: receive failed: Connection reset by peer", "quit"),
    (b"\x01\x00\x00\x00\x01", None, "quit"),
    (b"", RESET, RESET),  # no goodbye: the server went away
])
async def test_the_servers_reset_after_the_clients_com_quit_is_the_clients_quit(tmp_path, client_said, error,
                                                                                reason):
    from gateway.cluster.mysql import MySqlSessionAuditor
    from gateway.cluster.store import Resource
    from tests.unit.protocols.mysql.session import MODERN, query

    cluster = Cluster.open(cfg.from_dict({"cluster": {"state_dir": str(tmp_path / "state")}}))
    try:
        session = cluster.new_session("alice", "maria", "mysql")
        auditor = MySqlSessionAuditor(cluster, session, MODERN,
                                      Resource(name="maria", kind="mysql", address="127.0.0.1:3306", labels={}),
                                      "app")
        now = pki.utcnow()
        identity = pki.Identity(user="alice", roles=("dev",), cluster=cluster.config.name,
                                not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
        upstream, _ = trio.testing.memory_stream_pair()

        async def relay(counters) -> str | None:
            for message in (query("select 1"), client_said):  # as the relay's filter is shown them
                if message:
                    auditor.on_message(message)
            return error

        opened = Opened(upstream=upstream, filter=auditor)
        await run_session(cluster, session, opened, identity, "127.0.0.1:1", relay)
        [ended] = [fields for event, _, fields, _ in cluster._audit_pending if event == "session.end"]
        assert ended["reason"] == reason
    finally:
        cluster.close()
