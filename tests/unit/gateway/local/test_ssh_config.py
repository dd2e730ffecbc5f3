"""Where a ProxyCommand connection's certificate goes (ssh's %r@%h)."""

import stat
from pathlib import Path

import pytest

from gateway.local.ssh_config import SshFiles


def test_a_certificate_is_named_as_ssh_names_it_and_written_whole(tmp_path):
    files = SshFiles(directory=tmp_path / "ssh")
    path = files.write_cert("root", "web-1.prod", "ssh-ed25519-cert-v01@openssh.com AAAA")
    assert path == tmp_path / "ssh" / "certs" / "root@web-1.prod-cert.pub"
    assert path.read_text() == "ssh-ed25519-cert-v01@openssh.com AAAA\n"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert Path(str(files.certs / files.CERT_PATTERN)).name == "%r@%h-cert.pub"


@pytest.mark.parametrize("login, host", [("../x", "web-1"), ("root", "../../etc"), ("root", ".hidden"),
                                         ("a@b", "web-1"), ("root", "web 1"), ("", "web-1")])
def test_a_name_that_is_no_plain_file_name_is_refused(tmp_path, login, host):
    with pytest.raises(ValueError, match="cannot name a certificate file"):
        SshFiles(directory=tmp_path).cert_for(login, host)
