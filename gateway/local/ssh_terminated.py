"""``wicket proxy ssh NODE --port 2222``: the gateway as an SSH server on
localhost, trio's half.

The SSH itself is asyncssh's, behind the fence of gateway/local/ssh_asyncio.py;
this module is what trio owns: the listener (only the owner's local uid
gets in, as for every kind), one task per client whose socket asyncssh
then speaks SSH on, and the dial: a stream of the profile's multiplexed
connection for the node (``ssh.public_key`` on the dial: the cluster
signs a certificate for it and this login only, and sends it in the
hand-off frame of protocols/ssh/handoff.py, read here to its last byte and
not one byte further), whose other end becomes the socket asyncssh's client
logs in to the node over. A cut stream (a lock, the certificate's end, the
cluster gone) ends the client's connection with the reason as the SSH
disconnect message.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import trio

from gateway.local import ssh_asyncio
from gateway.local.connect import ClusterError
from gateway.local.dialer import DIAL_TIMEOUT, MuxDialer
from gateway.local.profile import Profile, ProfileError
from gateway.local.proxy import MuxRoute, guarded, peer_addr
from gateway.local.ssh import PUBLIC_KEY_PARAM, read_handoff, refusal_text
from gateway.local.waitroom import RIDE_OUT, ClientGone
from gateway.net.peercred import LocalUsers
from gateway.net.relay import RelayCounters
from protocols.dial import DialError, DialRequest
from protocols.errors import ProtocolError

log = logging.getLogger("wicket.proxy.ssh")

class SshTerminated(MuxRoute):
    """Serves one port; ``resource`` is the node a plain ``LOGIN`` reaches."""

    def __init__(self, profile: Profile, resource: str, *, keys: ssh_asyncio.LocalKeys, host_key_path: Path,
                 wait_for_cluster: float = RIDE_OUT, local_users: LocalUsers | None = None,
                 use_agent: bool = True, dialer: MuxDialer | None = None) -> None:
        super().__init__(profile, resource, wait_for_cluster=wait_for_cluster, local_users=local_users,
                         dialer=dialer)
        self.default_node = resource
        self.keys = keys
        self.use_agent = use_agent
        self.host_key = ssh_asyncio.load_host_key(host_key_path)
        self.reports = AuditReports(profile)

    async def serve_listeners(self, listeners: list[trio.SocketListener], *,
                              task_status=trio.TASK_STATUS_IGNORED) -> None:
        """(trio) Accept on ``listeners`` until cancelled, with asyncssh's loop open."""
        async with ssh_asyncio.open_loop():
            if self.use_agent:
                agent = await ssh_asyncio.agent_keys()
                self.keys = ssh_asyncio.LocalKeys([*self.keys.blobs, *agent], allow_none=self.keys.allow_none)
            if not self.keys.blobs and not self.keys.allow_none:
                log.warning("ssh_no_local_keys action=%s", "no public key of yours was found (~/.ssh/*.pub, the "
                            "ssh-agent): pass --authorized-keys FILE, or --allow-no-auth to let any local "
                            "process of yours in without a key")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.reports.run)
                # One client's trouble ends that client's connection only.
                await nursery.start(trio.serve_listeners, guarded(self._handle), listeners)
                task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        """(trio) One local client, start to end."""
        client_addr = peer_addr(stream)
        if self.stranger(stream.socket, client_addr) is not None or self.client_arrived(client_addr) is not None:
            await stream.aclose()  # the log says why
            return
        try:
            sock = socket.socket(fileno=stream.socket.detach())
            async with trio.open_nursery() as watchers:
                try:
                    await ssh_asyncio.serve_connection(sock, _Client(self, watchers), self.keys, self.host_key,
                                                       client_addr)
                finally:
                    watchers.cancel_scope.cancel()
        finally:
            self.client_left()


