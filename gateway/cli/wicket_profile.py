"""``wicket profile show|set|unset``: the profile's settings
(gateway/local/settings.py)."""

from __future__ import annotations

import json

import click

from gateway.cli.common import format_option


def register(main: click.Group) -> None:
    from gateway.local import settings
    from gateway.local.profile import wicket_home

    def fail(exc: settings.SettingsError) -> click.ClickException:
        return click.UsageError(str(exc))

    known = "".join(f"\n\n{s.name} (default {json.dumps(s.default)}): {s.help}" for s in settings.SETTINGS.values())

    @main.group(help="The profile's settings ($WICKET_HOME/settings.json): choices kept across logins." + known)
    def profile() -> None:
        pass

    @profile.command("show")
    @format_option
    def show(fmt: str) -> None:
        """Print every setting's value."""
        try:
            values = settings.show(wicket_home())
        except settings.SettingsError as exc:
            raise fail(exc) from None
        if fmt == "json":
            click.echo(json.dumps(values))
            return
        for name, value in values.items():
            click.echo(f"{name} = {json.dumps(value)}")

    @profile.command("set")
    @click.argument("name")
    @click.argument("value")
    def set_(name: str, value: str) -> None:
        """Set NAME to VALUE (true/false for a switch)."""
        try:
            stored = settings.put(wicket_home(), name, value)
        except settings.SettingsError as exc:
            raise fail(exc) from None
        click.echo(f"{name} = {json.dumps(stored)}")

    @profile.command("unset")
    @click.argument("name")
    def unset(name: str) -> None:
        """Put NAME back to its default."""
        try:
            stored = settings.put(wicket_home(), name, None)
        except settings.SettingsError as exc:
            raise fail(exc) from None
        click.echo(f"{name} = {json.dumps(stored)} (the default)")
