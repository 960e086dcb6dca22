"""``ecospa.jobs.phases``: each phase's own peak resident memory (the mark reset at its start),
the memory it started from, and the job's overall peak."""
from __future__ import annotations

import sys

import pytest
import torch

from ecospa.jobs.phases import Phases, peak_rss_mb, return_freed_memory, rss_mb

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM marks are Linux-only")
MB = 2**20


def _touch(n: int) -> None:
    """``n`` bytes of a new anonymous mapping made resident (one write per page), then unmapped."""
    import mmap
    m = mmap.mmap(-1, n)
    for i in range(0, n, mmap.PAGESIZE):
        m[i] = 1
    m.close()


@linux
def test_each_phase_has_its_own_peak_and_start():
    return_freed_memory()
    ph = Phases()
    with ph("big"):  # fresh pages of their own mapping, touched, then unmapped: whatever the state
        _touch(200 * MB)  # of glibc's heap in this worker (a heap block could reuse resident pages)
    with ph("small"):
        _touch(20 * MB)
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
