import os
import stat

from gateway.private_files import ensure_private_dir


def test_creates_0700(tmp_path):
    target = tmp_path / "a" / "b"
    old = os.umask(0)
    try:
        ensure_private_dir(target)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_tightens_an_existing_dir(tmp_path):
    target = tmp_path / "open"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    ensure_private_dir(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
