"""The fast Commit (issue 18): a round that repeats the last one its
coordinator led, among the same participants, commits without a Propose and
its Acks (one round trip fewer), and a participant that cannot take part
refuses it at once instead of leaving the others to time out."""

from __future__ import annotations

from collections import Counter

from swarm_sim import Sim

from peerlearn.wire import control as m


def count_messages(sim: Sim) -> Counter:
    counts: Counter = Counter()
    deliver = sim._deliver

    def counting(src, dst, data):
        counts[type(m.decode(data)).__name__] += 1
        deliver(src, dst, data)

    sim._deliver = counting
    return counts


def applied_steps(sim, t0, pid="p00"):
    return [e[3] for e in sim.events if e[1] == "apply" and e[2] == pid and e[0] > t0]


def test_steady_rounds_go_without_propose_or_ack():
    sim = Sim(4)
    sim.run(3)  # the view formed: every round from here repeats the last
    counts = count_messages(sim)
    t0 = sim.now
    sim.run(t0 + 5)
    assert len(applied_steps(sim, t0)) >= 10
    assert counts["Propose"] == 0 and counts["Ack"] == 0, counts
    assert counts["Commit"] >= 10 * 3
    assert counts["Abort"] == 0
    assert sim.parity_violations() == []
    # Every round after the first of a view is fast; the first one proposes.
    sim.join("p04", via="p01")
    t1 = sim.now
    sim.run(t1 + 5)
    assert counts["Propose"] >= 1
    assert "p04" in sim.peers["p00"].core.members
    assert len(applied_steps(sim, t1, "p04")) >= 5
    assert sim.parity_violations() == []


def test_a_participant_that_cannot_take_part_refuses_the_fast_commit_at_once():
    """Its failed Done aborts the round within a message hop or two, not after
    the collective timeout (5 s here); the next round goes through Propose,
    whose ack timeout leaves the refuser out if it still cannot, and rounds
    go on."""
    sim = Sim(4)
    sim.run(3)
    counts = count_messages(sim)
    refuser = sim.peers["p02"].core
    refuser._may_ack = lambda now, sender, msg: False  # e.g. its state moved under it
    t0 = sim.now
    sim.run(t0 + 0.5)
    assert counts["Abort"] >= 1
    assert refuser.rejected >= 1
    del refuser._may_ack
    sim.run(sim.now + 5)
    assert counts["Propose"] >= 1
    assert len(applied_steps(sim, t0)) >= 8
    assert sim.parity_violations() == []


def test_fast_commit_round_trips_the_wire():
    c = m.Commit(9, 9, 4, ("a", "b"), (m.PeerInfo("a", "h:1", "h:2"),
                                       m.PeerInfo("b", "h:3", "h:4")), b"\x01" * 8, True)
    assert m.decode(m.encode(c)) == c
