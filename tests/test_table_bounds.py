"""The round logic's per-peer tables stay bounded under a member that mints ids.

A member holding the secret can name as many ids as it likes (a Join or a
heartbeat each, or the members of a Commit it sends as coordinator), and
every member that leaves for good leaves an entry behind. Driven with
injected time and no sockets, as tests/test_rounds.py does.
"""

from __future__ import annotations

from swarm_sim import Sim

from peerlearn.swarm import rounds as r
from peerlearn.swarm import welcoming
from peerlearn.wire import control as m

T = r.Timeouts(heartbeat_every=0.1, dead_after=0.6, gather=1.0, ack=0.5, collective=5.0)
H = b"\x05" * 8


def info(pid: str) -> m.PeerInfo:
    return m.PeerInfo(pid, f"{pid}:1", f"{pid}:2")


def beat(pid: str, epoch: int = 3) -> m.Heartbeat:
    return m.Heartbeat(epoch, 0, epoch, 5, H, True, info(pid))


def member_core(n_members: int = 3, epoch: int = 3) -> r.RoundCore:
    """"a", a founder whose record holds a view of n_members (a, b, c, ...)."""
    ids = ["a", "b", "c"][:n_members] + [f"v{i:04d}" for i in range(n_members - 3)]
    record = r.Applied(epoch, tuple(info(i) for i in ids), epoch, epoch, 5, H)
    core = r.RoundCore(info("a"), T, founder=True, step=5, state_hash=H, record=record)
    for i in ids[1:]:
        core.receive(1.0, i, beat(i, epoch))
    return core


def assert_bounded(core: r.RoundCore) -> None:
    # MAX_KNOWN ids besides the view's (I am never in `seen`).
    assert len(core.seen) <= r.MAX_KNOWN + len(set(core.members) - {core.me.id})
    tracked = set(core.seen) | {core.me.id}
    for table in (core.known, core.last_heard, core.beats, core.beat_at, core.readies):
        assert set(table) <= tracked
    assert core.left <= tracked


def test_a_flood_of_invented_ids_is_capped_and_counted():
    core = member_core()
    view = dict(core.members)
    n = 3 * r.MAX_KNOWN
    welcomes = 0
    for i in range(n):
        pid = f"x{i:05d}"
        msg = beat(pid) if i % 2 else m.Join(info(pid))
        out = core.receive(1.0 + i * 1e-5, pid, msg)
        welcomes += sum(isinstance(a, r.Send) and isinstance(a.msg, m.Welcome) for a in out)
        assert_bounded(core)
    outsiders = set(core.seen) - set(core.members)
    assert len(outsiders) == r.MAX_KNOWN
    assert core.refused_unknown == n - len(outsiders)
    assert welcomes <= len(outsiders)  # a refused Join is not answered
    # The view and its members' addresses are untouched.
    assert core.members == view and all(i in core.known for i in view)
    # We heartbeat a bounded number of peers.
    sends = [a for a in core.tick(1.1) if isinstance(a, r.Send)]
    assert len(sends) <= r.MAX_KNOWN + len(core.members)
    # A member is heard whatever the table holds.
    refused = core.refused_unknown
    core.receive(1.2, "b", beat("b"))
    assert core.last_heard["b"] == 1.2 and core.refused_unknown == refused


def test_silent_ids_make_room_after_dead_after_and_live_ones_keep_theirs():
    core = member_core()
    for i in range(r.MAX_KNOWN):
        core.receive(1.0, f"x{i:05d}", beat(f"x{i:05d}"))
    assert core.receive(1.1, "late", beat("late")) == [] and "late" not in core.seen
    # Half the ids keep heartbeating; the other half, and b and c (members),
    # fall silent.
    t = 1.0
    while t < 1.0 + 2 * T.dead_after:
        t += T.heartbeat_every
        for i in range(0, r.MAX_KNOWN, 2):
            core.receive(t, f"x{i:05d}", beat(f"x{i:05d}"))
        core.tick(t)
    assert all(f"x{i:05d}" in core.known for i in range(0, r.MAX_KNOWN, 2))
    assert not any(f"x{i:05d}" in core.seen for i in range(1, r.MAX_KNOWN, 2))
    # Silent view members are dead to the detector, never forgotten.
    assert {"b", "c"} <= set(core.known) & set(core.last_heard) and set(core.members) == {
        "a", "b", "c"}
    assert not core.alive("b", t)
    core.receive(t, "late", beat("late"))
    assert "late" in core.known
    assert_bounded(core)


