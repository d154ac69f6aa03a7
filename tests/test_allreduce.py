"""Ring all-reduce across real processes over loopback sockets.

Every peer is a spawned process serving commands from the test (build a ring,
run an all-reduce with an injected fault). Peers derive their inputs from
seeds, so each can also compute the exact fp64 reference itself; they report
a digest of their result, its error and whether their input was left alone.
Every scenario ends by asserting that all peers that finished hold
byte-identical results.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from peerlearn.swarm import AllReduceAborted, op_id, segment_bounds

SECRET = b"peerlearn-test-secret-0123456789"
TIMEOUT = 1.5  # per-step limit handed to ring_allreduce in the fault tests


def _input(seed: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * (1 + seed % 3)


def _peer(cmd_q, res_q) -> None:
    from peerlearn.swarm import ring_allreduce
    from peerlearn.swarm.allreduce import CodecSpec
    from peerlearn.swarm.ring import connect_ring
    from peerlearn.transport.stream import LinkListener

    listener = LinkListener("127.0.0.1", 0, SECRET)
    res_q.put(("port", os.getpid(), listener.address[1]))
    ring = None
    while True:
        cmd = cmd_q.get()
        if cmd[0] == "quit":
            return
        if cmd[0] == "ring":
            _, rank, addrs, tag = cmd
            if ring is not None:
                ring.close()
            ring = connect_ring(rank, addrs, listener, SECRET, ring_tag=tag, n_conns=2)
            res_q.put(("ring", rank))
            continue
        _, seeds, numel, average, tag, fault, timeout, codec, shape = cmd
        x = _input(seeds[ring.rank], numel)
        before = x.clone()
        in_place = shape.pop("in_place", False)

        def on_step(step: int, fault=fault) -> None:
            if fault is None:
                return
            kind = fault[0]
            if kind == "kill-mid" and step > fault[1]:
                # The kill is due any moment: never let this peer finish first
                # (on an idle machine the whole ring can end within the 10 ms,
                # and a survivor then reports "done").
                time.sleep(60)
            if fault[1] != step:
                return
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "kill-mid":  # dies while this step's transfers are in flight
                import threading

                threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGKILL)).start()
            if kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)

        t0 = time.monotonic()
        try:
            y = ring_allreduce(x, rank=ring.rank, world=ring.world, send_link=ring.send,
                               recv_link=ring.recv, op_tag=tag, average=average,
                               timeout=timeout, on_step=on_step, **shape,
                               out=x if in_place else None,
                               codec=None if codec is None else CodecSpec(codec, 64))
        except AllReduceAborted as e:
            res_q.put(("aborted", ring.rank, time.monotonic() - t0, torch.equal(x, before),
                       e.phase, e.step, e.direction))
            continue
        exact = sum(_input(s, numel).double() for s in seeds)
        if average:
            exact = exact / len(seeds)
        err = ((y.double() - exact).abs() / (exact.abs() + 1.0)).max().item() if numel else 0.0
        res_q.put(("done", ring.rank, hashlib.sha256(y.numpy().tobytes()).hexdigest(), err,
                   in_place or torch.equal(x, before), (y.data_ptr() == x.data_ptr()) == in_place))


class Swarm:
    """n peer processes; `ring(members)` wires those peers (by index) in that order."""

    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_peer, args=(q, self.res_q), daemon=True)
                      for q in self.cmd_qs]
        for p in self.procs:
            p.start()
        ports = {}
        for _ in range(n):
            _, pid, port = self._get(60)
            ports[pid] = port
        self.ports = [ports[p.pid] for p in self.procs]
        self.members: list[int] = []
        self.tag = 0

    def _get(self, timeout: float):
        return self.res_q.get(timeout=timeout)

    def ring(self, members: list[int]) -> None:
        self.tag += 1
        addrs = [("127.0.0.1", self.ports[i]) for i in members]
        for rank, i in enumerate(members):
            self.cmd_qs[i].put(("ring", rank, addrs, self.tag))
        assert sorted(self._get(30)[1] for _ in members) == list(range(len(members)))
        self.members = members

    def allreduce(self, numel, *, average=True, tag=1, faults=None, timeout=30.0,
                  expect=None, seeds=None, codec=None, **shape):
        """Runs one all-reduce on the current ring; returns {rank: report}.
        shape: lanes= and piece_elems= for ring_allreduce."""
        faults = faults or {}
        seeds = seeds if seeds is not None else [100 + i for i in self.members]
        for rank, i in enumerate(self.members):
            self.cmd_qs[i].put(("allreduce", seeds, numel, average, tag, faults.get(rank),
                                timeout, codec, shape))
        out = {}
        for _ in range(expect if expect is not None else len(self.members)):
            msg = self._get(60)
            out[msg[1]] = msg
        return out

    def close(self) -> None:
        for q, p in zip(self.cmd_qs, self.procs):
            if p.is_alive():
                q.put(("quit",))
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def swarm():
    # Seven processes shared by the whole file (starting torch dominates its
    # run time). Each fault test kills its own victim and wires only live
    # peers, so the tests do not depend on their order.
    s = Swarm(7)
    try:
        yield s
    finally:
        s.close()


def _assert_identical_and_exact(reports: dict, tol: float) -> None:
    assert all(r[0] == "done" for r in reports.values()), repr(reports)[:3000]
    digests = {r[2] for r in reports.values()}
    assert len(digests) == 1, f"peers disagree: {reports}"
    for r in reports.values():
        assert r[3] <= tol, f"error {r[3]} above {tol}"
        assert r[4], "input tensor was modified"
        assert r[5], "result aliases the input"


def test_segments_and_op_ids_are_well_formed():
    for numel in (0, 1, 7, 63, 64, 1000, 1_000_003):
        for world in (1, 2, 3, 4, 7):
            b = segment_bounds(numel, world, 64)
            assert b[0] == 0 and b[-1] == numel and len(b) == world + 1
            assert all(x <= y for x, y in zip(b, b[1:]))
            assert all(x % 64 == 0 or x == numel for x in b)
    ids = {op_id(tag, step) for tag in (0, 1, 2, 2**48 - 1) for step in range(8)}
    assert len(ids) == 32
    with pytest.raises(ValueError):
        op_id(2**48, 0)


def test_four_peers_sum_and_mean_awkward_sizes(swarm):
    swarm.ring([0, 1, 2, 3])
    tag = 10
    for numel in (1, 7, 1000, 1_000_003):
        for average in (True, False):
            tag += 1
            reports = swarm.allreduce(numel, average=average, tag=tag)
            # fp32 accumulation of 4 terms: a few ulp of the largest magnitude.
            _assert_identical_and_exact(reports, 1e-6)
    # Then world sizes 2 and 1 from the same processes.
    swarm.ring([2, 0])
    for numel in (1, 7, 1_000_003):
        tag += 1
        _assert_identical_and_exact(swarm.allreduce(numel, tag=tag), 1e-6)
    swarm.ring([3])
    _assert_identical_and_exact(swarm.allreduce(1000, tag=tag + 1), 0.0)


@pytest.mark.parametrize("codec", [None, "int8"])
def test_pieces_and_lanes_give_the_same_exact_identical_results(swarm, codec):
    """Many pieces per step (the pipeline) and two lanes (one connection
    each): still exact, byte-identical everywhere, awkward sizes included."""
    from peerlearn.wire.codecs import Codec

    swarm.ring([0, 1, 2, 3])
    c = None if codec is None else int(Codec.INT8_ABSMAX)
    for k, (numel, lanes, piece) in enumerate([(1_000_003, 1, 4096), (1_000_003, 2, 10_000),
                                               (130, 2, 64), (1, 2, 64)]):
        reports = swarm.allreduce(numel, tag=700 + k, codec=c, lanes=lanes, piece_elems=piece)
        _assert_identical_and_exact(reports, 1e-6 if c is None else 0.25)
    # in place (out=tensor), as torch.distributed does it: the same result
    _assert_identical_and_exact(swarm.allreduce(1_000_003, tag=710, codec=c, lanes=2,
                                                piece_elems=10_000, in_place=True),
                                1e-6 if c is None else 0.25)
    # More lanes than a link has connections is a ring mismatch: every peer
    # aborts (nobody waits for a lane that never runs), inputs untouched.
    reports = swarm.allreduce(1000, tag=720, codec=c, lanes=3, timeout=TIMEOUT)
    assert all(r[0] == "aborted" and r[3] and r[2] < 5.0 for r in reports.values()), reports


def test_int8_all_reduce_is_bit_identical_across_peers(swarm):
    from peerlearn.wire.codecs import Codec

    swarm.ring([0, 1, 2, 3])
    for k, numel in enumerate((5, 1000, 1_000_003)):
        reports = swarm.allreduce(numel, tag=500 + k, codec=int(Codec.INT8_ABSMAX))
        # Each of the 3 reduce-scatter hops and the owner's final encode adds at
        # most half a quantisation step (block absmax / 254) of values ~ N(0, 3).
        _assert_identical_and_exact(reports, 0.25)
        if numel > 5:
            assert all(r[3] > 1e-6 for r in reports.values()), "nothing was quantised"


@pytest.mark.parametrize("members,victim,fault", [
    ([0, 1, 2, 3], 1, ("kill", 2)),  # between steps, in the all-gather of a 4-ring
    ([0, 2, 3, 4], 3, ("kill-mid", 1)),  # while step 1's transfers are in flight
    ([0, 2, 3, 6], 3, ("kill-mid", 2)),  # the same, two lanes, pieces in flight
])
def test_sigkill_aborts_survivors_then_three_retry(swarm, members, victim, fault):
    swarm.ring(members)
    numel = 4_000_000 if fault[0] == "kill-mid" else 100_003
    shape = {"lanes": 2, "piece_elems": 100_000} if fault[1] == 2 and numel > 1e6 else {}
    t0 = time.monotonic()
    reports = swarm.allreduce(numel, tag=5, faults={victim: fault}, timeout=TIMEOUT, expect=3,
                              **shape)
    assert time.monotonic() - t0 < 5.0
    assert set(reports) == set(range(4)) - {victim}
    for r in reports.values():
        assert r[0] == "aborted", r
        assert r[2] < 5.0, f"abort took {r[2]:.1f} s"
        assert r[3], "input modified by an aborted all-reduce"
    dead = swarm.procs[members[victim]]
    dead.join(timeout=5)
    assert dead.exitcode == -signal.SIGKILL

    survivors = [m for r, m in enumerate(members) if r != victim]
    swarm.ring(survivors)
    reports = swarm.allreduce(numel, tag=6)
    # The reference is the mean of the three survivors alone: the dead peer's
    # contribution must be absent entirely.
    _assert_identical_and_exact(reports, 1e-6)


def test_hung_peer_times_out_instead_of_hanging(swarm):
    members = [0, 2, 3, 5]
    swarm.ring(members)
    victim = 2
    t0 = time.monotonic()
    try:
        reports = swarm.allreduce(200_000, tag=9, faults={victim: ("stop", 1)},
                                   timeout=TIMEOUT, expect=3)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(swarm.procs[members[victim]].pid, signal.SIGKILL)
    assert set(reports) == {0, 1, 3}
    for r in reports.values():
        assert r[0] == "aborted", r
        assert r[3]
        assert r[2] < TIMEOUT + 3.0, f"abort took {r[2]:.1f} s"
    assert elapsed < 5.0


def test_ring_refuses_a_link_from_another_ring():
    """The predecessor names its ring and rank in the data-plane greeting; a
    link from an earlier ring (another tag) is refused, not wired in."""
    import threading

    from peerlearn.swarm.ring import RingError, connect_ring
    from peerlearn.transport.stream import LinkListener

    listeners = [LinkListener("127.0.0.1", 0, SECRET) for _ in range(2)]
    addrs = [lst.address for lst in listeners]
    errors: dict[int, BaseException] = {}

    def rank(r: int, tag: int) -> None:
        try:
            connect_ring(r, addrs, listeners[r], SECRET, ring_tag=tag, n_conns=1,
                         timeout=10).close()
        except BaseException as e:  # noqa: BLE001 - checked below
            errors[r] = e

    ts = [threading.Thread(target=rank, args=(0, 7)), threading.Thread(target=rank, args=(1, 8))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for lst in listeners:
        lst.close()
    assert isinstance(errors.get(0), RingError) and "ring:0000000000000008" in str(errors[0])
    assert isinstance(errors.get(1), RingError)
