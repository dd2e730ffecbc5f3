import itertools

import pytest

from tests.integration import harness
from tests.integration.harness import Cluster, Echo, Gateway
# The test_postgres*.py topic files' shared PostgreSQL set-up:
from tests.integration.pgclients import gw, pg_env, pg_port  # noqa: F401

_names = itertools.count(1)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Whatever a test started and did not stop (a Gateway's proxies, a
    Cluster of its own) is stopped when it ends, after its own fixtures:
    a stray ``wicket proxy`` would retry its cluster's port for good, and
    disturb whichever later test gets that port."""
    before = len(harness.LIVE)
    yield
    harness.stop_started_since(before)


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    e = Echo(tmp_path_factory.mktemp("echo"))
    yield e
    e.proc.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, echo):
    c = Cluster(tmp_path_factory.mktemp("cluster"), echo)
    yield c
    c.stop()


@pytest.fixture
def make_gateway(tmp_path, cluster):
    """make_gateway(roles) -> a Gateway for a fresh user with those roles."""
    made = []

    def make(roles: str = "dev", *extra: str, login: bool = True) -> Gateway:
        name = f"user{next(_names)}"
        cluster.add_user(name, roles, *extra)
        gw = Gateway(tmp_path, cluster, name)
        if login:
            r = gw.login()
            assert r.returncode == 0, r.stderr
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()
