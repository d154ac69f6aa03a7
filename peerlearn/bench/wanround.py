"""`peerlearn bench wanround`: where a small round's time goes over an emulated WAN (issue 18).

4 peers, each on its own emulated host (peerlearn.netsim: 100 ms RTT, 100
Mbit/s per host by default), run the synthetic workload (`peerlearn run
--algo synthetic --numel 262144 --compute-s 0`: a 1 MiB fp32 state) under
the daemon exactly as shipped. The peer processes are this module's `peer`
role: it installs timestamping hooks (below) and then runs the same
`peerlearn run` command line; nothing in the daemon's code paths changes
except that every peer's contribution is handed over at the next multiple
of `slot_s` on the machine's monotonic clock (one clock for every namespace),
so all peers submit at the same instant and the links idle between rounds
as they do while a real swarm computes.

End to end, per round: from the first peer handing its contribution to the
daemon (`Peer.all_reduce`; with slots all of them within a millisecond or
two) to the last participant having applied the result (`apply` done, new
state hashed: what `all_reduce` waits for). Only rounds that all peers took
part in and applied count; the window starts after the first such round.

The hooks write one JSON line per event to a file per peer, with
`time.monotonic()`: every control message sent and handled (heartbeats
aside), Ready, the collective's start and end, data-link setup (and whether
a link was new), each ring transfer's end (per lane, so per ring step), the
TCP state of each data connection at a round's first send (TCP_INFO: cwnd,
MSS, ms since it last sent, RTO, congestion control), Done, the apply, and
the daemon's own all-reduce duration histogram (PeerStats.durations: the
`peerlearn_collective_seconds{operation="all_reduce"}` metric).

The round splits into stages, each ending when the last peer finished it,
so the stages add up to the end-to-end time exactly:

    contributions        first to last hand-over
    submit_to_ready      the daemon re-hashes the state and sends Ready
    ready_to_coordinator the last Ready reaches the coordinator      (1/2 RTT)
    propose              the coordinator decides
    propose_ack          Propose out, every Ack back                  (1 RTT)
    commit               the last participant receives the Commit   (1/2 RTT)
    collective           the ring (link checks, 2(N-1) steps, the hash)
    done_to_coordinator  the last Done reaches the coordinator      (1/2 RTT)
    apply_out            the last participant receives the Apply    (1/2 RTT)
    apply_local          the apply and the new state's hash

In the same invocation, over the same emulated hosts: the RTT probe (UDP
ping-pong, `netsim.measure.rtt`) and the bare ring all-reduce of the same
tensor among the same hosts over already-open links with the daemon's
connections and lanes (no daemon, no control plane): back to back after a
barrier (`warm`), and started at slot boundaries after the same idle as
the daemons' rounds (`after_idle`). Ratios are against both.

EXPERIMENT options, each reported under its own label: `no_slow_start_after_idle`
measures a further window of rounds after `net.ipv4.tcp_slow_start_after_idle=0`
was set in every host's namespace (the same peers, the same links; set back
to 1 after it); `nodelay` a window with TCP_NODELAY set on the round's data
connections (a file per peer is the switch; the bare ring is then timed
with it too, `*_nodelay`: the links leave Nagle's algorithm on); `cc`
sets the congestion control of every data connection (TCP_CONGESTION on
the connecting, sending side; the namespaces inherit the machine's
default, bbr here, and a namespace cannot change its default); `mtu` is
the emulator's (65000 by default, where TCP's windows count 64 KB
segments; 1500 is a real path's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONTROL_PORT, DATA_PORT, RING_PORT = 7400, 7401, 29631
RING_SECRET = b"peerlearn-bench-wanround-ring-secret"
STAGES = ("contributions", "submit_to_ready", "ready_to_coordinator", "propose", "propose_ack",
          "commit", "collective", "done_to_coordinator", "apply_out", "apply_local")
CONTROL_STAGES = STAGES[:6]
DECISION_STAGES = STAGES[7:]


# ------------------------------------------------------------ inside a host


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
                       ("ring_allgather", "allgather")):
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


# ------------------------------------------------------------ the parent


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line still being written
    return out


def _netns_sysctl(emu, key: str, value: str) -> None:
    for h in emu.hosts:
        subprocess.run(["ip", "netns", "exec", h.netns, "sysctl", "-q", "-w", f"{key}={value}"],
                       check=True, capture_output=True)


def _complete(events: list[list[dict]], peers: int) -> list[int]:
    """Round ids every peer took part in (n = peers) and applied, in order."""
    applied: dict[int, set[int]] = {}
    full: set[int] = set()
    for i, evs in enumerate(events):
        for e in evs:
            if e["k"] == "applied":
                applied.setdefault(e["rid"], set()).add(i)
            elif e["k"] == "coll_start" and e["n"] == peers:
                full.add(e["rid"])
    return sorted(r for r, who in applied.items() if r in full and len(who) == peers)


def _first(evs, k: str, **match):
    """The time of the first event of kind k whose fields equal match, or None."""
    return next((e["t"] for e in evs if e["k"] == k and
                 all(e.get(f) == v for f, v in match.items())), None)


def _first_after(evs, t: float, k: str, **match):
    return _first([e for e in evs if e["t"] >= t], k, **match)


def _round(events: list[list[dict]], short: dict[str, int], rid: int) -> dict | None:
    """One round's timestamps, stages and collective steps (None if the round
    cannot be placed). The coordinator is the peer that sent its Commit (or
    Propose, or Apply); a message the protocol no longer sends makes its
    stage 0 s and is listed under `absent`, so the stages still add up.
    (Participants also send a Commit back to the coordinator while a round
    runs, rounds.RoundCore.tick: the earliest sender of each kind is taken.)"""
    n = len(events)
    coord = None
    for kind in ("Propose", "Apply", "Commit"):
        sent = [(e["t"], i) for i, evs in enumerate(events) for e in evs
                if e["k"] == "send" and e["m"] == kind and e["rid"] == rid]
        if sent:
            coord = min(sent)[1]
            break
    starts = [e for evs in events for e in evs if e["k"] == "coll_start" and e["rid"] == rid]
    if coord is None or not starts:
        return None
    C, ids = events[coord], {v: k for k, v in short.items()}
    step, first_start = starts[0]["step"], min(e["t"] for e in starts)
    t_prop = _first(C, "send", m="Propose", rid=rid)
    cut = t_prop if t_prop is not None else first_start

    def last_before(evs, kind, t):
        ts = [e["t"] for e in evs if e["k"] == kind and e.get("step") == step and e["t"] <= t]
        return ts[-1] if ts else None

    contrib = [last_before(events[p], "contrib", cut) for p in range(n)]
    ready = [last_before(events[p], "ready", cut) for p in range(n)]
    if None in contrib:
        return None
    t_commit = _first(C, "send", m="Commit", rid=rid)
    t_apply = _first(C, "send", m="Apply", rid=rid)
    per: dict[str, list] = {k: [] for k in (
        "ready_at_c", "ack_at_c", "commit_recv", "coll_start", "ring_start", "ring_end",
        "coll_end", "done", "done_at_c", "apply_recv", "applied")}
    links, tcp, tcp_after, steps, algos = [], [], [], [], set()
    for p, evs in enumerate(events):
        sid, mine = ids[p], [e for e in evs if e.get("rid") == rid]
        local = p == coord
        per["ready_at_c"].append(ready[p] if local or ready[p] is None else
                                 _first_after(C, ready[p], "recv", m="Ready", frm=sid, step=step))
        per["ack_at_c"].append(t_prop if local else _first(C, "recv", m="Ack", frm=sid, rid=rid))
        per["commit_recv"].append(t_commit if local else _first(mine, "recv", m="Commit"))
        per["apply_recv"].append(t_apply if local else _first(mine, "recv", m="Apply"))
        for k in ("coll_start", "ring_start", "ring_end", "coll_end", "done", "applied"):
            per[k].append(_first(mine, k))
        per["done_at_c"].append(per["done"][-1] if local else
                                _first(C, "recv", m="Done", frm=sid, rid=rid))
        cs, rs = per["coll_start"][-1], per["ring_start"][-1]
        if cs is not None and rs is not None:
            links += [e for e in evs if e["k"] in ("link_out", "link_in") and cs <= e["t"] <= rs]
        tcp += [c for e in mine if e["k"] == "tcp" for c in e["conns"]]
        tcp_after += [c for e in mine if e["k"] == "tcp_after" for c in e["conns"]]
        algos |= {e.get("algo", "ring") for e in mine if e["k"] == "ring_start"}
        arr: dict[int, float] = {}
        for e in mine:
            if e["k"] == "srecv":
                arr[e["step"]] = max(arr.get(e["step"], 0.0), e["t"])
        steps.append(arr)
    for k in ("coll_start", "ring_start", "ring_end", "coll_end", "applied"):
        if None in per[k]:
            return None  # a participant missing: not a round of every peer

    def latest(key):
        vs = per[key]
        return None if None in vs else max(vs)

    t0 = min(contrib)
    raw = [max(contrib), None if None in ready else max(ready), latest("ready_at_c"), t_prop,
           latest("ack_at_c") if t_prop is not None else None, latest("commit_recv"),
           max(per["coll_end"]), latest("done_at_c"), latest("apply_recv"), max(per["applied"])]
    marks, absent = [t0], []
    for name, v in zip(STAGES, raw):
        if v is None:
            absent.append(name)
        marks.append(max(marks[-1], v if v is not None else marks[-1]))
    stages = {name: marks[i + 1] - marks[i] for i, name in enumerate(STAGES)}
    n_steps = max((len(a) for a in steps), default=0)
    if not n_steps:
        return None
    keys = sorted({g for a in steps for g in a})
    arrive = [max(a.get(g, 0.0) for a in steps) for g in keys]
    ring = {"algo": sorted(algos),
            "start": max(r - c for r, c in zip(per["ring_start"], per["coll_start"])),
            "steps": [arrive[0] - max(per["ring_start"])] +
                     [arrive[g] - arrive[g - 1] for g in range(1, len(arrive))],
            "finish": max(per["coll_end"]) - arrive[-1],
            "per_peer_ring_s": [e - s for s, e in zip(per["ring_start"], per["ring_end"])],
            "link_setup_max_s": max((e["dt"] for e in links), default=0.0),
            "new_links": sum(bool(e["new"]) for e in links)}
    msgs: dict[str, int] = {}
    for evs in events:
        for e in evs:
            if e["k"] == "send" and t0 <= e["t"] <= marks[-1] and \
                    (e["rid"] == rid or (e["m"] == "Ready" and e["step"] == step)):
                msgs[e["m"]] = msgs.get(e["m"], 0) + 1
    return {"rid": rid, "step": step, "coordinator": coord, "t0": t0,
            "end_to_end_s": marks[-1] - t0, "stages": stages, "absent": absent, "ring": ring,
            "tcp": tcp, "tcp_after": tcp_after, "messages_sent": msgs}


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1]}


def _summarise(rounds: list[dict], rtt_s: float, baseline: dict, events, peers: int,
               window: list[int]) -> dict:
    if not rounds:
        return {"rounds": 0}
    med = lambda xs: statistics.median(xs)  # noqa: E731
    e2e = [r["end_to_end_s"] for r in rounds]
    stages = {s: med([r["stages"][s] for r in rounds]) for s in STAGES}
    n_steps = min(len(r["ring"]["steps"]) for r in rounds)
    steps = [med([r["ring"]["steps"][g] for r in rounds]) for g in range(n_steps)]
    ring = {"algo": sorted({a for r in rounds for a in r["ring"]["algo"]}),
            "start_s": med([r["ring"]["start"] for r in rounds]), "steps_s": steps,
            "finish_s": med([r["ring"]["finish"] for r in rounds]),
            "per_peer_ring_s": med([max(r["ring"]["per_peer_ring_s"]) for r in rounds]),
            "link_setup_max_s": max(r["ring"]["link_setup_max_s"] for r in rounds),
            "new_links_in_window": sum(r["ring"]["new_links"] for r in rounds)}
    tcp = [c for r in rounds for c in r["tcp"]]
    # The daemon's own duration of the collective (PeerStats: the all_reduce
    # histogram), over the window, per peer: its delta sum over delta count.
    own = []
    lo, hi = window[0], window[-1]
    for evs in events:
        ap = [e for e in evs if e["k"] == "applied" and lo <= e["rid"] <= hi]
        before = [e for e in evs if e["k"] == "applied" and e["rid"] < lo]
        if ap and before and ap[-1]["ar_n"] > before[-1]["ar_n"]:
            own.append((ap[-1]["ar_sum"] - before[-1]["ar_sum"]) /
                       (ap[-1]["ar_n"] - before[-1]["ar_n"]))
    m = med(e2e)
    out = {
        "rounds": len(rounds), "round_ids": [rounds[0]["rid"], rounds[-1]["rid"]],
        "rounds_not_complete_in_window": (hi - lo + 1) - len(rounds),
        "coordinators": sorted({r["coordinator"] for r in rounds}),
        "stages_absent": sorted({s for r in rounds for s in r["absent"]}),
        "end_to_end_s": _stats(e2e), "end_to_end_rtts": m / rtt_s,
        "all_end_to_end_s": [round(x, 4) for x in e2e],
        "stages_median_s": stages,
        "stages_median_rtts": {s: v / rtt_s for s, v in stages.items()},
        "phases_median_rtts": {
            "control_before_ring": sum(stages[s] for s in CONTROL_STAGES) / rtt_s,
            "collective": stages["collective"] / rtt_s,
            "decision_after_ring": sum(stages[s] for s in DECISION_STAGES) / rtt_s},
        "ring": ring, "ring_steps_rtts": [s / rtt_s for s in steps],
        "collective_s_daemon_metric": own and statistics.mean(own),
        "messages_sent_per_round": {k: med([r["messages_sent"].get(k, 0) for r in rounds])
                                    for k in sorted({k for r in rounds
                                                     for k in r["messages_sent"]})},
    }
    if tcp:
        out["tcp_at_first_send"] = {
            "connections_sampled": len(tcp), "cc": sorted({c["cc"] for c in tcp}),
            "mss": _stats([c["mss"] for c in tcp]),
            "cwnd_segments": _stats([c["cwnd"] for c in tcp]),
            "cwnd_bytes": _stats([c["cwnd"] * c["mss"] for c in tcp]),
            "idle_ms": _stats([c["idle_ms"] for c in tcp]),
            "rto_ms": _stats([c["rto_us"] / 1e3 for c in tcp]),
            "srtt_ms": _stats([c["rtt_us"] / 1e3 for c in tcp]),
            "peer_rwnd_bytes": _stats([c["snd_wnd"] for c in tcp]),
            "retrans_total": max(c["retrans"] for c in tcp)}
        after = [c for r in rounds for c in r.get("tcp_after", [])]
        if after:  # once step 0's bytes were handed to TCP (a restart after idle shows here)
            out["tcp_at_first_send"]["cwnd_segments_after_step0_send"] = \
                _stats([c["cwnd"] for c in after])
    for name, b in baseline.items():
        if b.get("median_s"):
            out[f"end_to_end_over_ring_{name}"] = m / b["median_s"]
    return out


def _ring_baseline(emu, numel: int, repeat: int, slot_s: float, cc: str | None, env: dict,
                   work: Path, rtt_s: float, nodelay: bool) -> dict:
    n = len(emu.hosts)
    addrs = ",".join(f"{h.addr}:{RING_PORT}" for h in emu.hosts)
    procs, files = [], [work / f"ring{r}.events" for r in range(n)]
    try:
        for r in range(n):
            argv = [sys.executable, "-m", "peerlearn.bench.wanround", "--role", "ring",
                    "--rank", str(r), "--addrs", addrs, "--numel", str(numel),
                    "--repeat", str(repeat), "--slot-s", str(slot_s), "--events", str(files[r]),
                    *(["--cc", cc] if cc else []), *(["--nodelay"] if nodelay else [])]
            with open(work / f"ring{r}.log", "w") as err:
                procs.append(emu.popen(r, argv, env=env, stdout=subprocess.PIPE, stderr=err,
                                       text=True))
        res = []
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=300 + repeat * 4 * (slot_s + 5))
            if p.returncode != 0:
                tail = (work / f"ring{r}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"ring peer {r} failed with exit code {p.returncode}: {tail}")
            res.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    events = [_read(f) for f in files]
    out: dict = {"conns": res[0]["conns"], "lanes": res[0]["lanes"]}
    for mode in [m for m in res[0] if m.startswith(("warm", "after_idle"))]:
        # A run: from the last peer's start (barrier exit, or the slot
        # boundary) to the last peer's end; each ring step: when its last
        # lane's transfer arrived at the last peer.
        rids = [e["rid"] for e in events[0] if e["k"] == "run" and e["mode"] == mode]
        runs, per_step, tcp, tcp_after = [], [], [], []
        for rid in rids:
            first = max((e["t0"] for evs in events for e in evs
                         if e["k"] == "run" and e["rid"] == rid), default=None)
            last = max((e["t"] for evs in events for e in evs
                        if e["k"] == "run_end" and e["rid"] == rid), default=None)
            arr: dict[int, float] = {}
            for evs in events:
                for e in evs:
                    if e["k"] == "srecv" and e["rid"] == rid:
                        arr[e["step"]] = max(arr.get(e["step"], 0.0), e["t"])
                    elif e["k"] == "tcp" and e["rid"] == rid:
                        tcp += e["conns"]
                    elif e["k"] == "tcp_after" and e["rid"] == rid:
                        tcp_after += e["conns"]
            if first is None or last is None:
                continue
            runs.append(last - first)
            seq = [arr[g] for g in sorted(arr)]
            if seq:
                per_step.append([seq[0] - first] + [b - a for a, b in zip(seq, seq[1:])])
        k = min((len(s) for s in per_step), default=0)
        steps = [statistics.median(s[g] for s in per_step) for g in range(k)]
        own = [max(r[mode][i] for r in res) for i in range(repeat)]
        out[mode] = {"median_s": statistics.median(runs), "min_s": min(runs),
                     "all_runs_s": [round(x, 4) for x in runs],
                     "slowest_peer_own_clock_median_s": statistics.median(own),
                     "rtts": statistics.median(runs) / rtt_s, "steps_s": steps,
                     "steps_rtts": [s / rtt_s for s in steps]}
        if tcp:
            out[mode]["tcp_at_first_send"] = {
                "cwnd_segments": _stats([c["cwnd"] for c in tcp]),
                "cwnd_bytes": _stats([c["cwnd"] * c["mss"] for c in tcp]),
                "idle_ms": _stats([c["idle_ms"] for c in tcp]),
                "cc": sorted({c["cc"] for c in tcp}),
                "cwnd_segments_after_step0_send": _stats([c["cwnd"] for c in tcp_after])}
    return out


class _Swarm:
    """4 `peerlearn run --algo synthetic` peers with hooks, one per host."""

    def __init__(self, emu, numel: int, slot_s: float, cc: str | None, env: dict, work: Path):
        self.emu, self.work, self.n = emu, work, len(emu.hosts)
        self.files = [work / f"p{i}.events" for i in range(self.n)]
        self.logs = [work / f"p{i}.log" for i in range(self.n)]
        self.procs = []
        founder = f"{emu.hosts[0].addr}:{CONTROL_PORT}"
        for i, h in enumerate(emu.hosts):
            argv = [sys.executable, "-m", "peerlearn.bench.wanround", "--role", "peer",
                    "--events", str(self.files[i]), "--slot-s", str(slot_s),
                    *(["--cc", cc] if cc else []), "--",
                    "run", "--algo", "synthetic", "--numel", str(numel), "--compute-s", "0",
                    "--listen", f"{h.addr}:{CONTROL_PORT}", "--data-port", str(DATA_PORT),
                    "--data-dir", str(work / f"p{i}"), "--metrics", "off",
                    "--log-format", "json", "--log-level", "debug",
                    *(["--join", founder] if i else [])]
            with open(self.logs[i], "w") as err, open(work / f"p{i}.out", "w") as out:
                self.procs.append(emu.popen(i, argv, env=env, stdout=out, stderr=err))
            if i == 0:
                time.sleep(1.0)  # the founder first; joiners retry anyway

    def events(self) -> list[list[dict]]:
        return [_read(f) for f in self.files]

    def wait_rounds(self, after: int, count: int, timeout: float) -> list[int]:
        """Until `count` complete rounds with an id above `after`; returns their ids."""
        deadline = time.monotonic() + timeout
        while True:
            done = [r for r in _complete(self.events(), self.n) if r > after]
            if len(done) >= count:
                return done[:count]
            if dead := [i for i, p in enumerate(self.procs) if p.poll() is not None]:
                raise RuntimeError(f"peer(s) {dead} exited (logs in {self.work})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(done)} of {count} complete rounds in {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def problems(self) -> list[str]:
        out = []
        for i, path in enumerate(self.logs):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("level") in ("warning", "error"):
                    out.append(f"p{i} {rec['level']}: {rec.get('message', '')[:160]}")
        return out


def run(peers: int = 4, numel: int = 262_144, wan: tuple[float, float] = (100.0, 100.0),
        rounds: int = 20, slot_s: float = 2.0, baseline_repeat: int = 10,
        no_slow_start_after_idle: bool = False, nodelay: bool = False, cc: str | None = None,
        mtu: int = 65000, logs_dir: str | None = None, settle_timeout: float = 240.0) -> dict:
    """See the module's docstring."""
    from peerlearn import buildinfo
    from peerlearn.netsim import WanEmulator, measure

    if rounds < 1 or peers < 2 or numel < peers:
        raise ValueError("need rounds >= 1, peers >= 2 and numel >= peers")
    rtt_ms, rate = wan
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PEERLEARN_SECRET=secrets.token_urlsafe(32))
    work = Path(tempfile.mkdtemp(prefix="peerlearn-wanround-"))
    res: dict = {
        "peers": peers, "numel": numel, "bytes": numel * 4, "revision": buildinfo.revision(),
        "path": f"emulated WAN, {rtt_ms:g} ms RTT, {rate:g} Mbit/s per host, MTU {mtu}",
        "slot_s": slot_s, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0],
        "end_to_end": "from the first peer handing its contribution to the daemon to the last "
                      "participant having applied the result; with slot_s > 0 every peer hands "
                      "it over at the same slot boundary",
        "experiment": {"cc": cc, "mtu": mtu, "no_slow_start_after_idle": no_slow_start_after_idle,
                       "nodelay": nodelay}}
    swarm = None
    try:
        with WanEmulator(n_hosts=peers, rtt_ms=rtt_ms, rate_mbit=rate, mtu=mtu) as emu:
            res["host_sysctls"] = emu.sysctls(0)
            probes = [measure.rtt(emu, 0, j, count=20) for j in range(1, peers)]
            rtt_s = statistics.median(s for p in probes for s in p["samples_ms"]) / 1e3
            res["rtt_probe_ms"] = {"median": rtt_s * 1e3,
                                   "min": min(p["min_ms"] for p in probes),
                                   "max": max(p["max_ms"] for p in probes)}
            res["ring_lower_bound_s"] = 2 * (peers - 1) / peers * numel * 4 * 8 / (rate * 1e6) \
                + 2 * (peers - 1) * rtt_s / 2 if rate else None
            base = _ring_baseline(emu, numel, baseline_repeat, slot_s, cc, env, work, rtt_s,
                                  nodelay)
            res["baseline_ring"] = base
            # one lane a connection: a ring step moves a segment's lane share on each
            res["bytes_per_connection_per_ring_step"] = numel * 4 // (peers * base["lanes"])
            swarm = _Swarm(emu, numel, slot_s, cc, env, work)
            settle = swarm.wait_rounds(0, 1, settle_timeout)
            res["settled_on_round"] = settle[0]
            budget = rounds * (max(slot_s, 1.0) + 5) + 60
            windows = {"default": swarm.wait_rounds(settle[0], rounds, budget)}
            experiments = []  # (label, switch on, switch off): one change from default each
            if no_slow_start_after_idle:
                key = "net.ipv4.tcp_slow_start_after_idle"
                experiments.append(("experiment_no_slow_start_after_idle",
                                    lambda: _netns_sysctl(emu, key, "0"),
                                    lambda: _netns_sysctl(emu, key, "1")))
            if nodelay:
                flags = [Path(str(f) + ".nodelay") for f in swarm.files]
                experiments.append(("experiment_tcp_nodelay",
                                    lambda: [f.touch() for f in flags],
                                    lambda: [f.unlink() for f in flags]))
            for label, on, off in experiments:
                on()
                since = max(e["rid"] for evs in swarm.events() for e in evs
                            if e["k"] == "coll_start")
                res[f"{label}_from_round"] = since + 2  # the round in flight may straddle it
                windows[label] = swarm.wait_rounds(since + 1, rounds, budget)
                off()
            swarm.stop()
            res["emulator"] = {k: v for k, v in emu.stats().items() if k != "per_host"}
            events = swarm.events()
            short = {e["id"][:8]: i for i, evs in enumerate(events) for e in evs
                     if e["k"] == "hello"}
            for name, ids in windows.items():
                rows = [x for x in (_round(events, short, rid) for rid in ids) if x is not None]
                ring = {k: base[k] for k in ("warm", "after_idle")}
                if name == "experiment_tcp_nodelay":
                    ring = {k: base[f"{k}_nodelay"] for k in ring}
                res[name] = _summarise(rows, rtt_s, ring, events, peers, ids)
                res[name]["rounds_unparsed"] = len(ids) - len(rows)
            res["log_problems"] = swarm.problems()[:10]
            res["peer_exit_codes"] = [p.returncode for p in swarm.procs]
    finally:
        if swarm is not None:
            swarm.stop()
        if logs_dir:
            dest = Path(logs_dir)
            dest.mkdir(parents=True, exist_ok=True)
            for f in work.glob("*.events"):
                shutil.copy(f, dest / f.name)
            for f in work.glob("*.log"):
                shutil.copy(f, dest / f.name)
        shutil.rmtree(work, ignore_errors=True)
    return res


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
