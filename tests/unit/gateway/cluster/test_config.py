"""gateway.cluster.config: the [audit] table. (The rest: tests/unit/test_config.py.)"""

from __future__ import annotations

import pytest

from gateway.cluster import config as cfg


def _load(tmp_path, text: str) -> cfg.ClusterConfig:
    path = tmp_path / "cluster.toml"
    path.write_text('[cluster]\nstate_dir = "s"\n' + text)
    return cfg.load(path)


def test_keep_must_outlast_the_login_failure_window(tmp_path):
    with pytest.raises(cfg.ConfigError) as err:
        _load(tmp_path, '[login]\nfailure_window = "10m"\n[audit]\nkeep = "5m"\n')
    message = str(err.value)
    assert str(tmp_path / "cluster.toml") in message and "audit.keep" in message
    assert "at least login.failure_window (10m00s)" in message
    assert _load(tmp_path, '[login]\nfailure_window = "10m"\n[audit]\nkeep = "10m"\n').audit_keep == 600
