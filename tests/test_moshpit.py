"""Group rounds on a virtual grid (peerlearn/swarm/moshpit.py): agreement
from the view alone, a partition into groups of at most g, the exact mean
in d rounds on a full grid, convergence under failures, and the parity
rule (bit-identical within a group; across groups only on a full grid after
d rounds that all applied)."""

from __future__ import annotations

import importlib.util
import math
import random
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.swarm import moshpit as mp
from peerlearn.swarm.direct import _reduce


def ids(n: int, tag: str = "") -> list[str]:
    return [f"{tag}{i:032x}"[-32:] for i in range(n)]


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def spread(values) -> float:
    xs = list(values)
    m = math.fsum(xs) / len(xs)
    return math.fsum((x - m) ** 2 for x in xs) / len(xs)


def gauss(members, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {m: rng.gauss(0.0, 1.0) for m in members}


# Grids up to 1,296 cells (the last axis possibly shorter), with a member
# count that fits.
grids = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(0, 6)).map(
    lambda t: mp.Grid(t[0], t[1], min(t[2], t[0])))


@st.composite
def views(draw, full: bool = False):
    grid = draw(grids)
    n = grid.cells if full else draw(st.integers(1, grid.cells))
    return grid, ids(n, draw(st.sampled_from(["", "a", "b7"]))), draw(st.integers(0, 3))


# ------------------------------------------------------------ agreement, partition

@settings(max_examples=60, deadline=None)
@given(views(), st.randoms(use_true_random=False))
def test_every_peer_computes_the_same_cells_and_groups_from_the_view(view, rnd):
    grid, members, seed = view
    shuffled = list(members)
    rnd.shuffle(shuffled)
    a = mp.place(members, grid, seed)
    b = mp.place(shuffled + shuffled[:3], grid, seed)  # any order, repeats: one set
    assert a == b
    for r in range(grid.dims + 1):
        assert mp.groups(a, grid, r) == mp.groups(b, grid, r)


@settings(max_examples=60, deadline=None)
@given(views(), st.integers(0, 50))
def test_each_round_partitions_the_members_into_lines_of_at_most_g(view, round_):
    grid, members, seed = view
    cells = mp.place(members, grid, seed)
    assert len(set(cells.values())) == len(members)  # one member a cell
    assert all(0 <= c < grid.cells for c in cells.values())
    gs = mp.groups(cells, grid, round_)
    flat = [m for g in gs for m in g]
    assert sorted(flat) == sorted(members)  # everyone, exactly once
    axis = mp.axis_of(round_, grid)
    for g in gs:
        assert 1 <= len(g) <= grid.side
        coords = [grid.coords(cells[m]) for m in g]
        rest = {c[:axis] + c[axis + 1:] for c in coords}
        assert len(rest) == 1  # the same cell on every other axis
        along = [c[axis] for c in coords]
        assert along == sorted(along)  # the order the mean is summed in
    # d rounds later the same axis, so the same groups
    assert mp.groups(cells, grid, round_ + grid.dims) == gs


def test_more_members_than_cells_is_refused():
    with pytest.raises(ValueError):
        mp.place(ids(10), mp.Grid(3, 2))
    assert len(mp.place(ids(9), mp.Grid(3, 2))) == 9


def test_grid_for_is_the_smallest_with_room():
    assert mp.grid_for(1024, 2) == mp.Grid(32, 2, 32)
    assert mp.grid_for(1025, 2) == mp.Grid(33, 2, 32)
    assert mp.grid_for(1024, 2, headroom=1.05).cells == 33 * 33
    assert mp.grid_for(16, 2, headroom=1.05) == mp.Grid(5, 2, 4)
    assert mp.grid_for(16, 4) == mp.Grid(2, 4, 2)
    assert mp.grid_for(1, 3) == mp.Grid(1, 3, 1)
    for n in range(1, 300):
        for d in (1, 2, 3):
            g = mp.grid_for(n, d)
            assert g.cells >= n and (g.side - 1) ** d < n  # enough, and the smallest side
            assert g.cells - n < g.side ** (d - 1)  # the last axis is no longer than needed


@settings(max_examples=40, deadline=None)
@given(views(), st.data())
def test_a_view_change_leaves_the_cells_of_members_hashed_before_it(view, data):
    # Members are placed in hashed order: one that joins or leaves cannot move
    # anyone placed before it, so a view change disturbs few groups.
    grid, members, seed = view
    if len(members) < 2:
        return
    cells = mp.place(members, grid, seed)
    gone = data.draw(st.sampled_from(members))
    after = mp.place([m for m in members if m != gone], grid, seed)
    before_gone = [m for m in members if mp._key(seed, m) < mp._key(seed, gone)]
    assert all(after[m] == cells[m] for m in before_gone)
    assert gone not in after


