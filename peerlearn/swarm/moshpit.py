"""Group-wise averaging rounds on a virtual grid, sans-IO (issue 19).

After Moshpit SGD (Ryabinin, Gorbunov, Plokhotnyuk, Pekhimenko, "Moshpit
SGD: Communication-Efficient Decentralized Training on Heterogeneous
Unreliable Devices", NeurIPS 2021). Gossip runs use its groups over real
sockets (`gossip.grid_groups`, `--grouping grid`); the daemon's rounds
still span every member. cmd/group_sim.py runs group rounds at up to
1,024 peers; docs/swarm.md, "Group rounds (Moshpit-style), simulated",
has what it measures.

Every member of a view gets a cell of a d-dimensional grid of side g, its
last axis possibly shorter (`Grid`, `grid_for`, `place`); round r
averages, in one group, the members whose cells agree on every coordinate
but axis r mod d (`groups`). Each group runs its own all-reduce (the
direct one, swarm/direct.py, two one-way delays, as collective.py takes it
for up to DIRECT_MAX_WORLD = 8 members); a failure aborts only that
group's part (`apply_group`). Pure functions of their arguments: no
sockets, threads, clocks or messages. Peers that agree on the view (the
member ids), the grid and the seed agree on every group of every round
without exchanging anything.

Invariants:
  * Agreement: `place` and `groups` depend only on the set of ids, the grid
    and the seed (a keyed blake2b, as gossip_groups, not Python's `random`),
    so every peer computes the same cells and groups.
  * Partition: each round's groups cover every placed member exactly once;
    a group has at most g members (one line of the grid), ordered by their
    coordinate on the round's axis.
  * Sum kept: a group that applies replaces its members' values by their
    mean and a failed one keeps them, so the sum over the view is unchanged
    (up to rounding) and the members' spread never grows.
  * Exact mean: with every cell full (N = g^d, or g^(d-1) x the last
    axis's length; "a full grid" below) and a fixed view, any d consecutive
    rounds that all apply leave every member holding the global mean.
    After the axes a_1..a_k have been averaged, a member's value depends
    only on its coordinates on the other axes; after all d it is one
    number everywhere.
  * Parity, within a group: the group mean is made once, summed in the
    group's order (its members' coordinates on the axis) and then divided
    by its size, as direct.py's owner of a segment sums the parts in rank
    order; every member takes those same bits (`group_mean`).
  * Parity, across groups: on a full grid, fixed view, d consecutive
    rounds that all apply leave every member with bit-identical values: by
    the induction above, the members of every group of round k hold the
    same bits for the same coordinate on the axes not yet averaged, and
    every group sums them in the same order (by coordinate). Those bits
    are the global mean up to rounding (a nested sum, not the flat sum's
    bits). Anything else (empty cells, a failed group, a view change, fewer
    than d rounds) leaves members of different groups with values that
    differ, by more than rounding until the averaging has converged. A
    state hash is therefore one per group and round, not one per step for
    the swarm as in today's global rounds.

When N is below the cells some are empty: groups are smaller and uneven,
and d rounds no longer give the exact mean; the mean is still kept and the
spread still shrinks every round (the authors' own simulation uses such
sparse grids: 512 to 900 peers on 32 x 32). `place` fills cells by linear
probing from each member's hashed cell, members taken in hashed order, so
a member that joins or leaves moves nobody hashed before it, and only
those after it whose probing passed its cell (about 10 at 1,024 members
in 33 x 33 cells, more as the grid fills). Under churn: a member dead but
still in the view leaves its group unable to finish (its all-reduce
aborts) and that group keeps its values; a peer not yet in the view is in
no group and averages nothing; peers that disagree on the view compute
different groups around the cells that differ, and those groups fail to
meet. The caller decides, from its own all-reduce, which groups failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")  # a value that supports + and / by an int: float, tensor, array


@dataclass(frozen=True)
class Grid:
    side: int  # g: the most members in one group
    dims: int  # d: rounds for one pass over every axis
    last: int = 0  # the last axis's length, at most g (0: g); see grid_for

    def __post_init__(self):
        if self.side < 1 or self.dims < 1 or not 0 <= self.last <= self.side:
            raise ValueError("a grid has side >= 1, dims >= 1 and 0 <= last <= side")

    @property
    def cells(self) -> int:
        return self.side ** (self.dims - 1) * (self.last or self.side)

    def coords(self, cell: int) -> tuple[int, ...]:
        """The cell's coordinates, axis 0 first (base-g digits, least
        significant first; the last one below `last`)."""
        out = []
        for _ in range(self.dims):
            cell, c = divmod(cell, self.side)
            out.append(c)
        return tuple(out)


def grid_for(n: int, dims: int, headroom: float = 1.0) -> Grid:
    """The smallest grid of `dims` axes with at least n x headroom cells:
    side g the smallest with g^d cells enough, the last axis cut to what is
    needed. Empty cells make groups uneven and the averaging slower, so the
    last axis is not left mostly empty (16 members: 5 x 4, not 5 x 5).
    Headroom above 1 leaves cells for joiners: a grid that changes moves
    every member."""
    need = max(1, -(-int(n * headroom * 1000) // 1000))  # ceil, robust to float error
    side = 1
    while side ** dims < need:
        side += 1
    return Grid(side, dims, -(-need // side ** (dims - 1)))


def _key(seed: int, member: str) -> bytes:
    return hashlib.blake2b(f"moshpit/{seed}/{member}".encode(), digest_size=8).digest()


def place(members: Iterable[str], grid: Grid, seed: int = 0) -> dict[str, int]:
    """Each member's cell (an index below grid.cells). Raises ValueError when
    the members outnumber the cells (a group would exceed g)."""
    ids = sorted(set(members))
    if len(ids) > grid.cells:
        raise ValueError(f"{len(ids)} members do not fit {grid.cells} cells")
    keyed = sorted((_key(seed, i), i) for i in ids)
    # next_free[c]: a cell at or after c (cyclically) that may be free; path
    # halving keeps a full grid's probing near-linear instead of quadratic.
    next_free: dict[int, int] = {}

    def free_from(c: int) -> int:
        while c in next_free:
            nxt = next_free[c]
            next_free[c] = next_free.get(nxt, nxt)
            c = nxt
        return c

    cells: dict[str, int] = {}
    for digest, member in keyed:
        c = free_from(int.from_bytes(digest, "big") % grid.cells)
        cells[member] = c
        next_free[c] = (c + 1) % grid.cells
    return cells


def axis_of(round_: int, grid: Grid) -> int:
    return round_ % grid.dims


def groups(cells: dict[str, int], grid: Grid, round_: int) -> list[tuple[str, ...]]:
    """Round `round_`'s groups: members whose cells share every coordinate
    but the round's axis, each group ordered by that coordinate (the order
    its mean is summed in), the groups ordered by their first member's cell."""
    axis = axis_of(round_, grid)
    stride = grid.side ** axis
    lines: dict[int, list[tuple[int, str]]] = {}
    for member, cell in cells.items():
        along = (cell // stride) % grid.side
        line = cell - along * stride  # the cell with coordinate 0 on the axis
        lines.setdefault(line, []).append((along, member))
    return [tuple(m for _, m in sorted(line)) for _, line in sorted(lines.items())]


def compacting_groups(cells: dict[str, int], grid: Grid, steps: int) -> list[tuple[str, ...]]:
    """The groups of round `steps` of a pass that starts from `cells` at
    round 0, where after each round every member's coordinate on the round's
    axis becomes its index in its group (Moshpit All-Reduce's key update:
    the paper's chunk index is appended, the averaged coordinate dropped).
    On a full grid the index is the coordinate and this is `groups`; on a
    sparse one it packs the members of uneven lines towards low
    coordinates, so the next axis's groups are fuller than the fixed
    cells' (static cells leave the same holes in every pass: 30 rounds to
    1e-4 for 1,000 members in groups of 2, against 32 with random pairs;
    cmd/gossip_mixing.py). Coordinates stay distinct (a round changes one
    axis, within a line), so a group still has at most g members; the
    groups are ordered as `groups` orders them."""
    coords = {m: list(grid.coords(c)) for m, c in cells.items()}
    for k in range(steps + 1):
        axis = k % grid.dims
        lines: dict[tuple[int, ...], list[tuple[int, str]]] = {}
        for member, c in coords.items():
            lines.setdefault(tuple(c[axis + 1:] + c[:axis]), []).append((c[axis], member))
        out = [tuple(m for _, m in sorted(line)) for _, line in sorted(lines.items())]
        if k == steps:
            return out
        for g in out:
            for index, member in enumerate(g):
                coords[member][axis] = index
    raise AssertionError("unreachable")


def group_of(member: str, round_groups: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    for g in round_groups:
        if member in g:
            return g
    raise KeyError(f"{member} is in no group of this round")


def group_mean(values: Sequence[T]) -> T:
    """The values' sum in the given order, divided by their count: one
    result, which every member of the group takes (direct.py's owner of a
    segment copies part 0, adds the others in rank order, divides by N)."""
    if not values:
        raise ValueError("an empty group has no mean")
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total / len(values)


def apply_group(values: Sequence[T], failed: Collection[int] = ()) -> list[T]:
    """What each member of one group holds after its round: `values` in the
    group's order, `failed` the positions of members whose part failed
    (died, stalled, refused). Any failure aborts the group's all-reduce for
    all of its members, who keep their own values (direct.py is all or
    nothing); otherwise all hold the same mean, the same object."""
    if any(not 0 <= i < len(values) for i in failed):
        raise ValueError("a failed position outside the group")
    if failed:
        return list(values)
    mean = group_mean(values)
    return [mean] * len(values)


def run_round(values: dict[str, T], cells: dict[str, int], grid: Grid, round_: int,
              failed: Collection[str] = ()) -> tuple[dict[str, T], list[bool]]:
    """One round over a whole view (the simulator's and the tests' helper):
    the new values of every placed member, and for each group of the round
    whether it applied. `failed`: members whose part fails this round."""
    out = dict(values)
    applied = []
    failed = set(failed)
    for g in groups(cells, grid, round_):
        bad = [k for k, m in enumerate(g) if m in failed]
        for m, v in zip(g, apply_group([values[m] for m in g], bad)):
            out[m] = v
        applied.append(not bad)
    return out, applied