def test_below_the_cap_a_silent_outsider_is_kept_for_ten_dead_afters():
    core = member_core()
    core.receive(1.0, "j", beat("j"))
    core.tick(1.0 + 5 * T.dead_after)
    assert "j" in core.known
    core.tick(1.1 + 10 * T.dead_after)
    assert "j" not in core.known and "j" not in core.seen


def test_a_member_never_heard_ages_out_once_a_round_leaves_it_out():
    # c is in our recorded view but never spoke; a round without it applies.
    view = (info("a"), info("b"), info("c"))
    core = r.RoundCore(info("b"), T, founder=True, step=5, state_hash=H,
                       record=r.Applied(3, view, 3, 3, 5, H))
    core.receive(1.0, "a", beat("a"))
    assert "c" in core.known and "c" not in core.seen
    core.receive(1.1, "a", m.Commit(4, 4, 5, ("a",), (info("a"),)))
    core.receive(1.2, "a", m.Apply(4))
    assert set(core.members) == {"a"}
    t = 1.2
    while t < 1.5 + 10 * T.dead_after:
        t += T.heartbeat_every
        core.receive(t, "a", beat("a", 4))
        core.tick(t)
    assert "c" not in core.known and "c" not in core.seen and "a" in core.known


def test_names_in_a_commit_are_capped_and_the_view_it_applies_is_known():
    # b's view: a (the coordinator), b (me), c. Its table is full of minted ids.
    core = r.RoundCore(info("b"), T, founder=True, step=5, state_hash=H,
                       record=r.Applied(3, (info("a"), info("b"), info("c")), 3, 3, 5, H))
    for i in ("a", "c"):
        core.receive(1.0, i, beat(i))
    for i in range(r.MAX_KNOWN):
        core.receive(1.0, f"x{i:05d}", beat(f"x{i:05d}"))
    refused = core.refused_unknown
    # The coordinator commits a round with a joiner j we never heard, and names
    # more ids than the table has room for.
    names = (info("a"), info("c"), info("j")) + tuple(info(f"y{i}") for i in range(500))
    assert core.receive(1.1, "a", m.Commit(4, 4, 5, ("a", "c", "j"), names)) == []
    assert core.refused_unknown >= refused + 500 and "j" not in core.known
    assert_bounded(core)
    # Applied: j is a member now, and we know where to reach it; the names
    # that took no part in the round are in no view.
    out = core.receive(1.2, "a", m.Apply(4))
    assert any(isinstance(a, r.ViewChanged) for a in out)
    assert set(core.members) == {"a", "c", "j"} and core.known["j"] == info("j")
    assert "j" in core.last_heard
    assert_bounded(core)


def test_a_swarm_flooded_with_minted_ids_keeps_applying_rounds(monkeypatch):
    # A smaller cap keeps the simulation quick; the rule is the same.
    monkeypatch.setattr(welcoming, "MAX_KNOWN", 64)
    sim = Sim(3, timeouts=T)
    sim.run(3)
    before = sim.max_step()
    minted = iter(range(10**9))

    def flood():
        # A member names 40 fresh ids to every peer every 50 ms, each heartbeating once.
        for _ in range(40):
            pid = f"x{next(minted):09d}"
            for dst in sim.peers:
                sim.forge(pid, dst, beat(pid, 0))
        if sim.now < 14:
            sim.at(0.05, flood)

    flood()
    sim.run(15)
    assert next(minted) > 10 * 64
    for p in sim.peers.values():
        assert set(p.core.members) == set(sim.peers)
        assert len(set(p.core.seen) - set(p.core.members)) <= 64
        assert p.core.refused_unknown > 0
    assert sim.max_step() >= before + 10
    assert min(p.step for p in sim.peers.values()) >= sim.max_step() - 1
    assert sim.parity_violations() == []


