"""The Python API (peerlearn.swarm.api.Peer): several peers in one process,
each with its own event loop thread, real sockets on loopback."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from peerlearn.state.shared import SharedState
from peerlearn.cli.daemon import query_status
from peerlearn.swarm import gossip as g
from peerlearn.swarm.api import Peer, flatten
from peerlearn.swarm.errors import (
    CollectiveTimeout,
    GossipFailed,
    PeerClosed,
    PeerStartError,
    StateReplaced,
    Withdrawn,
)
from peerlearn.swarm.peer import PeerConfig
from peerlearn.swarm.rounds import Timeouts
from peerlearn.wire.codecs import Codec

SECRET = b"api-test-secret-0123456789"
FAST = Timeouts(heartbeat_every=0.1, dead_after=3.0, gather=2.0, ack=2.0)
# For tests of what a round computes, not of who it leaves out: on a loaded
# machine a peer's Ready can come 2 s after the first, and one left out sees
# StateReplaced (other tests' subject).
PATIENT = Timeouts(heartbeat_every=0.1, dead_after=3.0, gather=10.0, ack=2.0)
N = 5000


def initial() -> SharedState:
    st = SharedState(0)
    st.register("w", torch.zeros(N))
    st.register("m", torch.zeros(3, 7, dtype=torch.bfloat16))
    return st


def add_mean(state: SharedState, mean: dict) -> None:
    state.tensors["w"].add_(mean["w"])
    state.tensors["m"].add_(mean["m"])


def wait_joiners_reported(first: Peer, joiners: list[Peer]) -> None:
    """Until the coordinator has heard that the joiners hold the state, its
    first round would go ahead without them (correctly: they would get
    StateReplaced and enter a later one); the tests want them all in it."""
    core = first.daemon.core
    deadline = time.monotonic() + 10
    while not all(p.id in core.beats and core.beats[p.id].synced for p in joiners):
        assert time.monotonic() < deadline, "joiners never reported their state"
        time.sleep(0.02)


@pytest.fixture
def swarm(tmp_path):
    peers: list[Peer] = []

    def make(n: int, **settings) -> list[Peer]:
        """n peers (the first founds); settings: more PeerConfig fields."""
        settings.setdefault("timeouts", FAST)
        first = Peer(PeerConfig(tmp_path / "p0", SECRET, **settings), initial).start()
        peers.append(first)
        for i in range(1, n):
            peers.append(Peer(PeerConfig(tmp_path / f"p{i}", SECRET,
                                         join=first.control_address, **settings)
                              ).start(timeout=20))
        for p in peers:
            p.sync_state(timeout=20)
        wait_joiners_reported(first, peers[1:])
        return peers

    yield make
    for p in peers:
        p.close()


def contribution(i: int, k: int) -> dict:
    gen = torch.Generator().manual_seed(1000 * i + k)
    return {"w": torch.randn(N, generator=gen),
            "m": torch.randn(3, 7, generator=gen).to(torch.bfloat16)}


def run_all(peers, fn):
    out, errors = {}, []

    def one(i, p):
        try:
            out[i] = fn(i, p)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(peers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    return out


def test_all_reduce_is_the_exact_mean_and_identical_everywhere(swarm):
    peers = swarm(3, timeouts=PATIENT)
    # Every peer is a member once one round has included them all.
    results = run_all(peers, lambda i, p: [p.all_reduce(contribution(i, k), apply=add_mean,
                                                        timeout=30) for k in range(3)])
    steps = {p.step for p in peers}
    hashes = {p.state.state_hash() for p in peers}
    assert len(steps) == 1 and len(hashes) == 1
    for k in range(3):
        got = [results[i][k] for i in range(3)]
        for name in ("w", "m"):
            assert all(torch.equal(got[0][name], x[name]) for x in got[1:])  # byte-identical
    # A round's participants are whoever was ready; the last round had all three.
    last = [results[i][2]["w"] for i in range(3)]
    exact = torch.stack([contribution(i, 2)["w"] for i in range(3)]).double().mean(0).float()
    assert torch.allclose(last[0], exact, rtol=0, atol=1e-6)
    assert results[0][2]["m"].dtype == torch.bfloat16 and results[0][2]["m"].shape == (3, 7)
    assert sorted(peers[0].members()) == sorted(p.id for p in peers)


def test_gossip_pairs_agree_without_messages_and_average_exactly(swarm):
    peers = swarm(4)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    assert all(len(p.live_members()) == 4 for p in peers)
    x = {i: torch.full((N,), float(i)) + torch.arange(N) / N for i in range(4)}
    out = run_all(peers, lambda i, p: p.gossip(x[i], round_=7, seed=3, timeout=20))
    ids = {p.id: i for i, p in enumerate(peers)}
    for group in g.gossip_groups(list(ids), 7, 3, 2):
        a, b = (ids[q] for q in group)
        assert torch.equal(out[a], out[b])
        assert torch.equal(out[a], (x[a] + x[b]) / 2)
    # Quantized: still byte-identical within a pair, within the int8 bound of the mean.
    out8 = run_all(peers, lambda i, p: p.gossip(x[i], round_=8, seed=3, codec=Codec.INT8_ABSMAX,
                                               timeout=20))
    for group in g.gossip_groups(list(ids), 8, 3, 2):
        a, b = (ids[q] for q in group)
        assert torch.equal(out8[a], out8[b])
        assert (out8[a] - (x[a] + x[b]) / 2).abs().max() < 4 / 127
    assert all(p.daemon.stats.gossips == 2 for p in peers)


def test_gossip_groups_are_a_pure_function():
    ids = [f"peer{i:02d}" for i in range(7)]
    a = g.gossip_groups(ids, 5, 1, 2)
    assert a == g.gossip_groups(list(reversed(ids)), 5, 1, 2)  # order of input irrelevant
    assert sorted(p for grp in a for p in grp) == sorted(ids)
    assert [len(grp) for grp in a].count(3) == 1 and all(len(grp) >= 2 for grp in a)
    assert a != g.gossip_groups(ids, 6, 1, 2)  # rounds reshuffle
    assert g.gossip_groups(["x"], 0) == [("x",)]
    with pytest.raises(ValueError):
        g.gossip_groups(ids, 0, 0, 1)


def test_gossip_with_an_absent_partner_fails_cleanly(swarm):
    peers = swarm(2)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    with pytest.raises(GossipFailed):
        peers[0].gossip(torch.ones(N), round_=1, timeout=1.0)  # the partner never calls
    assert peers[0].daemon.stats.gossip_failures == 1

    # Both sides try again with a fresh round. The lone attempt's header and
    # tensor (round 1) may still wait on the partner's link, ahead of the new
    # ones: the partner reads past that attempt (an earlier round) to the
    # next, so both meet at round 2 in one call each.
    out = run_all(peers, lambda i, p: p.gossip(torch.ones(N), round_=2, timeout=10))
    assert all(torch.equal(o, torch.ones(N)) for o in out.values()), out
    assert peers[1].daemon.stats.gossip_failures == 0


def test_a_drifted_peer_is_repaired_and_its_stale_contribution_refused(swarm):
    peers = swarm(3)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    good = peers[0].state.state_hash()
    bad = peers[2]
    bad._on_loop(lambda: bad.state.tensors["w"].add_(1.0))  # a silent bit-level drift
    with pytest.raises(StateReplaced):
        bad.all_reduce(contribution(2, 1), timeout=30)
    assert bad.state.state_hash() == good
    assert bad.daemon.parity_mismatches >= 1 and bad.daemon.syncs >= 1
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 2), apply=add_mean, timeout=30))
    assert len({p.state.state_hash() for p in peers}) == 1


@pytest.mark.parametrize("donate", [True, False])
def test_a_contribution_failed_with_state_replaced_is_freed_at_once(swarm, donate):
    """A contribution that fails (StateReplaced) is freed as soon as the
    caller lets go of the exception, without waiting for the cycle
    collector, and so is the state it replaced. The exception, kept by the
    contribution's future, had the raising frames in its traceback, and they
    held the future, the Submission and the tensors: a cycle. A 2 GB joiner
    syncing again and again kept one contribution per sync that way until
    the collector ran: 9 GB, 4.4x its state (docs/benchmarks.md). Donated,
    the buffer is the caller's tensor; else the daemon's copy."""
    import gc
    import weakref

    peers = swarm(3)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    bad = peers[2]
    old = weakref.ref(bad.state.tensors["w"])
    bad._on_loop(lambda: bad.state.tensors["w"].add_(1.0))  # drift: it will be replaced
    mine = torch.randn(N)
    gone = weakref.ref(mine)
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(StateReplaced):
            bad.all_reduce(mine, timeout=30, donate=donate)
        subs = [o for o in gc.get_objects() if type(o).__name__ == "Submission"]
        assert subs and all(s.tensor is None for s in subs)  # the daemon's copy too
        del mine, subs
        assert gone() is None, gc.get_referrers(gone())
        assert old() is None
    finally:
        gc.enable()


def test_timeout_withdraws_and_close_ends_a_pending_call(swarm):
    a, b = swarm(2)
    run_all([a, b], lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    step = a.step
    # b does not contribute: a alone is not a majority of the view {a, b}.
    with pytest.raises(CollectiveTimeout):
        a.all_reduce(contribution(0, 1), timeout=2.5)
    assert a.step == step and a.daemon.submission is None
    # Withdrawn means gone: the next call is the one that counts.
    run_all([a, b], lambda i, p: p.all_reduce(contribution(i, 2), apply=add_mean, timeout=30))
    assert a.step == b.step == step + 1
    caught = []
    t = threading.Thread(target=lambda: caught.append(pytest.raises(PeerClosed, a.all_reduce,
                                                                    contribution(0, 3))))
    t.start()
    time.sleep(0.5)
    a.close()
    t.join(30)
    assert len(caught) == 1
    with pytest.raises(PeerClosed):
        a.all_reduce(contribution(0, 4))


def test_async_all_reduces_queue_into_successive_rounds_in_order(swarm):
    peers = swarm(3, timeouts=PATIENT)  # the queueing, not who is left out
    step = peers[0].step
    applied = {i: [] for i in range(3)}

    def submit_three(i, p):
        def record(state, mean, i=i):
            add_mean(state, mean)
            applied[i].append(state.step)

        pending = [p.all_reduce_async(contribution(i, k), apply=record) for k in range(3)]
        assert len(p.daemon.submissions) >= 2  # several in flight at once, not one by one
        return [x.result(30) for x in pending]

    results = run_all(peers, submit_three)
    assert {p.step for p in peers} == {step + 3}
    assert len({p.state.state_hash() for p in peers}) == 1
    assert all(applied[i] == [step, step + 1, step + 2] for i in range(3))  # in order
    for k in range(3):
        assert all(torch.equal(results[0][k]["w"], results[i][k]["w"]) for i in (1, 2))
    exact = torch.stack([contribution(i, 2)["w"] for i in range(3)]).double().mean(0).float()
    assert torch.allclose(results[0][2]["w"], exact, rtol=0, atol=1e-6)


def test_a_queued_all_reduce_can_be_withdrawn_and_a_pending_one_waited_again(swarm):
    a, b = swarm(2)
    run_all([a, b], lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    step = a.step
    first = a.all_reduce_async(contribution(0, 1), apply=add_mean)
    second = a.all_reduce_async(contribution(0, 2), apply=add_mean)
    second.withdraw()
    assert list(a.daemon.submissions) == [a.daemon.submission] and a.daemon.submission
    with pytest.raises(Withdrawn):  # settled, not left hanging
        second.result(5)
    with pytest.raises(CollectiveTimeout):  # b has not contributed: no majority yet
        first.result(0.5)
    assert not first.done()
    mine = b.all_reduce(contribution(1, 1), apply=add_mean, timeout=30)
    assert torch.equal(first.result(30)["w"], mine["w"])
    assert a.step == b.step == step + 1 and a.daemon.submission is None


def test_config_mistakes_are_refused_up_front(tmp_path):
    from peerlearn.state.identity import Identity
    from peerlearn.swarm.peer import PeerDaemon

    with pytest.raises(ValueError, match="ring_lanes"):
        PeerConfig(tmp_path, SECRET, n_conns=2, ring_lanes=4)
    key = Identity.load_or_create(tmp_path / "a").public_raw
    with pytest.raises(ValueError, match="not on the allowlist"):
        PeerDaemon(PeerConfig(tmp_path / "b", None, allowlist=[key],
                              join="0" * 32 + "@127.0.0.1:9"))


def test_flatten_round_trips_names_shapes_dtypes():
    t = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    flat, unflatten = flatten(t)
    assert flat.dtype == torch.float32 and flat.numel() == 10
    back = unflatten(flat)
    assert set(back) == {"a", "b"} and back["a"].dtype == torch.float16
    assert torch.equal(back["b"], t["b"])
    single, un = flatten(torch.ones(2, 2))
    assert un(single).shape == (2, 2)


def test_a_donated_buffer_is_taken_without_a_copy():
    buf = torch.arange(10.0)
    tiled = {"a": buf[:4].view(2, 2), "b": buf[4:]}  # back to back, in name order
    flat, unflatten = flatten(tiled, donate=True)
    assert flat.data_ptr() == buf.data_ptr() and torch.equal(flat, buf)
    assert torch.equal(unflatten(flat)["a"], tiled["a"])
    # Not donated, out of name order, or not one buffer: copied.
    assert flatten(tiled)[0].data_ptr() != buf.data_ptr()
    swapped = {"b": buf[:4], "a": buf[4:]}
    assert flatten(swapped, donate=True)[0].data_ptr() != buf.data_ptr()
    apart = {"a": torch.ones(3), "b": torch.ones(3)}
    assert torch.equal(flatten(apart, donate=True)[0], torch.ones(6))


def test_allowlist_swarm_without_a_secret(tmp_path):
    """Admission by public key: the data plane's key travels to admitted peers
    over the encrypted control plane; a stranger is refused and counted."""
    from peerlearn.state.identity import Identity

    dirs = {n: tmp_path / n for n in "abc"}
    keys = [Identity.load_or_create(dirs[n]).public_raw for n in "ab"]  # c is not listed
    a = Peer(PeerConfig(dirs["a"], None, timeouts=FAST, allowlist=keys), initial).start()
    peers = [a]
    try:
        with pytest.raises(PeerStartError, match="PEER_ID@HOST:PORT"):  # which peer is there?
            Peer(PeerConfig(dirs["b"], None, timeouts=FAST, allowlist=keys,
                            join=a.control_address)).start(timeout=20)
        b = Peer(PeerConfig(dirs["b"], None, timeouts=FAST, allowlist=keys,
                            join=f"{a.id}@{a.control_address}")).start(timeout=20)
        peers.append(b)
        b.sync_state(timeout=20)  # the state comes over the data plane: b has the key
        assert (dirs["b"] / "data.key").read_bytes() == (dirs["a"] / "data.key").read_bytes()
        wait_joiners_reported(a, [b])
        out = run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), timeout=30))
        assert torch.equal(out[0]["w"], out[1]["w"])
        stranger = Peer(PeerConfig(dirs["c"], None, timeouts=FAST, allowlist=keys + [
            Identity.load_or_create(dirs["c"]).public_raw], join=f"{a.id}@{a.control_address}"))
        with pytest.raises(PeerStartError):
            stranger.start(timeout=3)
        assert a.daemon.plane.refused_connections >= 1
        assert not (dirs["c"] / "data.key").exists()
        # `peerlearn status` speaks to an allowlist swarm with a listed identity ...
        target = f"{a.id}@{a.control_address}"
        dealers = len(a.daemon.plane._dealers)
        rows = query_status(target, None, data_dir=str(dirs["b"]), allowlist=keys)
        assert {r["id"] for r in rows} == {a.id, b.id}
        assert len(a.daemon.plane._dealers) == dealers + 1  # the reply's socket ...
        time.sleep(2.5)
        assert len(a.daemon.plane._dealers) == dealers  # ... is not kept
        # ... and gets nothing with an unlisted one
        with pytest.raises(SystemExit, match="no status answer"):
            query_status(target, None, timeout=1.5, data_dir=str(dirs["c"]), allowlist=keys)
        # ... nor when it names a peer that is not the one at that address: the
        # handshake needs that peer's own server key (nobody else can answer)
        with pytest.raises(SystemExit, match="no status answer"):
            query_status(f"{b.id}@{a.control_address}", None, timeout=1.5,
                         data_dir=str(dirs["b"]), allowlist=keys)
        with pytest.raises(SystemExit, match="listed identity"):
            query_status(target, None, data_dir=str(tmp_path / "none"),
                         allowlist=keys)
    finally:
        for p in peers:
            p.close()


def test_a_nonfinite_contribution_fails_the_round_and_poisons_nothing(swarm):
    """One member contributes NaN: the round fails for every participant (the
    mean is never applied nor returned), the peer that saw it counts it, the
    coordinator traces the sender and leaves it out, and the others' rounds
    then apply in parity. No state turns NaN.

    The NaN member's Ready reaches the coordinator before any honest one is
    sent: the first round then cannot run without it. (When all three were
    sent at once, a loaded machine made its Ready come a gather late in a
    fresh-clone CI run: the honest pair applied without it, no round was
    ever poisoned, and nothing was checked.) Patient timeouts keep a loaded
    member from being left out for a late ack or taken for dead meanwhile."""
    peers = swarm(3, timeouts=Timeouts(heartbeat_every=0.1, dead_after=10.0, gather=10.0,
                                        ack=10.0))
    # All three members first: with the founder alone in the view, no round
    # leaving it out is a quorum, so the search for the sender
    # (suspicion.py) could not leave the founder out, and, with the founder
    # the smallest suspect, poisoned rounds went on until the sender gave up.
    run_all(peers, lambda i, p: p.wait_for_peers(3, timeout=50))
    bad, honest = peers[2], peers[:2]
    nan = contribution(2, 0)
    nan["w"][7] = float("nan")
    bad.sync_state(timeout=20)
    pending = bad.all_reduce_async(nan, apply=add_mean)
    deadline = time.monotonic() + 20
    while not any(bad.id in p.daemon.core.readies for p in peers):
        assert time.monotonic() < deadline, "the NaN member's Ready never reached a coordinator"
        time.sleep(0.02)

    results = run_all(honest, lambda i, p: applied_eventually(p, contribution(i, 0), 55))
    # Its contribution went on to every later round it was let into, until
    # one applied without it (then StateReplaced); it never got a mean.
    with pytest.raises((StateReplaced, CollectiveTimeout)):
        try:
            pending.result(timeout=60)
        except CollectiveTimeout:
            pending.withdraw()
            raise
    # A poisoned round was seen: whoever finished its collective first
    # counted it and failed it; one still reducing when the abort came
    # retries without checking (contributing.py: superseded), so it need not
    # be an honest peer. The sender was traced and left out (suspicion.py).
    assert any(p.daemon.nonfinite_rounds >= 1 for p in peers)
    assert sum(p.daemon.core.exclusions for p in peers) >= 1
    for p in peers:
        assert all(bool(torch.isfinite(t.float()).all()) for t in p.state.tensors.values())
    assert all(torch.isfinite(results[i]["w"]).all() for i in (0, 1))
    same_state(honest)


def applied_eventually(p, contrib, timeout=40):
    """all_reduce until a round applies it: while a poisoner is traced, an
    honest suspect may be left out of a round that applies without it, and
    its contribution (made against the state that round replaced) is then
    recomputed, as DiLoCo does on StateReplaced."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return p.all_reduce(contrib, apply=add_mean, timeout=deadline - time.monotonic())
        except StateReplaced:
            continue


