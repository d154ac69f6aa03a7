"""A donor serves a joiner from its live state (issue 17): no copy of the
state unless an apply had to cut the push, and the joiner holds the same
bytes either way. Peers in one process on loopback (tests/test_api.py's way)."""

from __future__ import annotations

import threading
import time

import torch

from peerlearn.state.shared import SharedState
from peerlearn.swarm import keeper as k
from peerlearn.swarm.api import Peer
from peerlearn.swarm.peer import PeerConfig
from peerlearn.swarm.rounds import Timeouts

SECRET = b"loans-test-secret-0123456789"
FAST = Timeouts(heartbeat_every=0.1, dead_after=3.0, gather=2.0, ack=2.0)
N = 1 << 20  # 4 MiB: a push takes a while, enough for an apply to arrive in it


def initial() -> SharedState:
    st = SharedState(0)
    st.register("w", torch.arange(N, dtype=torch.float32))
    st.register("m", torch.ones(3, 7, dtype=torch.bfloat16))
    return st


def add(state: SharedState, mean: torch.Tensor) -> None:
    state.tensors["w"].add_(mean)


def count_copies(monkeypatch) -> list[int]:
    copies: list[int] = []
    real = k._copy
    monkeypatch.setattr(k, "_copy", lambda st: copies.append(st.step) or real(st))
    return copies


def test_a_joiner_is_served_from_the_live_state_without_a_copy(tmp_path, monkeypatch):
    copies = count_copies(monkeypatch)
    founder = Peer(PeerConfig(tmp_path / "a", SECRET, timeouts=FAST), initial).start()
    founder.all_reduce(torch.ones(N), apply=add, timeout=30)  # step 1, alone
    joiner = None
    try:
        joiner = Peer(PeerConfig(tmp_path / "b", SECRET, join=founder.control_address,
                                 timeouts=FAST)).start(timeout=20)
        assert joiner.sync_state(timeout=30) == 1
        assert joiner.state.state_hash() == founder.state.state_hash()
        assert torch.equal(joiner.state.tensors["w"], founder.state.tensors["w"])
        assert copies == [] and founder.daemon.transfers.cut_pushes == 0
        assert founder.daemon.keeper._snap is None and not founder.daemon.keeper.loans.out
    finally:
        for p in (joiner, founder):
            if p is not None:
                p.close()


def test_a_push_cut_by_an_apply_is_served_again_from_a_copy(tmp_path, monkeypatch):
    """The donor applies a round while its first push holds the loan: the
    apply cuts it (it waits LEND_WAIT_S at most), the joiner's fetch fails
    as a transfer, and the next push comes from the keeper's one copy."""
    from peerlearn.swarm import coordinating

    copies = count_copies(monkeypatch)
    monkeypatch.setattr(k, "LEND_WAIT_S", 0.05)
    # The founder's round must apply during the push: it does not wait for
    # the joiner catching up (the subject here is the cut, not admission).
    monkeypatch.setattr(coordinating, "CATCHUP_MAX_FACTOR", 0.0)
    lent = threading.Event()
    real_lend = k.StateKeeper.lend

    def lend(self, step, digest, cut):
        loan = real_lend(self, step, digest, cut)
        if loan is not None and not lent.is_set():
            lent.set()  # the founder now contributes; its apply must cut this loan
            deadline = time.monotonic() + 20
            while not loan.was_cut and time.monotonic() < deadline:
                time.sleep(0.01)
        return loan

    monkeypatch.setattr(k.StateKeeper, "lend", lend)
    founder = Peer(PeerConfig(tmp_path / "a", SECRET, timeouts=FAST), initial).start()
    joiner = None
    rounds: list[int] = []

    def contribute() -> None:
        assert lent.wait(30)
        founder.all_reduce(torch.ones(N), apply=add, timeout=30)
        rounds.append(founder.step)

    t = threading.Thread(target=contribute)
    t.start()
    try:
        joiner = Peer(PeerConfig(tmp_path / "b", SECRET, join=founder.control_address,
                                 timeouts=FAST)).start(timeout=20)
        assert joiner.sync_state(timeout=30) == 1  # the state after the founder's round
        t.join(30)
        assert rounds == [1]
        assert founder.daemon.keeper.loans.cuts == 1 and founder.daemon.transfers.cut_pushes == 1
        assert copies == [1]  # one copy, for the push after the cut
        assert joiner.state.state_hash() == founder.state.state_hash()
        assert torch.equal(joiner.state.tensors["w"], torch.arange(N, dtype=torch.float32) + 1)
        assert founder.daemon.keeper._snap is None  # dropped after that push
    finally:
        t.join(30)
        for p in (joiner, founder):
            if p is not None:
                p.close()


def test_a_failed_pull_fails_the_fetch_only_once_every_pull_ended(tmp_path, monkeypatch):
    """A joiner fetches from two donors at once; one pull fails at once, the
    other is slow. The fetch fails only after the slow pull ended (its links
    aborted): a pull left running held the failed fetch's tensors, and wrote
    into them, while the next fetch allocated another state."""
    from peerlearn.swarm.datalinks import CHANNEL_STATE, PeerLinks
    from peerlearn.swarm.statesync import StateTransfers, SyncFailed
    from peerlearn.transport.stream import StreamError

    a = Peer(PeerConfig(tmp_path / "a", SECRET, timeouts=FAST), initial).start()
    b = c = None
    events: list[str] = []
    try:
        b = Peer(PeerConfig(tmp_path / "b", SECRET, join=a.control_address,
                            timeouts=FAST)).start(timeout=20)
        b.sync_state(timeout=30)
        done = [threading.Thread(target=p.all_reduce, args=(torch.ones(N),),
                                 kwargs=dict(apply=add, timeout=30)) for p in (a, b)]
        for t in done:
            t.start()
        for t in done:
            t.join()
        assert b.id in a.members()  # two donors for the next joiner
        donors = {id(a.daemon.links), id(b.daemon.links)}
        real_recv, real_fetch = PeerLinks.recv_into, StateTransfers.fetch

        def recv(self, peer, out, op_id, *, channel, **kw):
            if channel == CHANNEL_STATE and id(self) not in donors and len(events) < 2:
                if not events:
                    events.append("a pull failed")
                    raise StreamError("injected")
                time.sleep(1.0)
                events.append("the other pull ended")
            return real_recv(self, peer, out, op_id, channel=channel, **kw)

        async def fetch(self, need):
            try:
                return await real_fetch(self, need)
            except SyncFailed:
                events.append("the fetch failed")
                raise

        monkeypatch.setattr(PeerLinks, "recv_into", recv)
        monkeypatch.setattr(StateTransfers, "fetch", fetch)
        c = Peer(PeerConfig(tmp_path / "c", SECRET, join=a.control_address,
                            timeouts=FAST)).start(timeout=20)
        c.sync_state(timeout=30)  # the next fetch succeeds
        assert events[:3] == ["a pull failed", "the other pull ended", "the fetch failed"]
        assert c.state.state_hash() == a.state.state_hash()
    finally:
        for p in (c, b, a):
            if p is not None:
                p.close()