# ------------------------------------------------------------ departed peers


def test_departures_are_capped_oldest_first():
    n = r.MAX_DEPARTED + 200
    core = member_core(n_members=n + 1, epoch=5)
    leavers = sorted(set(core.members) - {"a"})[:n]
    for i, p in enumerate(leavers):
        # Liars: a round id past every round, so no applied round ever makes
        # their entries inert.
        core.receive(2.0 + i * 1e-4, p, m.Leave(True, 1 << 61))
        assert len(core.departed_peers) <= r.MAX_DEPARTED
    assert list(core.departed_peers) == leavers[-r.MAX_DEPARTED:]
    assert set(core.members) == {"a"} and core.voters() == {"a"}


def test_a_departure_below_our_epoch_is_dropped_at_once_as_inert():
    core = member_core(n_members=4, epoch=5)
    core.receive(2.0, "b", m.Leave(True, 4))  # took part in nothing we may still apply
    core.receive(2.1, "c", m.Leave(True, 7))  # round 7 may yet apply here: kept
    assert "b" not in core.departed_peers and core.departed_peers["c"] == 7
    assert "b" not in core.members and "c" not in core.members
    assert core.voters() == set(core.members) == {"a", "v0000"}


def test_an_entry_for_a_member_outlives_the_cap():
    core = member_core(n_members=r.MAX_DEPARTED + 20, epoch=5)
    core.receive(2.0, "b", m.Leave(True, 9))
    # A view naming b again (a Welcome from a round b acked before it left):
    # b must not vote in it.
    core.members["b"] = info("b")
    assert "b" not in core.voters()
    for i, p in enumerate(sorted(set(core.members) - {"a", "b"})):
        core.receive(3.0 + i * 1e-4, p, m.Leave(True, 1 << 61))
    assert len(core.departed_peers) <= r.MAX_DEPARTED
    assert core.departed_peers["b"] == 9 and "b" not in core.voters()


def test_a_commit_from_before_a_leave_does_not_bring_the_leaver_back():
    # The rule the departed entries exist for still holds beside the pruning.
    view = tuple(info(i) for i in "abcde")
    core = r.RoundCore(info("b"), T, founder=True, step=5, state_hash=H,
                       record=r.Applied(5, view, 5, 5, 5, H))
    for i in "acde":
        core.receive(2.0, i, beat(i, 5))
    core.receive(2.1, "a", m.Commit(6, 6, 5, ("a", "c", "d"), (info("a"), info("c"), info("d"))))
    assert core.observed is not None
    core.receive(2.2, "c", m.Leave(True, 6))  # acked round 6, then left
    core.receive(2.3, "e", m.Leave(True, 2))  # took part in nothing still open: pruned
    assert core.departed_peers == {"c": 6}
    core.receive(2.4, "a", m.Apply(6))
    assert core.epoch == 6 and set(core.members) == {"a", "d"}


def test_a_view_naming_many_unheard_ids_costs_a_few_introductions():
    """A stale member asks a member for the view (its heartbeat shows a later
    epoch); a liar answers with a view keeping ours plus 500 ids nobody runs.
    It is refused (they are unheard), and we introduce ourselves to at most
    MAX_INTRODUCTIONS of them (a Join each), so that a real member we never
    heard could start heartbeating us."""
    core = member_core()
    out = core.receive(1.1, "b", beat("b", epoch=9))
    assert [type(a.msg) for a in out] == [m.Join] and core.view_asked_of == "b"
    fake = tuple(info(f"x{i:04d}") for i in range(500))
    welcome = m.Welcome(9, 6, (info("a"), info("b"), info("c")) + fake)
    out = core.receive(1.2, "b", welcome)
    joins = [a for a in out if isinstance(a.msg, m.Join)]
    assert 0 < len(joins) <= welcoming.MAX_INTRODUCTIONS
    assert core.epoch == 3 and sorted(core.members) == ["a", "b", "c"]
    assert_bounded(core)
