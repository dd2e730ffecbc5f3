"""gateway/local/ssh_client.py: the ssh_config `wicket exec --ssh` and
`wicket env --ssh` write, and the wrappers that give OpenSSH's tools -F."""

import os
import stat
import subprocess
import shutil

import pytest

from gateway.local.ssh_client import render, write_wrappers

BLOCK = ("# Wicket: OpenSSH to the nodes of cluster prod (c:3025).\n"
         "Host *.prod\n"
         "    ProxyCommand wicket proxy ssh --stdio --fdpass %r@%h:%p\n"
         "    StrictHostKeyChecking yes\n")


def test_each_node_is_an_alias_the_clusters_block_applies_to():
    text = render("prod", [("web-1", {"login": "deploy"}), ("db-2", {})], BLOCK)
    assert "Host web-1\n    HostName web-1.prod\n    User deploy\nHost db-2\n    HostName db-2.prod\n" in text
    assert "\nHost *.prod web-1 db-2\n    ProxyCommand" in text  # the aliases get its options
    # Other hosts: the user's and the system's configuration, which -F skips.
    assert text.endswith("Match all\n    Include ~/.ssh/config\n    Include /etc/ssh/ssh_config\n")


def test_a_block_of_another_shape_is_refused_not_guessed():
    with pytest.raises(ValueError, match="no 'Host \\*.prod' line"):
        render("prod", [("web-1", {})], BLOCK.replace("Host *.prod", "Host *.other"))


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH's client is not installed")
def test_ssh_reads_the_config_and_resolves_an_alias(tmp_path):
    """OpenSSH itself (ssh -G prints the options it would use) agrees."""
    config = tmp_path / "ssh_config"
    config.write_text(render("prod", [("web-1", {"login": "deploy"})], BLOCK))
    shown = subprocess.run(["ssh", "-F", str(config), "-G", "web-1"], capture_output=True, text=True,
                           env={**os.environ, "HOME": str(tmp_path)}, check=True).stdout.splitlines()
    assert "hostname web-1.prod" in shown and "user deploy" in shown
    assert "proxycommand wicket proxy ssh --stdio --fdpass %r@%h:%p" in shown
    other = subprocess.run(["ssh", "-F", str(config), "-G", "example.org"], capture_output=True, text=True,
                           env={**os.environ, "HOME": str(tmp_path)}, check=True).stdout.splitlines()
    assert not any(line.startswith("proxycommand") for line in other)


def test_wrappers_give_the_real_tools_the_config(tmp_path):
    config = tmp_path / "the config"
    bin_dir = write_wrappers(tmp_path / "bin", config)
    assert stat.S_IMODE(bin_dir.stat().st_mode) == 0o700
    for tool in ("ssh", "scp", "sftp"):
        real = shutil.which(tool)
        path = bin_dir / tool
        if real is None:
            assert not path.exists()
            continue
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert path.read_text().splitlines()[-1] == f"exec {real} -F '{config}' \"$@\""

