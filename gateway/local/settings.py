"""A profile's settings: choices a person makes once for their gateway,
kept beside the login in ``$WICKET_HOME/settings.json`` (0600) so a new
login does not undo them (``wicket profile set KEY VALUE``).

Only the settings in :data:`SETTINGS` exist; each has a type and says what
it does. A file another wicket wrote with settings this one does not know
keeps them; one that is not a JSON object, or a known key of the wrong
type, is an error naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from gateway.identity import pki
from gateway.private_files import ensure_private_dir


class SettingsError(ValueError):
    """A setting that does not exist, a value it cannot take, or an unreadable file."""


@attrs.frozen(slots=True, kw_only=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str

    def parse(self, text: str) -> Any:
        """The value of ``text`` as typed on a command line."""
        if self.type is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise SettingsError(f"{self.name} is true or false, not {text!r}")
        return self.type(text)


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting(name="ssh.allow_no_auth", type=bool, default=False,
            help="The local SSH server (`wicket proxy ssh NODE --port P`) lets every process of your own local "
                 "user in without a key (ssh's `none` method); otherwise one of your keys is needed. Never a "
                 "password."),
)}


def _path(home: Path) -> Path:
    return home / "settings.json"


def _known(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise SettingsError(f"no setting {name!r}; there are: {', '.join(sorted(SETTINGS))}") from None


def _read(home: Path) -> dict[str, Any]:
    path = _path(home)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path} is unreadable ({exc}); fix or remove it") from None
    if not isinstance(doc, dict):
        raise SettingsError(f"{path} must hold a JSON object of settings; fix or remove it")
    for name, value in doc.items():
        setting = SETTINGS.get(name)
        if setting is not None and not isinstance(value, setting.type):
            raise SettingsError(f"{path}: {name} must be {setting.type.__name__}, not {value!r}; "
                                f"run `wicket profile set {name} VALUE`")
    return doc


def get(home: Path, name: str) -> Any:
    """The setting's value in the profile at ``home`` (its default if unset)."""
    return _read(home).get(name, _known(name).default)


def show(home: Path) -> dict[str, Any]:
    """Every known setting's value."""
    doc = _read(home)
    return {name: doc.get(name, setting.default) for name, setting in sorted(SETTINGS.items())}


def put(home: Path, name: str, text: str | None) -> Any:
    """Set ``name`` from ``text`` (None: back to its default). Returns the value."""
    setting = _known(name)
    doc = _read(home)
    if text is None:
        doc.pop(name, None)
        value = setting.default
    else:
        value = doc[name] = setting.parse(text)
    ensure_private_dir(home)
    pki.write_private(_path(home), json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
    return value
