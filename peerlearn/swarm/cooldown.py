"""Peers shut out for a while, the wait doubling with each repeat (sans-IO)."""

from __future__ import annotations


class Cooldowns:
    """peer -> (shut out until, repeats). Bounded: a member mints identities
    at will, so past `cap` entries the ones whose wait ends first go."""

    def __init__(self, first_s: float, max_s: float, cap: int = 1024):
        self.first_s, self.max_s, self.cap = first_s, max_s, cap
        self._until: dict[str, tuple[float, int]] = {}

    def active(self, peer: str, now: float) -> bool:
        entry = self._until.get(peer)
        return entry is not None and now < entry[0]

    def active_ids(self, now: float) -> set[str]:
        return {p for p, (until, _) in self._until.items() if now < until}

    def add(self, peer: str, now: float) -> None:
        """Shut peer out: first_s, then twice as long each time, up to max_s."""
        _, repeats = self._until.get(peer, (0.0, 0))
        self._until[peer] = (now + min(self.first_s * 2 ** repeats, self.max_s), repeats + 1)
        if len(self._until) > self.cap:
            for p in sorted(self._until, key=lambda q: self._until[q][0])[
                    :len(self._until) - self.cap]:
                del self._until[p]

    def forgive(self, peer: str) -> None:
        """peer behaved: its next offence starts from first_s again."""
        self._until.pop(peer, None)

    def __len__(self) -> int:
        return len(self._until)
