"""What OpenSSH's tools (ssh, scp, sftp, rsync, git) need to reach the
nodes that `wicket exec --ssh NODE` and `wicket env --ssh NODE` name
(gateway/kinds.py names :func:`client_setup` for the ssh kind).

They reach a node the ProxyCommand way (gateway/local/ssh_stdio.py), not
through a local listener: each ssh connection runs its own `wicket proxy
ssh --stdio --fdpass`, so OpenSSH does SSH end to end (it checks the
node's host key against the cluster's known_hosts itself, and the node
sees the user's own certificate); a CI job needs no SSH key of its own to
let itself in to a local SSH server; bulk copies go at ProxyCommand's
pace, which is faster than the terminated server's; and there is no port
for another local user to try. What it costs: a wicket start and a TLS
handshake with the cluster per ssh connection.

`wicket exec` puts everything in its private temporary directory, removed
when the command ends::

    ssh-profile/    the exec's login as ssh's ProxyCommand sees it: the
                    profile's files linked (not copied), and an ssh/ of its
                    own with the SSH key, certificate and known_hosts
                    (gateway/local/ssh_config.py writes them)
    ssh_config      an alias per named node (``ssh web-1``: HostName
                    web-1.CLUSTER, and User when the roles grant exactly
                    one login), the block `wicket config ssh` prints, then
                    the user's own ~/.ssh/config and the system's, so other
                    hosts behave as with a plain ssh
    bin/            ssh, scp and sftp: OpenSSH's own with ``-F ssh_config``,
                    first on the command's PATH (``ssh web-1``, ``rsync -e
                    ssh``, and git without GIT_SSH_COMMAND)

and exports ``GIT_SSH_COMMAND`` and ``RSYNC_RSH`` (``ssh -F ssh_config``)
and ``WICKET_<NODE>_SSH_CONFIG`` for each node. `wicket env` writes the
key and certificate where `wicket config ssh` does, and its ssh_config as
``$WICKET_HOME/ssh/config-<nodes>`` (kept: the shell it is for outlives
the command), with the same exports but no wrappers.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from gateway.identity import pki
from gateway.local.profile import Profile

#: The OpenSSH tools that get a wrapper with ``-F`` in `wicket exec`.
TOOLS = ("ssh", "scp", "sftp")


async def client_setup(profile: Profile, nodes: Sequence[tuple[str, dict[str, Any]]],
                       directory: Path | None) -> dict[str, str]:
    """(trio) Write what ssh needs for ``nodes`` (name, settings) and
    return the environment that points the tools at it: in ``directory``
    (private, removed by the caller) for `wicket exec`, or, when None, in
    the profile for `wicket env`. Raises what ``api.api_call`` raises."""
    from gateway.local.serving import env_name

    if directory is None:
        ssh_profile = profile
        names = "+".join(sorted(name for name, _ in nodes))
        if len(names) > 100:
            names = hashlib.sha256(names.encode()).hexdigest()[:16]
        config = profile.home / "ssh" / f"config-{names}"
    else:
        ssh_profile = profile.linked_into(directory / "ssh-profile")
        config = directory / "ssh_config"
    block = await _profile_block(ssh_profile)
    pki.write_private(config, render(ssh_profile.cluster_name, nodes, block).encode())
    command = f"ssh -F {shlex.quote(str(config))}"
    env = {"GIT_SSH_COMMAND": command, "RSYNC_RSH": command}
    for name, _ in nodes:
        env[f"WICKET_{env_name(name)}_SSH_CONFIG"] = str(config)
    if directory is not None:
        env["PATH"] = os.pathsep.join([str(write_wrappers(directory / "bin", config)),
                                       os.environ.get("PATH", os.defpath)])
    return env


async def _profile_block(ssh_profile: Profile) -> str:
    """(trio) The SSH key, certificate and known_hosts in ``ssh_profile``,
    and the ``Host *.CLUSTER`` block `wicket config ssh` prints for them,
    its ProxyCommand run with this profile and this wicket. The one use of
    gateway/local/ssh_config.py here."""
    from gateway.local import ssh_config

    await ssh_config.refresh(ssh_profile)
    wicket = f"{shlex.quote(sys.executable)} -m gateway.cli.wicket"  # the same code as this exec
    return ssh_config.ssh_config(ssh_profile, command=f"env WICKET_HOME={shlex.quote(str(ssh_profile.home))} "
                                                      f"{wicket}")


def render(cluster: str, nodes: Sequence[tuple[str, dict[str, Any]]], block: str) -> str:
    """The ssh_config: an alias block per node, ``block`` (whose ``Host
    *.CLUSTER`` line is made to match the aliases too, so its options
    apply to them), then the user's and the system's own configuration,
    which ``ssh -F`` would otherwise skip."""
    head = f"Host *.{cluster}"
    lines = block.splitlines()
    if head not in lines:
        raise ValueError(f"the ssh_config block has no {head!r} line")
    aliases = [name for name, _ in nodes]
    lines[lines.index(head)] = " ".join([head, *aliases])
    out = [f"# Written by wicket for the nodes of cluster {cluster}: ssh NODE, or ssh LOGIN@NODE."]
    for name, settings in nodes:
        out += [f"Host {name}", f"    HostName {name}.{cluster}"]
        if settings.get("login"):
            out.append(f"    User {settings['login']}")
    out += [*lines, "", "# Any other host: as a plain ssh would have it.", "Match all",
            "    Include ~/.ssh/config", "    Include /etc/ssh/ssh_config", ""]
    return "\n".join(out)


def write_wrappers(bin_dir: Path, config: Path) -> Path:
    """``bin_dir`` with ssh, scp and sftp: the ones on PATH now, given
    ``-F config`` (a later ``-F`` of the command's own wins). A tool that
    is not installed gets none."""
    bin_dir.mkdir(mode=0o700, exist_ok=True)
    for tool in TOOLS:
        real = shutil.which(tool)
        if real is None:
            continue
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\n# written by `wicket exec`: {tool} with the exec's ssh_config\n"
                        f"exec {shlex.quote(real)} -F {shlex.quote(str(config))} \"$@\"\n")
        path.chmod(0o700)
    return bin_dir
