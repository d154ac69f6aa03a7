"""The direct all-reduce (swarm/direct.py) over a full mesh of real striped
links on loopback, one thread per peer: exact rank-order sums, bit-identical
results, the input left alone, a codec's bytes made once, and a peer that
never sends named by the others' timeouts."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from peerlearn.swarm.allreduce import AllReduceAborted, CodecSpec
from peerlearn.swarm.direct import direct_allreduce
from peerlearn.transport.stream import LinkListener, connect_link

SECRET = b"peerlearn-test-secret-0123456789"


class Mesh:
    """send[i][j]: i's link to j; recv[j][i]: j's link from i."""

    def __init__(self, n: int):
        self.n = n
        self.listeners = [LinkListener("127.0.0.1", 0, SECRET) for _ in range(n)]
        self.send = [[None] * n for _ in range(n)]
        self.recv = [[None] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                port = self.listeners[j].address[1]
                self.send[i][j] = connect_link("127.0.0.1", port, SECRET, 2, timeout=5.0)
                self.recv[j][i] = self.listeners[j].accept_link(timeout=5.0)

    def close(self) -> None:
        for row in self.send + self.recv:
            for link in row:
                if link is not None:
                    link.close()
        for listener in self.listeners:
            listener.close()

    def run(self, inputs, *, tag: int, stalled: int | None = None, timeout: float = 10.0,
            **kw) -> dict[int, object]:
        """Every peer's result (or exception); `stalled` never calls at all."""
        out: dict[int, object] = {}

        def peer(r: int) -> None:
            try:
                out[r] = direct_allreduce(inputs[r], rank=r, world=self.n,
                                          send_links=self.send[r], recv_links=self.recv[r],
                                          op_tag=tag, timeout=timeout, **kw)
            except BaseException as e:  # noqa: BLE001 - reported to the test
                out[r] = e

        threads = [threading.Thread(target=peer, args=(r,)) for r in range(self.n)
                   if r != stalled]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return out


@pytest.fixture
def mesh4():
    m = Mesh(4)
    yield m
    m.close()


def _inputs(n: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) * (1 + r) for r in range(n)]


def _rank_order(xs: list[torch.Tensor], average: bool) -> torch.Tensor:
    acc = xs[0].clone()
    for x in xs[1:]:
        acc.add_(x)
    return acc.div_(len(xs)) if average else acc


@pytest.mark.parametrize("numel", [1, 7, 1000, 262144 + 3])
def test_sum_and_mean_are_the_exact_rank_order_sum_on_every_peer(mesh4, numel):
    for k, average in enumerate((False, True)):
        xs = _inputs(4, numel, seed=numel)
        before = [x.clone() for x in xs]
        res = mesh4.run(xs, tag=10 * numel + k, average=average)
        want = _rank_order(xs, average)
        for r in range(4):
            assert isinstance(res[r], torch.Tensor), res[r]
            # Bit for bit: the owner adds the parts in rank order, whatever
            # order they arrived in, so the result is reproducible too.
            assert torch.equal(res[r], want), r
            assert torch.equal(xs[r], before[r]), "the input was written"


def test_in_place_gives_the_same_bits(mesh4):
    xs = _inputs(4, 5000, seed=3)
    want = _rank_order(xs, True)
    copies = [x.clone() for x in xs]
    res = mesh4.run(copies, tag=77, average=True)  # out= is per call: see below
    assert all(torch.equal(res[r], want) for r in range(4))
    outs: dict[int, object] = {}

    def peer(r: int) -> None:
        outs[r] = direct_allreduce(xs[r], rank=r, world=4, send_links=mesh4.send[r],
                                   recv_links=mesh4.recv[r], op_tag=78, out=xs[r])

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in range(4):
        assert outs[r].data_ptr() == xs[r].data_ptr()
        assert torch.equal(xs[r], want), r


def test_int8_results_are_bit_identical_and_quantised(mesh4):
    from peerlearn.wire.codecs import Codec

    xs = _inputs(4, 100_003, seed=5)
    res = mesh4.run(xs, tag=90, average=True, codec=CodecSpec(int(Codec.INT8_ABSMAX), 64))
    first = res[0]
    assert all(torch.equal(res[r], first) for r in range(4))
    exact = torch.stack([x.double() for x in xs]).mean(0)
    err = (first.double() - exact).abs().max().item()
    # One quantisation of each part on the way in, one of the result: each at
    # most half a step (block absmax / 254) of values ~ N(0, 4).
    assert 1e-6 < err < 0.25, err


def test_a_peer_that_never_sends_is_named_and_the_rest_abort_in_time():
    mesh = Mesh(3)
    try:
        xs = _inputs(3, 4096)
        t0 = time.monotonic()
        res = mesh.run(xs, tag=5, stalled=2, timeout=1.0)
        took = time.monotonic() - t0
        for r in (0, 1):
            e = res[r]
            assert isinstance(e, AllReduceAborted), e
            assert e.peer_rank == 2 and e.direction == "recv", (e, e.peer_rank)
        # The first to time out names it and aborts; the other may see that
        # abort on the gather it already reads before its own timeout, and
        # then names the one whose scatter part it still lacks.
        assert any(isinstance(res[r].cause, TimeoutError) for r in (0, 1)), res
        assert took < 5.0, took
    finally:
        mesh.close()


def test_two_peers_and_one():
    mesh = Mesh(2)
    try:
        xs = _inputs(2, 300)
        res = mesh.run(xs, tag=1, average=True)
        assert torch.equal(res[0], res[1]) and torch.equal(res[0], _rank_order(xs, True))
    finally:
        mesh.close()
    x = torch.arange(5, dtype=torch.float32)
    y = direct_allreduce(x, rank=0, world=1, send_links=[None], recv_links=[None], op_tag=0)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def _bytes_received(link) -> list[int]:
    """tcpi_bytes_received of each of the link's connections (Linux)."""
    import socket
    import struct
    return [struct.unpack_from("<Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256),
                               128)[0] for s in link._socks]


@pytest.mark.skipif(not hasattr(__import__("socket"), "TCP_INFO"), reason="needs Linux TCP_INFO")
def test_small_parts_ride_one_connection_large_ones_all():
    """Parts up to ONE_CONNECTION_BYTES go over the first connection of each
    link only (its receive window stays grown: docs/benchmarks.md), larger
    ones over every connection."""
    from peerlearn.swarm.direct import ONE_CONNECTION_BYTES

    mesh = Mesh(3)
    try:
        before = {(j, i): _bytes_received(mesh.recv[j][i]) for i in range(3) for j in range(3)
                  if i != j}
        small = _inputs(3, 3 * 4096)  # 16 KiB parts
        res = mesh.run(small, tag=11)
        assert all(torch.equal(res[r], res[0]) for r in range(3))
        after = {k: _bytes_received(mesh.recv[k[0]][k[1]]) for k in before}
        for k in before:
            grew = [a - b for a, b in zip(after[k], before[k])]
            assert grew[0] >= 2 * 4096 * 4 and grew[1] == 0, (k, grew)
        numel = 3 * (ONE_CONNECTION_BYTES // 4 + 4096)  # parts just over the bound
        large = _inputs(3, numel)
        res = mesh.run(large, tag=12)
        assert all(torch.equal(res[r], res[0]) for r in range(3))
        final = {k: _bytes_received(mesh.recv[k[0]][k[1]]) for k in before}
        for k in before:
            assert all(f > a for f, a in zip(final[k], after[k])), k
    finally:
        mesh.close()
