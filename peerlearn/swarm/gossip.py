"""Gossip averaging: exchange a tensor with a small group, no global barrier.

NoLoCo and gossip averaging replace the all-reduce of a round by an average
within a group of two (or a few) peers. There is no coordinator and no extra
message: every peer computes the same partition of the members from
(members, round, seed) alone, so two peers that agree on the view agree on
who pairs with whom. Peers whose views disagree simply fail to meet (the
exchange times out) and keep their own tensor.

Invariants:
  * `gossip_groups` is a pure function; its order is a keyed hash, not
    Python's `random`, so peers on different Python versions agree.
  * Every member of a group ends with byte-identical results when the
    exchange succeeds everywhere: values are summed in the group's order
    (the same tuple at every member: sorted ids for random groups, grid
    coordinates for grid groups), and with a codec each member's own value
    is its dequantized bytes, which is exactly what the others decode.
  * Grid groups (`grid_groups`, Moshpit SGD's, swarm/moshpit.py): on a full
    grid with a fixed view, ceil(log_size N) rounds that all succeed leave
    every member with the same bits, the global mean up to rounding; random
    groups of 2 only shrink the spread (by half a round, in expectation).
  * Not agreed: if one side's exchange fails after the other side finished,
    the two hold different tensors. Gossip algorithms tolerate this; a
    caller needing agreement uses a round (all-reduce) instead.
  * Rounds are told, not assumed: each member first sends its round in a
    small header (op GOSSIP_HELLO_OP, the same for every round), then its
    tensor (op GOSSIP_OP | round). The one behind catches up, the one ahead
    waits: a member reading a partner's earlier round reads past that
    attempt (its tensor too) and waits for the next, at its own round; a
    member reading a later round stops with GossipFailed(ahead=True), and
    its caller tries again at once at `next_round`, that later round, where
    the partner waits. The links stay in order meanwhile (nothing aborted),
    and the header already read is taken from `heard`. Two sides of a
    healed partition, which trained at different speeds, meet this way in
    one outer step. What it replaced: both sides gave up and went to
    max(rounds) + 1; a side that failed fast started its next attempt while
    the slower one still read the last, read one round off again, and under
    load three peers stayed one round apart for the rest of a test (a
    restarted peer, a joiner: 0 exchanges in 60 s).
  * Any other failure (timeout, broken link, refused values) aborts the
    group's links, after our headers went out (a partner behind still
    learns our round); the member goes to its own round + 1. A link that
    ends while we wait for a header was an earlier attempt's: the wait
    moves to the partner's next link.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Sequence

import torch

from peerlearn.swarm import moshpit
from peerlearn.swarm.aggregate import aggregate
from peerlearn.swarm.datalinks import CHANNEL_GOSSIP, PeerLinks
from peerlearn.swarm.errors import GossipFailed
from peerlearn.transport.stream import DEFAULT_CHUNK_ELEMS, StreamError
from peerlearn.wire import codecs

# | round. Unique among gossip ops; round ops may reach this range (op_id of a
# tag >= 2^45), which is harmless: gossip has its own channel, so its own links.
GOSSIP_OP = 1 << 61
MAX_ROUND = (1 << 48) - 1
# How far a partner's header may move our round in one jump. Honest peers
# drift apart by the outer steps of one partition (thousands); a header from a
# broken or hostile member claiming round 2^48 - 1 would otherwise push us to
# the end of the round space, where the next exchange is refused: the end of
# training. At 2^20 per jump, that takes 2^28 such exchanges (a smaller cap
# would leave two sides of a long partition unable to meet again).
MAX_CATCHUP = 1 << 20
# A partner's values are refused when not finite or larger (max |x|) than
# this many times ours: averaging with one member's NaN or 1e30 made its
# partners' models NaN for good in three exchanges.
GROWTH_LIMIT = 1e4
# The round header: outside every GOSSIP_OP | round (rounds stay below 2^48).
GOSSIP_HELLO_OP = GOSSIP_OP | (1 << 48)
HEADER_BYTES = 8  # the sender's round, uint64 little-endian
# How long a failed exchange waits for its own round header to go out before
# it aborts the links (see exchange): a live partner's connect and an 8-byte
# send take milliseconds; a dead one's must not hold the failure up.
HEADER_GRACE_S = 1.0


def gossip_groups(members: Sequence[str], round_: int, seed: int = 0,
                  size: int = 2) -> list[tuple[str, ...]]:
    """Partitions members into groups of `size` (ids sorted within a group).

    A leftover smaller than 2 joins the last full group, so nobody is alone
    unless there is one member. Same inputs, same output, on every peer.
    """
    if size < 2:
        raise ValueError("a gossip group has at least 2 members")
    key = f"{seed}/{round_}/".encode()
    ids = sorted(set(members), key=lambda i: (hashlib.blake2b(key + i.encode(),
                                                              digest_size=8).digest(), i))
    groups = [ids[i:i + size] for i in range(0, len(ids), size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        leftover = groups.pop()
        groups[-1] = groups[-1] + leftover
    return [tuple(sorted(g)) for g in groups]


GROUPINGS = ("random", "grid")


def grid_groups(members: Sequence[str], round_: int, seed: int = 0,
                size: int = 2) -> list[tuple[str, ...]]:
    """Moshpit SGD's groups (Ryabinin et al., NeurIPS 2021): the members on
    a grid of d = ceil(log_size N) axes of side at most `size`; round r
    groups the members that differ only on axis r mod d, in their order on
    that axis (the order their values are summed in). Each pass of d rounds
    starts from cells drawn by a keyed hash of (seed, pass, id), and within
    it a member's coordinate on an averaged axis becomes its index in its
    group (moshpit.compacting_groups), so a sparse grid (N not size^d)
    mixes about as fast as a full one would instead of repeating its holes.
    Same inputs, same output, on every peer."""
    if size < 2:
        raise ValueError("a gossip group has at least 2 members")
    ids = sorted(set(members))
    dims = 1
    while size ** dims < len(ids):
        dims += 1
    grid = moshpit.grid_for(len(ids), dims)
    pass_, step = divmod(round_, dims)
    pass_seed = int.from_bytes(hashlib.blake2b(f"grid/{seed}/{pass_}".encode(),
                                               digest_size=8).digest(), "big")
    return moshpit.compacting_groups(moshpit.place(ids, grid, pass_seed), grid, step)


def groups_for(grouping: str, members: Sequence[str], round_: int, seed: int = 0,
               size: int = 2) -> list[tuple[str, ...]]:
    """Round round_'s groups by `grouping` (one of GROUPINGS)."""
    if grouping == "random":
        return gossip_groups(members, round_, seed, size)
    if grouping == "grid":
        return grid_groups(members, round_, seed, size)
    raise ValueError(f"grouping {grouping!r}: one of {', '.join(GROUPINGS)}")


