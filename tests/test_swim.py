"""SWIM membership (peerlearn/swarm/swim.py) in simulated time: detection
within the stated bound, refutation by a slow member, O(1) messages a
period, bounded tables, the wire decoder, and a property test over random
schedules of crashes, lossy, cut and slow links."""

from __future__ import annotations

import os
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarm_sim import SwimNet

from peerlearn.swarm import swim as s
from peerlearn.wire import swim as w
from peerlearn.wire.control import MessageError

CFG = s.SwimConfig()
SCHEDULES = int(os.environ.get("PEERLEARN_SIM_SCHEDULES", "40"))


def ids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]


class Log:
    """Every view change: (t, observer, Changed)."""

    def __init__(self):
        self.events: list = []

    def __call__(self, t, who, c):
        self.events.append((t, who, c))

    def about(self, member, state=None):
        return [(t, who, c) for t, who, c in self.events
                if c.member == member and (state is None or c.state == state)]


def swarm(n: int, seed: int = 0, cfg=CFG, **kw) -> tuple[SwimNet, Log, list[str]]:
    log = Log()
    net = SwimNet(latency=0.05, seed=seed, config=cfg, observe=log, **kw)
    members = ids(n)
    for i in members:
        net.add(i, known=members)
    return net, log, members


def detection_bound(n: int, cfg=CFG) -> float:
    """The docstring's deterministic bound: two round-robin passes, one
    period of probing, the longest suspicion timeout (no local health)."""
    return (2 * (n - 1) + 1) * cfg.period + cfg.suspicion_max(n)


def check_confirms_waited(log: Log, cfg=CFG) -> None:
    """Every DEAD a member confirmed itself came after it had held that
    member SUSPECT, at the same incarnation and with nothing newer in
    between, for at least the shortest suspicion timeout."""
    held: dict[tuple[str, str], tuple[float, int]] = {}
    for t, who, c in log.events:
        key = (who, c.member)
        if c.state == "suspect":
            held[key] = (t, c.incarnation)
        elif c.state == "dead" and c.by_me:
            since, inc = held[key]
            assert inc == c.incarnation
            assert t - since >= cfg.suspicion_mult * cfg.period - 1e-9
            del held[key]
        else:
            held.pop(key, None)


# ---------------------------------------------------------------- detection


def test_crashed_member_confirmed_by_every_live_member_within_the_bound():
    n = 16
    net, log, members = swarm(n, seed=1)
    net.run(20)
    victim = members[5]
    net.kill(victim)
    net.run(20 + detection_bound(n) + 1)
    seen = {who: t - 20 for t, who, c in log.about(victim, "dead")}
    live = [i for i in net.live()]
    assert set(seen) >= set(live)
    assert max(seen.values()) <= detection_bound(n)
    # In practice: the shortest timeout, a few periods to be probed, and
    # the gossip's spread (16 members: 4.8 s minimum).
    assert max(seen.values()) < CFG.suspicion_min(n) + 6 * CFG.period
    assert min(seen.values()) >= CFG.suspicion_min(n)
    check_confirms_waited(log)
    # Nobody else was ever suspected.
    assert all(c.member == victim for _, _, c in log.events)


def test_a_stalling_member_refutes_and_is_never_confirmed_dead():
    """A member that stalls now and then (what it sends in a 3 s stall comes
    2 s late, as from a process paused or starved) misses probes and is
    suspected; it hears so on the next probe of it (the buddy record),
    refutes, and is never confirmed dead. (One whose every answer takes
    longer than the period is a failed member to SWIM: docstring, 2.)"""
    n = 12
    net, log, members = swarm(n, seed=2)
    slow = members[4]
    t = 5.0
    net.run(t)
    for _ in range(4):
        net.slow[slow] = 2.0
        net.run(t + 3)
        del net.slow[slow]
        net.run(t + 15)
        t += 15
    assert log.about(slow, "suspect"), "its probes failed: others suspected it"
    assert not log.about(slow, "dead")
    assert net.members[slow].incarnation >= 1  # it refuted
    assert not [e for e in log.events if e[2].state == "dead"]
    check_confirms_waited(log)
    net.run(t + 30)
    for i in net.live():
        m = net.members[i]
        assert all(m.state_of(j) == "alive" for j in members if j != i)
        assert m.health == 0


