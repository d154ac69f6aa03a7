"""Measurements across a running ``WanEmulator``: RTT, TCP throughput, UDP loss, and
UDP hole punching across NAT sites.

Each function starts ``probe.py`` endpoints inside the hosts and parses their JSON.
The endpoints use default socket options, so TCP figures reflect what an
application with default buffers gets on the emulated path.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence

from .emulator import WanEmulator

_PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py")


def _start(wan: WanEmulator, host: int, *args, server: bool) -> subprocess.Popen:
    p = wan.popen(host, [sys.executable, _PROBE, *map(str, args)],
                  stdout=subprocess.PIPE, text=True)
    if server and p.stdout.readline().strip() != "listening":
        raise RuntimeError(f"probe {args[0]} on host {host} failed (exit {p.wait()})")
    return p


def _result(p: subprocess.Popen, timeout: float) -> dict:
    out, _ = p.communicate(timeout=timeout)
    if p.returncode != 0 or not out.strip():
        raise RuntimeError(f"probe exited {p.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def _steady_mbit(samples: list, warmup_s: float) -> float:
    """Receive rate from the first sample at or after ``warmup_s`` to the last one."""
    start = next((s for s in samples if s[0] >= warmup_s), None)
    end = samples[-1] if samples else None
    if start is None or end[0] <= start[0]:
        return 0.0
    return (end[1] - start[1]) * 8 / (end[0] - start[0]) / 1e6


def tcp_flows(wan: WanEmulator, pairs: Sequence[tuple[int, int]], conns: int = 1,
              seconds: float = 3.0, warmup_s: float | None = None,
              port: int = 5201) -> list[dict]:
    """Concurrent bulk TCP transfers, ``conns`` connections per (src, dst) pair.

    Per pair: ``mbit`` is the aggregate receive rate after ``warmup_s`` (default a
    third of the run, so slow start is mostly excluded), ``mbit_per_conn`` the
    whole-run average of each connection, ``connect_ms`` the handshake times,
    ``samples`` the sink's (seconds since first data, bytes received) series.
    """
    warmup_s = seconds / 3 if warmup_s is None else warmup_s
    sinks = [_start(wan, dst, "sink", port + i, conns, server=True)
             for i, (_, dst) in enumerate(pairs)]
    sources = [_start(wan, src, "source", wan.hosts[dst].addr, port + i, conns, seconds,
                      server=False) for i, (src, dst) in enumerate(pairs)]
    results = []
    for sink, src in zip(sinks, sources):
        s = _result(src, timeout=seconds + 30)
        r = _result(sink, timeout=30)
        dur = r["samples"][-1][0] if r["samples"] else seconds
        results.append({
            "mbit": _steady_mbit(r["samples"], warmup_s),
            "mbit_per_conn": [b * 8 / dur / 1e6 for b in r["per_conn"]],
            "bytes": r["bytes"],
            "connect_ms": s["connect_ms"],
            "samples": r["samples"],
        })
    return results


def tcp_throughput(wan: WanEmulator, src: int, dst: int, conns: int = 1,
                   seconds: float = 3.0, warmup_s: float | None = None) -> dict:
    """One ``tcp_flows`` pair; see there."""
    return tcp_flows(wan, [(src, dst)], conns, seconds, warmup_s)[0]


def rtt(wan: WanEmulator, a: int, b: int, count: int = 10, gap_s: float = 0.01,
        port: int = 5301) -> dict:
    """UDP ping-pong round trips from host ``a`` to host ``b`` (milliseconds)."""
    echo = _start(wan, b, "echo", port, server=True)
    try:
        r = _result(_start(wan, a, "ping", wan.hosts[b].addr, port, count, gap_s,
                           server=False), timeout=60)
    finally:
        echo.kill()
        echo.wait()
    rtts = r["rtt_ms"]
    return {"median_ms": statistics.median(rtts) if rtts else float("nan"),
            "min_ms": min(rtts, default=float("nan")),
            "max_ms": max(rtts, default=float("nan")), "samples_ms": rtts}


def udp_delivery(wan: WanEmulator, src: int, dst: int, count: int = 2000,
                 gap_s: float = 0.0005, size: int = 1000, port: int = 5401) -> dict:
    """Send ``count`` numbered datagrams one way; which sequence numbers arrived.

    The sink's receive buffer holds all ``count`` datagrams, so ``lost`` is the
    path's loss however late the sink process gets the CPU; ``sink_dropped`` is
    what the destination's kernel still dropped at the sink's socket (should be 0;
    None where the kernel cannot tell).
    """
    idle_s = wan.rtt_ms / 1e3 + 0.5
    # A datagram costs its skb's truesize in the buffer, about twice its size or
    # more for small ones; 2x the payload plus 2 KiB each leaves room.
    rcvbuf = count * (2 * size + 2048)
    sink = _start(wan, dst, "udpsink", port, idle_s, rcvbuf, server=True)
    _result(_start(wan, src, "udpsend", wan.hosts[dst].addr, port, count, gap_s, size,
                   server=False), timeout=count * gap_s * 10 + 60)
    r = _result(sink, timeout=count * gap_s * 10 + 60)
    seqs = r["seqs"]
    return {"sent": count, "received": len(seqs),
            "lost": sorted(set(range(count)) - set(seqs)), "sink_dropped": r["dropped"]}


def udp_hole_punch(wan: WanEmulator, rendezvous: int, a: int, b: int, seconds: float = 1.0,
                   port: int = 5501, local_port: int = 4500) -> dict:
    """UDP hole punching between hosts ``a`` and ``b`` (typically behind NAT sites).

    Both register with a rendezvous server on public host ``rendezvous``, learn the
    other's endpoint as the server saw it, and send to it for ``seconds``. ``ok``:
    each received the other's datagrams; per host ``me`` / ``peer`` are the public
    endpoints, ``received`` how many datagrams got through, ``first_ms`` when the
    first did (after the rendezvous answered).
    """
    server = _start(wan, rendezvous, "rendezvous", port, server=True)
    try:
        ends = [_start(wan, h, "punch", wan.hosts[rendezvous].addr, port, local_port,
                       seconds, server=False) for h in (a, b)]
        ra, rb = (_result(p, timeout=seconds + 30) for p in ends)
    finally:
        server.kill()
        server.wait()
    return {"ok": ra["received"] > 0 and rb["received"] > 0, "a": ra, "b": rb}
