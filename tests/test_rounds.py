"""Membership and round agreement, driven with simulated time and no sockets.

Every scenario ends the way torchft's fault tests do: by asserting that all
peers that reached a step hold the same state there.
"""

from __future__ import annotations

from swarm_sim import Sim

from peerlearn.swarm import rounds as r


def views(sim, pid=None):
    return [(t, e[3]) for t, kind, p, *e in [(ev[0], ev[1], ev[2], ev[2], ev[3])
                                             for ev in sim.events]
            if kind == "view" and (pid is None or p == pid)]


def applied_rounds(sim):
    return [(t, p, s) for t, kind, p, s in sim.events if kind == "apply"]


def mid_round(quantifier) -> tuple[Sim, int]:
    """A swarm of 4 stopped while `quantifier` (any/all) of its peers run a collective."""
    sim = Sim(4, collective_time=0.5)
    sim.run(3)
    while not quantifier(p.core.active for p in sim.peers.values()):
        sim.run(sim.now + 0.01)
    return sim, sim.peers["p00"].core.active.round_id


def test_swarm_forms_and_advances_in_lockstep():
    sim = Sim(4)
    sim.run(10)
    steps = [p.step for p in sim.peers.values()]
    assert min(steps) >= 5, steps
    assert max(steps) - min(steps) <= 1
    assert sim.parity_violations() == []
    # Everyone ends in the same view of four.
    last = {p: v for _, kind, p, v in sim.events if kind == "view"}
    assert all(set(v) == set(sim.peers) for v in last.values())
    assert sim.rejected_wire == 0


def test_killed_peer_is_evicted_within_the_bound_and_the_swarm_goes_on():
    sim = Sim(4)
    sim.run(4)
    sim.kill("p02")
    t_kill = sim.now
    step_at_kill = sim.max_step()
    sim.run(12)
    survivors = ["p00", "p01", "p03"]
    assert sim.max_step(survivors) >= step_at_kill + 5
    first_view_without = min(t for t, kind, p, v in sim.events
                             if kind == "view" and t > t_kill and "p02" not in v)
    # dead_after + one gather + one round is the bound for this configuration.
    assert first_view_without - t_kill <= sim.t.dead_after + sim.t.gather + 1.0
    assert sim.parity_violations() == []


def test_killing_the_coordinator_costs_at_most_one_round():
    sim = Sim(4)
    sim.run(4)
    before = sim.max_step()
    sim.kill("p00")  # smallest id: the coordinator
    sim.run(12)
    survivors = ["p01", "p02", "p03"]
    assert sim.peers["p01"].core.is_coordinator(sim.now)
    assert min(sim.peers[p].step for p in survivors) >= before + 5
    assert sim.parity_violations() == []


def test_peer_killed_mid_collective_is_excluded_from_the_retry():
    # Kill p03 while a collective is in flight.
    sim, rid = mid_round(any)
    sim.kill("p03")
    sim.run(sim.now + 6)
    survivors = [sim.peers[p] for p in ("p00", "p01", "p02")]
    # The round in flight was aborted: nobody applied round `rid`.
    assert all(p.core.epoch != rid for p in survivors)
    assert all(p.core.epoch > rid for p in survivors)
    # The rounds after it ran among the survivors only.
    for p in survivors:
        assert "p03" not in p.core.members
    assert sim.parity_violations() == []


def test_hung_peer_is_evicted_like_a_dead_one():
    sim = Sim(3)
    sim.run(3)
    sim.stop("p01")  # SIGSTOP: sockets stay open, nothing is answered
    t0 = sim.now
    sim.run(t0 + sim.t.dead_after + sim.t.gather + 2)
    assert not sim.peers["p00"].core.alive("p01", sim.now)
    assert "p01" not in sim.peers["p00"].core.members
    assert sim.parity_violations() == []


def test_graceful_leave_is_seen_at_once():
    sim = Sim(3)
    sim.run(3)
    p = sim.peers["p02"]
    sim.run_actions(p, p.core.leave(sim.now))
    sim.run(sim.now + sim.latency * 1.5)  # the Leave is on its way; then the process exits
    sim.kill("p02")
    assert not sim.peers["p00"].core.alive("p02", sim.now)
    assert sim.peers["p00"].core.alive("p01", sim.now)