def test_local_health_stretches_a_slow_members_timeouts():
    """A member whose every message comes a period late fails its probes
    without the Nacks it asked for: its local health multiplier rises and
    stretches its period and probe timeout, so it accuses fewer healthy
    members than it would with the multiplier off."""
    def accusations(cfg):
        net, log, members = swarm(8, seed=12, cfg=cfg)
        slow = members[2]
        net.run(3)
        net.slow[slow] = 1.2
        seen = []
        for t in range(4, 120):
            net.run(t)
            seen.append(net.members[slow].health)
        return len([1 for _, who, c in log.events if who == slow and c.state == "suspect"
                    and c.member != slow]), max(seen)

    with_health, top = accusations(CFG)
    without, _ = accusations(s.SwimConfig(max_health=0))
    assert top >= 1
    assert with_health < without * 0.75


def test_a_late_stale_suspicion_is_checked_with_the_suspect():
    """A suspicion that reaches a member after the refutation's gossip has
    run out (here: injected) would run to DEAD; the member asks the suspect
    once, halfway through the timeout, and the suspect's Ack refutes it."""
    n = 64
    net, log, members = swarm(n, seed=11)
    a, x, b = members[1], members[2], members[3]
    net.run(3)
    net.members[x].incarnation = 1  # it refuted long ago; everyone but a knows
    for i in members:
        if i not in (a, x):
            net.members[i].know(net.now, x, net.addrs[x], 1)
    stale = w.Ping(1, (w.Update(w.SUSPECT, x, 0, by=b),))
    net._run(a, net.members[a].receive(net.now, b, stale))
    t0 = net.now
    assert net.members[a].state_of(x) == "suspect"
    timeout = CFG.suspicion_timeout(n, 0)
    net.run(t0 + timeout + 5)
    back = [t for t, who, c in log.about(x, "alive") if who == a and c.incarnation == 1]
    assert back and back[0] - t0 <= timeout / 2 + 1
    assert not log.about(x, "dead")


def test_a_member_that_leaves_is_left_everywhere_at_once():
    net, log, members = swarm(10, seed=3)
    net.run(5)
    net.leave(members[2])
    net.run(8)
    for i in net.live():
        assert net.members[i].state_of(members[2]) == "left"
    # A probe already under way when LEFT arrived may have suspected it; LEFT
    # outranks that, and nobody confirms it dead.
    assert not log.about(members[2], "dead")


def test_a_joiner_is_known_everywhere_and_knows_everyone():
    net, log, members = swarm(32, seed=4)
    net.run(5)
    new = "ff" * 16
    net.add(new, via=[members[7]])
    net.run(5 + 15)
    for i in net.live():
        assert net.members[i].state_of(new) == "alive"
    assert sorted(net.members[new].members()) == members
    assert not [e for e in log.events if e[2].state != "alive"]


def test_a_joiner_that_gossip_misses_is_told_by_its_own_probes():
    """With updates sent only twice by each member, gossip alone misses
    some members; the joiner's Pings carry its ALIVE until acked, so every
    member knows it within a pass of its round robin."""
    cfg = s.SwimConfig(retransmit_mult=1)
    n = 48
    net, log, members = swarm(n, seed=9, cfg=cfg)
    net.run(3)
    new = "ee" * 16
    net.add(new, via=[members[0]])
    net.run(3 + 8)
    missed = [i for i in members if net.members[i].state_of(new) is None]
    net.run(3 + (n + 2) * cfg.period * 2)
    assert all(net.members[i].state_of(new) == "alive" for i in members)
    assert missed  # gossip alone had not reached these 8 s in; none is left now
    assert all(net.members[new].table[i].told == 0 for i in members)


