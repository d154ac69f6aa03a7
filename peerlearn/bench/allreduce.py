"""`peerlearn bench allreduce`: our ring all-reduce beside torch.distributed's gloo.

N peers run as separate processes, on loopback or each in its own network
namespace behind the WAN emulator. Every peer first times our all-reduce
(`peerlearn.swarm.ring_allreduce`, in place, SUM) once per codec, then
gloo's `all_reduce` (in place, SUM) of the same tensor over the same
addresses, in the same processes.

Timing: a barrier (a one-element all-reduce on the same transport) before
each run, then one warm-up (TCP slow start belongs to a new connection, not to
the path) and `repeat` timed runs. A run's time is the slowest peer's; the best
run is reported. Bus bandwidth = 2(N-1)/N x bytes / time (what each peer sends
and receives); over the emulator the lower bound is that volume at the link
rate.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch

from peerlearn.swarm.allreduce import DEFAULT_PIECE_ELEMS
from peerlearn.wire.codecs import codec_from_name

SECRET = b"peerlearn-bench-secret-not-for-production"
RING_PORT, GLOO_PORT = 29611, 29612  # inside namespaces every host has its own address


def _peer(a: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from peerlearn.swarm import CodecSpec, connect_ring, ring_allreduce
    from peerlearn.transport.stream import LinkListener

    addrs = [(h, int(p)) for h, p in (x.rsplit(":", 1) for x in a.addrs.split(","))]
    world, rank = len(addrs), a.rank
    torch.manual_seed(rank)
    x = torch.randn(a.numel)
    out = torch.empty_like(x)
    specs = {}
    for name in a.codec.split(","):
        chosen = codec_from_name(name)
        specs[name] = None if chosen is None else CodecSpec(int(chosen), 64)
    timings: dict[str, list[float]] = {f"ours:{name}": [] for name in specs}
    timings["gloo"] = []
    cpu: dict[str, list[float]] = {name: [] for name in specs}  # this process, user + system
    busy: dict[str, list[float]] = {name: [] for name in specs}  # the whole machine's cores

    with LinkListener(*addrs[rank], SECRET) as lst:
        ring = connect_ring(rank, addrs, lst, SECRET, ring_tag=1, n_conns=a.conns, timeout=120)
        one = torch.zeros(1)
        tag = 0

        def ours(t: torch.Tensor, **kw) -> torch.Tensor:
            nonlocal tag
            tag += 1
            return ring_allreduce(t, rank=rank, world=world, send_link=ring.send,
                                  recv_link=ring.recv, op_tag=tag, average=False,
                                  timeout=600, **kw)

        for name, codec in specs.items():
            for i in range(1 + a.repeat):
                out.copy_(x)
                ours(one)  # barrier
                t0, c0, m0 = time.perf_counter(), time.process_time(), _cpu_times()
                ours(out, codec=codec, out=out, chunk_elems=a.chunk_elems,  # in place, as gloo
                     piece_elems=a.piece_elems, lanes=a.lanes)
                if i:
                    timings[f"ours:{name}"].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    m1 = _cpu_times()
                    busy[name].append((m1[0] - m0[0]) / max(1, m1[1] - m0[1]))
        ring.close()

    if a.gloo:
        gloo_addr = f"tcp://{addrs[0][0]}:{a.gloo_port}"
        dist.init_process_group("gloo", init_method=gloo_addr, rank=rank, world_size=world)
        y = torch.empty_like(x)
        for i in range(1 + a.repeat):
            y.copy_(x)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(y)
            if i:
                timings["gloo"].append(time.perf_counter() - t0)
        dist.destroy_process_group()
    return {"rank": rank, **timings, "cpu": cpu, "busy": busy}


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (any namespace)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(popen, hosts: list[str], ports: list[int], gloo_port: int, numel: int, codec: str,
            repeat: int, conns: int, chunk_elems: int, piece_elems: int, lanes: int, gloo: bool,
            env: dict, timeout: float) -> list[dict]:
    addrs = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports))
    procs = []
    try:
        for r in range(len(hosts)):
            argv = [sys.executable, "-m", "peerlearn.bench.allreduce", "--role", "peer",
                    "--rank", str(r), "--addrs", addrs, "--numel", str(numel), "--codec", codec,
                    "--repeat", str(repeat), "--conns", str(conns),
                    "--chunk-elems", str(chunk_elems), "--piece-elems", str(piece_elems),
                    "--lanes", str(lanes),
                    "--gloo-port", str(gloo_port)]
            if not gloo:
                argv.append("--no-gloo")
            procs.append(popen(r, argv, env=env, stdout=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                raise RuntimeError(f"a peer failed with exit code {p.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _summarise(results: list[dict], name: str, nbytes: int, world: int) -> dict | None:
    runs = list(zip(*(r[name] for r in results)))  # per run: every peer's time
    if not runs:
        return None
    best = min(max(run) for run in runs)
    return {"seconds": best, "all_runs_s": [max(run) for run in runs],
            "bus_gbit_s": 2 * (world - 1) / world * nbytes * 8 / best / 1e9}


def run(peers: int = 4, numel: int = 100_000_000, codecs: tuple[str, ...] = ("none",), wan=None,
        repeat: int = 3, conns: int | None = None, chunk_elems: int = 1 << 18,
        piece_elems: int = DEFAULT_PIECE_ELEMS, lanes: int | None = None, gloo: bool = True,
        probe_s: float = 6.0) -> dict:
    """Times our all-reduce once per codec, then gloo's, in the same processes.

    Over the emulator, first `probe_s` seconds of plain TCP bulk flows in the
    ring's pattern (each host to its successor, `conns` connections) show what
    the emulated path really carries on this machine: a rate it cannot carry
    with plain TCP is not a fair test of anything above it.

    Bus figures are fp32-equivalent (the tensor's bytes, whatever the wire
    carries), so codecs compare by time; `codec_speedup` is fp32's time over
    each codec's, measured on the same links in the same run.
    """
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    for name in codecs:
        codec_from_name(name)  # refuse an unknown name before starting any process
    nbytes = numel * 4
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    res: dict = {"peers": peers, "numel": numel, "bytes": nbytes, "codecs": list(codecs),
                 "op": "sum", "repeat": repeat, "cores": os.cpu_count(), "chunk_elems": chunk_elems,
                 "piece_elems": piece_elems}
    args = (numel, ",".join(codecs), repeat)
    conns = conns or (2 if wan is None else 8)
    lanes = lanes or conns  # one lane per connection, as the daemon runs it
    res["lanes"] = lanes
    if wan is None:
        env["GLOO_SOCKET_IFNAME"] = "lo"
        results = _launch(lambda _r, argv, **kw: subprocess.Popen(argv, **kw),
                          ["127.0.0.1"] * peers, [_free_port() for _ in range(peers)],
                          _free_port(), *args, conns, chunk_elems, piece_elems, lanes, gloo, env,
                          900)
        res["path"] = "loopback"
    else:
        from peerlearn.netsim import WanEmulator, measure

        rtt_ms, rate_mbit = wan
        with WanEmulator(n_hosts=peers, rtt_ms=rtt_ms, rate_mbit=rate_mbit) as emu:
            # Is the emulator faithful at this rate on this machine? Plain TCP
            # (no peerlearn code) in the ring's pattern, same connection count.
            if probe_s > 0:
                flows = measure.tcp_flows(emu, [(i, (i + 1) % peers) for i in range(peers)],
                                          conns=conns, seconds=probe_s)
                res["plain_tcp_ring_mbit"] = [round(f["mbit"], 1) for f in flows]
            env["GLOO_SOCKET_IFNAME"] = emu.hosts[0].ifname
            results = _launch(lambda r, argv, **kw: emu.popen(r, argv, **kw),
                              [h.addr for h in emu.hosts], [RING_PORT] * peers, GLOO_PORT,
                              *args, conns, chunk_elems, piece_elems, lanes, gloo, env, 1800)
            stats = emu.stats()
        res["path"] = f"emulated WAN, {rtt_ms:g} ms RTT, {rate_mbit:g} Mbit/s per host"
        res["emulator"] = {k: stats[k] for k in ("dropped_queue", "dropped_loss", "late_max_ms")}
        res["lower_bound_s"] = 2 * (peers - 1) / peers * nbytes * 8 / (rate_mbit * 1e6)
    res["conns"] = conns
    res["ours"] = {name: _summarise(results, f"ours:{name}", nbytes, peers) for name in codecs}
    for name, summary in res["ours"].items():
        # CPU seconds of all peers together per run, and the share of the
        # machine that is while the run lasts: near 1.0 the peers, which would
        # each have their own machine in a real swarm, wait for cores here.
        per_run = [sum(r["cpu"][name][k] for r in results) for k in range(repeat)]
        summary["cpu_s_all_peers"] = min(per_run)
        summary["machine_cpu_share"] = min(per_run) / (summary["seconds"] * (os.cpu_count() or 1))
        # Everything on the machine (peers, emulator, kernel) while rank 0 ran:
        # near 1.0 the run was bound by this machine's cores, not by the path.
        summary["machine_busy"] = [round(b, 3) for b in results[0]["busy"][name]]
    res["gloo"] = _summarise(results, "gloo", nbytes, peers)
    secs = {name: r["seconds"] for name, r in res["ours"].items()}
    if res["gloo"]:
        res["speedup_vs_gloo"] = {n: res["gloo"]["seconds"] / t for n, t in secs.items()}
    if "none" in secs:
        res["codec_speedup"] = {n: secs["none"] / t for n, t in secs.items() if n != "none"}
    if wan is not None:
        # of the fp32 volume's bound: a codec can exceed 1.0
        res["of_lower_bound"] = {n: res["lower_bound_s"] / t for n, t in secs.items()}
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["peer"], required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--addrs", required=True)
    p.add_argument("--numel", type=int, required=True)
    p.add_argument("--codec", default="none", help="comma-separated codec names")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--conns", type=int, default=2)
    p.add_argument("--chunk-elems", type=int, default=1 << 18)
    p.add_argument("--piece-elems", type=int, default=DEFAULT_PIECE_ELEMS)
    p.add_argument("--lanes", type=int, default=1)
    p.add_argument("--gloo-port", type=int, default=GLOO_PORT)
    p.add_argument("--no-gloo", dest="gloo", action="store_false")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(_peer(a)), flush=True)


if __name__ == "__main__":
    main()