class _Client:
    """The trio side of one local client: its dial and the watch on its
    stream (ssh_asyncio.Hooks)."""

    def __init__(self, route: SshTerminated, watchers: trio.Nursery) -> None:
        self.route = route
        self.watchers = watchers
        self.default_node = route.default_node

    async def dial(self, login: str, node: str, public_key: str, client_addr: str) -> ssh_asyncio.NodeStream:
        """(trio) See ssh_asyncio.Hooks."""
        route = self.route
        request = DialRequest(resource=node, params={"login": login, PUBLIC_KEY_PARAM: public_key},
                              client_addr=client_addr)
        arrived = time.monotonic()
        try:
            route.dialer.check_fresh()
            link, stream = await route.on_link(
                lambda link: (link, link.open(request, reply_timeout=DIAL_TIMEOUT, context=client_addr,
                                              arrived=arrived)),
                route.room.deadline(), client_addr, lambda: False)
            reply = await link.reply(stream)
        except ProfileError as exc:
            raise ssh_asyncio.NodeRefused(str(exc)) from None
        except ClientGone:
            raise ssh_asyncio.NodeRefused("the client left") from None
        except (ClusterError, trio.TooSlowError) as exc:
            route.stats.failure()
            raise ssh_asyncio.NodeRefused(
                (getattr(exc, "message", None) or "the Wicket cluster did not answer in time")
                + "; check that the Wicket cluster is running and reachable from this machine") from None
        if reply is not None:
            route.stats.answered(stream.dial_seconds)  # the agent's /metrics
        if reply is None:
            route.stats.failure()
            raise ssh_asyncio.NodeRefused(f"the session to {node} ended before the cluster answered "
                                          f"({stream.error}); try again")
        if isinstance(reply, DialError):
            route.log_refused(client_addr, reply, None)
            raise ssh_asyncio.NodeRefused(refusal_text(reply))
        ours, theirs = loopback_pair()
        if not link.bind(stream, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), RelayCounters()):
            theirs.close()
            raise ssh_asyncio.NodeRefused(f"the session to {node} ended before it began ({stream.error}); try again")
        try:
            handoff = await read_handoff(trio.socket.from_stdlib_socket(theirs))
        except (ProtocolError, trio.TooSlowError, OSError) as exc:
            link.cut(stream, "no hand-off from the cluster")
            theirs.close()
            raise ssh_asyncio.NodeRefused(f"the cluster's answer for {node} was unreadable ({exc}); is this "
                                          f"wicket as new as the cluster?") from None
        log.info("ssh_session_start node=%s login=%s client=%s session=%s", node, login, client_addr,
                 reply.session_id)
        return ssh_asyncio.NodeStream(sock=theirs, certificate=handoff.certificate, host=handoff.host,
                                      agent_forwarding=handoff.agent_forwarding,
                                      known_hosts=handoff.known_hosts, session_id=reply.session_id,
                                      handle=(link, stream))

    def watch(self, node_stream: ssh_asyncio.NodeStream, on_cut) -> None:
        """(trio's thread) See ssh_asyncio.Hooks."""
        self.watchers.start_soon(self._watch, node_stream, on_cut)

    def ended(self, node_stream: ssh_asyncio.NodeStream) -> str | None:
        """(either) See ssh_asyncio.Hooks."""
        return node_stream.handle[1].error

    def report(self, node_stream: ssh_asyncio.NodeStream, event: str, fields: dict) -> None:
        """(either) See ssh_asyncio.Hooks."""
        self.route.reports.add(node_stream.session_id, event, fields)

    async def _watch(self, node_stream: ssh_asyncio.NodeStream, on_cut) -> None:
        link, stream = node_stream.handle
        try:
            error = await link.wait(stream)
        finally:
            self.route.dialer.release(link)
            counters = stream.counters
            self.route.stats.ended(counters.a_to_b, counters.b_to_a)  # the agent's /metrics
            log.info("ssh_session_end node=%s client=%s session=%s sent=%d received=%d%s", node_stream.host,
                     stream.context, node_stream.session_id, counters.a_to_b, counters.b_to_a,
                     f" error={stream.error!r}" if stream.error else "")
        if error is not None:
            on_cut(error)


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (asyncssh's client wants a peer
    address, which a socketpair has not). The listener takes one connection
    and only ours: another local process racing to connect first is
    dropped, and the listener closes at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        ours = socket.create_connection(listener.getsockname())
        try:
            while True:
                theirs, addr = listener.accept()
                if addr == ours.getsockname():
                    break
                theirs.close()
        except BaseException:
            ours.close()
            raise
    for sock in (ours, theirs):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ours, theirs


class AuditReports:
    """What the gateway saw inside its SSH sessions (commands, sftp file
    operations, forwards, exit statuses), sent to the cluster's audit log
    in batches (``POST /v1/ssh/audit``). The cluster records them as
    reported by the gateway: it cannot see inside SSH itself. Bounded: past
    :data:`MAX_QUEUED` waiting, the oldest are dropped and counted."""

    MAX_QUEUED = 10_000
    BATCH = 256
    #: A batch waits this long for company, so a burst is one request.
    GATHER = 0.2
    RETRY = 2.0

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.queue: list[dict] = []
        self.dropped = 0
        self._wake = trio.Event()

    def add(self, session_id: str, event: str, fields: dict) -> None:
        """(trio's thread, blocks on nothing)"""
        self.queue.append({"session_id": session_id, "event": event, "fields": fields})
        if len(self.queue) > self.MAX_QUEUED:
            del self.queue[0]
            self.dropped += 1
        self._wake.set()

    async def run(self) -> None:
        """(trio) Send what is queued until cancelled; then what is left, briefly."""
        from gateway.local import api

        try:
            while True:
                await self._wake.wait()
                await trio.sleep(self.GATHER)
                await self.flush(api)
        finally:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self.flush(api)

    async def flush(self, api) -> None:
        """(trio)"""
        while self.queue:
            batch = self.queue[:self.BATCH]
            try:
                await api.api_call(self.profile, "POST", "/v1/ssh/audit", {"events": batch})
            except Exception as exc:  # the cluster is away or refuses: keep them, try again later
                log.warning("ssh_audit_report_failed events=%d error=%r action=%s", len(self.queue),
                            getattr(exc, "message", None) or str(exc), "they are sent when the cluster answers")
                await trio.sleep(self.RETRY)
                return
            del self.queue[:len(batch)]
        self._wake = trio.Event()
        if self.dropped:
            log.warning("ssh_audit_reports_dropped count=%d", self.dropped)
            self.dropped = 0
