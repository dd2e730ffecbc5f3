"""The ssh kind's local route (gateway/kinds.py): two ways in.

* ``wicket proxy ssh NODE --port 2222``: the gateway is an SSH server on
  localhost (gateway/local/ssh_terminated.py, asyncssh behind the fence of
  gateway/local/ssh_asyncio.py): ``ssh -p 2222 LOGIN@127.0.0.1``, or
  ``LOGIN%OTHER-NODE@127.0.0.1`` for another node on the same port;
* ``wicket proxy ssh --stdio LOGIN@NODE``: OpenSSH's ProxyCommand, OpenSSH
  end to end, the gateway carrying bytes (gateway/local/ssh_stdio.py;
  ``wicket config ssh`` writes the ssh_config block).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from gateway.local.dialer import DIAL_TIMEOUT
from gateway.local.proxy import NEXT_STEP, Listening
from protocols.dial import DialError
from protocols.errors import ErrorCode
from protocols.ssh import Handoff, HandoffReader

#: The dial parameters that ask the cluster for a connection's certificate
#: (gateway/cluster/ssh.py): the public key to sign, and which way in.
PUBLIC_KEY_PARAM = "ssh.public_key"
MODE_PARAM = "ssh.mode"

#: The next step after a refusal, for a person at an ssh client, where it
#: differs from the other kinds' (gateway/local/proxy.py).
_NEXT_STEP = {
    ErrorCode.ACCESS_DENIED: "`wicket ls` lists the nodes you can reach and the logins your roles allow; ask a "
                             "cluster administrator for a role that allows this one",
    ErrorCode.UPSTREAM_UNREACHABLE: None,  # the message says it already
}


def refusal_text(error: DialError) -> str:
    """A dial refusal as a person at an ssh client reads it, with what to do next."""
    step = _NEXT_STEP.get(error.code, NEXT_STEP.get(error.code))
    return error.message + (f"; {step}" if step else "")


async def read_handoff(sock: trio.socket.SocketType) -> Handoff:
    """(trio) The cluster's hand-off frame on a dialled stream's socket,
    read to its last byte and no further: what follows is the node's."""
    reader = HandoffReader()
    with trio.fail_after(DIAL_TIMEOUT):
        while need := reader.needed():
            data = await sock.recv(need)
            reader.receive_data(data)  # b"": the stream ended, a RemoteProtocolError
    return reader.next_event()


def ssh_route(profile, resource: str, identity, *, wait_for_cluster: float, local_users=None, stdio: bool = False,
              fdpass: bool = False, authorized_keys: str | None = None, allow_no_auth: bool = False,
              write_known_hosts: str | None = None, dialer=None):
    """With ``stdio``: one session on stdin/stdout, ``resource`` being
    ``LOGIN@NODE[:PORT]`` (it has a ``run``, not a listener). Else the SSH
    server on a local port, ``resource`` the node a plain login reaches."""
    import click

    if fdpass and not stdio:
        raise click.UsageError("--fdpass goes with --stdio (ssh's ProxyCommand with ProxyUseFdpass yes)")
    if stdio:
        from gateway.local.ssh_stdio import SshStdio, TargetError, hand_over, parse_target

        if authorized_keys or allow_no_auth or write_known_hosts:
            raise click.UsageError("--authorized-keys, --allow-no-auth and --write-known-hosts are for the local "
                                   "SSH server, not --stdio")
        from gateway.local.ssh_config import SshFiles

        try:
            login, node, host = parse_target(resource, profile.cluster_name)
            files = SshFiles.of(profile)
            files.cert_for(login, host)  # a name ssh's %r@%h can be
        except (TargetError, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
        sock = hand_over(files, login, host, timeout=wait_for_cluster + 2 * DIAL_TIMEOUT) if fdpass else None
        return SshStdio(profile, node, login, wait_for_cluster=wait_for_cluster, sock=sock)

    from gateway.local import settings, ssh_asyncio
    from gateway.local.ssh_terminated import SshTerminated

    try:  # the flag, or the profile's own opt-in (`wicket profile set ssh.allow_no_auth true`)
        allow_no_auth = allow_no_auth or settings.get(profile.home, "ssh.allow_no_auth")
    except settings.SettingsError as exc:
        raise click.UsageError(str(exc)) from None

    if authorized_keys:
        files = [Path(authorized_keys).expanduser()]
        if not files[0].is_file():
            raise click.BadParameter(f"{authorized_keys} is not a file", param_hint="--authorized-keys")
    else:
        files = sorted((Path.home() / ".ssh").glob("*.pub"))
    keys = ssh_asyncio.LocalKeys(ssh_asyncio.LocalKeys.read_files(files), allow_none=allow_no_auth)
    use_agent = not authorized_keys and bool(os.environ.get("SSH_AUTH_SOCK"))
    if not keys.blobs and not use_agent and not allow_no_auth:
        raise click.UsageError("no public key of yours was found (~/.ssh/*.pub, an ssh-agent): pass "
                               "--authorized-keys FILE, or let every process of your own local user in without a "
                               "key: `wicket profile set ssh.allow_no_auth true` (or --allow-no-auth once)")
    from gateway.private_files import ensure_private_dir

    ensure_private_dir(profile.home / "ssh")
    route = SshTerminated(profile, resource, keys=keys, host_key_path=profile.home / "ssh" / "gateway_host_key",
                          wait_for_cluster=wait_for_cluster, local_users=local_users, use_agent=use_agent,
                          dialer=dialer)

    def try_line(host: str, port: int) -> str:
        line = ssh_asyncio.known_hosts_line(route.host_key, host, port)
        if write_known_hosts:
            path = Path(write_known_hosts).expanduser()
            with open(path, "a") as f:
                f.write(line + "\n")
        return (f"Try: ssh -p {port} LOGIN@{host}   (LOGIN%NODE@{host} for another node)\n"
                f"The gateway's host key, for known_hosts"
                f"{f' (added to {write_known_hosts})' if write_known_hosts else ''}:\n{line}")

    return Listening(handler=route, dialer=route.dialer, try_line=try_line, route=route)