def same_state(peers, timeout=20):
    deadline = time.monotonic() + timeout
    while len({(p.step, p.state.state_hash()) for p in peers}) != 1:
        assert time.monotonic() < deadline, [(p.step, p.state.state_hash()) for p in peers]
        time.sleep(0.1)


def test_apply_runs_off_the_loop_so_heartbeats_go_on(swarm):
    """An outer step that takes longer than a heartbeat period must not hold
    the daemon's loop: heartbeats keep going out while it runs."""
    peers = swarm(2)
    seen = {}

    def slow_apply(state, mean, peer):
        core = peer.daemon.core
        before = core.last_beat_at
        time.sleep(1.0)  # 10 heartbeat periods of FAST
        seen[peer.id] = core.last_beat_at - before
        add_mean(state, mean)

    run_all(peers, lambda i, p: p.all_reduce(
        contribution(i, 0), apply=lambda st, mean, p=p: slow_apply(st, mean, p), timeout=30))
    assert all(v > 0.5 for v in seen.values()), seen
    assert len({p.state.state_hash() for p in peers}) == 1


def test_a_joiner_with_another_secret_fails_fast_and_says_why(tmp_path):
    """The member answers, but every control handshake fails: start() says
    the secret may be wrong within seconds, not after the join timeout."""
    first = Peer(PeerConfig(tmp_path / "p0", SECRET, timeouts=FAST), initial).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerStartError, match="secret"):
            Peer(PeerConfig(tmp_path / "p1", b"another-secret-0123456789xyz", timeouts=FAST,
                            join=first.control_address, join_timeout=60)).start(timeout=60)
        assert time.monotonic() - t0 < 20
        assert first.daemon.plane.refused_connections >= 1
    finally:
        first.close()


