import itertools

import pytest

from tests.integration.harness import Cluster, Echo, Gateway

_names = itertools.count(1)


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
