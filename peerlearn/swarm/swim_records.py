"""SWIM membership's configuration, the actions a member returns (Send,
Changed) and its per-member and per-probe records (swim.py has the protocol)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from peerlearn.wire import swim as w
from peerlearn.wire.swim import ALIVE, DEAD, LEFT, SUSPECT

_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
_U32 = (1 << 32) - 1


@dataclass(frozen=True)
class SwimConfig:
    period: float = 1.0
    probe_timeout: float = 0.5  # for an Ack; at most period / 2 (a PingReq needs the rest)
    indirect: int = 3  # k, members asked to probe a silent target
    suspicion_mult: float = 4.0  # minimum suspicion = this x max(1, log10 n) x period
    suspicion_max_mult: float = 6.0  # the timeout starts at this x the minimum
    confirmations: int = 2  # independent suspicions that bring it down to the minimum
    retransmit_mult: int = 4  # each update is sent this x ceil(log10(n + 1)) times
    max_piggyback: int = 8  # updates on one message (wire cap: 16)
    max_members: int = 4096
    max_relays: int = 16  # indirect probes run for others at once
    max_queue: int = 1024  # updates waiting to be piggybacked
    max_health: int = 8  # local health multiplier cap (period x (1 + health))
    dead_keep: float = 300.0  # seconds a dead member's entry is kept
    reprobe_every: int = 10  # periods between probes of one kept dead member
    join_retry: float = 2.0  # seconds between Joins until a seed's whole table came
    max_syncs_per_period: int = 2  # Members answers to Joins
    members_per_message: int = 128

    def __post_init__(self):
        if not 0 < self.probe_timeout <= self.period / 2:
            raise ValueError("probe_timeout must be in (0, period / 2]")
        if not 1 <= self.max_piggyback <= w.MAX_UPDATES:
            raise ValueError(f"max_piggyback must be 1..{w.MAX_UPDATES}")
        if not 1 <= self.members_per_message <= w.MAX_ENTRIES:
            raise ValueError(f"members_per_message must be 1..{w.MAX_ENTRIES}")
        if self.max_members > 255 * self.members_per_message:
            raise ValueError("max_members must fit in 255 Members messages")

    def suspicion_min(self, n: int) -> float:
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.period

    def suspicion_max(self, n: int) -> float:
        return self.suspicion_max_mult * self.suspicion_min(n)

    def suspicion_timeout(self, n: int, confirmed: int) -> float:
        """The timeout after `confirmed` independent suspicions besides the
        first: from suspicion_max down to suspicion_min, logarithmically."""
        lo, hi = self.suspicion_min(n), self.suspicion_max(n)
        k = min(self.confirmations, max(n - 2, 0))
        if k < 1 or confirmed >= k:
            return lo
        return max(lo, hi - (hi - lo) * math.log(confirmed + 1) / math.log(k + 1))

    def retransmits(self, n: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))


@dataclass(frozen=True)
class Send:
    to: str
    addr: str  # "" : answer on the connection the request came from
    msg: object


@dataclass(frozen=True)
class Changed:
    """This member's view of `member` changed: state is "alive", "suspect",
    "dead" or "left". by_me: this member confirmed it dead itself (its own
    suspicion timed out), rather than hearing so."""

    member: str
    state: str
    incarnation: int
    addr: str
    by_me: bool = False


class _Member:
    __slots__ = ("id", "addr", "inc", "state", "since", "by", "told", "checked")

    def __init__(self, mid: str, addr: str, inc: int, state: int, since: float):
        self.id, self.addr, self.inc, self.state, self.since = mid, addr, inc, state, since
        self.by: list[str] = []  # who suspects this incarnation (first is the first)
        self.told = -1  # our incarnation it acked a Ping carrying our ALIVE for
        self.checked = False  # a lone suspicion of it: asked it directly once


class _Probe:
    __slots__ = ("target", "seq", "start", "timeout", "end", "relays", "nacks", "acked",
                 "told")

    def __init__(self, target: str, seq: int, start: float, timeout: float, end: float):
        self.target, self.seq, self.start, self.timeout, self.end = target, seq, start, \
            timeout, end
        self.relays: list[str] = []
        self.nacks = 0
        self.acked = False
        self.told = -1  # the incarnation of ours the Ping carried, if it did
