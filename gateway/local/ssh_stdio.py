"""``wicket proxy ssh --stdio LOGIN@NODE[:PORT]``: one SSH connection on
standard input and output, OpenSSH's ProxyCommand.

OpenSSH does SSH end to end (its own key exchange with the node, host key
checks against the known_hosts `wicket config ssh` wrote); Wicket carries
the bytes, and gets the connection its certificate. This process opens a
stream on a multiplexed connection to the cluster for the node's resource
with the login and a public key on the dial (``ssh.mode = proxycommand``);
once the cluster has checked the session certificate and the roles (node
and login, deny wins) and reached the node, it sends a user certificate
for that key and that login only, valid two minutes, in the hand-off frame
ahead of the node's bytes (protocols/ssh/handoff.py). How ssh gets it:

* ``--fdpass`` (``ProxyUseFdpass yes``, the block `wicket config ssh`
  prints): :func:`hand_over` forks before anything else; the child dials
  with the profile's key and binds one end of a socket pair to the stream
  (the relay engine moves every byte from then on); the parent reads the
  hand-off frame from the other end, writes the certificate where the
  block's ``CertificateFile`` (``certs/%r@%h-cert.pub``) points, and only
  then passes that end to ssh and exits. ssh reads its certificate files
  after its ProxyCommand has passed the connection, so it always reads
  this connection's own.
* Plain ``--stdio`` (an ssh_config written by hand, or another client's
  ProxyCommand): ssh read its certificate files when it started, so the
  key is made in memory for this connection and, with its certificate,
  given to the ssh-agent of ``$SSH_AUTH_SOCK`` for the certificate's life
  (protocols/ssh/agent.py) before the node's first byte is relayed; ssh
  asks the agent when it authenticates (after the key exchange). Then stdin
  and stdout are relayed to the other end of a socket pair by two trio tasks.
  ssh hangs up on this process (SIGHUP) as it exits: the session then has
  ``HANGUP_GRACE`` to end cleanly (ssh's EOF is on its way to the node)
  before it is cut, rather than this process dying with it, which the
  cluster would record as a connection cut short. A hang-up that comes
  while the dial is on its way is kept: the grace starts once the session
  is up.

What goes wrong is printed on stderr, where ssh shows it, with what to do
next; the exit status is 255, as ssh's own for a failed connection, or 0
after a session that ended cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import AsyncIterator

import trio

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.identity import sshcerts
from gateway.identity.pki import utcnow
from gateway.local.connect import ClusterError
from gateway.local.dialer import DIAL_TIMEOUT
from gateway.local.profile import Profile, ProfileError
from gateway.local.proxy import MuxRoute
from gateway.local.ssh import MODE_PARAM, PUBLIC_KEY_PARAM, read_handoff, refusal_text
from gateway.local.ssh_config import SshFiles
from gateway.local.waitroom import RIDE_OUT, ClientGone
from gateway.net.muxlink import MuxLink, Stream
from gateway.net.relay import RelayCounters, relay
from protocols.dial import DialError, DialRequest
from protocols.errors import ProtocolError
from protocols.signals import NEED_DATA
from protocols.ssh import HandoffReader
from protocols.ssh.agent import ReplyReader, add_ed25519_certificate

log = logging.getLogger("wicket.proxy.ssh")

#: ssh's own exit status for a connection that failed.
EXIT_FAILED = 255

#: Plain ``--stdio``: ssh hangs up on its ProxyCommand (SIGHUP) as it exits,
#: right after closing its end of the pipes, so before the node's EOF has
#: come back. How long the session then has to end cleanly (the node sees
#: ssh's EOF and closes: well under a second) before it is cut.
HANGUP_GRACE = 5.0


class TargetError(ValueError):
    pass


def parse_target(target: str, cluster_name: str) -> tuple[str, str, str]:
    """``LOGIN@NODE[:PORT]`` (what ssh's ``%r@%h:%p`` expands to) as
    (login, resource name, host as ssh named it). NODE may carry the
    cluster's suffix (``web-1.CLUSTER``, the name ssh_config's ``Host
    *.CLUSTER`` matches); the port is the one ssh would use and is ignored:
    the cluster knows the node's address. The host is what ssh's ``%h``
    is in the certificate file's name."""
    login, at, rest = target.rpartition("@")
    if not at or not login or not rest:
        raise TargetError(f"{target!r}: expected LOGIN@NODE (ssh's ProxyCommand passes %r@%h:%p)")
    host = rest
    if rest.startswith("["):
        host = rest[1:].partition("]")[0]
    elif rest.count(":") == 1:
        host = rest.partition(":")[0]
    node, suffix = host, "." + cluster_name
    if node.endswith(suffix) and len(node) > len(suffix):
        node = node[: -len(suffix)]
    if not node:
        raise TargetError(f"{target!r}: no node name")
    return login, node, host


