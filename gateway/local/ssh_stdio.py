"""``wicket proxy ssh --stdio LOGIN@NODE[:PORT]``: one SSH connection on
standard input and output, OpenSSH's ProxyCommand.

OpenSSH does SSH end to end (its own key exchange with the node, host key
checks against the known_hosts `wicket config ssh` wrote, the user
certificate from the profile); Wicket only carries the bytes. This process
opens a stream on a multiplexed connection to the cluster for the node's
resource with the login as the dial's parameter, and, once the cluster has
checked the certificate, the roles (node and login, deny wins) and reached
the node, relays stdin to the stream and the stream to stdout until both
ends are done. The stream's socket end belongs to the relay engine; stdin
and stdout are pipes from ssh, relayed to the other end of a socket pair
by two trio tasks.

What goes wrong is printed on stderr, where ssh shows it, with what to do
next; the exit status is 255, as ssh's own for a failed connection, or 0
after a session that ended cleanly.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import trio

from gateway.local.connect import ClusterError
from gateway.local.dialer import DIAL_TIMEOUT
from gateway.local.profile import Profile, ProfileError
from gateway.local.proxy import MuxRoute
from gateway.local.ssh import refusal_text
from gateway.local.waitroom import RIDE_OUT, ClientGone
from gateway.net.muxlink import MuxLink, Stream
from gateway.net.relay import RelayCounters, relay
from protocols.dial import DialError, DialRequest

log = logging.getLogger("wicket.proxy.ssh")

#: ssh's own exit status for a connection that failed.
EXIT_FAILED = 255


class TargetError(ValueError):
    pass


def parse_target(target: str, cluster_name: str) -> tuple[str, str]:
    """``LOGIN@NODE[:PORT]`` (what ssh's ``%r@%h:%p`` expands to) as
    (login, resource name). NODE may carry the cluster's suffix
    (``web-1.CLUSTER``, the name ssh_config's ``Host *.CLUSTER`` matches);
    the port is the one ssh would use and is ignored: the cluster knows the
    node's address."""
    login, at, rest = target.rpartition("@")
    if not at or not login or not rest:
        raise TargetError(f"{target!r}: expected LOGIN@NODE (ssh's ProxyCommand passes %r@%h:%p)")
    node = rest
    if rest.startswith("["):
        node = rest[1:].partition("]")[0]
    elif rest.count(":") == 1:
        node = rest.partition(":")[0]
    suffix = "." + cluster_name
    if node.endswith(suffix) and len(node) > len(suffix):
        node = node[: -len(suffix)]
    if not node:
        raise TargetError(f"{target!r}: no node name")
    return login, node


class SshStdio(MuxRoute):
    """One session on stdin/stdout (see the module docstring)."""

    def __init__(self, profile: Profile, resource: str, login: str, *, wait_for_cluster: float = RIDE_OUT,
                 sock: socket.socket | None = None) -> None:
        """``sock``: the socket ssh holds the other end of (:func:`hand_over`);
        None: stdin and stdout."""
        super().__init__(profile, resource, wait_for_cluster=wait_for_cluster)
        self.login = login
        self.sock = sock

    def fail(self, message: str) -> int:
        print(f"wicket: {message}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    async def run(self) -> int:
        """(trio) The session, start to end: the exit status."""
        request = DialRequest(resource=self.resource, params={"login": self.login}, client_addr="stdio")
        stale = self._stale_certificate()
        if stale is not None:
            return self.fail(stale)
        try:
            self.dialer.check_fresh()
            link, stream = await self.on_link(
                lambda link: (link, link.open(request, reply_timeout=DIAL_TIMEOUT, context="stdio")),
                self.room.deadline(), "stdio", lambda: False)
            reply = await link.reply(stream)
        except ProfileError as exc:
            return self.fail(str(exc))
        except ClientGone:  # not for us: stdin is read only once the session is up
            return EXIT_FAILED
        except (ClusterError, trio.TooSlowError) as exc:
            return self.fail((getattr(exc, "message", None) or "the Wicket cluster did not answer in time")
                             + "; check that the Wicket cluster is running and reachable from this machine")
        if reply is None:
            return self.fail(f"the session to {self.resource} ended before the cluster answered "
                             f"({stream.error}); try again")
        if isinstance(reply, DialError):
            return self.fail(refusal_text(reply))
        if self.sock is not None:
            return await self._carry(link, stream)
        return await self._relay(link, stream)

    def _stale_certificate(self) -> str | None:
        """Why the profile's SSH certificate, which ssh is about to show the
        node, will be refused (None: it will do)."""
        from gateway.identity.pki import utcnow
        from gateway.local.ssh_config import SshFiles

        files = SshFiles.of(self.profile)
        ends = files.cert_expiry()
        if ends is None and files.cert.exists():
            return f"{files.cert} is unreadable; run `wicket config ssh`"
        if ends is not None and ends <= utcnow():
            return (f"your SSH certificate ({files.cert}) expired at {ends:%Y-%m-%d %H:%M:%SZ}; run `wicket login` "
                    f"(it renews it) or `wicket config ssh`")
        return None

    async def _carry(self, link: MuxLink, stream: Stream) -> int:
        """ssh's socket itself is the stream's end: the relay engine moves
        every byte, nothing here does."""
        if not link.bind(stream, trio.SocketStream(trio.socket.from_stdlib_socket(self.sock)), RelayCounters()):
            return self.fail(f"the session to {self.resource} ended before it began ({stream.error})")
        error = await link.wait(stream)
        if error is not None:
            return self.fail(f"the session to {self.resource} was cut: {error}")
        return 0

    async def _relay(self, link: MuxLink, stream: Stream) -> int:
        ours, theirs = socket.socketpair()
        counters = RelayCounters()
        local = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
        if not link.bind(stream, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), counters):
            await local.aclose()
            return self.fail(f"the session to {self.resource} ended before it began ({stream.error})")
        # Duplicates: trio makes its descriptors non-blocking and closes them.
        stdio = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0)))
        async with local, stdio:
            async with trio.open_nursery() as nursery:
                outcome: dict[str, str | None] = {}

                async def carry() -> None:
                    outcome["relay"] = (await relay(stdio, local, names=("ssh", "cluster"))).error

                nursery.start_soon(carry)
                outcome["stream"] = await link.wait(stream)
                if outcome["stream"] is not None:  # cut: a lock, the certificate's end, the cluster gone
                    nursery.cancel_scope.cancel()
        error = outcome.get("stream")
        if error is not None:
            return self.fail(f"the session to {self.resource} was cut: {error}")
        return 0


