"""The shipped examples stay true: config/agent.toml loads, the Kubernetes
sidecar manifest passes the Kubernetes schema (kubernetes-validate, no
cluster), the systemd unit passes `systemd-analyze verify`, and every
WICKET_AGENT_ variable they set is one `wicket agent` reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from gateway.cli import wicket as wicket_cli
from gateway.local.agent_config import load
from tests.integration.harness import ROOT

CONFIG = ROOT / "config"


def _agent_variables() -> set[str]:
    group = wicket_cli.main.commands["agent"]
    names = set()
    for param in group.params:
        if param.name != "help":
            names.add(param.envvar if isinstance(param.envvar, str) else f"WICKET_AGENT_{param.name.upper()}")
    return names


def test_the_agent_config_example_loads():
    config = load(CONFIG / "agent.toml", {})
    assert [r.name for r in config.resources] == ["pg-prod", "echo"]
    assert config.resources[0].options == {"db_user": "app"} and config.admin == "127.0.0.1:9464"


def test_the_kubernetes_sidecar_manifest_is_valid():
    yaml = pytest.importorskip("yaml")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = yaml.safe_load((CONFIG / "kubernetes" / "sidecar.yaml").read_text())
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    sidecar = doc["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    used = {e["name"] for e in sidecar["env"]}
    assert used <= _agent_variables(), used - _agent_variables()
    probes = [sidecar[p]["exec"]["command"][3] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert probes == ["startupz", "readyz", "livez"]


def test_the_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (requirements/apt.txt: systemd)")
    text = (CONFIG / "systemd" / "wicket-agent.service").read_text()
    used = set(re.findall(r"Environment=(WICKET_AGENT_[A-Z_]+)=", text))
    assert used and used <= _agent_variables(), used - _agent_variables()
    # The unit names the installed command; here, a stand-in at a path that exists.
    stand_in = tmp_path / "wicket"
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m gateway.cli.wicket \"$@\"\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "wicket-agent.service"
    unit.write_text(text.replace("/usr/local/bin/wicket", str(stand_in)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
