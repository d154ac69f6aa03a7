"""Rounds with a robust aggregation rule (`PeerConfig.aggregate`): real peers
on loopback, one of them dishonest. The honest peers apply every round, hold
byte-identical states, and the dishonest contribution moves the result by at
most about the honest spread; a NaN contribution is left out and its sender
shut out."""

from __future__ import annotations

import math
import time

import pytest
import torch

from peerlearn.swarm.aggregate import aggregate
from peerlearn.swarm.errors import CollectiveTimeout, StateReplaced
from tests.test_api import add_mean, applied_eventually, run_all, same_state
from tests.test_api import swarm as api_swarm  # noqa: F401 - a fixture, by this name

N = 5000


@pytest.fixture
def robust_swarm(api_swarm):  # noqa: F811 - the imported fixture, requested
    return lambda n, rule: api_swarm(n, aggregate=rule)


def honest(i: int) -> dict:
    gen = torch.Generator().manual_seed(77)
    base = torch.randn(N, generator=gen)
    gen.manual_seed(i)
    return {"w": base + 0.1 * torch.randn(N, generator=gen),
            "m": torch.zeros(3, 7, dtype=torch.bfloat16)}


@pytest.mark.parametrize("attack", ["scale", "sign-flip"])
def test_centered_clip_bounds_a_huge_or_flipped_contribution(robust_swarm, attack):
    peers = robust_swarm(4, "centered-clip")
    rows = torch.stack([honest(i)["w"] for i in range(3)])
    spread = float((rows - rows.mean(0)).norm(dim=1).max())

    def bad(c: dict) -> dict:
        return {"w": c["w"] * (1e30 if attack == "scale" else -10.0), "m": c["m"]}

    results = run_all(peers, lambda i, p: applied_eventually(p, bad(honest(i)) if i == 3
                                                        else honest(i)))
    got = [results[i]["w"] for i in range(4)]
    assert all(torch.equal(got[0], g) for g in got[1:])  # every peer, the attacker too
    assert float((got[0] - rows.mean(0)).norm()) < spread
    same_state(peers)
    assert all(bool(torch.isfinite(p.state.tensors["w"]).all()) for p in peers)


def test_a_nan_contribution_is_left_out_and_its_sender_shut_out(robust_swarm):
    peers = robust_swarm(4, "centered-clip")
    nan = {"w": torch.full((N,), math.nan), "m": torch.zeros(3, 7, dtype=torch.bfloat16)}

    def one(i, p):
        if i != 3:
            return applied_eventually(p, honest(i))
        return p.all_reduce(nan, apply=add_mean, timeout=20)

    results = run_all(peers, one)
    # exactly the rule over the honest rows, in ring (participant id) order
    ring = sorted(range(3), key=lambda i: peers[i].id)
    want = aggregate(torch.stack([honest(i)["w"] for i in ring]), "centered-clip").value
    assert torch.equal(results[0]["w"], want)
    assert all(p.daemon.refused_contributions == 1 for p in peers[:3])
    coordinator = min(peers, key=lambda p: p.id)
    assert coordinator.daemon.core.exclusions >= 1 or coordinator is peers[3]
    same_state(peers)
    if coordinator is not peers[3]:
        # Shut out for a cooldown: the honest three apply rounds without it.
        def again(i, p):
            if i != 3:
                return applied_eventually(p, honest(i))
            with pytest.raises((CollectiveTimeout, StateReplaced)):
                p.all_reduce(honest(3), apply=add_mean, timeout=4)
            return None

        after = run_all(peers, again)
        assert torch.equal(after[0]["w"], after[1]["w"])
        assert torch.equal(after[0]["w"], want)


def test_robust_gossip_in_a_group_of_three_clips_a_huge_partner(robust_swarm):
    """Gossip with a robust rule: the group's values in sorted-id order go
    through the rule at every member (the same bits everywhere); a partner's
    1e30 is clipped and its NaN left out and counted, where the mean would
    fail the exchange."""
    peers = robust_swarm(3, "centered-clip")
    run_all(peers, lambda i, p: applied_eventually(p, honest(i)))  # all three in the view
    assert all(len(p.live_members()) == 3 for p in peers)
    rows = torch.stack([honest(i)["w"] for i in range(3)])
    spread = float((rows - rows.mean(0)).norm(dim=1).max())
    for k, scale in enumerate((1e30, math.nan)):
        def one(i, p, k=k, scale=scale):
            w = honest(i)["w"] * (scale if i == 2 else 1.0)
            return p.gossip({"w": w}, round_=k, group_size=3, timeout=20)["w"]

        got = run_all(peers, one)
        assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
        assert float((got[0] - rows[:2].mean(0)).norm()) < spread
    deadline = time.monotonic() + 5
    while not all(p.daemon.stats.gossip_poisoned == 1 for p in peers):
        assert time.monotonic() < deadline, [p.daemon.stats.gossip_poisoned for p in peers]
        time.sleep(0.05)
