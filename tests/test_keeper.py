"""The shared state's owner (swarm/keeper.py) and the state hash kept per
tensor version (state/shared.py): the loop goes on while the state thread
works, jobs never overlap, a hash is computed once per change, and a donor's
copy lives only while it is sent."""

from __future__ import annotations

import asyncio
import threading

import torch

from peerlearn.state import shared
from peerlearn.state.shared import SharedState
from peerlearn.swarm.config import Submission
from peerlearn.swarm.keeper import StateKeeper


def _state() -> SharedState:
    st = SharedState(3)
    st.register("a", torch.arange(1000, dtype=torch.float32))
    st.register("b", torch.ones(10, dtype=torch.bfloat16))
    return st


def test_a_hash_reads_only_tensors_written_since(monkeypatch):
    st = _state()
    first = st.state_hash()
    reads: list[int] = []
    real = shared.hash_tensor
    monkeypatch.setattr(shared, "hash_tensor", lambda t: reads.append(t.numel()) or real(t))
    assert st.state_hash() == first and reads == []  # unchanged: nothing read
    st.tensors["a"][5] += 1.0  # an in-place write through torch bumps the version
    changed = st.state_hash()
    assert changed != first and reads == [1000]
    st.tensors["a"][5] -= 1.0
    assert st.state_hash() == first
    st.invalidate()  # a write around torch: the caller says so
    assert st.state_hash() == first and reads == [1000, 1000, 1000, 10]


def test_jobs_run_in_order_on_one_thread_while_the_loop_goes_on(tmp_path):
    st = _state()
    names: list[str] = []
    release = threading.Event()

    def slow_apply(state: SharedState, result: torch.Tensor) -> None:
        names.append(threading.current_thread().name)
        # Blocks until the loop has ticked: if the loop waited on this job,
        # the test would hang here instead.
        assert release.wait(30)
        state.tensors["a"].add_(result)

    async def main():
        keeper = StateKeeper(st, asyncio.get_running_loop())
        sub = Submission(torch.ones(1000), slow_apply)
        applying = asyncio.ensure_future(keeper.apply(sub, torch.ones(1000), 4))
        checkpoint = asyncio.ensure_future(keeper.checkpoint(tmp_path / "c.ckpt"))
        await asyncio.sleep(0.05)  # the loop runs while the apply blocks its thread
        assert not applying.done() and not checkpoint.done()
        release.set()
        digest, error = await applying
        await checkpoint
        assert error is None and keeper.step == 4 and keeper.digest == digest
        assert digest == st.state_hash() and st.tensors["a"][0] == 1.0
        step, again = await keeper.rehash()
        assert (step, again) == (4, digest)
        keeper.close()

    asyncio.run(main())
    assert names and names[0].startswith("peerlearn-state")
    from peerlearn.state import checkpoint

    loaded = checkpoint.load(tmp_path / "c.ckpt")
    assert loaded.step == 4 and loaded.state_hash() == st.state_hash()  # after the apply


def test_a_failing_apply_is_returned_not_raised():
    st = _state()

    def broken(state, result):
        raise RuntimeError("boom")

    async def main():
        keeper = StateKeeper(st, asyncio.get_running_loop())
        digest, error = await keeper.apply(Submission(torch.ones(1), broken), torch.ones(1), 9)
        keeper.close()
        return digest, error

    digest, error = asyncio.run(main())
    assert isinstance(error, RuntimeError) and st.step == 9 and digest == st.state_hash()


def test_a_donor_copy_is_shared_then_dropped():
    st = _state()

    async def main():
        keeper = StateKeeper(st, asyncio.get_running_loop())
        await keeper.rehash()
        one = await keeper.snapshot()
        two = await keeper.snapshot()
        assert one is two  # one copy per state, shared by the pushes of it
        assert one[0] == 3 and one[1] == st.state_hash()
        st.tensors["a"].add_(1.0)  # the live state moves on; the copy does not
        assert torch.equal(one[3]["a"], torch.arange(1000, dtype=torch.float32))
        await keeper.rehash()  # the state moved on (step 3, another hash)
        st.step = 4
        await keeper.rehash()
        keeper.step = 4
        # One copy at most: a push that a step-3 copy serves shares it; one
        # that needs step 4 waits until the copy is free.
        assert await keeper.snapshot(min_step=3) is one
        assert await keeper.snapshot(min_step=4) is None
        for _ in range(3):
            keeper.release_snapshot()
        assert keeper._snap is None  # the copy lives only while someone sends it
        fresh = await keeper.snapshot(min_step=4)
        assert fresh[0] == 4 and fresh is not one
        keeper.release_snapshot()
        keeper.close()

    asyncio.run(main())


def test_a_push_borrows_the_live_tensors_and_an_apply_waits_for_it(monkeypatch):
    """A donor's push reads the live state (no copy: issue 17's fourth
    state-sized buffer); an apply arriving meanwhile writes only once the
    loan has ended."""
    from peerlearn.swarm import keeper as k

    monkeypatch.setattr(k, "LEND_WAIT_S", 60.0)  # never cut here
    st = _state()
    copies: list[int] = []
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **kw: copies.append(1))

    async def main():
        keeper = StateKeeper(st, asyncio.get_running_loop())
        step, digest, manifest = await keeper.peek()
        assert (step, digest) == (3, st.state_hash()) and [e[0] for e in manifest] == ["a", "b"]
        loan = await asyncio.to_thread(keeper.lend, step, digest, lambda: None)
        assert all(loan.tensors[n].data_ptr() == t.data_ptr() for n, t in st.tensors.items())
        sub = Submission(torch.ones(1000), lambda s, r: s.tensors["a"].add_(r))
        applying = asyncio.ensure_future(keeper.apply(sub, torch.ones(1000), 4))
        await asyncio.sleep(0.2)  # the apply waits on the state thread, the loop goes on
        assert not applying.done() and float(loan.tensors["a"][0]) == 0.0
        loan.end()
        digest2, error = await applying
        assert error is None and float(st.tensors["a"][0]) == 1.0 and keeper.step == 4
        assert not loan.was_cut and keeper.loans.cuts == 0
        # The state moved on since that offer: no loan (the push fails as a
        # transfer, and the requester never sees bytes that miss the hash).
        assert await asyncio.to_thread(keeper.lend, step, digest, lambda: None) is None
        keeper.close()

    asyncio.run(main())
    assert copies == []


def test_an_apply_cuts_a_loan_held_too_long(monkeypatch):
    """A push still reading when the apply's wait ends is cut (its link
    aborted: here the reader ends its loan when told) and the apply goes on."""
    from peerlearn.swarm import keeper as k

    monkeypatch.setattr(k, "LEND_WAIT_S", 0.05)
    st = _state()
    cut_on: list[str] = []

    async def main():
        keeper = StateKeeper(st, asyncio.get_running_loop())
        step, digest, _ = await keeper.peek()
        holder: list = []

        def cut() -> None:
            cut_on.append(threading.current_thread().name)
            holder[0].end()  # the aborted send fails and the push ends its loan

        loan = await asyncio.to_thread(keeper.lend, step, digest, cut)
        holder.append(loan)
        sub = Submission(torch.ones(1000), lambda s, r: s.tensors["a"].add_(r))
        digest2, error = await asyncio.wait_for(keeper.apply(sub, torch.ones(1000), 4), 10)
        assert error is None and float(st.tensors["a"][0]) == 1.0
        assert loan.was_cut and keeper.loans.cuts == 1 and not keeper.loans.out
        keeper.close()

    asyncio.run(main())
    assert len(cut_on) == 1 and cut_on[0].startswith("peerlearn-state")
