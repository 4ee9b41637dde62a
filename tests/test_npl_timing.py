"""engine.npl.timing.DeviceTimer: named buckets, a block inside another counted in its own bucket only."""
from __future__ import annotations

import pytest

from ffnscope.engine.npl import timing
from ffnscope.engine.npl.timing import DeviceTimer


def test_an_inner_block_counts_in_its_bucket_only(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0])  # outer starts, inner starts, inner ends, outer ends
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = DeviceTimer("cpu", ("original", "explicit"))
    with timer("original") as outer:
        with timer("explicit") as inner:
            pass
    assert timer.seconds == {"original": 8.0, "explicit": 2.0}
    assert (outer.seconds, inner.seconds) == (8.0, 2.0)


def test_a_failed_block_is_not_timed(monkeypatch):
    timer = DeviceTimer("cpu", ("substituted",))
    with pytest.raises(RuntimeError):
        with timer("substituted"):
            raise RuntimeError("planted")
    assert timer.seconds == {"substituted": 0.0}
