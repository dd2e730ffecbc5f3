"""Every option of both CLIs can also come from the environment."""

import click
import pytest
from click.testing import CliRunner

from gateway.cli import cluster as cluster_cli
from gateway.cli import wicket as wicket_cli


def leaves(group: click.Group, ctx: click.Context):
    for name, command in group.commands.items():
        sub = click.Context(command, parent=ctx, info_name=name)
        if isinstance(command, click.Group):
            yield from leaves(command, sub)
        else:
            yield sub


@pytest.mark.parametrize("main", [wicket_cli.main, cluster_cli.main], ids=["wicket", "wicket-cluster"])
def test_every_option_has_an_environment_variable(main, monkeypatch):
    root = main.make_context(main.name, [], resilient_parsing=True, **main.context_settings)
    seen = 0
    for ctx in leaves(main, root):
        for param in ctx.command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            name = param.envvar or f"{ctx.auto_envvar_prefix}_{param.name.upper()}"
            monkeypatch.setenv(name, "from-env")
            assert param.resolve_envvar_value(ctx) == "from-env", (ctx.command_path, param.name)
            seen += 1
    assert seen > 20


def test_the_command_line_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WICKET_HOME", str(tmp_path))
    monkeypatch.setenv("WICKET_PROXY_TCP_PORT", "not-a-port")
    result = CliRunner().invoke(wicket_cli.main, ["proxy", "tcp", "echo"])
    assert result.exit_code == 2 and "--port" in result.output
    result = CliRunner().invoke(wicket_cli.main, ["proxy", "tcp", "echo", "--port", "0"])
    assert result.exit_code == 3 and "wicket login" in result.output  # past the options: not logged in
