"""The profile's SSH side for OpenSSH end to end (ProxyCommand mode).

``$WICKET_HOME/ssh/`` (0700)::

    id_ed25519            a key pair made here once (0600); useless on its own:
    id_ed25519.pub        no node trusts it, only certificates for it
    certs/LOGIN@HOST-cert.pub
                          one connection's user certificate, for that login
                          only, valid two minutes: written by the ProxyCommand
                          (``wicket proxy ssh --stdio --fdpass``) from its
                          dial's hand-off before ssh reads it
    known_hosts           the nodes' host keys and host CAs, as the cluster has them

:func:`refresh` makes the key if there is none and writes known_hosts
(``GET /v1/ssh/hosts``); :func:`ssh_config` renders the block for
``~/.ssh/config`` that points OpenSSH at them, with ``wicket proxy ssh
--stdio --fdpass`` as the ProxyCommand of every ``Host *.CLUSTER``, and
``CertificateFile .../certs/%r@%h-cert.pub``: ssh reads the certificate
files after its ProxyCommand has passed it the connection, and the
ProxyCommand passes it only once the cluster has signed that connection's
certificate (gateway/local/ssh_stdio.py).
"""

from __future__ import annotations

import os
import re
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
    def certs(self) -> Path:
        return self.directory / "certs"

    #: What ssh_config's CertificateFile names, under :attr:`certs`.
    CERT_PATTERN = "%r@%h-cert.pub"

    def cert_for(self, login: str, host: str) -> Path:
        """The certificate file ssh looks for when it connects as ``login``
        to ``host`` (its ``%r`` and ``%h``); ValueError for a name that
        cannot be a file name here."""
        name = f"{login}@{host}"
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} cannot name a certificate file (letters, digits, . _ - and one @)")
        return self.certs / f"{name}-cert.pub"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def public_key_line(self) -> str:
        """The profile key's public line (OSError if there is none: run `wicket config ssh`)."""
        return self.public_key.read_text().strip()

    def write_cert(self, login: str, host: str, line: str) -> Path:
        """One connection's certificate where ssh will read it (atomically:
        another connection to the same login and host may be writing its
        own, which serves as well: same key, same login, same node)."""
        path = self.cert_for(login, host)
        ensure_private_dir(self.certs)
        pki.write_public(path, (line + "\n").encode())
        return path


_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._$-]{0,63}@[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def ensure_key(files: SshFiles, comment: str) -> None:
    """The profile's key pair, made if there is none."""
    ensure_private_dir(files.directory)
    if files.key.exists() and files.public_key.exists():
        return
    key = ed25519.Ed25519PrivateKey.generate()
    pki.write_private(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    pki.write_public(files.public_key, (sshcerts.public_key_line(key, comment) + "\n").encode())


async def refresh(profile: Profile) -> dict[str, Any]:
    """(trio) The profile's key pair (made once) and the known_hosts lines
    of the nodes the user reaches. Returns the cluster's answer (logins,
    known_hosts). Raises what ``api.api_call`` raises."""
    files = SshFiles.of(profile)
    answer = await api.api_call(profile, "GET", "/v1/ssh/hosts")
    ensure_key(files, f"wicket:{profile.user}@{profile.cluster_name}")
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

    def path(p: Path, tokens: str = "") -> str:
        # ssh_config expands %-tokens in these: a literal % is %%.
        text = str(p).replace("%", "%%") + tokens
        return f'"{text}"' if " " in text else text

    return "\n".join([
        f"# Wicket: OpenSSH to the nodes of cluster {profile.cluster_name} ({profile.cluster_addr}).",
        "# Each connection gets its own certificate, for its login only, from its ProxyCommand.",
        f"Host *.{profile.cluster_name}",
        f"    ProxyCommand {command.replace('%', '%%')} proxy ssh --stdio --fdpass %r@%h:%p",
        "    ProxyUseFdpass yes",
        f"    IdentityFile {path(files.key)}",
        f"    CertificateFile {path(files.certs, '/' + SshFiles.CERT_PATTERN)}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {path(files.known_hosts)}",
        "    StrictHostKeyChecking yes",
        "    UpdateHostKeys no",
        "",
    ])