# ------------------------------------------------------------ the apply rule

def test_a_failed_group_keeps_every_value_and_a_good_one_takes_one_mean():
    vals = [1.0, 2.0, 4.0]
    assert mp.apply_group(vals, failed=[1]) == vals
    assert mp.apply_group(vals, failed=[0, 2]) == vals
    out = mp.apply_group(vals)
    assert out == [7.0 / 3] * 3 and out[0] is out[1] is out[2]
    assert mp.apply_group([5.0]) == [5.0]
    with pytest.raises(ValueError):
        mp.apply_group(vals, failed=[3])
    with pytest.raises(ValueError):
        mp.group_mean([])


def test_run_round_aborts_only_the_failed_members_groups():
    grid = mp.Grid(4, 2)
    members = ids(16)
    cells = mp.place(members, grid)
    vals = gauss(members, 1)
    victim = members[5]
    out, applied = mp.run_round(vals, cells, grid, 0, failed={victim})
    gs = mp.groups(cells, grid, 0)
    assert applied == [victim not in g for g in gs] and applied.count(False) == 1
    for g in gs:
        if victim in g:
            assert all(out[m] == vals[m] for m in g)
        else:
            assert len({out[m] for m in g}) == 1
            assert out[g[0]] == pytest.approx(math.fsum(vals[m] for m in g) / len(g))


# ------------------------------------------------------------ means and convergence

@settings(max_examples=40, deadline=None)
@given(views(full=True), st.integers(0, 10), st.integers(0, 2**31))
def test_d_rounds_that_apply_give_every_member_the_global_mean_on_a_full_grid(
        view, start, seed):
    grid, members, place_seed = view
    cells = mp.place(members, grid, place_seed)
    vals = gauss(members, seed)
    exact = math.fsum(vals.values()) / len(vals)
    for r in range(start, start + grid.dims):
        vals, applied = mp.run_round(vals, cells, grid, r)
        assert all(applied)
    for v in vals.values():
        assert v == pytest.approx(exact, rel=1e-12, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(views(), st.floats(0.0, 0.3), st.integers(0, 2**31))
def test_the_sum_is_kept_and_the_spread_never_grows_whatever_fails(view, p, seed):
    grid, members, place_seed = view
    cells = mp.place(members, grid, place_seed)
    rng = random.Random(seed)
    vals = gauss(members, seed)
    total, last = math.fsum(vals.values()), spread(vals.values())
    # Rounding may move values once the spread is down to the last bits (a
    # mean of k equal values need not be that value), hence the floor.
    floor = 1e-24 * last
    for r in range(3 * grid.dims):
        failed = {m for m in members if rng.random() < p}
        vals, _ = mp.run_round(vals, cells, grid, r, failed)
        assert math.fsum(vals.values()) == pytest.approx(total, abs=1e-9)
        now = spread(vals.values())
        assert now <= last * (1 + 1e-9) + floor
        last = now


@pytest.mark.parametrize("n,grid,p,most", [
    (256, mp.Grid(16, 2), 0.01, 30), (900, mp.Grid(32, 2), 0.005, 40),
    (200, mp.Grid(6, 3), 0.02, 60)])
def test_random_failures_slow_the_averaging_but_it_still_reaches_1e_9(n, grid, p, most):
    members = ids(n)
    cells = mp.place(members, grid, 7)
    rng = random.Random(n)
    vals = gauss(members, n)
    first, rounds = spread(vals.values()), None
    for r in range(1, most + 1):
        vals, _ = mp.run_round(vals, cells, grid, r, {m for m in members if rng.random() < p})
        if spread(vals.values()) < 1e-9 * first:
            rounds = r
            break
    assert rounds is not None and rounds > grid.dims  # failures cost rounds


# ------------------------------------------------------------ parity

@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 64), st.integers(0, 2**31))
def test_the_group_mean_is_the_direct_all_reduce_bits_at_every_rank(size, numel, seed):
    # What each rank of direct.py computes for its segment: part 0 copied,
    # the others added in rank order, divided by the world.
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(numel, generator=g) * 10 ** (i % 5) for i in range(size)]
    mean = mp.group_mean(parts)
    for rank in range(size):
        mine = torch.empty(numel)
        _reduce(mine, parts[rank], dict(enumerate(parts)), rank, size, True, None, [])
        assert mine.numpy().tobytes() == mean.numpy().tobytes()
    out = mp.apply_group(parts)
    assert all(o.numpy().tobytes() == mean.numpy().tobytes() for o in out)


