"""The README's first command: `wicket demo` brings up everything and each
line it prints works, one connection through every kind."""

import getpass
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.local import mongoserver, sshserver
from tests.integration.harness import PY, Proc, _env, wait_for


def test_demo_end_to_end(tmp_path):
    state = tmp_path / "demo"
    proc = Proc([PY, "-m", "gateway.cli.wicket", "demo", "--state-dir", str(state)], tmp_path / "demo.log", _env())
    try:
        psql_line = proc.read_line(r'^\s+(psql "host=.*")$', timeout=120).group(1)
        out = subprocess.run(psql_line + ' -X -tA -c "select current_user, current_database()"', shell=True,
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "demo|demo", out.stderr
        line = proc.read_line(r"^\s+(python3 -c .*)$").group(1)
        out = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "b'hello wicket'", out.stderr
        if shutil.which("mariadbd") or Path("/usr/sbin/mariadbd").exists():
            line = proc.read_line(r"^\s+(mysql -h .*)$").group(1)
            out = subprocess.run(line + " -N -B -e 'select current_user(), database()'", shell=True,
                                 capture_output=True, text=True, timeout=60)
            assert out.stdout.strip() == "demo@%\tdemo", out.stderr
        try:
            mongoserver.mongoeco_python()
        except mongoserver.Unavailable:
            wait_for(lambda: "no MongoDB resource: mongoeco needs Python >= 3.13" in proc.log(), what="the note")
        else:
            uri = proc.read_line(r'^\s+mongosh "(mongodb://[^"]+)"$').group(1)
            import pymongo

            with pymongo.MongoClient(uri, serverSelectionTimeoutMS=30_000) as client:
                client.demo.things.insert_one({"_id": 1, "via": "wicket"})
                assert client.demo.things.find_one({"_id": 1}) == {"_id": 1, "via": "wicket"}
            # The check after the stop sees this server too (by its open log).
            assert any(b"mongoeco_server" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _using(state))
        local_ssh_port = None
        if sshserver.missing() is None:
            line = proc.read_line(r"^\s+(ssh -F \S+ \S+@demo-ssh\.demo)$").group(1)
            assert line.split()[-1].split("@")[0] == ("root" if os.geteuid() == 0 else getpass.getuser())
            out = subprocess.run(line + " -o BatchMode=yes true", shell=True, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, out.stderr
            # The gateway's own SSH server, which the demo runs: the line as printed.
            line = proc.read_line(r"^\s+(ssh -o UserKnownHostsFile=\S+ -p \d+ \S+@127\.0\.0\.1)$").group(1)
            local_ssh_port = int(line.split(" -p ")[1].split()[0])
            out = subprocess.run(line + " -o BatchMode=yes echo terminated", shell=True, capture_output=True,
                                 text=True, timeout=120)
            assert out.stdout == "terminated\n", out.stderr
        else:
            wait_for(lambda: "no SSH resource: " in proc.log(), what="the note")
        assert (state / "demo-password").stat().st_mode & 0o777 == 0o600
        assert (state / "home" / "key.pem").stat().st_mode & 0o777 == 0o600
    finally:
        rc = proc.stop(signal.SIGINT)
    assert rc == 0, proc.log()
    assert "stopped" in proc.log()
    if local_ssh_port is not None:  # the gateway's SSH server stopped with it
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", local_ssh_port), timeout=5).close()
    # Every child went away with it: the cluster, sshd and each database
    # server, each of which names a path under the demo's state directory
    # on its command line or holds a file there open (mongoeco's log).
    assert not _using(state)


def _using(directory: Path) -> list[str]:
    """The processes whose command line names a path under ``directory``,
    or that hold a file there open."""
    needle = str(directory) + "/"
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle.encode() in (proc / "cmdline").read_bytes() or any(
                    os.readlink(fd).startswith(needle) for fd in (proc / "fd").iterdir()):
                found.append(proc.name)
        except OSError:
            pass  # gone meanwhile, or not ours to look at
    return found