def test_partition_minority_never_advances_and_converges_after_healing():
    sim = Sim(5)
    sim.run(4)
    minority, majority = ["p00", "p01"], ["p02", "p03", "p04"]
    sim.partition(minority, majority)
    frozen = {p: sim.peers[p].step for p in minority}
    sim.run(14)
    assert {p: sim.peers[p].step for p in minority} == frozen  # not one step
    assert sim.max_step(majority) >= max(frozen.values()) + 5
    sim.heal()
    t_heal = sim.now
    sim.run(24)
    # Healed means taking part again, not just copying the majority's state.
    for p in minority:
        assert any(e[1] == "apply" and e[2] == p and e[0] > t_heal + 5 for e in sim.events), p
        assert set(sim.peers[p].core.members) == set(sim.peers), p
    states = {(p.step, p.state) for p in sim.peers.values()}
    steps = [p.step for p in sim.peers.values()]
    assert max(steps) - min(steps) <= 1, steps
    assert sim.parity_violations() == []
    # The old minority caught up by syncing, then took part in rounds again.
    assert all(any(e[1] == "sync" and e[2] == p for e in sim.events) for p in minority)
    assert len({s for s, _ in states}) <= 2


def test_even_split_stalls_both_sides():
    sim = Sim(4)
    sim.run(3)
    a, b = ["p00", "p01"], ["p02", "p03"]
    sim.partition(a, b)
    frozen = sim.max_step()
    sim.run(10)
    assert sim.max_step() <= frozen + 1  # at most the round already in flight


def test_joiner_syncs_without_stalling_the_swarm():
    sim = Sim(3)
    sim.run(4)
    sim.join("p09", via="p01")
    t_join = sim.now
    sim.run(12)
    others = ["p00", "p01", "p02"]
    # Nobody waited: the others' rounds kept their pace while p09 synced.
    applied_during = [t for t, p, s in applied_rounds(sim) if t_join < t < t_join + 1.0]
    assert applied_during
    j = sim.peers["p09"]
    assert any(e[1] == "sync" and e[2] == "p09" for e in sim.events)
    assert "p09" in sim.peers["p00"].core.members  # entered a later round
    assert abs(j.step - sim.max_step(others)) <= 1
    assert sim.parity_violations() == []


def test_coordinator_is_smallest_live_member():
    sim = Sim(3)
    sim.run(2)
    assert [p.core.coordinator(sim.now) for p in sim.peers.values()] == ["p00"] * 3


def test_proposal_from_a_non_coordinator_is_ignored():
    sim = Sim(3)
    sim.run(2)
    core = sim.peers["p02"].core
    before = core.rejected
    from peerlearn.wire import control as m
    out = core.receive(sim.now, "p01", m.Propose(999, 999, core.step, core.state_hash,
                                                 ("p01", "p02")))
    assert out == [] and core.rejected == before + 1


def test_churn_keeps_parity():
    import random

    rng = random.Random(7)
    sim = Sim(6)
    sim.run(3)
    next_id = 10
    for _ in range(12):
        live = [p for p in sim.peers if not sim.peers[p].killed]
        if len(live) > 4 and rng.random() < 0.6:
            sim.kill(rng.choice(live))
        else:
            sim.join(f"p{next_id:02d}", via=rng.choice(live))
            next_id += 1
        sim.run(sim.now + rng.uniform(1.0, 3.0))
    sim.run(sim.now + 8)
    assert sim.parity_violations() == []
    live = [p for p in sim.peers.values() if not p.killed]
    assert min(p.step for p in live) >= 10
    # The swarm never went long without completing a step.
    times = sorted(t for t, _, _ in applied_rounds(sim))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < sim.t.dead_after + sim.t.gather + sim.t.ack + 2


def test_timeouts_defaults_are_sane():
    t = r.Timeouts()
    assert t.heartbeat_every * 3 <= t.dead_after