def test_a_restarted_member_goes_past_its_old_incarnation():
    """A member that crashed and comes back (fresh state, incarnation 0,
    same id) hears from its seed what the swarm held about it, DEAD at
    some incarnation, and comes back above it."""
    n = 10
    net, log, members = swarm(n, seed=10)
    x = members[3]
    net.run(5)
    net.kill(x)
    net.run(5 + detection_bound(n))
    assert all(net.members[i].state_of(x) == "dead" for i in net.live())
    t = net.now
    net.add(x, via=[members[0]])
    net.run(t + 10)
    assert net.members[x].incarnation >= 1
    assert all(net.members[i].state_of(x) == "alive" for i in net.live() if i != x)
    assert sorted(net.members[x].members()) == sorted(set(members) - {x})


def test_a_healed_partition_brings_the_wrongly_dead_back():
    n = 8
    net, log, members = swarm(n, seed=5)
    a, b = members[:3], members[3:]
    net.run(5)
    for x in a:
        for y in b:
            net.cut |= {(x, y), (y, x)}
    net.run(5 + 60)
    assert all(net.members[x].state_of(y) == "dead" for x in a for y in b)
    net.cut.clear()
    # Each side probes the other's kept dead entries (one every reprobe_every
    # periods): the buddy record makes them refute, and the refutation spreads.
    net.run(65 + 2 * n * CFG.reprobe_every * CFG.period)
    for x in members:
        assert all(net.members[x].state_of(y) == "alive" for y in members if y != x), x
    check_confirms_waited(log)


def test_same_seed_same_actions():
    def trace():
        net, log, members = swarm(12, seed=6)
        net.run(10)
        net.kill(members[1])
        net.run(40)
        return [(round(t, 9), who, c) for t, who, c in log.events], net.sent_b

    assert trace() == trace()


# ---------------------------------------------------------------- cost


@pytest.mark.parametrize("n", [8, 64, 256])
def test_messages_a_period_do_not_grow_with_the_swarm(n):
    net, log, members = swarm(n, seed=7, decode=True)
    net.run(5)
    net.counting = True
    for d in (net.sent_b, net.sent_n, net.recv_b, net.recv_n, net.by_type):
        d.clear()
    span = 40.0
    net.run(5 + span)
    sent = [net.sent_n.get(i, 0) / span for i in members]
    got = [net.recv_n.get(i, 0) / span for i in members]
    # One Ping out and one Ack back, one Ping in and one Ack out, a period.
    assert 1.9 <= sum(sent) / n <= 2.1
    assert max(sent) <= 4 and max(got) <= 6
    # Nothing to piggyback in a quiet swarm: a few bytes a message.
    per_msg = sum(net.sent_b.values()) / sum(net.sent_n.values())
    assert per_msg <= 10
    assert not [e for e in log.events if e[2].state != "alive"]


def test_bytes_a_message_are_bounded_under_churn():
    """Every update slot full: a message stays within the stated bound."""
    cfg = CFG
    ups = tuple(w.Update(w.ALIVE, f"{i:032x}", 2**32 - 1, "255.255.255.255:65535")
                for i in range(cfg.max_piggyback))
    for msg in (w.Ping(2**32 - 1, ups), w.Ack(2**32 - 1, ups),
                w.PingReq(2**32 - 1, "ab" * 16, ups)):
        assert len(w.encode(msg)) <= 26 + cfg.max_piggyback * 47 == 402
    sus = w.Update(w.SUSPECT, "ab" * 16, 2**32 - 1, by="cd" * 16)
    assert len(w.encode(w.Ping(1, (sus,) * cfg.max_piggyback))) <= 8 + cfg.max_piggyback * 43


