"""Tokens per second as /health and the dashboard report them: over the last 10 s, measured from
the oldest token in that window, decaying to 0 when generation stops."""

from __future__ import annotations

from petald.cli.api.token_rate import TokenRate


def test_the_rate_follows_generation_and_decays_when_it_stops():
    now = [100.0]
    rate = TokenRate(window_s=10.0, clock=lambda: now[0])
    assert rate.per_second() == 0.0
    for _ in range(21):  # 20 tokens a second for one second
        rate.add()
        now[0] += 0.05
    assert abs(rate.per_second() - 20 / 1.05) < 1e-9  # measured over its own time, not the whole window
    now[0] += 5.0
    assert 0 < rate.per_second() < 4  # idle: falling
    now[0] += 10.0
    assert rate.per_second() == 0.0  # every token older than the window
