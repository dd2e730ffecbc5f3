"""``wicket-cluster ca``: the cluster's certificate authorities (the pin
gateways pin, the public halves, host certificates for SSH nodes).

Registered on ``wicket-cluster`` by :func:`register`, which hands over the
CLI's shared pieces (the ``--config`` option, the config loader), so this
module imports nothing of gateway/cli/cluster.py.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Callable

import click

from gateway.durations import parse_duration

_CA_FILES = {"host": "host_ca.crt", "user": "user_ca.crt", "db-client": "db_client_ca.crt",
             "ssh-user": "ssh_user_ca.pub", "ssh-host": "ssh_host_ca.pub"}


def register(main: click.Group, *, config_option: Callable, load_config: Callable[[Path], Any]) -> None:
    """Add the ``ca`` group to ``main``."""

    @main.group()
    def ca() -> None:
        """The cluster's certificate authorities."""

    @ca.command("pin")
    @config_option
    def ca_pin(config_path: Path) -> None:
        """Print the pin gateways pass to `wicket login --ca-pin`."""
        from gateway.identity import pki

        config = load_config(config_path)
        path = config.state_dir / "host_ca.crt"
        if not path.exists():
            raise click.ClickException(f"no host CA in {config.state_dir}; start the cluster once to create it")
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(path.read_bytes())
        click.echo(pki.public_key_pin(cert.public_key()))

    @ca.command("show")
    @config_option
    @click.argument("which", type=click.Choice(list(_CA_FILES)))
    def ca_show(config_path: Path, which: str) -> None:
        """Print a CA's public certificate (or SSH public key).

        db-client is what a database's ssl_ca_file must trust for `auth = cert`;
        ssh-user is what sshd's TrustedUserCAKeys must list; ssh-host signs the
        host certificates of nodes whose resource says host_ca = "cluster"."""
        config = load_config(config_path)
        path = config.state_dir / _CA_FILES[which]
        if not path.exists():
            raise click.ClickException(f"no {which} CA in {config.state_dir}; start the cluster once to create it")
        click.echo(path.read_text(), nl=False)

    @ca.command("sign-ssh-host")
    @config_option
    @click.argument("node")
    @click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="The node's host public key (e.g. a copy of /etc/ssh/ssh_host_ed25519_key.pub).")
    @click.option("--name", "names", multiple=True, help="Another name the certificate is for (repeatable).")
    @click.option("--validity", default="365d", show_default=True, help="How long the certificate is valid.")
    def ca_sign_ssh_host(config_path: Path, node: str, key_path: Path, names: tuple[str, ...], validity: str) -> None:
        """Sign NODE's host key with the cluster's SSH host CA and print the
        certificate, for a node whose resource says host_ca = "cluster".

        On the node: save it as /etc/ssh/ssh_host_ed25519_key-cert.pub and add
        `HostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub` to sshd_config.
        The certificate is for NODE.CLUSTER, the name clients use."""
        from gateway.identity import pki, sshcerts

        config = load_config(config_path)
        if not (config.state_dir / "ssh_host_ca").exists():
            raise click.ClickException(f"no SSH host CA in {config.state_dir}; start the cluster once to create it")
        try:
            seconds = parse_duration(validity)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--validity") from None
        try:
            key = sshcerts.parse_public_key(key_path.read_text(), str(key_path))
        except (OSError, sshcerts.SSHKeyError) as exc:
            raise click.ClickException(str(exc)) from None
        ca_key = pki.load_or_create_ssh_ca(config.state_dir, "ssh_host_ca", "wicket-ssh-host-ca")
        now = pki.utcnow()
        cert = sshcerts.sign_host_cert(ca_key, key, names=[f"{node}.{config.name}", *names], key_id=f"wicket:{node}",
                                       not_before=now, not_after=now + dt.timedelta(seconds=seconds))
        click.echo(sshcerts.cert_line(cert, f"wicket:{node}"))