def _announce_poisoned_far_state(liar):
    """The liar's own state turns all-NaN 1000 steps ahead, and it says so in
    its heartbeats (honest code, lying state)."""
    def poison():
        d = liar.daemon
        for t in d.state.tensors.values():
            t.fill_(float("nan"))
        d.state.step += 1000
        h = d.state.state_hash()
        d.core.step, d.core.state_hash = d.state.step, h
        d.keeper.step, d.keeper.digest = d.state.step, h  # the state's owner believes it too
    liar._on_loop(poison)


def test_a_member_announcing_a_far_state_is_not_followed_and_rounds_go_on(swarm):
    """Issue 16, case 2: a member holding the secret announces a far step
    with the hash of a state it serves. Every peer used to fetch it (and
    would have installed it, were it finite). A newer state is now believed
    only when a majority of the other voters announce it: nobody fetches it,
    the claim is counted, the liar (the smallest id, so the coordinator)
    is followed no more, and the others go on applying rounds."""
    peers = swarm(3)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    liar = min(peers, key=lambda p: p.id)
    honest = [p for p in peers if p is not liar]
    same_state(peers)  # a peer still repairing its first round is another test
    _announce_poisoned_far_state(liar)
    start = max(p.step for p in honest)
    results = run_all(honest, lambda i, p: [applied_eventually(p, contribution(i, k), 60)
                                            for k in range(1, 4)])
    assert all(p.step >= start + 3 for p in honest)
    assert len({p.state.state_hash() for p in honest}) == 1
    for p in honest:
        assert all(bool(torch.isfinite(t.float()).all()) for t in p.state.tensors.values())
        assert p.daemon.core.unbacked_states >= 1
        assert p.daemon.bad_states == 0  # never fetched
        assert p.daemon.core.coordinator(time.monotonic()) != liar.id
    assert torch.isfinite(results[0][2]["w"]).all()


