"""A profile's settings (gateway/local/settings.py)."""

import json
import stat

import pytest

from gateway.local import settings


def test_set_show_and_unset(tmp_path):
    assert settings.get(tmp_path, "ssh.allow_no_auth") is False
    assert settings.put(tmp_path, "ssh.allow_no_auth", "true") is True
    assert settings.get(tmp_path, "ssh.allow_no_auth") is True
    assert stat.S_IMODE((tmp_path / "settings.json").stat().st_mode) == 0o600
    assert settings.show(tmp_path) == {"ssh.allow_no_auth": True}
    assert settings.put(tmp_path, "ssh.allow_no_auth", None) is False
    assert json.loads((tmp_path / "settings.json").read_text()) == {}


def test_another_wickets_settings_are_kept(tmp_path):
    (tmp_path / "settings.json").write_text('{"future.thing": 3}')
    settings.put(tmp_path, "ssh.allow_no_auth", "off")
    assert json.loads((tmp_path / "settings.json").read_text()) == {"future.thing": 3, "ssh.allow_no_auth": False}


@pytest.mark.parametrize("name, text, message", [
    ("nope", "1", "no setting 'nope'; there are: ssh.allow_no_auth"),
    ("ssh.allow_no_auth", "maybe", "true or false, not 'maybe'"),
])
def test_bad_names_and_values_say_what_is_expected(tmp_path, name, text, message):
    with pytest.raises(settings.SettingsError, match=message):
        settings.put(tmp_path, name, text)


@pytest.mark.parametrize("content, message", [("[]", "JSON object"), ("{", "unreadable"),
                                              ('{"ssh.allow_no_auth": "yes"}', "must be bool")])
def test_a_bad_file_is_named(tmp_path, content, message):
    (tmp_path / "settings.json").write_text(content)
    with pytest.raises(settings.SettingsError, match=message):
        settings.get(tmp_path, "ssh.allow_no_auth")
