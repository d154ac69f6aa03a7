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
