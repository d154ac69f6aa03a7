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
    exchange succeeds everywhere: values are summed in sorted-id order, and
    with a codec each member's own value is its dequantized bytes, which is
    exactly what the others decode.
  * Not agreed: if one side's exchange fails after the other side finished,
    the two hold different tensors. Gossip algorithms tolerate this; a
    caller needing agreement uses a round (all-reduce) instead.
  * Rounds are told, not assumed: each member first sends its round in a
    small header (op GOSSIP_HELLO_OP, the same for every round), then its
    tensor (op GOSSIP_OP | round). A member whose partner is at another
    round fails at once with GossipFailed naming that round, and both sides
    go on to `next_round` = max(both rounds) + 1: the two sides of a healed
    partition, which trained at different speeds, meet there; without it
    they would pair by different rounds forever. Both sides give up, the
    one ahead too: when it skipped the earlier header and waited, it read
    the partner's *next* attempt, already one round past its own, and the
    two leapfrogged each other for good (seen through a real partition).
    A member that fails without hearing the other's round (timeout, link
    broken) goes to its own round + 1, which is the same next_round when it
    was the one ahead.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Sequence

import torch

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


def next_round(mine: int, heard: Iterable[int] = ()) -> int:
    """The round to try after a failed exchange at round `mine`, having
    heard the partners' rounds `heard`: the same on both sides of a round
    mismatch, whichever of them heard the other. A round more than
    MAX_CATCHUP ahead of ours is not followed."""
    return max([mine, *(h for h in heard if h <= mine + MAX_CATCHUP)]) + 1


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
             block_size: int = 64, timeout: float = 30.0,
             rule: str = "mean") -> tuple[torch.Tensor, tuple[str, ...]]:
    """Averages tensor (flat fp32, only read) over group; returns a new tensor
    and the partners whose values were left out (see `rule`).

    rule: "mean", or a robust rule of swarm.aggregate applied to the group's
    values in sorted-id order (the same rows at every member, so the same
    bits). With a robust rule and three or more members, a partner's NaN is
    left out and its 1e30 clipped, instead of failing the exchange; a pair
    cannot outvote anyone, so pairs keep the refusals below.

    Sends to every other member and receives from each at the same time (the
    sends on helper threads): first the round header, then the tensor. Raises
    GossipFailed on any failure, after aborting the group's gossip links so
    the partners fail fast too; its `rounds` names the partners heard at
    another round than ours (peer id -> round): see `next_round`.
    """
    if not 0 <= round_ <= MAX_ROUND:
        raise ValueError("gossip round out of range")
    others = [p for p in group if p != me]
    if not others:
        return tensor.clone(), ()
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
    rounds: dict[str, int] = {}  # partners at another round than ours
    poisoned_by = None

    def send(peer: str) -> None:
        try:
            link = links.outgoing(peer, addresses[peer], timeout=timeout, channel=CHANNEL_GOSSIP)
            # The tensor follows the header at once: a partner at another round
            # reads the header, gives up and aborts the link, which drops it.
            link.send(header, GOSSIP_HELLO_OP, timeout=timeout)
            link.send(tensor, op, codec=codec, block_size=block_size, timeout=timeout)
        except (StreamError, TimeoutError, OSError, KeyError) as e:
            errors.append(e)

    senders = [threading.Thread(target=send, args=(p,), daemon=True) for p in others]
    for t in senders:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        for peer in others:
            theirs = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            links.recv_into(peer, theirs, GOSSIP_HELLO_OP, channel=CHANNEL_GOSSIP,
                            timeout=max(0.1, deadline - time.monotonic()))
            their_round = int.from_bytes(bytes(theirs.tolist()), "little")
            if their_round != round_:
                if their_round <= MAX_ROUND:  # past 2^48 it is no round: no hint
                    rounds[peer] = their_round
                raise GossipFailed(f"{peer} is at gossip round {their_round}, "
                                   f"we at {round_}")
            values[peer] = torch.empty_like(tensor)
            links.recv_into(peer, values[peer], op, channel=CHANNEL_GOSSIP,
                            timeout=max(0.1, deadline - time.monotonic()))
            why = None if robust else refused_value(values[peer], mine)
            if why is not None:
                poisoned_by = peer
                raise GossipFailed(f"{peer}'s values {why}: refused", poisoned_by=peer)
    except (StreamError, TimeoutError, OSError, GossipFailed) as e:
        errors.append(e)
    if errors:
        for peer in others:
            links.abort(peer, CHANNEL_GOSSIP)
    for t in senders:
        t.join()
    if errors:
        raise GossipFailed(f"gossip round {round_} with {list(others)}: {errors[0]}",
                           rounds=rounds, poisoned_by=poisoned_by) from errors[0]
    if rule != "mean":
        got = aggregate(torch.stack([values[p] for p in group]), rule)
        return got.value, tuple(group[i] for i in got.refused)
    out = torch.zeros_like(tensor)
    for p in group:  # sorted: the same additions in the same order everywhere
        out.add_(values[p])
    return out.div_(len(group)), ()
