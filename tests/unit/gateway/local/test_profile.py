"""gateway/local/profile.py."""

import stat


def test_a_profile_linked_into_another_directory_follows_the_original(tmp_path):
    """The exec's ssh/ lives in the view; the login is the profile's own,
    linked, so a renewal written to the profile shows through it."""
    from gateway.local.profile import FILES, Profile

    home = tmp_path / "home"
    original = Profile.save(home, cluster_addr="c:3025", cluster_name="prod", user="ann", ca_pin="sha256:x",
                            key_pem=b"key", cert_pem=b"first", ca_pem=b"ca")
    view = original.linked_into(tmp_path / "view")
    assert stat.S_IMODE((tmp_path / "view").stat().st_mode) == 0o700
    assert all((view.home / name).is_symlink() for name in FILES)
    assert Profile.load(view.home) == view and view.cluster_name == "prod"
    Profile.save(home, cluster_addr="c:3025", cluster_name="prod", user="ann", ca_pin="sha256:x",
                 key_pem=b"key2", cert_pem=b"renewed", ca_pem=b"ca")
    assert view.cert_path.read_bytes() == b"renewed"
