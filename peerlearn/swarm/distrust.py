"""Peers whose word on the shared state proved false (sans-IO, part of RoundCore).

The parity rule follows the newest state a live member announces, so one
member holding the secret could announce a far step with the hash of a
poisoned state and every peer would fetch it. A fetched state is checked
before it is installed (its hash, and that every float is finite); when the
check fails, every peer that announced exactly that (step, hash) is
distrusted for a cooldown that doubles with each repeat (DISTRUST_FIRST_S up
to DISTRUST_MAX_S): its heartbeats and Readies no longer count towards the
newest step, the parity check, or as a donor, so the honest peers go on
applying rounds meanwhile. An honest peer never announces a non-finite state
(rounds refuse non-finite means, syncs refuse non-finite states), so it is
never distrusted for one. A state that is finite but wrong (random weights
with a matching hash) is not detected here: see docs/swarm.md's threat model.

RoundCore (rounds.py) mixes this in; the state is RoundCore's.
"""

from __future__ import annotations

DISTRUST_FIRST_S = 30.0
DISTRUST_MAX_S = 3600.0


class Distrusting:
    """Distrust of peers whose announced state was refused; see rounds.py."""

    def trusted(self, peer: str, now: float) -> bool:
        return not self.distrusted.active(peer, now)

    def refuse_state(self, now: float, step: int, state_hash: bytes) -> list[str]:
        """The state (step, state_hash) was fetched and refused (not finite, or
        not matching its hash): distrust every peer announcing it. Returns them."""
        liars = sorted(i for i, b in self.beats.items()
                       if i != self.me.id and (b.step, b.state_hash) == (step, state_hash))
        liars += sorted(i for i, r in self.readies.items()
                        if i != self.me.id and i not in liars
                        and (r.step, r.state_hash) == (step, state_hash))
        for i in liars:
            self.distrusted.add(i, now)
            self.readies.pop(i, None)
        return liars