def test_resuming_founder_waits_then_adopts_the_newest_state():
    from peerlearn.wire import control as m

    t = r.Timeouts(rejoin_grace=5.0)
    me = m.PeerInfo("a", "a:1", "a:2")
    core = r.RoundCore(me, t, founder=True, resuming=True)
    core.state_synced(3, b"\x03" * 8)
    core.tick(0.0)
    # Our own Ready does not start a round during the grace...
    out = core.local_ready(0.1, 3, b"\x03" * 8)
    assert not any(isinstance(a, r.Send) and isinstance(a.msg, m.Propose) for a in out)
    assert core.leading is None
    # ...and a peer that comes back with a newer state is where we resume from.
    b = m.PeerInfo("b", "b:1", "b:2")
    core.receive(1.0, "b", m.Heartbeat(0, 0, 0, 7, b"\x07" * 8, True, b))
    need = [a for a in core.tick(1.1) if isinstance(a, r.SyncNeeded)]
    assert need == [r.SyncNeeded(7, b"\x07" * 8, ("b",))]
    # A founder of a new swarm (nothing to resume) does not wait at all.
    fresh = r.RoundCore(me, t, founder=True)
    fresh.tick(0.0)
    out = fresh.local_ready(0.1, 0, r.ZERO_HASH)
    assert any(isinstance(a, r.StartCollective) for a in out)


def test_coordinator_killed_mid_round_successor_finishes_it():
    # Every participant has the Commit: the round is decided-to-run.
    sim, rid = mid_round(all)
    sim.kill("p00")  # coordinator and participant, its Done never comes
    sim.run(sim.now + sim.t.dead_after + sim.t.ack + 0.2)
    survivors = [sim.peers[p] for p in ("p01", "p02", "p03")]
    # p01 took the round over and ended it: nobody still holds it open, nobody applied it.
    assert all(p.core.observed is None and p.core.epoch != rid for p in survivors)
    sim.run(sim.now + 5)
    assert all(p.core.epoch > rid for p in survivors)
    assert sim.parity_violations() == []


def test_decision_missed_while_the_old_coordinator_seemed_alive_is_learned_later():
    """A participant that still hears its dead coordinator (a late message, a slow
    detector) rejects the successor's Abort; it must still learn the decision
    and take part in later rounds, not hold the round open forever."""
    from peerlearn.wire import control as m

    sim, rid = mid_round(all)
    sim.kill("p00")
    beat = m.Heartbeat(sim.peers["p00"].core.epoch, 0, 0, 0, r.ZERO_HASH, True,
                       sim.peers["p00"].core.me)
    # p03 keeps hearing p00 (delivered late) until well after p01 has decided.
    t_end = sim.now + sim.t.dead_after + 2 * sim.t.ack + 1.0  # suspicion.ACK_MISSES
    while sim.now < t_end:
        p3 = sim.peers["p03"]
        sim.run_actions(p3, p3.core.receive(sim.now, "p00", beat))
        sim.run(sim.now + sim.t.heartbeat_every)
    c = sim.peers["p01"].core.observed
    assert c is None or c.round_id > rid  # p01 ended the round (it may run a later one)
    stuck_at = {p: sim.peers[p].step for p in ("p01", "p02", "p03")}
    sim.run(sim.now + 8)
    # p03 learned the abort from the others' heartbeats, so the three of them
    # (a quorum of the view only with p03) go on together.
    assert all(sim.peers[p].step >= s + 5 for p, s in stuck_at.items())
    assert sim.peers["p03"].core.aborted >= rid
    assert sim.parity_violations() == []


def test_a_member_speaking_in_anothers_name_is_rejected():
    from peerlearn.wire import control as m

    me = m.PeerInfo("a", "a:1", "a:2")
    core = r.RoundCore(me, founder=True)
    forged = m.PeerInfo("c", "c:1", "c:2")
    for msg in (m.Heartbeat(0, 0, 0, 5, b"\x05" * 8, True, forged), m.Join(forged),
                m.Ready(5, b"\x05" * 8, forged)):
        assert core.receive(1.0, "b", msg) == []
    assert core.rejected == 3
    assert "c" not in core.known and "c" not in core.readies and "c" not in core.beats


def test_timeouts_scaled_to_a_dead_after():
    t = r.Timeouts.for_dead_after(10.0)
    assert t.dead_after == 10.0 and t.gather >= t.dead_after and t.heartbeat_every * 3 <= 10.0
    fast = r.Timeouts.for_dead_after(1.0)
    assert fast.heartbeat_every == 0.25 and fast.gather == 2.0