class SshStdio(MuxRoute):
    """One session on stdin/stdout (see the module docstring)."""

    def __init__(self, profile: Profile, resource: str, login: str, *, wait_for_cluster: float = RIDE_OUT,
                 sock: socket.socket | None = None) -> None:
        """``sock``: our end of the socket pair whose other end :func:`hand_over`
        passes to ssh; None: stdin and stdout."""
        super().__init__(profile, resource, wait_for_cluster=wait_for_cluster)
        self.login = login
        self.sock = sock

    def fail(self, message: str) -> int:
        print(f"wicket: {message}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    async def run(self) -> int:
        """(trio) The session, start to end: the exit status."""
        if self.sock is not None:
            return await self._run(None)
        # ssh may hang up on us while the dial is still on its way: that
        # hang-up is kept, and the session gets its HANGUP_GRACE once it is
        # up, as after one later, instead of this process dying at once.
        with trio.open_signal_receiver(signal.SIGHUP) as hangups:
            return await self._run(hangups)

    async def _run(self, hangups: AsyncIterator[int] | None) -> int:
        key = None
        if self.sock is not None:  # the profile's key: ssh has it as its IdentityFile
            files = SshFiles.of(self.profile)
            try:
                public = files.public_key_line()
            except OSError:
                return self.fail(f"{files.public_key} is missing; run `wicket config ssh`")
        else:  # a key for this connection only, for the ssh-agent
            key = ed25519.Ed25519PrivateKey.generate()
            public = sshcerts.public_key_line(key)
        request = DialRequest(resource=self.resource, client_addr="stdio",
                              params={"login": self.login, PUBLIC_KEY_PARAM: public, MODE_PARAM: "proxycommand"})
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
        return await self._relay(link, stream, key, hangups)

    async def _carry(self, link: MuxLink, stream: Stream) -> int:
        """ssh's socket itself is the stream's end: the relay engine moves
        every byte, nothing here does."""
        if not link.bind(stream, trio.SocketStream(trio.socket.from_stdlib_socket(self.sock)), RelayCounters()):
            return self.fail(f"the session to {self.resource} ended before it began ({stream.error})")
        error = await link.wait(stream)
        if error is not None:
            return self.fail(f"the session to {self.resource} was cut: {error}")
        return 0

    async def _relay(self, link: MuxLink, stream: Stream, key: ed25519.Ed25519PrivateKey,
                     hangups: AsyncIterator[int]) -> int:
        ours, theirs = socket.socketpair()
        counters = RelayCounters()
        local = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
        if not link.bind(stream, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), counters):
            await local.aclose()
            return self.fail(f"the session to {self.resource} ended before it began ({stream.error})")
        try:
            handoff = await read_handoff(local.socket)
        except (ProtocolError, trio.TooSlowError, OSError) as exc:
            link.cut(stream, "no hand-off from the cluster")
            await local.aclose()
            return self.fail(f"the cluster's answer for {self.resource} was unreadable ({exc}); is this wicket as "
                             f"new as the cluster?")
        problem = await give_agent(key, handoff.certificate)
        if problem is not None:
            print(f"wicket: {problem}", file=sys.stderr, flush=True)  # ssh may still get in another way
        # Duplicates: trio makes its descriptors non-blocking and closes them.
        stdio = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0)))
        async with local, stdio:
            async with trio.open_nursery() as nursery:
                outcome: dict[str, str | None] = {}

                async def carry() -> None:
                    outcome["relay"] = (await relay(stdio, local, names=("ssh", "cluster"))).error

                async def hung_up(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with trio.CancelScope() as scope:
                        task_status.started(scope)
                        async for _ in hangups:
                            break
                        await trio.sleep(HANGUP_GRACE)
                        link.cut(stream, f"ssh exited and the node had not ended the session "
                                         f"{HANGUP_GRACE:g} s later")

                nursery.start_soon(carry)
                watcher = await nursery.start(hung_up)
                outcome["stream"] = await link.wait(stream)
                if outcome["stream"] is not None:  # cut: a lock, the certificate's end, the cluster gone
                    nursery.cancel_scope.cancel()
                else:
                    watcher.cancel()  # the rest reaches ssh (carry) if it is still there
        error = outcome.get("stream")
        if error is not None:
            return self.fail(f"the session to {self.resource} was cut: {error}")
        return 0


async def give_agent(key: ed25519.Ed25519PrivateKey, certificate: str) -> str | None:
    """(trio) Give the ssh-agent of ``$SSH_AUTH_SOCK`` ``key`` with its
    ``certificate`` until the certificate ends; None once it took them,
    else why not and what to do."""
    path = os.environ.get("SSH_AUTH_SOCK")
    advice = "use the block `wicket config ssh` prints (ProxyUseFdpass yes, --fdpass), which needs no agent"
    if not path:
        return f"no ssh-agent (SSH_AUTH_SOCK) to give this connection's certificate to: {advice}"
    cert = sshcerts.load_cert(certificate)
    lifetime = int((sshcerts.cert_valid_before(cert) - utcnow()).total_seconds())
    raw = serialization.Encoding.Raw
    request = add_ed25519_certificate(
        certificate=sshcerts.cert_blob(cert),
        public=key.public_key().public_bytes(raw, serialization.PublicFormat.Raw),
        seed=key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        comment=cert.key_id.decode("ascii", "replace"), lifetime=max(1, lifetime))
    reader = ReplyReader()
    try:
        with trio.fail_after(DIAL_TIMEOUT):
            agent = await trio.open_unix_socket(path)
            async with agent:
                await agent.send_all(request)
                while (added := reader.next_event()) is NEED_DATA:
                    reader.receive_data(await agent.receive_some(4096))
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ProtocolError) as exc:
        return f"the ssh-agent at {path} did not take this connection's certificate ({exc}): {advice}"
    return None if added else f"the ssh-agent at {path} refused this connection's certificate: {advice}"


