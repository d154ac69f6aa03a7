"""The recursive halving and doubling all-reduce (swarm/halving.py) over
real links on loopback, one thread per peer: bit-identical results equal to
the mean, the input left alone, powers of two and folded ranks, only the
schedule's partners used, a rerun's bits the same, and a peer that never
sends named by its partners."""

from __future__ import annotations

import threading

import pytest
import torch

from peerlearn.swarm.allreduce import AllReduceAborted
from peerlearn.swarm.halving import halving_allreduce, partners
from tests.test_direct_allreduce import Mesh, _inputs

torch.set_num_threads(1)


def run(mesh: Mesh, inputs, *, tag: int, stalled: int | None = None, timeout: float = 10.0,
        used: set | None = None, **kw) -> dict[int, object]:
    out: dict[int, object] = {}

    def slots(r: int, table, direction: str):
        def opener(j: int):
            def open_link():
                if used is not None:
                    used.add((r, j, direction))
                return table[r][j]
            return open_link
        return [None if j == r else opener(j) for j in range(mesh.n)]

    def peer(r: int) -> None:
        try:
            out[r] = halving_allreduce(inputs[r], rank=r, world=mesh.n,
                                       send_links=slots(r, mesh.send, "send"),
                                       recv_links=slots(r, mesh.recv, "recv"),
                                       op_tag=tag, timeout=timeout, **kw)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out[r] = e

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(mesh.n) if r != stalled]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize("n", [2, 3, 5, 8, 12])
def test_every_peer_gets_the_same_bits_the_mean_and_only_its_partners_are_used(n):
    mesh = Mesh(n)
    try:
        for numel in (1, 1000, 70_001):
            inputs = _inputs(n, numel, seed=numel)
            before = [x.clone() for x in inputs]
            used: set = set()
            got = run(mesh, inputs, tag=numel, used=used)
            assert all(isinstance(got[r], torch.Tensor) for r in range(n)), got
            assert all(torch.equal(got[r], got[0]) for r in range(n))
            exact = torch.stack([x.double() for x in inputs]).mean(0)
            torch.testing.assert_close(got[0].double(), exact, rtol=1e-5, atol=1e-6)
            assert all(torch.equal(a, b) for a, b in zip(inputs, before))  # only read
            again = run(mesh, inputs, tag=numel + 1)
            assert torch.equal(again[0], got[0])  # no timing in the bits
            if numel > 1:  # (one element: most segments are empty, fewer links open)
                for r in range(n):
                    want = set(partners(r, n))
                    assert {j for (i, j, _) in used if i == r} == want, (r, used)
    finally:
        mesh.close()


def test_a_log_number_of_partners():
    assert partners(0, 32) == [16, 8, 4, 2, 1]
    assert partners(5, 12) == [5 ^ 4, 5 ^ 2, 5 ^ 1]  # 12 = 8 + 4: ranks 8-11 fold into 0-3
    assert partners(1, 12) == [9, 1 ^ 4, 1 ^ 2, 0]
    assert partners(9, 12) == [1]
    assert all(r in partners(j, 12) for r in range(12) for j in partners(r, 12))


def test_a_peer_that_never_sends_is_named_by_its_partners_and_all_fail():
    mesh = Mesh(5)
    try:
        got = run(mesh, _inputs(5, 4096), tag=7, stalled=2, timeout=3.0)
        assert all(isinstance(got[r], AllReduceAborted) for r in got), got
        # Its first partner in the schedule times out waiting for it.
        first = partners(2, 5)[0]
        assert got[first].peer_rank == 2, got[first]
    finally:
        mesh.close()



def test_a_link_holding_an_aborted_rounds_frame_is_read_past_to_the_senders_next_one():
    """A partner that sent its step of an aborted round after we gave that
    round up left the frame on a link we never read; the next round's
    receive meets it (StreamProtocolError) and moves on to the partner's
    next link, as PeerLinks.recv_into does for the ring."""
    from peerlearn.swarm.allreduce import op_id
    from peerlearn.transport.stream import connect_link
    from tests.test_direct_allreduce import SECRET

    mesh = Mesh(2)
    stale_send = connect_link("127.0.0.1", mesh.listeners[1].address[1], SECRET, 2, timeout=5.0)
    stale_recv = mesh.listeners[1].accept_link(timeout=5.0)
    try:
        tag, numel = 9, 4096
        stale_send.send(torch.ones(numel // 2), op_id(tag - 1, 1), timeout=5.0)  # round 8's step
        handed = iter([stale_recv, mesh.recv[1][0]])
        inputs = _inputs(2, numel)
        out: dict[int, object] = {}

        def peer(r: int) -> None:
            recv = [None, None]
            recv[1 - r] = (lambda: next(handed)) if r == 1 else (lambda: mesh.recv[0][1])
            send = [None, None]
            send[1 - r] = lambda: mesh.send[r][1 - r]
            try:
                out[r] = halving_allreduce(inputs[r], rank=r, world=2, send_links=send,
                                           recv_links=recv, op_tag=tag, timeout=10.0)
            except BaseException as e:  # noqa: BLE001 - reported to the test
                out[r] = e

        threads = [threading.Thread(target=peer, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(isinstance(out[r], torch.Tensor) for r in range(2)), out
        assert torch.equal(out[0], out[1])
        torch.testing.assert_close(out[0], (inputs[0] + inputs[1]) / 2)
    finally:
        stale_send.close()
        stale_recv.close()
        mesh.close()