# ------------------------------------------------------------ leaving for good


def test_a_peer_that_leaves_shrinks_the_quorum_of_a_two_peer_swarm():
    sim = Sim(2)
    sim.run(3)
    sim.leave("p01")
    t_left = sim.now
    before = sim.max_step(["p00"])
    sim.run(sim.now + 3)
    # It was answered, recorded that it left, and the survivor dropped it.
    assert sim.peers["p01"].disk_record.departed
    assert [p.id for p in sim.peers["p01"].disk_record.members] == ["p00"]
    assert list(sim.peers["p00"].core.members) == ["p00"]
    assert [p.id for p in sim.peers["p00"].disk_record.members] == ["p00"]
    # The survivor applies rounds alone, soon after the leave.
    applies = [t for t, kind, p, s in sim.events if kind == "apply" and p == "p00" and s > before]
    assert applies and applies[0] - t_left < 1.0
    assert sim.max_step(["p00"]) >= before + 5
    assert sim.parity_violations() == []


def test_three_peers_two_leave_one_after_the_other_and_the_survivor_goes_on():
    sim = Sim(3)
    sim.run(3)
    sim.leave("p00")  # the coordinator
    sim.run(sim.now + 1)
    sim.leave("p02")
    sim.run(sim.now + 1)
    before = sim.max_step(["p01"])
    sim.run(sim.now + 3)
    assert sim.max_step(["p01"]) >= before + 5
    assert list(sim.peers["p01"].core.members) == ["p01"]
    assert sim.parity_violations() == []


def test_killed_peers_do_not_shrink_the_quorum_and_the_survivor_names_them():
    sim = Sim(3)
    sim.run(3)
    sim.kill("p00")
    sim.kill("p02")
    sim.run(sim.now + 1)
    before = sim.max_step(["p01"])
    sim.run(sim.now + 3)
    core = sim.peers["p01"].core
    assert sim.max_step(["p01"]) <= before + 1  # the round in flight at most
    assert core.unreachable_voters(sim.now) == ["p00", "p02"]
    assert core.quorum_needed == 2


def test_a_swarm_stopping_all_at_once_keeps_its_view_and_restarts():
    sim = Sim(2)
    sim.run(3)
    sim.leave("p00")
    sim.leave("p01")  # nobody stays to answer: neither departs
    sim.run(sim.now + 1)
    assert not any(sim.peers[p].disk_record.departed for p in ("p00", "p01"))
    assert all(len(sim.peers[p].disk_record.members) == 2 for p in ("p00", "p01"))
    before = sim.max_step()
    sim.restart("p00", via=None)
    sim.restart("p01", via=None)
    sim.run(sim.now + 4)
    assert min(sim.peers[p].step for p in ("p00", "p01")) >= before + 3
    assert sim.parity_violations() == []


def test_departed_peers_restarted_behind_a_partition_cannot_outvote_the_survivors():
    # 7 peers; 4 leave for good at once; the 3 survivors' quorum is 2. One
    # survivor, p02, is cut off while they leave and hears none of it: the
    # old 7 are still its view, at the epoch the leavers left. The 4 restart
    # (from their records) cut off from the two other survivors but beside
    # p02: that side holds 5 of p02's 7, yet only p02's vote counts there
    # (the others say `departed`).
    sim = Sim(7)
    sim.run(3)
    leavers = ("p03", "p04", "p05", "p06")
    while any(p.core.active for p in sim.peers.values()):
        sim.run(sim.now + 0.01)  # between rounds: nobody applies one while they leave
    sim.partition({"p02"}, set(sim.peers) - {"p02"})
    for p in leavers:
        sim.leave(p)
    sim.run(sim.now + 1)
    assert all(sim.peers[p].disk_record.departed for p in leavers)
    assert len(sim.peers["p02"].core.members) == 7
    assert {sim.peers[p].disk_record.epoch for p in leavers} == {sim.peers["p02"].core.epoch}
    sim.heal()
    side = {"p03", "p04", "p05", "p06", "p02"}
    sim.partition(side, set(sim.peers) - side)
    for p in leavers:
        sim.restart(p, via=None)
    cut_at = sim.max_step()
    sim.run(sim.now + 6)
    assert sim.max_step(sorted(side)) <= cut_at + 1  # the round in flight at most
    assert sim.max_step(["p00", "p01"]) >= cut_at + 5  # the majority of the voters goes on
    assert sim.parity_violations() == []
    sim.heal()
    sim.run(sim.now + 8)
    assert sim.parity_violations() == []
    steps = [p.step for p in sim.peers.values()]
    assert max(steps) - min(steps) <= 1, steps
    # The departed peers came back through a round: they vote again.
    assert not any(sim.peers[p].core.departed for p in leavers)