def test_each_update_is_sent_a_bounded_number_of_times():
    """lambda log n: each member sends the DEAD of a crashed member at most
    retransmits(n) times, and its SUSPECT at most that for each suspector it
    carries (the first and up to `confirmations` more), besides the buddy
    copy on its own probes of the suspect."""
    n = 64
    net, log, members = swarm(n, seed=8)
    victim = members[9]
    net.run(5)
    sent: dict[tuple[str, int], int] = {}
    orig = net._send

    def count(src, dst, msg):
        if dst != victim:
            for u in getattr(msg, "updates", ()):
                if u.member == victim:
                    sent[src, u.state] = sent.get((src, u.state), 0) + 1
        orig(src, dst, msg)

    net._send = count
    net.kill(victim)
    net.run(5 + detection_bound(n))
    limit = CFG.retransmits(n)
    assert max(v for (_, state), v in sent.items() if state == w.DEAD) <= limit
    assert max(v for (_, state), v in sent.items() if state == w.SUSPECT) <= \
        limit * (CFG.confirmations + 1)
    # And it did spread: every live member sent both.
    for state in (w.SUSPECT, w.DEAD):
        assert len([1 for (_, x) in sent if x == state]) >= n - 2


# ---------------------------------------------------------------- bounds


def test_a_stranger_cannot_grow_state_without_bound():
    cfg = s.SwimConfig(max_members=64, max_queue=32, max_relays=4)
    m = s.SwimMember("aa" * 16, "10.0.0.1:7400", 0.0, random.Random(0), cfg)
    now = 0.0
    answers = 0
    for i in range(2000):
        now += 0.001
        mid = f"{i + 1:032x}"
        out = m.receive(now, mid, w.Join(0, f"10.1.{i % 250}.1:7400"))
        answers += sum(isinstance(a.msg, w.Members) for a in out if isinstance(a, s.Send))
        ups = tuple(w.Update(w.ALIVE, f"{10**6 + i * 8 + k:032x}", k, "x:1") for k in range(8))
        m.receive(now, mid, w.Ping(i, ups))
        m.receive(now, mid, w.PingReq(i, f"{(i % 60) + 1:032x}", ups))
        m.tick(now)
        assert len(m.table) <= cfg.max_members
        assert m.queue_len() <= cfg.max_queue
        assert m.relays_len() <= cfg.max_relays
    # At most max_syncs_per_period table answers a period (2 s here).
    assert answers <= (now / cfg.period + 1) * cfg.max_syncs_per_period * 1
    # Updates about itself from a stranger: it only raises its incarnation.
    m.receive(now, "bb" * 16, w.Ping(1, (w.Update(w.DEAD, m.me, 2**64 - 1),)))
    assert m.incarnation == 2**64 - 1
    assert w.decode(w.encode(w.Ack(1, m._piggyback("bb" * 16)))) is not None


def test_config_rejects_a_probe_timeout_without_room_for_indirect_probes():
    with pytest.raises(ValueError):
        s.SwimConfig(period=1.0, probe_timeout=0.8)


# ---------------------------------------------------------------- wire


def roundtrips():
    ups = (w.Update(w.ALIVE, "ab" * 16, 3, "10.0.0.1:7400"),
           w.Update(w.SUSPECT, "peer-x", 4, by="cd" * 16),
           w.Update(w.DEAD, "ef" * 16, 5), w.Update(w.LEFT, "Z", 0))
    return [w.Ping(0, ()), w.Ping(7, ups), w.Ack(2**32 - 1, ups[:2]),
            w.PingReq(9, "01" * 16, ups), w.Nack(3), w.Join(2**64 - 1, "h:1"),
            w.Members(0, 2, (w.Update(w.SUSPECT, "ab" * 16, 1, "h:1"),
                             w.Update(w.ALIVE, "x", 0, "h:2")))]


@pytest.mark.parametrize("msg", roundtrips())
def test_every_message_round_trips(msg):
    assert w.decode(w.encode(msg)) == msg


