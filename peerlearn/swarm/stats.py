"""What a peer daemon counts for its operator, and the rate limit it answers
status requests with. Loop-owned: changed on the daemon's event loop only;
peerlearn.cli.metrics copies it there (`snapshot`) and serves the copy.
"""

from __future__ import annotations

import bisect
import time

# Durations from a 10 ms all-reduce on a LAN to a state transfer of a large
# model over a slow link: the last finite bucket is an hour.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0, 1800.0, 3600.0)
# How late the daemon's 50 ms tick wakes: work on the loop (a hash, a copy of
# the state) shows up here; heartbeats wait as long.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Timed operations: the label values of peerlearn_collective_seconds (a fixed set).
OPERATIONS = ("all_reduce", "gossip", "state_sync")
# Why a contribution went into another round (peerlearn_round_retries_total).
RETRY_REASONS = ("aborted", "collective_failed", "nonfinite", "superseded")


class Durations:
    """A histogram per operation: counts per bucket (not cumulative), sum."""

    def __init__(self, operations: tuple[str, ...], buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = {op: [0] * (len(buckets) + 1) for op in operations}  # last: +Inf
        self.sums = dict.fromkeys(operations, 0.0)

    def observe(self, op: str, seconds: float) -> None:
        counts = self.counts[op]
        counts[bisect.bisect_left(self.buckets, seconds)] += 1  # first bound >= seconds
        self.sums[op] += seconds

    def copy(self) -> Durations:
        out = Durations(tuple(self.counts), self.buckets)
        out.counts = {op: list(c) for op, c in self.counts.items()}
        out.sums = dict(self.sums)
        return out


class PeerStats:
    """Counters beside the daemon's own (rounds_applied and the like)."""

    def __init__(self):
        self.durations = Durations(OPERATIONS, DURATION_BUCKETS)
        self.retries = dict.fromkeys(RETRY_REASONS, 0)
        self.lost_contributions = 0  # failed with ContributionLost (in-place rounds)
        self.gossips = 0
        self.gossip_failures = 0
        self.gossip_poisoned = 0  # exchanges refused for a partner's values
        self.checkpoints = 0
        self.checkpoint_failures = 0
        self.checkpoint_seconds = Durations(("checkpoint",), DURATION_BUCKETS)
        self.checkpoint_at: float | None = None  # wall clock (time.time) of the last one
        self.loop_lag = Durations(("loop_lag",), LAG_BUCKETS)
        self.loop_lag_max = 0.0  # the longest since start, seconds

    def tick_late(self, seconds: float) -> None:
        self.loop_lag.observe("loop_lag", seconds)
        self.loop_lag_max = max(self.loop_lag_max, seconds)

    def retried(self, reason: str) -> None:
        self.retries[reason] += 1

    def gossip_done(self, ok: bool, seconds: float, poisoned: bool = False) -> None:
        """poisoned: a partner's values were refused (the exchange failed), or
        left out by a robust rule (it went on without them)."""
        self.durations.observe("gossip", seconds)
        if ok:
            self.gossips += 1
        else:
            self.gossip_failures += 1
        self.gossip_poisoned += poisoned

    def checkpoint_done(self, ok: bool, seconds: float) -> None:
        if ok:
            self.checkpoints += 1
            self.checkpoint_at = time.time()
            self.checkpoint_seconds.observe("checkpoint", seconds)
        else:
            self.checkpoint_failures += 1


class TokenBucket:
    """At most `rate` events a second on average, `burst` at once. Loop-owned."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), None

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
