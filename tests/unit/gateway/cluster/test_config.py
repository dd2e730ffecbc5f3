"""gateway.cluster.config: the example file, errors naming file and key,
[audit] and [limits]."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cluster import config as cfg

ROOT = Path(__file__).resolve().parents[4]


def test_example_config_parses():
    c = cfg.load(ROOT / "config" / "cluster.toml")
    assert c.name == "example"
    assert c.listen == ("0.0.0.0", 3025)
    assert {r.name for r in c.roles} == {"developer", "oncall"}
    assert c.resources[0].labels == {"env": "dev", "team": "platform"}
    assert c.session_ttl == 8 * 3600


def test_relative_state_dir(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[cluster]\nstate_dir = "state"\n')
    c = cfg.load(p)
    assert c.state_dir == tmp_path / "state"
    assert c.audit_jsonl == tmp_path / "state" / "audit.jsonl"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[cluster]\n", "cluster.state_dir: required"),
        ('[cluster]\nstate_dir="s"\nlisten="nope"\n', "cluster.listen"),
        ('[cluster]\nstate_dir="s"\nsession_ttl="10h"\nmax_session_ttl="1h"\n', "cluster.session_ttl"),
        ('[cluster]\nstate_dir="s"\nbogus=1\n', "cluster.bogus: unknown key"),
        ('[cluster]\nstate_dir="s"\nname="Bad Name"\n', "cluster.name"),
        ('[cluster]\nstate_dir="s"\n[resources.x]\nkind="tcp"\n', "resources.x.address"),
        ('[cluster]\nstate_dir="s"\n[resources.x]\nkind="ftp"\naddress="a:1"\n', "kind 'ftp'"),
        ('[cluster]\nstate_dir="s"\n[roles.r]\nallow=[{}]\n', "roles.r"),
        ('[cluster]\nstate_dir="s"\n[resources.x]\naddress="a:1"\nlabels={env="dev\\u202e"}\n',
         "resources.x.labels.env: contains a control character"),
        ('[cluster]\nstate_dir="s"\n[roles.r]\nallow=[{resources=["a\\n*"]}]\n', "control character"),
        ('[cluster]\nstate_dir="s"\n[login]\nmax_failures=0\n', "login.max_failures"),
        ('[nope]\n', "unknown section"),
        ('[cluster]\nstate_dir="s"\n[audit]\nkeep="forever"\n', "audit.keep"),
        ('[cluster]\nstate_dir="s"\n[audit]\nkept="90d"\n', "audit: expected a table with keep"),
        ("not toml [", "not valid TOML"),
        ('[cluster]\nstate_dir="s"\n[limits]\nstreams_per_user=0\n', "limits.streams_per_user: expected a positive"),
        ('[cluster]\nstate_dir="s"\n[limits]\nstreams_per_user=true\n', "limits.streams_per_user"),
        ('[cluster]\nstate_dir="s"\n[limits]\nstreams=5\n', "limits: expected a table with"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(cfg.ConfigError, match=match) as err:
        cfg.load(p)
    assert str(p) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="no such file"):
        cfg.load(tmp_path / "missing.toml")


def test_audit_keep(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[cluster]\nstate_dir = "s"\n')
    assert cfg.load(p).audit_keep is None  # for ever, unless told
    p.write_text('[cluster]\nstate_dir = "s"\n[audit]\nkeep = "90d"\n')
    assert cfg.load(p).audit_keep == 90 * 86400


def test_limits_default_to_shares_of_the_open_files_limit():
    c = cfg.from_dict({"cluster": {"state_dir": "/s"}})
    assert c.limits == cfg.Limits()  # unset: derived at start
    limits = c.limits.resolve(20_000)
    assert limits.reserve_fds == 1024
    assert limits.streams_per_user == (20_000 - 1024) // 8
    assert limits.streams_per_connection == limits.streams_per_user // 2
    small = c.limits.resolve(256)
    assert small.reserve_fds == 32 and small.streams_per_user == 28 and small.streams_per_connection == 14
    # Together, one user's sessions stay well under what the cluster may hold.
    assert limits.streams_per_user < (20_000 - limits.reserve_fds) / 4


def test_limits_given_are_kept_and_a_connection_never_exceeds_its_user():
    c = cfg.from_dict({"cluster": {"state_dir": "/s"}, "limits": {"streams_per_user": 5, "reserve_fds": 100}})
    limits = c.limits.resolve(20_000)
    assert limits.streams_per_user == 5 and limits.reserve_fds == 100 and limits.streams_per_connection == 5


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


def test_server_workers_default_to_one_and_are_bounded(tmp_path):
    assert cfg.from_dict({"cluster": {"state_dir": "/s"}}).workers == 1
    assert _load(tmp_path, "[server]\nworkers = 3\n").workers == 3
    for bad in ("0", "true", '"2"', str(cfg.MAX_WORKERS + 1)):
        with pytest.raises(cfg.ConfigError, match="server.workers"):
            _load(tmp_path, f"[server]\nworkers = {bad}\n")
    with pytest.raises(cfg.ConfigError, match="server: expected a table with workers"):
        _load(tmp_path, "[server]\nthreads = 2\n")