def test_hex_ids_travel_as_bytes():
    # [0, 1, [[2, bin16, 1]]]: 4 bytes of Ping, 21 of update.
    assert len(w.encode(w.Ping(1, (w.Update(w.DEAD, "ab" * 16, 1),)))) == 25
    assert len(w.encode(w.Ping(1, (w.Update(w.DEAD, "AB" * 16, 1),)))) == 25 + 16


BAD = [
    b"", b"\xc1", msgpack.packb({"t": 0}), msgpack.packb([]), msgpack.packb([9, 1, []]),
    msgpack.packb([0, 1]), msgpack.packb([0, -1, []]), msgpack.packb([0, 2**32, []]),
    msgpack.packb([0, 1.0, []]), msgpack.packb([0, True, []]), msgpack.packb([0, 1, {}]),
    msgpack.packb([0, 1, [[0, "a", 1]]]),  # ALIVE without addr
    msgpack.packb([0, 1, [[1, "a", 1, "h:1"]]], use_bin_type=True) + b"x",  # trailing
    msgpack.packb([0, 1, [[2, "a", 1, "h:1"]]]),  # DEAD with an extra field
    msgpack.packb([0, 1, [[4, "a", 1]]]),  # no such state
    msgpack.packb([0, 1, [[2, "", 1]]]),  # empty id
    msgpack.packb([0, 1, [[2, "a\n", 1]]]),  # unprintable
    msgpack.packb([0, 1, [[2, b"\0" * 33, 1]]], use_bin_type=True),  # id bytes too long
    msgpack.packb([0, 1, [[2, "a", -1]]]),
    msgpack.packb([0, 1, [[2, "a" * 65, 1]]]),
    msgpack.packb([0, 1, [[2, "a", 1]] * 17]),  # too many updates
    msgpack.packb([5, 2, 2, []]), msgpack.packb([5, 0, 1, [[0, "a", 1, "h"], [0, "a", 2, "h"]]]),
    msgpack.packb([5, 0, 1, [[2, "a", 1]]]),  # an entry needs its address
    msgpack.packb([4, 1, ""]), msgpack.packb([4, 1, "x" * 257]),
    msgpack.packb([3, 1, 2]), msgpack.packb([2, 1, "a"]),
    msgpack.packb([0, 1, [[0, "a", 1, "h"]]]) .replace(b"\xa1h", b"\xc7\x01\x00h"),  # ext
    b"\x92\x00" + b"\xdc\xff\xff" + b"\x90" * 10,  # array of 65535 claimed
    b"\x00" * (w.MAX_SWIM_BYTES + 1),
]


@pytest.mark.parametrize("data", BAD)
def test_decoder_rejects_malformed_input(data):
    with pytest.raises(MessageError):
        w.decode(data)


def test_decoder_rejects_non_bytes():
    with pytest.raises(MessageError):
        w.decode("ping")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_decoder_fuzz_raises_only_message_error(data):
    try:
        msg = w.decode(data)
    except MessageError:
        return
    assert w.decode(w.encode(msg)) == msg


# ---------------------------------------------------------------- property

fault = st.one_of(
    st.tuples(st.just("crash"), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 7), st.integers(0, 7)),
    st.tuples(st.just("isolate"), st.integers(0, 7)),
    st.tuples(st.just("lossy"), st.integers(0, 7), st.integers(0, 7), st.floats(0.1, 0.9)),
    st.tuples(st.just("slow"), st.integers(0, 7), st.floats(0.3, 2.0)),
    st.tuples(st.just("heal"),),
)
schedule = st.tuples(
    st.integers(4, 8),  # members
    st.floats(0.0, 0.1),  # jitter: 0.05 + 0.1 one way, inside probe_timeout / 2
    st.integers(0, 2**16),  # seed
    st.lists(st.tuples(fault, st.floats(0.5, 15.0)), min_size=1, max_size=8),
)
PCFG = s.SwimConfig(dead_keep=10_000.0)  # no dead entry forgotten inside a schedule