def test_a_poisoned_state_fetched_from_the_only_other_voter_is_refused(swarm):
    """With two voters the other one alone is a majority of the others, so
    its far state is fetched (one dishonest member of two is past any
    quorum's bound). The fetched state is still checked: not finite, refused,
    counted, its announcer distrusted, and nothing NaN installed."""
    peers = swarm(2)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    same_state(peers)
    liar = min(peers, key=lambda p: p.id)
    honest = next(p for p in peers if p is not liar)
    _announce_poisoned_far_state(liar)
    deadline = time.monotonic() + 30
    while honest.daemon.bad_states < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert honest.daemon.bad_states >= 1
    assert not honest.daemon.core.trusted(liar.id, time.monotonic())
    assert all(bool(torch.isfinite(t.float()).all()) for t in honest.state.tensors.values())


@pytest.mark.parametrize("path", ["ring", "direct"])
def test_a_member_that_stalls_its_ring_is_named_left_out_and_rounds_go_on(
        swarm, caplog, monkeypatch, path):
    """A member acks a round, then never joins its collective (it neither
    sends nor reads): a participant waiting for it times out, names it in its
    Done, and the coordinator leaves both out for a cooldown; the others'
    rounds apply. Checks the naming on real links, not only in simulation.

    Both the ring and the direct all-reduce (4 peers and a small tensor take
    it). The direct one used to open every link before sending anything, so
    a participant held up by the staller held up a third peer too, which
    could time out first and name that innocent one (a fresh-clone CI run
    did); each link now opens inside its own transfer. Under load an honest
    peer can still be named, on either path: one that starts its collective
    later than step_timeout after a partner (seen in a fresh-clone CI run);
    the coordinator's rule of leaving out accuser and accused absorbs it,
    so only the staller's naming is checked."""
    from peerlearn.swarm import collective

    if path == "ring":
        monkeypatch.setattr(collective, "_direct", lambda update, n: False)
    caplog.set_level("INFO", logger="peerlearn.peer")
    peers = swarm(4, step_timeout=2.0)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    same_state(peers)
    # The leader is the most followed peer (the founder, usually), not the
    # smallest id: the staller is any other, the lead the one that leads.
    leader = peers[0].daemon.core.coordinator(time.monotonic())
    lead = next(p for p in peers if p.id == leader)
    staller = max((p for p in peers if p is not lead), key=lambda p: p.id)
    honest = [p for p in peers if p is not staller]
    took_part_before = staller.daemon.core.took_part  # the round above

    async def stall(a, sub):
        await asyncio.sleep(3600)  # acked, and then nothing: cancelled at close
    staller.daemon._run_round = stall

    stop = threading.Event()

    def one(i, p):
        if p is staller:  # keeps offering itself, as a staller would
            while not stop.is_set():
                try:
                    p.all_reduce(contribution(i, 1), apply=add_mean, timeout=4)
                except (CollectiveTimeout, StateReplaced):
                    pass
            return None
        try:
            for k in range(1, 8):
                applied_eventually(p, contribution(i, k), 60)
                if k >= 2 and lead.daemon.core.stall_exclusions >= 1:
                    break
        finally:
            stop.set()
        return None
    run_all(peers, one)
    same_state(honest)
    # Once it took part in a committed round after it began to stall (it may
    # also have been left out of every one, its Ready coming after the
    # others'), it was named and shut out: the accused, and the accuser unless
    # that is the coordinator. (The round above set took_part too: comparing
    # with None let this pass vacuously.)
    if staller.daemon.core.took_part is not took_part_before:
        named = f"the link with {staller.id[:8]} stalled"
        assert any(named in r.getMessage() for r in caplog.records)
        # Whoever led that round (leadership may move while it stalls, even
        # to the staller: then it is deposed, deposing.py) left someone out.
        assert sum(p.daemon.core.stall_exclusions for p in peers) >= 1
    assert staller.id not in lead.daemon.core.members