@settings(max_examples=30, deadline=None)
@given(views(full=True), st.integers(0, 10), st.integers(0, 2**31))
def test_a_full_grid_after_d_rounds_that_applied_holds_one_bit_pattern(view, start, seed):
    grid, members, place_seed = view
    cells = mp.place(members, grid, place_seed)
    vals = gauss(members, seed)
    for r in range(start, start + grid.dims):
        vals, _ = mp.run_round(vals, cells, grid, r)
        for g in mp.groups(cells, grid, r):  # within each group, always
            assert len({bits(vals[m]) for m in g}) == 1
    assert len({bits(v) for v in vals.values()}) == 1


def test_across_groups_values_differ_unless_the_grid_is_full_and_d_rounds_applied():
    grid = mp.Grid(8, 2)
    members = ids(64)
    cells = mp.place(members, grid, 1)
    vals = gauss(members, 2)
    one, _ = mp.run_round(vals, cells, grid, 0)  # fewer than d rounds
    assert len({bits(v) for v in one.values()}) == 8
    failed, _ = mp.run_round(one, cells, grid, 1, failed={members[0]})  # one group failed
    assert len({bits(v) for v in failed.values()}) > 1
    sparse = ids(60)  # N < g^d: holes make groups uneven
    sc = mp.place(sparse, grid, 1)
    sv = gauss(sparse, 2)
    for r in range(2):
        sv, _ = mp.run_round(sv, sc, grid, r)
    assert len({bits(v) for v in sv.values()}) > 1
    assert spread(sv.values()) > 1e-6 * spread(gauss(sparse, 2).values())  # not rounding


def test_the_full_grid_result_is_the_global_mean_only_up_to_rounding():
    # Its bits are a nested sum's: equal to the flat sum's for some draws, not
    # all, so no rule may compare them with a mean computed another way.
    grid = mp.Grid(4, 2)
    members = ids(16)
    cells = mp.place(members, grid)
    differs = 0
    for seed in range(20):
        vals = gauss(members, seed)
        flat = mp.group_mean([vals[m] for m in sorted(members)])
        for r in range(2):
            vals, _ = mp.run_round(vals, cells, grid, r)
        v = next(iter(vals.values()))
        assert v == pytest.approx(flat, rel=1e-13, abs=1e-15)
        differs += bits(v) != bits(flat)
    assert 0 < differs < 20


# ------------------------------------------------------------ cmd/group_sim.py

_spec = importlib.util.spec_from_file_location(
    "group_sim", Path(__file__).resolve().parent.parent / "cmd" / "group_sim.py")
group_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(group_sim)


def sim(n: int, *extra: str) -> dict:
    args = group_sim.parse(["--peers", str(n), "--sim-s", "600", "--notebook", "no", *extra])
    times = group_sim.swim_times(args.swim, n)
    return {d: (group_sim.simulate_today(n, args, times) if d == "today" else
                group_sim.simulate_groups(n, args, times, d)) for d in args.design_list}


def test_sim_without_churn_applies_every_group_in_2_one_way_delays_plus_the_bytes():
    row = sim(16, "--churn-per-min", "0", "--headroom", "1", "--designs", "abort")["abort"]
    assert row["grid"] == [4, 4]
    assert row["group_rounds_applied"] == 1.0 and row["failures_by_cause"] == {}
    # 2 x 50 ms + 2 (3/4) x 1 MB at 100 Mbit/s
    assert row["group_round_s"]["median"] == pytest.approx(0.1 + 1.5 * 0.08)
    assert row["rounds_to_1e-9"]["max"] == 2  # a full grid: d rounds


def test_sim_under_churn_fails_groups_for_the_reasons_each_design_has():
    rows = sim(64)
    assert rows["abort"]["failures_by_cause"].get("dead_in_view", 0) > 0
    assert "dead_in_view" not in rows["exclude"]["failures_by_cause"]
    assert rows["exclude"]["failures_by_cause"].get("views_disagree", 0) > 0
    assert set(rows["settled"]["failures_by_cause"]) <= {"killed_in_transfer", "alone"}
    assert rows["settled"]["group_rounds_applied"] > rows["exclude"]["group_rounds_applied"]
    today = rows["today"]
    assert today["rounds_applied"] == pytest.approx(today["rounds_applied_formula"], abs=0.05)


@pytest.mark.parametrize("n,theirs", [(512, 8.2), (900, 5.0)])
def test_the_notebook_setting_gives_the_authors_rounds_without_failures(n, theirs):
    # yandex-research/moshpit-sgd, averaging_experiments/plot_results.ipynb:
    # rounds to 1e-9, mean of 10 runs, 32 x 32 grid, p = 0.
    assert group_sim.notebook(n, 0.0, exclude=True)["rounds_to_1e-9"] == pytest.approx(
        theirs, abs=0.5)
