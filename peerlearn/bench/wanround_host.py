"""`peerlearn bench wanround`'s processes inside the emulated hosts (started by
wanround.py): `--role peer`, `peerlearn run` with timestamping hooks
installed, and `--role ring`, the bare ring all-reduce it is compared with.

The hooks write one JSON line per event to a file per peer, with
`time.monotonic()`: every control message sent and handled (heartbeats
aside), Ready, the collective's start and end, data-link setup (and whether
a link was new), each ring transfer's end (per lane, so per ring step), the
TCP state of each data connection at a round's first send (TCP_INFO: cwnd,
MSS, ms since it last sent, RTO, congestion control), Done, the apply, and
the daemon's own all-reduce duration histogram (PeerStats.durations: the
`peerlearn_collective_seconds{operation="all_reduce"}` metric).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import struct
import sys
import threading
import time

RING_SECRET = b"peerlearn-bench-wanround-ring-secret"


class _Events:
    """One JSON line per event, t = time.monotonic(); any thread."""

    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, kind: str, **fields) -> None:
        fields["t"], fields["k"] = time.monotonic(), kind
        line = json.dumps(fields, separators=(",", ":"))
        with self.lock:
            self.f.write(line + "\n")


def _tcp_info(fd: int) -> dict:
    """A few TCP_INFO fields of one connection (struct tcp_info, linux/tcp.h)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        b = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        cc = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    finally:
        s.close()  # the duplicate only

    def u32(off: int) -> int:
        return struct.unpack_from("<I", b, off)[0] if len(b) >= off + 4 else -1

    return {"cc": cc.split(b"\0", 1)[0].decode(), "rto_us": u32(8), "mss": u32(16),
            "idle_ms": u32(44), "rtt_us": u32(68), "ssthresh": u32(76), "cwnd": u32(80),
            "retrans": u32(100), "snd_wnd": u32(228), "unacked": u32(24),
            "pacing_rate": struct.unpack_from("<Q", b, 104)[0] if len(b) >= 112 else -1}


def _nodelay(link, on: bool = True) -> None:
    """TCP_NODELAY on every connection of a link (an EXPERIMENT: the links
    leave Nagle's algorithm on, so a transfer's small last segment and its END
    frame wait for an ACK while the previous small segment is unacknowledged)."""
    for s in link._socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(on))


def _install_link_hooks(emit: _Events, traffic: str | None) -> None:
    """Each ring transfer's end (op id: round << 16 | step, one piece a step
    at these sizes) and, before step 0 is sent, the TCP state of the lane's
    connections. traffic: only links counted under it (None: every link)."""
    from peerlearn.transport import link as tl

    send0, recv0 = tl.Link.send, tl.Link.recv_into

    def ours(link) -> bool:
        return traffic is None or link._root.traffic == traffic

    def send(self, tensor, op_id, **kw):
        if not ours(self):
            return send0(self, tensor, op_id, **kw)
        step, rid = op_id & 0xFFFF, op_id >> 16
        if step == 0:
            try:
                emit("tcp", rid=rid, conns=[_tcp_info(fd) for fd in self._fds])
            except OSError:
                pass
        try:
            return send0(self, tensor, op_id, **kw)
        finally:
            emit("ssent", rid=rid, step=step, peer=_far_host(self))
            if step == 0:  # a restart after idle happens in the send: seen only now
                try:
                    emit("tcp_after", rid=rid, conns=[_tcp_info(fd) for fd in self._fds])
                except OSError:
                    pass

    def recv_into(self, out, op_id, **kw):
        if not ours(self):
            return recv0(self, out, op_id, **kw)
        try:
            return recv0(self, out, op_id, **kw)
        finally:
            emit("srecv", rid=op_id >> 16, step=op_id & 0xFFFF, peer=_far_host(self))

    tl.Link.send, tl.Link.recv_into = send, recv_into


def _far_host(link) -> str:
    """The emulated host at the other end (each peer has its own address),
    so a late transfer can be pinned on a pair of peers."""
    try:
        return link._socks[0].getpeername()[0]
    except (OSError, IndexError, AttributeError):
        return ""


def _slot_wait(slot_s: float) -> None:
    """Sleep to the next multiple of slot_s on the monotonic clock (shared by
    every namespace of this machine), at least 10 ms away."""
    if slot_s > 0:
        now = time.monotonic()
        time.sleep(math.ceil((now + 0.01) / slot_s) * slot_s - now)


