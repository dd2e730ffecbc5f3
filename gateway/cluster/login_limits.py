"""How long a login attempt must wait, from the failures before it.

Failed logins are counted per **(user, client address)**, not per user: a
lockout per user let anyone on the network keep a person out by failing
five times (again and again), and one per address let one guesser lock out
everyone behind the same NAT. So a person who types the right password
(and TOTP code) from another address gets in at once, whatever was tried
against them elsewhere; a guesser at one address is slowed down ever more.

After ``max_failures`` failures for a pair within the window, each further
attempt from that pair waits :data:`FIRST_DELAY` after the last failure,
doubling with each failure beyond (10 s, 20 s, 40 s ...), never more than
the window. An address gets the same, from four times as many failures
across all users (one guesser trying many names). Refused attempts are not
failures: they do not make the wait grow. Attempts still in progress count
as failures, so a burst in parallel gets no more tries than one in series.

Pure: :func:`wait` takes the counts and the time.
"""

from __future__ import annotations

FIRST_DELAY = 10.0
#: Failures per address across all users, per failure of one pair.
ADDRESS_FACTOR = 4


def wait(failures: int, last_failure: float | None, threshold: int, window: float, now: float) -> float:
    """Seconds the next attempt must still wait (0: it may go ahead now).

    ``failures`` within the window (in-progress attempts included),
    ``last_failure`` the time of the newest (None: only attempts in
    progress, which count as now)."""
    if failures < threshold:
        return 0.0
    delay = min(window, FIRST_DELAY * 2.0 ** min(failures - threshold, 32))
    start = now if last_failure is None else last_failure
    return max(0.0, start + delay - now)
