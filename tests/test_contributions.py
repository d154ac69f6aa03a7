"""The rules a contribution's fate follows (swarm/contributions.py), sans-IO:
every contribution ends exactly once, a round settles the one it carried,
and a withdrawn one never enters a new round."""

from __future__ import annotations

import random

from peerlearn.swarm.contributions import Contributions
from peerlearn.swarm.errors import ContributionLost, StateReplaced, Withdrawn


class Sub:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_rounds_take_contributions_in_order_and_settle_the_one_they_carried():
    c = Contributions()
    a, b = Sub("a"), Sub("b")
    assert c.submit(a) and not c.submit(b)
    assert c.offer() is a and c.round_started(1) is a
    assert c.round_failed(1) == [] and c.offer() is a  # retried with the same
    assert c.round_started(2) is a
    (done,) = c.round_applied(2, "mean")
    assert done.sub is a and done.result == "mean" and done.error is None
    assert c.offer() is b


def test_withdrawing_a_queued_one_fails_it_and_the_leader_only_after_its_round():
    c = Contributions()
    a, b, d = Sub("a"), Sub("b"), Sub("d")
    for s in (a, b, d):
        c.submit(s)
    (gone,) = c.withdraw(b, round_running=True)  # queued: at once
    assert gone.sub is b and isinstance(gone.error, Withdrawn)
    c.round_started(1)
    assert c.withdraw(a, round_running=True) == []  # its round runs on
    assert c.offer() is None  # ... and no new round may count on it
    (late,) = c.round_failed(1)
    assert late.sub is a and isinstance(late.error, Withdrawn) and c.offer() is d
    # A withdrawn leader whose round applies gets the result after all.
    c.round_started(2)
    c.withdraw(d, round_running=True)
    (applied,) = c.round_applied(2, "r2")
    assert applied.sub is d and applied.result == "r2"


def test_a_replaced_state_fails_everyone_and_the_carrying_round_settles_nothing():
    c = Contributions()
    a, b = Sub("a"), Sub("b")
    c.submit(a)
    c.submit(b)
    c.round_started(5)
    failed = c.state_replaced(StateReplaced(9))
    assert [f.sub for f in failed] == [a, b]
    assert all(isinstance(f.error, StateReplaced) for f in failed)
    assert c.round_applied(5, "late") == [] and c.offer() is None


def test_a_round_that_spent_its_contribution_in_place_fails_it_and_the_next_leads():
    c = Contributions()
    a, b = Sub("a"), Sub("b")
    c.submit(a)
    c.submit(b)
    c.round_started(3)
    (lost,) = c.round_spent(3, ContributionLost("ring failed after reducing in place"))
    assert lost.sub is a and isinstance(lost.error, ContributionLost)
    assert c.offer() is b and c.round_spent(3, ContributionLost("again")) == []
    # One already failed (a replaced state) is not failed twice.
    c.round_started(4)
    c.state_replaced(StateReplaced(1))
    assert c.round_spent(4, ContributionLost("late")) == []


def test_random_schedules_end_every_contribution_exactly_once():
    """Property: whatever the order of submits, withdraws, round starts and
    ends, and replaced states, each contribution is settled once, a round
    applies at most the one it carried, and nothing withdrawn starts a round."""
    for seed in range(300):
        rng = random.Random(seed)
        c = Contributions()
        subs, ended, running, rid = [], {}, None, 0
        for _ in range(60):
            op = rng.choice(["submit", "withdraw", "start", "apply", "fail", "spend",
                             "replace"])
            out = []
            if op == "submit":
                subs.append(Sub(f"s{len(subs)}"))
                c.submit(subs[-1])
            elif op == "withdraw" and subs:
                out = c.withdraw(rng.choice(subs), running is not None)
            elif op == "start" and running is None and c.offer() is not None:
                rid += 1
                lead = c.round_started(rid)
                assert lead is not None
                running = (rid, lead)
            elif op in ("apply", "fail", "spend") and running is not None:
                out = c.round_applied(running[0], running[0]) if op == "apply" \
                    else c.round_failed(running[0]) if op == "fail" \
                    else c.round_spent(running[0], ContributionLost("spent"))
                if op in ("apply", "spend"):
                    assert all(s.sub is running[1] for s in out)
                running = None
            elif op == "replace":
                out = c.state_replaced(StateReplaced(0))
            for s in out:
                assert s.sub not in ended, (seed, s)
                ended[s.sub] = s
        assert c.settled == len(ended)
        assert all(s in ended or s in c.queue for s in subs)
