"""The profile's SSH side for OpenSSH end to end (ProxyCommand mode).

``$WICKET_HOME/ssh/`` (0700)::

    id_ed25519            a key pair made here, new at every refresh (0600)
    id_ed25519.pub
    id_ed25519-cert.pub   its user certificate from the cluster's SSH user CA,
                          ending with the session certificate
    known_hosts           the nodes' host keys and host CAs, as the cluster has them

:func:`refresh` makes the key, has the cluster sign it (``POST
/v1/ssh/cert``) and writes the four files; :func:`ssh_config` renders the
block for ``~/.ssh/config`` that points OpenSSH at them, with ``wicket
proxy ssh --stdio`` as the ProxyCommand of every ``Host *.CLUSTER``.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.identity import pki, sshcerts
from gateway.local import api
from gateway.local.profile import Profile, wicket_home
from gateway.private_files import ensure_private_dir


@attrs.frozen(slots=True, kw_only=True)
class SshFiles:
    directory: Path

    @classmethod
    def of(cls, profile: Profile) -> "SshFiles":
        return cls(directory=profile.home / "ssh")

    @property
    def key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def public_key(self) -> Path:
        return self.directory / "id_ed25519.pub"

    @property
    def cert(self) -> Path:
        return self.directory / "id_ed25519-cert.pub"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def cert_expiry(self) -> dt.datetime | None:
        """When the certificate on disk ends (None: there is none, or it is unreadable)."""
        try:
            return sshcerts.cert_valid_before(sshcerts.load_cert(self.cert.read_bytes()))
        except (OSError, sshcerts.SSHKeyError):
            return None


async def refresh(profile: Profile) -> dict[str, Any]:
    """(trio) A new key pair and its certificate, and the known_hosts lines,
    written to the profile. Returns the cluster's answer (principals,
    expires_at, ...). Raises what ``api.api_call`` raises."""
    files = SshFiles.of(profile)
    key = ed25519.Ed25519PrivateKey.generate()
    comment = f"wicket:{profile.user}@{profile.cluster_name}"
    answer = await api.api_call(profile, "POST", "/v1/ssh/cert",
                                {"public_key": sshcerts.public_key_line(key)})
    ensure_private_dir(files.directory)
    pki.write_private(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    pki.write_public(files.public_key, (sshcerts.public_key_line(key, comment) + "\n").encode())
    pki.write_public(files.cert, (answer["certificate"] + "\n").encode())
    pki.write_public(files.known_hosts, "".join(line + "\n" for line in answer.get("known_hosts", [])).encode())
    return answer


def wicket_command() -> str:
    """How OpenSSH should run this wicket: the installed script if it is
    on PATH, else this interpreter with the module."""
    found = shutil.which("wicket")
    if found:
        return shlex.quote(found)
    return f"{shlex.quote(sys.executable)} -m gateway.cli.wicket"


def ssh_config(profile: Profile, *, command: str | None = None) -> str:
    """The ``~/.ssh/config`` block for the profile's cluster."""
    files = SshFiles.of(profile)
    command = command or wicket_command()
    if os.environ.get("WICKET_HOME"):  # ssh runs it with its own environment: say which profile
        command = f"env WICKET_HOME={shlex.quote(str(wicket_home()))} {command}"

    def path(p: Path) -> str:
        # ssh_config expands %-tokens in these: a literal % is %%.
        text = str(p).replace("%", "%%")
        return f'"{text}"' if " " in text else text

    return "\n".join([
        f"# Wicket: OpenSSH to the nodes of cluster {profile.cluster_name} ({profile.cluster_addr}).",
        "# The certificate ends with your session: after `wicket login`, run `wicket config ssh` again.",
        f"Host *.{profile.cluster_name}",
        f"    ProxyCommand {command.replace('%', '%%')} proxy ssh --stdio --fdpass %r@%h:%p",
        "    ProxyUseFdpass yes",
        f"    IdentityFile {path(files.key)}",
        f"    CertificateFile {path(files.cert)}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {path(files.known_hosts)}",
        "    StrictHostKeyChecking yes",
        "    UpdateHostKeys no",
        "",
    ])
