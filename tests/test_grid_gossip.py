"""Grid gossip groups (Moshpit SGD's, swarm/gossip.grid_groups): the groups
as a pure function, the exact mean in ceil(log_size N) rounds with the same
bits at every member (the exchange's own arithmetic), and the same over real
peers on loopback with `Peer.gossip(grouping="grid")`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.algorithms.training import Hyper, gossip_config
from peerlearn.swarm import moshpit
from peerlearn.swarm.gossip import GROUPINGS, grid_groups, gossip_groups, group_of, groups_for
from tests.test_api import run_all
from tests.test_decentralized_swarm import peers  # noqa: F401 - a fixture

torch.set_num_threads(1)


def ids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(7 * n, 8 * n)]


def exchange_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """What gossip.exchange computes from a group's values in the group's
    order: zeros, each member's added, one division."""
    out = torch.zeros_like(values[0])
    for v in values:
        out.add_(v)
    return out.div_(len(values))


def gossip_rounds(values: dict[str, torch.Tensor], rounds: int, size: int, seed: int = 0):
    for r in range(rounds):
        new = {}
        for g in grid_groups(sorted(values), r, seed, size):
            mean = exchange_mean([values[m] for m in g])
            new.update({m: mean for m in g})
        values = new
    return values


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 90), size=st.integers(2, 6), round_=st.integers(0, 50),
       seed=st.integers(0, 3))
def test_grid_groups_partition_the_members_into_groups_of_at_most_size(n, size, round_, seed):
    members = ids(n)
    gs = grid_groups(list(reversed(members)), round_, seed, size)
    flat = [m for g in gs for m in g]
    assert sorted(flat) == members  # every member exactly once
    assert all(1 <= len(g) <= size for g in gs)
    assert gs == grid_groups(members, round_, seed, size)  # the input's order does not matter
    assert gs == groups_for("grid", members, round_, seed, size)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), dims=st.integers(1, 4), steps=st.integers(0, 9),
       seed=st.integers(0, 3))
def test_compacting_groups_are_a_partition_of_lines_and_the_fixed_groups_on_a_full_grid(
        n, dims, steps, seed):
    grid = moshpit.grid_for(n, dims)
    cells = moshpit.place(ids(n), grid, seed)
    gs = moshpit.compacting_groups(cells, grid, steps)
    assert sorted(m for g in gs for m in g) == ids(n)
    assert all(1 <= len(g) <= grid.side for g in gs)
    if len(cells) == grid.cells:  # full: an index in a full line is its coordinate
        assert sorted(gs) == sorted(moshpit.groups(cells, grid, steps))


@pytest.mark.parametrize("n,size,rounds", [(8, 2, 3), (9, 3, 2), (16, 4, 2), (16, 2, 4),
                                           (27, 3, 3)])
def test_on_a_full_grid_every_member_holds_the_same_bits_after_log_size_n_rounds(n, size,
                                                                                 rounds):
    g = torch.Generator().manual_seed(n * size)
    start = {m: torch.randn(257, generator=g) * 10 ** torch.randint(-3, 4, (1,), generator=g)
             for m in ids(n)}
    end = gossip_rounds(start, rounds, size)
    first = next(iter(end.values()))
    assert all(torch.equal(v, first) for v in end.values())
    exact = torch.stack([start[m].double() for m in sorted(start)]).mean(0)
    torch.testing.assert_close(first.double(), exact, rtol=1e-5, atol=1e-5)
    # One round fewer leaves members apart: the rounds are all needed.
    before = gossip_rounds(start, rounds - 1, size)
    assert len({bytes(v.numpy().tobytes()) for v in before.values()}) > 1


def test_random_pairs_leave_the_members_apart_where_the_grid_agrees():
    """The same 16 values, 4 rounds of pairs: random groups (NoLoCo's)
    against the grid (a 2 x 2 x 2 x 2 hypercube)."""
    g = torch.Generator().manual_seed(3)
    start = {m: torch.randn(64, generator=g) for m in ids(16)}
    grid = gossip_rounds(start, 4, 2)
    assert len({bytes(v.numpy().tobytes()) for v in grid.values()}) == 1
    values = dict(start)
    for r in range(4):
        new = {}
        for grp in gossip_groups(sorted(values), r, 0, 2):
            mean = exchange_mean([values[m] for m in grp])
            new.update({m: mean for m in grp})
        values = new
    assert len({bytes(v.numpy().tobytes()) for v in values.values()}) > 1


def test_grouping_is_checked_and_recorded_only_when_not_random():
    assert GROUPINGS == ("random", "grid")
    with pytest.raises(ValueError, match="grouping"):
        Hyper(grouping="ring").check("noloco")
    Hyper(grouping="grid").check("noloco")
    assert "grouping" not in gossip_config("noloco", Hyper())  # earlier runs' config stands
    assert gossip_config("noloco", Hyper(grouping="grid"))["grouping"] == "grid"
    with pytest.raises(ValueError, match="grouping"):
        groups_for("ring", ids(4), 0)


def test_real_peers_gossiping_on_the_grid_hold_the_exact_mean_in_three_rounds(peers):  # noqa: F811
    """8 peers on loopback, groups of 2: rounds 0, 1, 2 pair them along the
    three axes of a 2 x 2 x 2 cube; after them every peer holds the same
    bytes, the mean of the 8 starting tensors."""
    make, _ = peers
    swarm = make(8)
    members = sorted(p.id for p in swarm)
    assert all(sorted(p.live_members()) == members for p in swarm)
    start = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    def three_rounds(i, p):
        x = {"w": start[i]}
        for r in range(3):
            x = p.gossip(x, round_=r, grouping="grid", timeout=20)
        return x["w"]

    end = run_all(swarm, three_rounds)
    assert all(torch.equal(end[i], end[0]) for i in range(8))
    torch.testing.assert_close(end[0], torch.stack(start).mean(0), rtol=1e-5, atol=1e-6)
    # The pairs each peer met were the grid's: round r's partner differs
    # from it on one axis only, so the three partners are three peers.
    for p in swarm:
        partners = {group_of(p.id, grid_groups(members, r, 0, 2)) for r in range(3)}
        assert len(partners) == 3 and all(len(g) == 2 for g in partners)