class FaultyNet(SwimNet):
    """Faults per directed link: cut, lossy (probability), slow (extra delay)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lossy: dict[tuple[str, str], float] = {}
        self.slow_link: dict[tuple[str, str], float] = {}

    def _send(self, src, dst, msg):
        p = self.lossy.get((src, dst), 0.0)
        if p and self.rng.random() < p:
            return
        extra = self.slow_link.get((src, dst), 0.0)
        if extra:
            self.slow[src] = extra
        super()._send(src, dst, msg)
        self.slow.pop(src, None)


@settings(max_examples=SCHEDULES, deadline=None, derandomize=SCHEDULES <= 100,
          suppress_health_check=[HealthCheck.too_slow])
@given(schedule)
def test_membership_under_random_faults(sched):
    """What holds whatever the schedule:

    * bounded: every table within max_members, queues and relays within theirs;
    * accuracy: a member that never crashed and none of whose links (either
      way) was ever cut, lossy or slow is never suspected by anyone;
    * a member confirms DEAD itself only after holding it SUSPECT, at that
      incarnation, for at least the shortest suspicion timeout;
    * completeness: once the faults end, every crashed member is confirmed
      dead by every live member within the deterministic bound (stretched by
      the largest local health multiplier);
    * recovery: every member that never crashed is then held ALIVE by every
      live member again (the wrongly confirmed refute when reprobed).
    """
    n, jitter, seed, faults = sched
    log = Log()
    net = FaultyNet(latency=0.05, jitter=jitter, seed=seed, config=PCFG, observe=log)
    members = ids(n)
    for i in members:
        net.add(i, known=members)
    touched: set[str] = set()
    crashed: set[str] = set()
    t = 2.0
    net.run(t)
    for f, gap in faults:
        kind, *args = f
        pick = [members[a % n] for a in args if isinstance(a, int)]
        if kind == "crash" and len(net.live()) > 2:
            net.kill(pick[0])
            crashed.add(pick[0])
        elif kind == "cut" and pick[0] != pick[1]:
            net.cut.add((pick[0], pick[1]))
            touched.update(pick)
        elif kind == "isolate":
            net.cut |= {(pick[0], y) for y in members} | {(y, pick[0]) for y in members}
            touched.update(members)  # every member has a link to it
        elif kind == "lossy" and pick[0] != pick[1]:
            net.lossy[pick[0], pick[1]] = args[2]
            touched.update(pick)
        elif kind == "slow":
            for y in members:
                net.slow_link[pick[0], y] = args[1]
            touched.update(members)
        elif kind == "heal":
            net.cut.clear()
            net.lossy.clear()
            net.slow_link.clear()
        t += gap
        net.run(t)
        for i in members:
            m = net.members[i]
            assert len(m.table) <= PCFG.max_members and m.queue_len() <= PCFG.max_queue
            assert m.relays_len() <= PCFG.max_relays
    net.cut.clear()
    net.lossy.clear()
    net.slow_link.clear()
    end = t
    stretch = 1 + PCFG.max_health
    bound = (2 * (n - 1) + 1) * PCFG.period * stretch + PCFG.suspicion_max(n) + 1
    # Recovery: each wrongly dead member is reprobed, one a reprobe_every periods.
    recover = n * PCFG.reprobe_every * PCFG.period * stretch
    net.run(end + bound + recover)
    live = net.live()
    for x in live:
        m = net.members[x]
        for c in crashed:
            assert m.state_of(c) == "dead", (x, c)
        for y in members:
            if y != x and y not in crashed:
                assert m.state_of(y) == "alive", (x, y, m.state_of(y))
    for y in members:
        if y not in crashed and y not in touched:
            assert not [e for e in log.about(y) if e[2].state != "alive"], y
    check_confirms_waited(log, PCFG)
