"""The registry of kinds: everything kind-specific is derived from it."""

import inspect

import click
import pytest
from click.testing import CliRunner

from gateway import kinds
from gateway.cli import cluster as cluster_cli
from gateway.cluster import config as cfg
from gateway.cluster import rbac


@pytest.mark.parametrize("kind", list(kinds.KINDS.values()), ids=list(kinds.KINDS))
def test_each_entry_is_whole(kind):
    route = kind.route()
    assert route.kind == kind.name
    for method in ("check_params", "open", "control"):
        assert callable(getattr(route, method))
    assert kinds.by_alpn(kind.alpn) is kind
    assert callable(kind.spec.check) and callable(kind.spec.parse)
    for param in kind.params:
        assert rbac.PARAM_KEYS[param.role_key] == param.name
    if kind.client_setup is not None:  # `wicket exec` awaits it
        assert inspect.iscoroutinefunction(kind.client_setup_function())


def test_ids_and_names_are_unique():
    assert len(set(kinds.alpn_ids())) == len(kinds.KINDS)
    assert not set(kinds.alpn_ids()) & {"http/1.1", "wicket-mux"}


def test_an_unknown_kind_is_named():
    with pytest.raises(ValueError, match="kind 'gopher' is not one of tcp, postgres"):
        cfg.validate_resource("r", "gopher", "h:1")


def test_settings_are_checked_by_the_kinds_schema():
    assert cfg.validate_resource("r", "tcp", "h:1") == {}
    with pytest.raises(ValueError, match="takes no settings.*tls"):
        cfg.validate_resource("r", "tcp", "h:1", {"tls": "require"})
    with pytest.raises(ValueError, match="verify-full.*needs ca_file"):
        cfg.validate_resource("r", "postgres", "h:1", {})


def _options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in p.opts}


def test_the_cli_offers_every_kinds_flags():
    add = _options(cluster_cli.resources_add)
    for kind in kinds.KINDS.values():
        assert {flag.option for flag in kind.spec.flags} <= add
    assert {p.role_option for p in kinds.params()} <= _options(cluster_cli.roles_add)


def test_resources_add_builds_the_spec_from_the_flags(tmp_path, monkeypatch):
    saved = {}

    class Store:
        def put_resource(self, resource):
            saved["resource"] = resource

    class Admin:
        def __init__(self, path):
            self.store, self.audit = Store(), type("A", (), {"write": lambda *a: None})()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cluster_cli, "_Admin", Admin)
    result = CliRunner().invoke(cluster_cli.main, [
        "resources", "add", "pg", "--config", str(tmp_path / "c.toml"), "--kind", "postgres",
        "--address", "db:5432", "--tls", "require", "--auth", "password", "--password-ref", "app=env:PW",
        "--password-ref", "*=file:/etc/pw"])
    assert result.exit_code == 0, result.output
    assert saved["resource"].spec == {"tls": "require", "auth": "password",
                                      "passwords": {"app": "env:PW", "*": "file:/etc/pw"}}
    result = CliRunner().invoke(cluster_cli.main, [
        "resources", "add", "e", "--config", str(tmp_path / "c.toml"), "--address", "h:1", "--tls", "require"])
    assert result.exit_code == 1 and "takes no settings" in result.output
