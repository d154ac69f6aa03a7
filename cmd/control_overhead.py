"""What the control plane costs on the wire beyond the bytes peerlearn counts
(docs/benchmarks.md, "Bytes a peer moves").

    python cmd/control_overhead.py              # 60 s, a round every 5 s

The control plane counts each message's frame as it leaves and reaches our
code (transport.traffic, traffic "control"); zmq's framing and heartbeats and
CURVE's handshake and boxes travel on top, and TCP/IP headers under all of it.
Three peers on loopback, in this process, with `peerlearn run`'s timeouts,
all-reduce a small tensor every --round-every seconds; then the kernel's own
counts for each control connection (`ss -ti`: payload bytes and segments,
both directions, read at the dialling end so each connection counts once)
are set against the counted bytes. Needs iproute2's `ss`; nothing else may
hold connections to these ports.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from peerlearn.state.shared import SharedState
from peerlearn.swarm.actions import Timeouts
from peerlearn.swarm.api import Peer
from peerlearn.swarm.config import PeerConfig
from peerlearn.transport.traffic import CONTROL, WIRE

SECRET = b"control-overhead-secret-0123456789"
IP_TCP_HEADERS = 52  # IPv4 20 + TCP 20 + the timestamp option 12, per segment


def initial() -> SharedState:
    st = SharedState(0)
    st.register("w", torch.zeros(1000))
    return st


def tcp_counts(ports: set[int]) -> tuple[int, int, int]:
    """(connections, payload bytes, segments) of the established connections
    dialled to `ports`, both directions."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    conns = payload = segments = 0
    for head, info in zip(out[::2], out[1::2]):  # a socket's line, then its tcp_info
        local, remote = head.split()[2:4]
        if int(remote.rsplit(":", 1)[1]) in ports and int(local.rsplit(":", 1)[1]) not in ports:
            conns += 1
            payload += _field(info, "bytes_sent") + _field(info, "bytes_received")
            segments += _field(info, "segs_out") + _field(info, "segs_in")
    return conns, payload, segments


def _field(info: str, name: str) -> int:
    found = re.search(rf"\b{name}:(\d+)", info)
    return int(found[1]) if found else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--round-every", type=float, default=5.0)
    args = ap.parse_args()
    timeouts = Timeouts.for_dead_after(3.0)  # `peerlearn run --dead-after`'s default
    tmp = Path(tempfile.mkdtemp(prefix="control-overhead-"))
    peers = [Peer(PeerConfig(tmp / "p0", SECRET, timeouts=timeouts), initial).start()]
    for i in (1, 2):
        peers.append(Peer(PeerConfig(tmp / f"p{i}", SECRET, timeouts=timeouts,
                                     join=peers[0].control_address), initial).start(timeout=20))
    rounds = []
    try:
        for p in peers:
            p.sync_state(timeout=20)
        until = time.monotonic() + args.seconds

        def work(p: Peer) -> None:
            while time.monotonic() < until:
                try:
                    p.all_reduce({"w": torch.ones(1000)}, timeout=10)
                    rounds.append(1)
                except Exception:  # noqa: BLE001 - a round missed: the next one goes on
                    pass
                time.sleep(args.round_every)

        threads = [threading.Thread(target=work, args=(p,)) for p in peers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)  # what is in flight arrives
        counted = WIRE.snapshot()[("sent", CONTROL)]
        conns, payload, segments = tcp_counts(
            {int(p.control_address.rsplit(":", 1)[1]) for p in peers})
    finally:
        for p in peers:
            p.close()
    print(f"{args.seconds:.0f} s, 3 peers on loopback, {len(rounds)} all-reduces completed, "
          f"{conns} control connections")
    print(f"counted control bytes: {counted}")
    print(f"TCP payload of the control connections: {payload} = {payload / counted:.2f}x "
          "counted (zmq framing and heartbeats, CURVE)")
    print(f"with {segments} segments' IPv4/TCP headers ({IP_TCP_HEADERS} B each): "
          f"{payload + IP_TCP_HEADERS * segments} = "
          f"{(payload + IP_TCP_HEADERS * segments) / counted:.2f}x counted")


if __name__ == "__main__":
    main()
