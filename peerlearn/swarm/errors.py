"""The exceptions the swarm's Python API raises; every failure is one of these.

PeerError is the base. A caller that trains catches StateReplaced (recompute
the contribution against the new state) and CollectiveTimeout (decide whether
to wait longer); GossipFailed is expected now and then (NoLoCo goes on with
its own tensor); PeerClosed ends the loop.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError


class PeerError(PeerlearnError):
    """Base of every failure the Peer API reports."""


class PeerClosed(PeerError):
    """The peer is shut down (or shutting down); nothing more can be submitted."""


class PeerStartError(PeerError):
    """The peer could not start (bind, identity, checkpoint) or join in time."""


class JoinTimeout(PeerStartError):
    """No member answered at the join address within PeerConfig.join_timeout."""


class StateReplaced(PeerError):
    """While a contribution waited for its round, this peer's shared state was
    replaced by the swarm's (it had fallen behind, or differed). The
    contribution was computed against a state that is gone: recompute it."""

    def __init__(self, step: int):
        super().__init__(f"shared state replaced by the swarm's at step {step}")
        self.step = step


class CollectiveTimeout(PeerError, TimeoutError):
    """No round completed within the timeout. The submission is withdrawn, but a
    round already committed may still apply it: read `Peer.step` to know."""


class ContributionLost(CollectiveTimeout):
    """A round reduced this contribution in place (one of at least
    collective.IN_PLACE_MIN_BYTES: the peer then holds one buffer for the
    round, not two) and ended without applying: the buffer holds others'
    sums, so it cannot go into another round. Nothing was applied; a
    CollectiveTimeout, so a training loop skips that outer step as it would
    on a timeout, and its next contribution spans both."""


class Withdrawn(PeerError):
    """The caller withdrew this contribution before any round took it."""


class GossipFailed(PeerError):
    """A gossip exchange did not complete (partner gone, views disagreed on the
    pairing, timeout). The caller keeps its own tensor; the partner may or may
    not have averaged with ours (gossip results are not agreed). `rounds`:
    partners that answered at a later gossip round (peer id -> their round):
    the caller's next round is `gossip.next_round` of its own and these.
    `ahead`: that was the only failure, the links were kept and those
    partners wait for us there: an attempt at next_round now meets them."""

    def __init__(self, message: str, rounds: dict[str, int] | None = None,
                 poisoned_by: str | None = None, ahead: bool = False):
        super().__init__(message)
        self.rounds = dict(rounds or {})
        self.poisoned_by = poisoned_by  # a partner whose values we refused
        self.ahead = ahead
