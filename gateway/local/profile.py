"""The gateway's profile directory: who we are logged in as, and where.

``$WICKET_HOME`` (default ``~/.wicket``), mode 0700::

    profile.json     cluster address and name, user, CA pin (no secrets)
    key.pem          the session private key (0600; made here, never sent)
    cert.pem         the session certificate the cluster signed
    cluster-ca.pem   the cluster's host CA, checked against the pin at login
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import ssl
from pathlib import Path

import attrs
from cryptography import x509

from gateway.identity import pki, tlsconf
from gateway.private_files import ensure_private_dir

PROFILE_VERSION = 1
#: The files that are the login (the key first).
FILES = ("key.pem", "cert.pem", "profile.json", "cluster-ca.pem")


class ProfileError(Exception):
    """No usable login; the message says what to run."""


def expired_message(cluster_addr: str, identity: pki.Identity) -> str:
    return (
        f"your session for {identity.user}@{cluster_addr} expired at "
        f"{identity.not_after:%Y-%m-%d %H:%M:%SZ}; run: wicket login {cluster_addr} --user {identity.user}"
    )


def wicket_home() -> Path:
    return Path(os.environ.get("WICKET_HOME") or Path.home() / ".wicket").expanduser()


@attrs.frozen(slots=True, kw_only=True)
class Profile:
    home: Path
    cluster_addr: str  # HOST:PORT as the user typed it
    cluster_name: str
    user: str
    ca_pin: str

    @property
    def key_path(self) -> Path:
        return self.home / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.home / "cert.pem"

    @property
    def ca_path(self) -> Path:
        return self.home / "cluster-ca.pem"

    @property
    def host(self) -> str:
        host = self.cluster_addr.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        return int(self.cluster_addr.rpartition(":")[2])

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def identity(self) -> pki.Identity:
        return pki.identity_from_cert(self.certificate())

    def check_fresh(self, now: dt.datetime) -> pki.Identity:
        """The identity, or :class:`ProfileError` saying to log in again."""
        identity = self.identity()
        if now >= identity.not_after:
            raise ProfileError(expired_message(self.cluster_addr, identity))
        return identity

    def client_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        return tlsconf.gateway_client_context(
            self.ca_path.read_bytes(), cert=self.cert_path, key=self.key_path, alpn=alpn
        )

    def linked_into(self, home: Path) -> "Profile":
        """This login as seen from ``home`` (made, 0700): its files linked,
        not copied, so a renewal or a new login shows there too; anything
        else in ``home`` (an ``ssh/`` directory) is that directory's own."""
        ensure_private_dir(home)
        for name in FILES:
            (home / name).symlink_to(self.home.absolute() / name)
        return attrs.evolve(self, home=home)

    # -- persistence -----------------------------------------------------------

    @classmethod
    def load(cls, home: Path | None = None) -> "Profile":
        home = home or wicket_home()
        path = home / "profile.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(
                f"not logged in (no profile in {home}); run: wicket login CLUSTER:PORT --user NAME"
            ) from None
        except ValueError:
            raise ProfileError(f"{path} is corrupt; run `wicket logout` and log in again") from None
        if doc.get("version") != PROFILE_VERSION:
            raise ProfileError(f"{path} was written by another wicket version; log in again")
        mode = (home / "key.pem").stat().st_mode & 0o777 if (home / "key.pem").exists() else 0
        if mode & 0o077:
            raise ProfileError(
                f"{home / 'key.pem'} is readable by others (mode {mode:o}); run: chmod 600 "
                f"{home / 'key.pem'} (or log in again)"
            )
        return cls(
            home=home,
            cluster_addr=doc["cluster_addr"],
            cluster_name=doc["cluster_name"],
            user=doc["user"],
            ca_pin=doc["ca_pin"],
        )

    @classmethod
    def save(
        cls,
        home: Path,
        *,
        cluster_addr: str,
        cluster_name: str,
        user: str,
        ca_pin: str,
        key_pem: bytes,
        cert_pem: bytes,
        ca_pem: bytes,
    ) -> "Profile":
        ensure_private_dir(home)
        pki.write_private(home / "key.pem", key_pem)
        pki.write_public(home / "cert.pem", cert_pem)
        pki.write_public(home / "cluster-ca.pem", ca_pem)
        doc = {
            "version": PROFILE_VERSION,
            "cluster_addr": cluster_addr,
            "cluster_name": cluster_name,
            "user": user,
            "ca_pin": ca_pin,
        }
        pki.write_public(home / "profile.json", json.dumps(doc, indent=2).encode() + b"\n")
        return cls(home=home, cluster_addr=cluster_addr, cluster_name=cluster_name, user=user, ca_pin=ca_pin)


def remove(home: Path | None = None) -> bool:
    """Forget the login (the key first). True if there was one."""
    home = home or wicket_home()
    existed = (home / "profile.json").exists() or (home / "key.pem").exists()
    for name in FILES:
        (home / name).unlink(missing_ok=True)
    if home.exists() and not any(home.iterdir()):
        shutil.rmtree(home, ignore_errors=True)
    return existed
