"""gateway/local/agent_config.py: [limits] max_connections from the file,
a flag over it, and a bad value named with its file and key."""

from __future__ import annotations

import pytest

from gateway.local.agent_config import AgentConfigError, load


def test_max_connections_from_the_file_and_a_flag_over_it(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[limits]\nmax_connections = 40\n")
    assert load(path, {}).max_connections == 40
    assert load(path, {"max_connections": 7}).max_connections == 7
    assert load(None, {}).max_connections is None


@pytest.mark.parametrize("value", ["0", "-1", "true", '"many"', "1.5"])
def test_a_bad_max_connections_names_the_file_and_key(tmp_path, value):
    path = tmp_path / "agent.toml"
    path.write_text(f"[limits]\nmax_connections = {value}\n")
    with pytest.raises(AgentConfigError, match=r"agent.toml: \[limits\]: max_connections: expected a number"):
        load(path, {})
