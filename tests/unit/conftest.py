"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from tests.unit import tlsutil


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA with a server and a client certificate (tlsutil)."""
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))
