"""What ssh's ProxyCommand passes (%r@%h:%p) as a login and a node."""

import pytest

from gateway.local.ssh_stdio import TargetError, parse_target


@pytest.mark.parametrize("target, expected", [
    ("root@web-1.prod:22", ("root", "web-1", "web-1.prod")),
    ("root@web-1.prod", ("root", "web-1", "web-1.prod")),
    ("root@web-1:2222", ("root", "web-1", "web-1")),
    ("deploy@web-1.other:22", ("deploy", "web-1.other", "web-1.other")),
    ("root@[web-1.prod]:22", ("root", "web-1", "web-1.prod")),
    ("a@b@web-1.prod:22", ("a@b", "web-1", "web-1.prod")),  # the node is after the last @; the cluster refuses it
    ("root@prod", ("root", "prod", "prod")),
])
def test_targets(target, expected):
    assert parse_target(target, "prod") == expected


@pytest.mark.parametrize("target", ["web-1", "@web-1", "root@", "root@:22"])
def test_bad_targets_say_what_is_expected(target):
    with pytest.raises(TargetError):
        parse_target(target, "prod")
