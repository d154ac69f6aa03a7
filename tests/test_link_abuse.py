"""A member holding the data key abusing a link: announced-but-unsent payloads."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import torch

from peerlearn import _native
from peerlearn.transport.stream import StreamError, StreamProtocolError
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
