"""gateway/local/session.py: when a certificate is due for renewal."""

import datetime as dt

from gateway.identity import pki
from gateway.local.session import RENEW_AT, renew_due


def _identity(issued: dt.datetime, life: float) -> pki.Identity:
    return pki.Identity(user="ci", roles=(), cluster="c", kind="bot", not_before=issued - pki.BACKDATE,
                        not_after=issued + dt.timedelta(seconds=life))


def test_renewal_is_due_two_thirds_into_the_life_as_issued_not_as_backdated():
    issued = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)
    identity = _identity(issued, 15)
    assert renew_due(identity, issued) == 15 * RENEW_AT
    assert renew_due(identity, issued + dt.timedelta(seconds=12)) == 0.0
    hour = _identity(issued, 3600)
    assert renew_due(hour, issued + dt.timedelta(seconds=600)) == 3600 * RENEW_AT - 600
