"""``ecospa.jobs.phases``: each phase's own peak resident memory (the mark reset at its start),
the memory it started from, and the job's overall peak."""
from __future__ import annotations

import sys

import pytest
import torch

from ecospa.jobs.phases import Phases, peak_rss_mb, return_freed_memory, rss_mb

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM marks are Linux-only")
MB = 2**20


@linux
def test_each_phase_has_its_own_peak_and_start():
    return_freed_memory()  # a freed 200 MB block goes back to the kernel (its own mapping)
    ph = Phases()
    with ph("big"):
        x = torch.ones(200 * MB // 4)  # touched: resident
        del x
    with ph("small"):
        y = torch.ones(20 * MB // 4)
        del y
    big, small = ph.rows
    assert [big["phase"], small["phase"]] == ["big", "small"] and ph.exact
    # the big phase added its 200 MB on top of where it started; the small one, started after the
    # block was freed, did not see that peak again (the mark was reset)
    assert big["peak_rss_mb"] - big["start_rss_mb"] >= 190
    assert small["peak_rss_mb"] - small["start_rss_mb"] < 100
    assert small["peak_rss_mb"] < big["peak_rss_mb"] - 100
    assert ph.peak_mb() >= big["peak_rss_mb"]
    assert ph.seconds() == {"big": big["seconds"], "small": small["seconds"]}


@linux
def test_a_phase_that_raises_is_recorded_and_the_overall_peak_keeps_earlier_phases():
    ph = Phases()
    with ph("a"):
        x = torch.ones(100 * MB // 4)
        del x
    with pytest.raises(RuntimeError):
        with ph("b"):
            raise RuntimeError("boom")
    assert [r["phase"] for r in ph.rows] == ["a", "b"]
    assert ph.peak_mb() >= ph.rows[0]["peak_rss_mb"]
    assert rss_mb() <= peak_rss_mb()