def hand_over() -> socket.socket:
    """(before trio, before any thread but the log writer) OpenSSH's
    ``ProxyUseFdpass``: make a socket pair, pass one end to ssh on stdout
    (SCM_RIGHTS) and keep the other in a child process of our own, which
    carries the session while this process exits (ssh waits for its proxy
    command to exit before it uses the socket). ssh then reads and writes
    that socket itself: no byte goes through stdin, stdout or a task of
    ours. Returns our end, in the child; the child's stdin and stdout are
    /dev/null, its stderr is still ssh's (the terminal), where refusals are
    printed."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid:  # the parent: hand ssh its end, and go
        try:
            with socket.fromfd(1, socket.AF_UNIX, socket.SOCK_STREAM) as out:
                socket.send_fds(out, [b"\0"], [theirs.fileno()])
        except OSError as exc:
            print(f"wicket: cannot pass the connection to ssh ({exc.strerror}): --fdpass needs "
                  f"`ProxyUseFdpass yes` in ssh_config", file=sys.stderr, flush=True)
            os._exit(EXIT_FAILED)
        os._exit(0)
    theirs.close()
    os.setsid()  # not in ssh's process group: ssh's Ctrl-C is for ssh
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    from gateway import logs

    logs.setup()  # the writer thread did not survive the fork
    return ours