def test_a_member_sending_huge_updates_is_left_out_and_nothing_huge_applies(swarm):
    """Issue 16, case 5: one contribution of 1e30 used to be applied (the
    outer parameters went to ~1e29 and every later round was refused as
    non-finite: training over). Now the mean fails every participant's check,
    the coordinator traces the sender and leaves it out, and the others'
    rounds apply."""
    peers = swarm(3)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    huge = contribution(2, 1)
    huge["w"].mul_(1e30)

    def one(i, p):
        if i == 2:  # the attacker keeps trying until it is left out
            for _ in range(3):
                try:
                    p.all_reduce(huge, apply=add_mean, timeout=4)
                except (CollectiveTimeout, StateReplaced):
                    pass
            return None
        return [applied_eventually(p, contribution(i, k)) for k in (1, 2)]

    results = run_all(peers, one)
    honest = peers[:2]
    same_state(honest)
    assert any(p.daemon.nonfinite_rounds >= 1 for p in honest)  # a poisoned mean was refused
    for p in honest:
        assert float(p.state.tensors["w"].abs().max()) < 100
    coordinator = min(honest, key=lambda p: p.id) if min(p.id for p in peers) != peers[2].id \
        else None
    if coordinator is not None:
        assert coordinator.daemon.core.exclusions >= 1
    assert torch.isfinite(results[0][1]["w"]).all()


def test_a_gossip_partner_sending_nan_or_huge_values_is_refused(swarm):
    """Issue 16, case 6: averaging with one member's NaN made its partners'
    models NaN for good in three exchanges. The partner's values are checked
    first: the exchange fails for the honest side, which keeps its own, counted."""
    peers = swarm(2)
    run_all(peers, lambda i, p: p.all_reduce(contribution(i, 0), apply=add_mean, timeout=30))
    assert all(len(p.live_members()) == 2 for p in peers)
    for bad_value in (float("nan"), 1e30):
        x = {0: torch.ones(N), 1: torch.ones(N)}
        x[1][5] = bad_value

        def one(i, p, x=x):
            try:
                return p.gossip(x[i], round_=3, seed=1, timeout=10)
            except GossipFailed as e:
                return e
        out = run_all(peers, one)
        assert isinstance(out[0], GossipFailed) and out[0].poisoned_by == peers[1].id
        # The sender may have averaged ours in before we aborted: its own business.
    assert peers[0].daemon.stats.gossip_poisoned == 2
    assert peers[1].daemon.stats.gossip_poisoned == 0
