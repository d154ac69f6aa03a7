"""A member holding the data key abusing a link: announced-but-unsent payloads,
and a link closed under a transfer that still borrows its descriptors."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
import torch

from peerlearn import _native
from peerlearn.transport.stream import Link, StreamError, StreamProtocolError
from peerlearn.wire import codecs as C

MIB = 1 << 20


def frame(kind=1, flags=0, dtype=1, op_id=1, seq=0, n_chunks=1, chunk_elems=4, payload_len=16):
    return struct.pack("<IBBBBQIIQII", 0x31464C50, kind, flags, dtype, 0, op_id, seq, n_chunks,
                       chunk_elems, payload_len, 0)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def socketpairs():
    pairs = [socket.socketpair() for _ in range(4)]
    yield pairs
    for a, b in pairs:
        a.close()
        b.close()


@pytest.mark.parametrize("accumulate", [False, True])
def test_an_announced_payload_costs_nothing_until_its_bytes_arrive(socketpairs, accumulate):
    # 4 headers (160 bytes) each announcing a packed chunk at the 128 MiB frame
    # limit: a receiver that sizes its buffer from payload_len takes 512 MiB.
    out = torch.zeros(4 << 18)
    recv_fds = [b.fileno() for _, b in socketpairs]
    before = rss_bytes()
    op = _native.start_recv(recv_fds, out, 7, accumulate, 20.0)
    try:
        for seq, (a, _) in enumerate(socketpairs):
            a.sendall(frame(flags=1, dtype=0, op_id=7, seq=seq, n_chunks=4, chunk_elems=1 << 18,
                            payload_len=_native.MAX_FRAME_PAYLOAD_BYTES))
        time.sleep(0.5)
        grown = rss_bytes() - before
        assert not op.done  # still waiting for the codec header: nothing decided yet
    finally:
        op.cancel()
        with pytest.raises(StreamError):
            op.wait()
    assert grown < 32 * MIB, f"receiver grew {grown / MIB:.0f} MiB for 160 bytes of headers"


def test_a_packed_length_that_disagrees_with_its_codec_header_fails_before_the_payload():
    a, b = socket.socketpair()
    with a, b:
        out = torch.zeros(1024)
        op = _native.start_recv([b.fileno()], out, 7, False, 5.0)
        packed = bytes(C.encode(torch.ones(1024), C.Codec.INT8_ABSMAX, block_size=64).tolist())
        a.sendall(frame(flags=1, dtype=0, op_id=7, chunk_elems=1024,
                        payload_len=_native.MAX_FRAME_PAYLOAD_BYTES) + packed[:32])
        started = time.monotonic()
        with pytest.raises(StreamProtocolError, match="payload_bytes|implies"):
            op.wait()
        assert time.monotonic() - started < 2  # decided on the header, not at the timeout


def test_accumulating_raw_chunks_still_adds_every_element():
    a, b = socket.socketpair()
    with a, b:
        n = 100_000  # several of the receiver's bounded accumulate slices
        out = torch.ones(n)
        x = torch.arange(n, dtype=torch.float32)
        op = _native.start_recv([b.fileno()], out, 9, True, 5.0)
        a.sendall(frame(op_id=9, chunk_elems=n, payload_len=4 * n) + bytes(x.untyped_storage())
                  + frame(kind=2, dtype=0, op_id=9, seq=1, chunk_elems=0, payload_len=0))
        op.wait()
        assert torch.equal(out, x + 1)


def _one_conn_link() -> tuple[Link, socket.socket]:
    a, b = socket.socketpair()
    return Link([b], b"\0" * 16), a


def test_close_during_a_receive_never_lets_the_op_read_a_reused_descriptor():
    link, far = _one_conn_link()
    out = torch.zeros(4)
    err: list[BaseException] = []

    def receive():
        try:
            link.recv_into(out, 1, timeout=10)
        except BaseException as e:  # noqa: BLE001 - checked below
            err.append(e)

    t = threading.Thread(target=receive)
    t.start()
    time.sleep(0.2)  # the op is polling the descriptor
    old_fd = link._fds[0]
    link.close()
    # A new socket takes the lowest free descriptor: the old number if close()
    # freed it. A stranger then sends a complete, valid op 1 on it.
    strangers = [socket.socketpair() for _ in range(4)]
    try:
        for s, peer in strangers:
            if s.fileno() == old_fd or peer.fileno() == old_fd:
                other = peer if s.fileno() == old_fd else s
                other.sendall(frame(op_id=1) + bytes(torch.full((4,), 7.0).untyped_storage())
                              + frame(kind=2, dtype=0, op_id=1, seq=1, chunk_elems=0,
                                      payload_len=0))
        t.join(5)
        assert not t.is_alive()
        assert err and isinstance(err[0], StreamError), "the receive must fail, not succeed"
        assert "Bad file descriptor" not in str(err[0])
        assert not torch.equal(out, torch.full((4,), 7.0)), "read a stranger's bytes"
        assert link._socks[0].fileno() == -1  # closed once the op let go
    finally:
        far.close()
        for s, peer in strangers:
            s.close()
            peer.close()


def test_close_with_no_op_in_flight_closes_at_once():
    link, far = _one_conn_link()
    with far:
        fd = link._fds[0]
        link.close()
        assert link._socks[0].fileno() == -1
        with pytest.raises(OSError):
            os.fstat(fd)
        with pytest.raises(StreamError, match="closed"):
            link.recv_into(torch.zeros(4), 1, timeout=1)


def test_closing_the_parent_waits_for_its_lanes_ops():
    pairs = [socket.socketpair() for _ in range(2)]
    link = Link([b for _, b in pairs], b"\0" * 16)
    lane = link.lanes(2)[1]
    box: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(box, lane.recv_into, torch.zeros(4), 1, timeout=10))
    t.start()
    time.sleep(0.2)
    link.close()
    t.join(5)
    assert box and "Bad file descriptor" not in str(box[0])
    assert all(b.fileno() == -1 for _, b in pairs)
    for a, _ in pairs:
        a.close()


def _catch(box, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except BaseException as e:  # noqa: BLE001 - checked by the caller
        box.append(e)