def next_round(mine: int, heard: Iterable[int] = ()) -> int:
    """The round to try after a failed exchange at round `mine`, having
    heard partners ahead of us at `heard` (GossipFailed.rounds): the latest
    of them, where those partners wait for us; else the next one. A round
    more than MAX_CATCHUP ahead of ours is not followed."""
    return max([mine + 1, *(h for h in heard if h <= mine + MAX_CATCHUP)])


def refused_value(theirs: torch.Tensor, mine: torch.Tensor) -> str | None:
    """Why a partner's values must not be averaged in, or None."""
    if not bool(torch.isfinite(theirs).all()):
        return "are not finite"
    inf = float("inf")  # max |x| as a reduction, without a copy of the tensor
    mine_max = float(torch.linalg.vector_norm(mine, ord=inf)) if mine.numel() else 0.0
    theirs_max = float(torch.linalg.vector_norm(theirs, ord=inf)) if theirs.numel() else 0.0
    if mine_max > 0 and theirs_max > GROWTH_LIMIT * mine_max:
        return f"are {theirs_max / mine_max:.3g} times larger than ours"
    return None


def group_of(me: str, groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    for g in groups:
        if me in g:
            return g
    raise GossipFailed(f"{me} is not among the members being paired")


def exchange(links: PeerLinks, me: str, group: tuple[str, ...], addresses: dict[str, str],
             tensor: torch.Tensor, round_: int, *, codec: int | None = None,
             block_size: int = 64, timeout: float = 30.0, rule: str = "mean",
             heard: dict[str, tuple[object, int]] | None = None,
             ) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Averages tensor (flat fp32, only read) over group; returns a new tensor
    and the partners whose values were left out (see `rule`).

    rule: "mean", or a robust rule of swarm.aggregate applied to the group's
    values in the group's order (the same rows at every member, so the same
    bits). With a robust rule and three or more members, a partner's NaN is
    left out and its 1e30 clipped, instead of failing the exchange; a pair
    cannot outvote anyone, so pairs keep the refusals below.

    Sends to every other member and receives from each at the same time (the
    sends on helper threads): first the round header, then the tensor. A
    partner's attempt at an earlier round is read past (header and tensor:
    it reads our header and comes to our round). A partner at a later round
    ends the exchange with GossipFailed(ahead=True), the links kept and its
    header filed in `heard` (peer -> (link, round), owned by the caller, one
    exchange at a time): the caller meets it at next_round at once, and that
    exchange takes the filed header instead of waiting for another. Any other
    failure raises GossipFailed after our headers went out and the group's
    gossip links were aborted, so the partners fail fast too.
    """
    if not 0 <= round_ <= MAX_ROUND:
        raise ValueError("gossip round out of range")
    others = [p for p in group if p != me]
    if not others:
        return tensor.clone(), ()
    heard = {} if heard is None else heard
    robust = rule != "mean" and len(group) >= 3
    if codec is not None and DEFAULT_CHUNK_ELEMS % block_size:
        raise ValueError("block_size must divide the stream chunk size")
    op = GOSSIP_OP | round_
    # Our own value as the others will see it: quantized chunk by chunk on the
    # wire equals quantized whole (blocks divide chunks), so decode(encode(x)).
    mine = tensor if codec is None else codecs.decode(
        codecs.encode(tensor, codec, block_size=block_size))
    values = {me: mine}
    errors: list[BaseException] = []

    header = torch.tensor(list(round_.to_bytes(HEADER_BYTES, "little")), dtype=torch.uint8)
    rounds: dict[str, int] = {}  # partners ahead of us
    poisoned_by = None
    header_out = {p: threading.Event() for p in others}  # sent, or failed to

    def send(peer: str) -> None:
        try:
            link = links.outgoing(peer, addresses[peer], timeout=timeout, channel=CHANNEL_GOSSIP)
            link.send(header, GOSSIP_HELLO_OP, timeout=timeout)
            header_out[peer].set()
            link.send(tensor, op, codec=codec, block_size=block_size, timeout=timeout)
        except (StreamError, TimeoutError, OSError, KeyError) as e:
            errors.append(e)
        finally:
            header_out[peer].set()

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    def their_round(peer: str) -> tuple[object, int]:
        filed = heard.pop(peer, None)
        if filed is not None and filed[0] is links.incoming(peer, timeout=left(),
                                                            channel=CHANNEL_GOSSIP):
            return filed
        raw = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        # follow: a link that ends here was an earlier attempt's, given up.
        link = links.recv_into(peer, raw, GOSSIP_HELLO_OP, channel=CHANNEL_GOSSIP,
                               timeout=left(), follow=True)
        return link, int.from_bytes(bytes(raw.tolist()), "little")

    senders = [threading.Thread(target=send, args=(p,), daemon=True) for p in others]
    for t in senders:
        t.start()
    deadline = time.monotonic() + timeout
    ahead = False
    try:
        for peer in others:
            values[peer] = torch.empty_like(tensor)
            while True:
                link, theirs = their_round(peer)
                if theirs > MAX_ROUND:  # past 2^48 it is no round
                    raise GossipFailed(f"{peer} sent gossip round {theirs}: no round")
                if theirs > round_:
                    heard[peer] = (link, theirs)
                    rounds[peer] = theirs
                    ahead = True
                    raise GossipFailed(f"{peer} is at gossip round {theirs}, we at {round_}")
                # Behind us: its tensor is read past (follow: or its link
                # ends), and its next attempt, at our round, read after.
                links.recv_into(peer, values[peer], GOSSIP_OP | theirs, channel=CHANNEL_GOSSIP,
                                timeout=left(), follow=theirs != round_)
                if theirs == round_:
                    break
            why = None if robust else refused_value(values[peer], mine)
            if why is not None:
                poisoned_by = peer
                raise GossipFailed(f"{peer}'s values {why}: refused", poisoned_by=peer)
    except (StreamError, TimeoutError, OSError, GossipFailed) as e:
        errors.append(e)
    if ahead:  # the links stay, in order, for the caller's next attempt
        for t in senders:
            t.join()
        ahead = len(errors) == 1
    if errors and not ahead:
        # Our round reaches the partners before the links go (a shut-down
        # socket still delivers what was queued): a partner behind reads it
        # and comes to our round; aborting first, it waited out its timeout
        # hearing nothing and stayed behind, and the two never met (seen
        # under load after a restart: our sender had not started yet).
        grace = time.monotonic() + min(HEADER_GRACE_S, max(0.0, deadline - time.monotonic()))
        for peer in others:
            header_out[peer].wait(max(0.0, grace - time.monotonic()))
        for peer in others:
            links.abort(peer, CHANNEL_GOSSIP)
            heard.pop(peer, None)
    for t in senders:
        t.join()
    if errors:
        raise GossipFailed(f"gossip round {round_} with {list(others)}: {errors[0]}",
                           rounds=rounds, poisoned_by=poisoned_by, ahead=ahead) from errors[0]
    if rule != "mean":
        got = aggregate(torch.stack([values[p] for p in group]), rule)
        return got.value, tuple(group[i] for i in got.refused)
    out = torch.zeros_like(tensor)
    for p in group:  # the group's order: the same additions in the same order everywhere
        out.add_(values[p])
    return out.div_(len(group)), ()
