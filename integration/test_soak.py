"""The soak of issue 15 in CI: 60 s of mixed traffic (integration/soak.py says which),
asserting that nothing was lost, the log holds no error, and RSS and open file
descriptors are flat after the warm-up. `python3 integration/soak.py --seconds 1800`
runs it for longer by hand (RELIABILITY.md has a 30-minute curve)."""

from __future__ import annotations

import pytest

from broker import IS_MOSQUITTO
from soak import flat, soak

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="samples roost's own process")

SECONDS = 60


@pytest.mark.timeout(SECONDS + 180)
def test_a_minute_of_mixed_traffic_loses_nothing_and_leaks_nothing():
    r = soak(SECONDS)
    for name, s in r["benches"].items():
        assert s["connections"]["established"] == s["connections"]["attempted"], (name, s)
        assert s["connections"]["dropped"] == 0, (name, s)
        assert s["loss"] == 0 and s["unacked"] == 0, (name, s)
        assert s["duplicates"] == 0 and s["misrouted"] == 0, (name, s)
        assert s["errors"] == {}, (name, s)
        # The traffic ran at its rate the whole time (an idle broker is flat too).
        assert s["sent"] >= 0.9 * s["rate_target"] * SECONDS, (name, s["sent"])
    assert r["churn_errors"] == [], r["churn_errors"][:5]
    assert r["churn_lost"] == [], r["churn_lost"][:5]
    assert r["takeovers"] >= 5 * SECONDS, r["takeovers"]
    assert r["log_problems"] == [], r["log_problems"][:10]
    warm, peak, tail, (fd_lo, fd_hi) = flat(r)
    # Descriptors: every client gone, the count is back where it started; during the
    # run it moves only by the few churn connections open at a time.
    assert abs(r["end_fds"] - r["start_fds"]) <= 2, (r["start_fds"], r["end_fds"])
    assert fd_hi - fd_lo <= 8, (fd_lo, fd_hi)
    # Memory: growth after the warm-up at most max(10%, 2 MiB). Measured 1.1 MiB here
    # (12.3 -> 13.4 MiB): the session store's five 256 KiB memtables are still filling
    # in the first 90 s; over 30 minutes RSS is flat within 2.3% after the warm-up
    # (RELIABILITY.md). ~80,000 publishes arrive after the warm-up: a broker that
    # leaked 48 bytes per publish grew 7 MiB and failed this test (with 3 MiB allowed).
    allowed = max(0.10 * warm, 2 * 1024)
    assert peak - warm <= allowed, (
        f"RSS grew from {warm} KiB after the warm-up to {peak} KiB (allowed {allowed:.0f})")