def _install_daemon_hooks(emit: _Events, slot_s: float, cc: str | None,
                          nodelay_flag: str) -> None:
    from peerlearn.swarm import collective as scol
    from peerlearn.swarm import contributing as sc
    from peerlearn.swarm import datalinks as sd
    from peerlearn.swarm import peer as sp
    from peerlearn.swarm import rounds as sr
    from peerlearn.swarm import synthetic as ss
    from peerlearn.transport import control as tc
    from peerlearn.transport.stream import SocketOptions
    from peerlearn.wire import control as m

    def fields(msg) -> dict:
        return {"m": type(msg).__name__, "rid": getattr(msg, "round_id", None),
                "step": getattr(msg, "step", None)}

    init0 = sp.PeerDaemon.__init__

    def init(self, *a, **kw):
        init0(self, *a, **kw)
        emit("hello", id=self.id)

    send0 = tc.ControlPlane.send

    def send(self, address, msg, to=None):
        if not isinstance(msg, m.Heartbeat):
            emit("send", to=(to or "")[:8], **fields(msg))
        return send0(self, address, msg, to=to)

    handle0 = sp.PeerDaemon._handle

    def handle(self, sender, msg):
        if not isinstance(msg, m.Heartbeat):
            emit("recv", frm=sender[:8], **fields(msg))
        return handle0(self, sender, msg)

    ready0 = sr.RoundCore.local_ready

    def local_ready(self, now, step, state_hash):
        emit("ready", step=step)
        return ready0(self, now, step, state_hash)

    finished0 = sr.RoundCore.collective_finished

    def collective_finished(self, now, round_id, ok, *a, **kw):
        emit("done", rid=round_id, ok=ok)
        return finished0(self, now, round_id, ok, *a, **kw)

    run0 = sc.run_collective

    def run_collective(links, cfg, me, a, update, inflight):
        emit("coll_start", rid=a.round_id, step=a.step, n=len(a.participants))
        ok = False
        try:
            out = run0(links, cfg, me, a, update, inflight)
            ok = True
            return out
        finally:
            emit("coll_end", rid=a.round_id, ok=ok)

    def timed(fn, algo):
        def wrapper(tensor, *a, **kw):
            emit("ring_start", rid=kw.get("op_tag"), algo=algo)
            try:
                return fn(tensor, *a, **kw)
            finally:
                emit("ring_end", rid=kw.get("op_tag"))
        return wrapper

    out0, in0 = sd.PeerLinks.outgoing, sd.PeerLinks.incoming
    seen_in: dict = {}

    def outgoing(self, peer, address, timeout=10.0, channel=sd.CHANNEL_ROUND):
        with self._cv:
            before = self._out.get((peer, channel))
        t0 = time.monotonic()
        link = out0(self, peer, address, timeout, channel)
        if channel == sd.CHANNEL_ROUND:
            nodelay = os.path.exists(nodelay_flag)  # the parent's switch
            if nodelay:
                _nodelay(link)
            emit("link_out", dt=time.monotonic() - t0, new=link is not before, nodelay=nodelay)
        return link

    def incoming(self, peer, timeout=10.0, channel=sd.CHANNEL_ROUND, **kw):
        t0 = time.monotonic()
        link = in0(self, peer, timeout, channel, **kw)
        if channel == sd.CHANNEL_ROUND:
            new = seen_in.get(peer) is not link
            seen_in[peer] = link
            emit("link_in", dt=time.monotonic() - t0, new=new)
        return link

    apply0 = sc.Contributing._apply

    async def apply(self, a, sub, result):
        await apply0(self, a, sub, result)
        d = self.stats.durations
        emit("applied", rid=a.round_id, step=a.step + 1, ar_sum=d.sums["all_reduce"],
             ar_n=sum(d.counts["all_reduce"]))

    update0 = ss.SyntheticWorkload.local_update

    def local_update(self, peer_id, step):
        out = update0(self, peer_id, step)
        _slot_wait(slot_s)
        emit("contrib", step=step)
        return out

    sp.PeerDaemon.__init__, sp.PeerDaemon._handle = init, handle
    tc.ControlPlane.send = send
    sr.RoundCore.local_ready, sr.RoundCore.collective_finished = local_ready, collective_finished
    sc.run_collective = run_collective
    # The collectives a round may run (another may be added: it is timed as a whole)
    for name, algo in (("ring_allreduce", "ring"), ("direct_allreduce", "direct"),
                       ("halving_allreduce", "halving"), ("ring_allgather", "allgather")):
        if hasattr(scol, name):
            setattr(scol, name, timed(getattr(scol, name), algo))
    sd.PeerLinks.outgoing, sd.PeerLinks.incoming = outgoing, incoming
    sc.Contributing._apply = apply
    ss.SyntheticWorkload.local_update = local_update
    if cc:
        connect0 = sd.connect_link

        def connect_link(host, port, secret, n_conns, **kw):
            kw.setdefault("options", SocketOptions(congestion=cc))
            return connect0(host, port, secret, n_conns, **kw)

        sd.connect_link = connect_link
    _install_link_hooks(emit, "round")


