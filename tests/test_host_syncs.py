"""No steady-state training step waits for the device: ``bench/host_syncs.py``'s count is 0.

Each method runs on the ``meta`` device, where every scalar read of a device tensor and every
blocking host <-> device copy of a step is counted (see the bench's docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import host_syncs  # noqa: E402


def test_the_counter_sees_what_would_stop_the_host() -> None:
    x = torch.empty(3, device="meta")
    counter = host_syncs.SyncCounter()
    with counter:
        bool(x.sum() > 0)                                   # a scalar read
        torch.zeros(3).to("meta")                           # a blocking copy
        torch.tensor([1, 2], device="meta")                 # built on the host, then copied
        torch.zeros(3).to("meta", non_blocking=True)        # not a sync
        int(torch.randint(5, (1,)))                         # a host draw: not a sync
    assert sum(counter.events.values()) == 3, counter.events


@pytest.mark.parametrize("method", host_syncs.METHODS)
def test_a_steady_step_has_no_host_device_sync(method: str) -> None:
    syncs, detail = host_syncs.count(method)
    assert syncs == 0, dict(detail)


def test_dq_greedy_picks_never_wait_for_the_device() -> None:
    """DQ's GraphCut keeps each pick's position on the device: a bin of picks, no sync."""
    from ld3m.coreset import CosineSimilarity, GraphCut

    with host_syncs.SyncCounter():  # set-up (checking the features once) is not counted
        similarity = CosineSimilarity(torch.empty(50, 8, device="meta"))
        cut = GraphCut(similarity, torch.arange(50, device="meta"), lam=1.0)
    counter = host_syncs.SyncCounter()
    with counter:
        for _ in range(10):
            cut.pick()
        cut.selected()
    assert sum(counter.events.values()) == 0, counter.events
