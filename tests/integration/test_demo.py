"""The README's first command: `wicket demo` brings up everything and the
line it prints works."""

import shutil
import signal
import subprocess
from pathlib import Path

from tests.integration.harness import PY, Proc, _env


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
        assert (state / "demo-password").stat().st_mode & 0o777 == 0o600
        assert (state / "home" / "key.pem").stat().st_mode & 0o777 == 0o600
    finally:
        rc = proc.stop(signal.SIGINT)
    assert rc == 0, proc.log()
    assert "stopped" in proc.log()
    # The cluster child went away with it.
    needle = str(state / "cluster.toml").encode()
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                alive.append(cmdline.parent.name)
        except OSError:
            pass
    assert not alive