def _peer_main(a: argparse.Namespace, rest: list[str]) -> None:
    """`peerlearn run ...` (rest) with the hooks installed."""
    emit = _Events(a.events)
    _install_daemon_hooks(emit, a.slot_s, a.cc, a.events + ".nodelay")
    from peerlearn.cli import app

    sys.argv = ["peerlearn", *rest]
    app.main()


def _ring_main(a: argparse.Namespace) -> None:
    """The bare ring: the daemon's connections and lanes, no daemon. `warm`:
    a barrier (a one-element all-reduce), then the timed one; `after_idle`:
    no barrier, every peer starts at the next slot boundary."""
    import torch

    from peerlearn.swarm import connect_ring, ring_allreduce
    from peerlearn.swarm.config import PeerConfig
    from peerlearn.transport.stream import LinkListener, SocketOptions

    torch.set_num_threads(1)
    emit = _Events(a.events)
    _install_link_hooks(emit, None)
    fields = PeerConfig.__dataclass_fields__
    conns, lanes = fields["n_conns"].default, fields["ring_lanes"].default
    addrs = [(h, int(p)) for h, p in (x.rsplit(":", 1) for x in a.addrs.split(","))]
    world, rank = len(addrs), a.rank
    x = torch.randn(a.numel, generator=torch.Generator().manual_seed(rank))
    opts = SocketOptions(congestion=a.cc) if a.cc else SocketOptions()
    modes = ["warm", "after_idle"] + (["warm_nodelay", "after_idle_nodelay"] if a.nodelay else [])
    out: dict = {"rank": rank, "conns": conns, "lanes": lanes, **{m: [] for m in modes}}
    with LinkListener(*addrs[rank], RING_SECRET) as lst:
        ring = connect_ring(rank, addrs, lst, RING_SECRET, ring_tag=7, n_conns=conns,
                            options=opts, timeout=120)
        tag = 0

        def reduce(t: torch.Tensor, **kw) -> None:
            nonlocal tag
            tag += 1
            ring_allreduce(t, rank=rank, world=world, send_link=ring.send, recv_link=ring.recv,
                           op_tag=tag, average=True, timeout=60, **kw)

        one = torch.zeros(1)
        reduce(x, lanes=lanes)  # warm-up
        for mode in modes:
            if mode.endswith("_nodelay"):
                _nodelay(ring.send)
                _nodelay(ring.recv)
            for _ in range(a.repeat):
                if mode.startswith("warm") or a.slot_s <= 0:
                    reduce(one)  # barrier
                else:
                    _slot_wait(a.slot_s)
                t0 = time.monotonic()
                emit("run", mode=mode, rid=tag + 1, t0=t0)
                reduce(x, lanes=lanes)
                emit("run_end", mode=mode, rid=tag)
                out[mode].append(time.monotonic() - t0)
        ring.close()
    print(json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["peer", "ring"], required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--slot-s", type=float, default=0.0)
    p.add_argument("--cc", default=None)
    p.add_argument("--rank", type=int)
    p.add_argument("--addrs")
    p.add_argument("--numel", type=int)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--nodelay", action="store_true")
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    a = p.parse_args(argv)
    if a.role == "peer":
        _peer_main(a, rest)
    else:
        _ring_main(a)


if __name__ == "__main__":
    main()