def hand_over(files: SshFiles, login: str, host: str, timeout: float) -> socket.socket:
    """(before trio, before any thread but the log writer) OpenSSH's
    ``ProxyUseFdpass``: make a socket pair and fork. The child (this call
    returns our end in it) carries the session: it dials, and the relay
    engine moves the stream's bytes to and from our end. The parent reads
    the cluster's hand-off frame from the other end, writes the
    connection's certificate where ssh will read it (``files``, ``login``
    and ``host``: ssh's ``%r`` and ``%h``), passes that end to ssh on
    stdout (SCM_RIGHTS) and exits (ssh waits for its proxy command to exit
    before it uses the socket, and reads its certificate files after); the
    node's first bytes are in the socket behind the frame. ssh then reads
    and writes that socket itself: no byte goes through stdin, stdout or a
    task of ours. If the dial is refused the child says why on stderr
    (ssh's: the terminal) and the parent passes nothing. The child's stdin
    and stdout are /dev/null."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid:  # the parent
        ours.close()
        os._exit(_pass_when_signed(theirs, files, login, host, timeout))
    theirs.close()
    os.setsid()  # not in ssh's process group: ssh's Ctrl-C is for ssh
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    from gateway import logs

    logs.setup()  # the writer thread did not survive the fork
    return ours


def _pass_when_signed(theirs: socket.socket, files: SshFiles, login: str, host: str, timeout: float) -> int:
    """(the parent of :func:`hand_over`, blocking) The exit status."""
    reader = HandoffReader()
    theirs.settimeout(timeout)
    try:
        while need := reader.needed():
            reader.receive_data(theirs.recv(need))
        files.write_cert(login, host, reader.next_event().certificate)
        theirs.settimeout(None)  # blocking again: ssh gets the socket as a plain one
    except ProtocolError:  # the stream ended: the child has said why
        return EXIT_FAILED
    except (OSError, ValueError) as exc:
        print(f"wicket: the connection's certificate could not be written for ssh ({exc})", file=sys.stderr,
              flush=True)
        return EXIT_FAILED
    try:
        with socket.fromfd(1, socket.AF_UNIX, socket.SOCK_STREAM) as out:
            socket.send_fds(out, [b"\0"], [theirs.fileno()])
    except OSError as exc:
        print(f"wicket: cannot pass the connection to ssh ({exc.strerror}): --fdpass needs "
              f"`ProxyUseFdpass yes` in ssh_config", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return 0
