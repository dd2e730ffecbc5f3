"""gateway.durations: parsing and formatting durations."""

from __future__ import annotations

import pytest

from gateway.durations import format_duration, parse_duration


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("1h30m", 5400), ("8h", 28800), ("250ms", 0.25),
                                           ("2d", 172800), ("15", 15), (7, 7)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "1x", "-5", "1h 30m", True, -1])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration():
    assert format_duration(5400) == "1h30m"
    assert format_duration(61) == "1m01s"
    assert format_duration(-3) == "0s"