# ------------------------------------------------------------ poisoned rounds


def test_a_member_poisoning_every_round_is_found_and_left_out():
    """Issue 16, case 5: one member's contribution makes every mean fail the
    check. The coordinator traces it by leaving half of the suspects out of
    each round (group testing under the quorum rule), excludes it, and the
    others apply rounds without it."""
    sim = Sim(7)
    sim.run(3)
    sim.peers["p05"].poison = True
    before = sim.max_step(["p00"])
    sim.run(sim.now + 8)
    core = sim.peers["p00"].core  # the coordinator
    assert core.excluded_now("p05", sim.now) and core.exclusions == 1
    assert not any(core.excluded_now(p, sim.now) for p in sim.peers if p != "p05")
    honest = [p for p in sim.peers if p != "p05"]
    assert sim.max_step(honest) >= before + 10
    assert sim.parity_violations() == []
    # It stops poisoning: after its cooldown it takes part again.
    sim.peers["p05"].poison = False
    sim.run(sim.now + 65)
    assert not core.excluded_now("p05", sim.now)
    assert sim.peers["p05"].step >= sim.max_step() - 1


def test_a_clean_round_with_every_suspect_clears_them():
    sim = Sim(3)
    sim.run(3)
    core = sim.peers["p00"].core
    core.suspects = {"p01", "p02"}
    core._learn_from_round(sim.now, ("p00", "p01", "p02"), applied=True, poisoned=False)
    assert core.suspects == set() and core.exclusions == 0


def test_a_joiner_whose_first_view_lacks_the_new_leader_still_enters():
    """A joiner's contact answered with the view of the moment, just before a
    new member that sorts first (the next leader) entered it. The leader never
    heard of the joiner, the joiner never heard the leader, and every later
    view naming the leader was refused as naming a peer nobody runs: the
    joiner fetched the state at every step and never entered (seen with 4
    peers over a 100 ms path). It now introduces itself to the members it
    never heard (welcoming._introduce) and takes the view."""
    sim = Sim(2)
    sim.run(3)
    sim.join("a00", via="p00")  # sorts first: leads once it is in the view
    sim.run(sim.now + 0.5)
    sim.join("p03", via="p01")
    sim.run(sim.now + 20)
    assert sim.peers["p00"].core.coordinator(sim.now) == "a00"
    assert sorted(sim.peers["p03"].core.members) == ["a00", "p00", "p01", "p03"]
    assert applied_rounds(sim)  # and rounds went on
    assert sim.parity_violations() == []


def test_a_joiner_introduces_itself_to_the_members_without_asking_each_for_the_view():
    """Once welcomed, a joiner tells every other member who it is (so they
    heartbeat it); they answer nothing. Each used to answer with the whole
    view: N Welcomes of N members per joiner, 69 MB at 1,024."""
    from collections import Counter

    from peerlearn.wire import control as m

    sim = Sim(8)
    sim.run(4)
    counts: Counter = Counter()
    deliver = sim._deliver

    def counting(src, dst, data):
        msg = m.decode(data)
        counts[(type(msg).__name__, getattr(msg, "introduce", None))] += 1
        deliver(src, dst, data)

    sim._deliver = counting
    sim.join("p08", via="p03")
    sim.run(sim.now + 5)
    assert "p08" in sim.peers["p00"].core.members
    assert counts[("Join", True)] == 7  # one to each member but its contact
    # Only the contact answers, once per Join the joiner sent it (the sim,
    # like the daemon, asks again until a view comes).
    assert counts[("Welcome", None)] == counts[("Join", False)] <= 3
    assert sim.parity_violations() == []
