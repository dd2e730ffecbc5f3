import pytest

from gateway.addresses import format_addr, parse_hostport


def test_parse_hostport():
    assert parse_hostport("db.internal:5432") == ("db.internal", 5432)
    assert parse_hostport("[::1]:5") == ("::1", 5)
    assert parse_hostport(":5", default_host="h") == ("h", 5)


@pytest.mark.parametrize("bad", ["x", "x:", "x:99999", ":5", "x:-1", "x:1a"])
def test_parse_hostport_refuses(bad):
    with pytest.raises(ValueError):
        parse_hostport(bad)


def test_format_addr():
    assert format_addr(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_addr(("::1", 80, 0, 0)) == "[::1]:80"


def test_round_trip():
    for addr in (("10.0.0.1", 1), ("fe80::1", 65535, 0, 0)):
        assert parse_hostport(format_addr(addr)) == addr[:2]


def test_format_addr_of_a_unix_socket():
    assert format_addr("") == "unix:local"  # an unnamed client
    assert format_addr("/run/w.sock") == "unix:/run/w.sock"
    assert format_addr(b"/run/w.sock") == "unix:/run/w.sock"
