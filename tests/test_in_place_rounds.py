"""Large contributions are reduced in place (swarm/collective.py,
IN_PLACE_MIN_BYTES): the round's result is the contribution's own buffer, no
second one; a round that fails once its ring wrote into that buffer fails
the contribution with ContributionLost instead of retrying it, and the
next round applies as usual, every peer in parity. Real peers on loopback;
the size threshold is lowered so a 5000-element state takes that path."""

from __future__ import annotations

import threading

import torch

from peerlearn.swarm import collective
from peerlearn.swarm.allreduce import AllReduceAborted
from peerlearn.swarm.errors import ContributionLost, CollectiveTimeout
from tests.test_api import N, PATIENT, run_all, swarm  # noqa: F401 - the fixture


def add_w(state, mean) -> None:
    state.tensors["w"].add_(mean["w"])


def own(i: int, k: int) -> dict:
    return {"w": torch.randn(N, generator=torch.Generator().manual_seed(100 * i + k))}


def test_a_large_round_reduces_in_the_donated_buffer(swarm, monkeypatch):  # noqa: F811
    monkeypatch.setattr(collective, "IN_PLACE_MIN_BYTES", 0)
    peers = swarm(2, timeouts=PATIENT)  # two: the ring (the direct path needs 3)
    given = {i: own(i, 0) for i in range(2)}
    ptrs = {i: given[i]["w"].data_ptr() for i in range(2)}
    out = run_all(peers, lambda i, p: p.all_reduce(given[i], apply=add_w, donate=True,
                                                   timeout=30))
    expect = (own(0, 0)["w"] + own(1, 0)["w"]) / 2
    for i in range(2):
        assert out[i]["w"].data_ptr() == ptrs[i]  # the result is the buffer given
        assert torch.allclose(out[i]["w"], expect, atol=1e-6)
    assert torch.equal(out[0]["w"], out[1]["w"])
    assert peers[0].state.state_hash() == peers[1].state.state_hash()


def test_a_round_that_fails_after_writing_in_place_loses_its_contribution(
        swarm, monkeypatch):  # noqa: F811
    monkeypatch.setattr(collective, "IN_PLACE_MIN_BYTES", 0)
    peers = swarm(2, timeouts=PATIENT)
    # One round first: the joiner is a member after it, so the failing round
    # below has both members (not the admission round a peer may redo alone).
    run_all(peers, lambda i, p: p.all_reduce(own(i, 0), apply=add_w, donate=True, timeout=30))
    real = collective.ring_allreduce
    failed, entered = [], threading.Event()

    def ring(tensor, *, out=None, rank, **kw):
        if failed:
            return real(tensor, out=out, rank=rank, **kw)
        if rank == 1:  # its ring begins, and fails when rank 0 aborts the links
            entered.set()
            return real(tensor, out=out, rank=rank, **kw)
        assert entered.wait(10), "rank 1 never began its ring"
        failed.append(out is tensor)
        tensor.mul_(3.0)  # partial sums written over the contribution
        kw["send_link"].abort()
        kw["recv_link"].abort()
        raise AllReduceAborted("injected", rank=rank, phase="reduce-scatter", step=1,
                               direction="recv", cause=None)

    monkeypatch.setattr(collective, "ring_allreduce", ring)
    before = peers[0].state.tensors["w"].clone()

    def first(i, p):
        try:
            return p.all_reduce(own(i, 1), apply=add_w, donate=True, timeout=30)
        except CollectiveTimeout as e:
            return e

    out = run_all(peers, first)
    assert failed == [True]  # it was given the contribution as its output
    # Rank 0's ring failed after writing: lost, not retried with partial sums.
    # Rank 1's ring had begun (its links were aborted under it), so its
    # contribution is lost as well; nothing was applied anywhere.
    assert all(isinstance(o, ContributionLost) for o in out.values()), out
    assert all(p.daemon.stats.lost_contributions == 1 for p in peers)
    assert torch.equal(peers[0].state.tensors["w"], before)
    # The next contributions go through, and every peer holds the same state.
    out = run_all(peers, lambda i, p: p.all_reduce(own(i, 2), apply=add_w, donate=True,
                                                   timeout=30))
    assert torch.equal(out[0]["w"], out[1]["w"])
    assert torch.allclose(out[0]["w"], (own(0, 2)["w"] + own(1, 2)["w"]) / 2, atol=1e-6)
    assert peers[0].state.state_hash() == peers[1].state.state_hash()
