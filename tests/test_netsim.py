"""Fidelity and hygiene of the WAN emulator (peerlearn.netsim).

Every test builds real namespaces and runs real TCP/UDP through the forwarder, so
they need root, ``ip netns`` and /dev/net/tun; elsewhere they skip with the reason.
Bounds leave room for a loaded 2-core machine but still fail on a wrong model
(e.g. delay applied once instead of per direction, rate computed per wake-up).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from peerlearn.netsim import WanEmulator, measure, netns_available
from peerlearn.netsim import netns as ns

_OK, _WHY = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _OK, reason=_WHY)]


def _ours() -> set[str]:
    return {n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout.split() if n.startswith(ns.NAME_PREFIX)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(autouse=True)
def _leaves_nothing_behind():
    # Only this process's namespaces: another test run may share the machine.
    mine = f"{ns.NAME_PREFIX}{os.getpid()}-"
    yield
    assert not {n for n in _ours() if n.startswith(mine)}


@pytest.mark.parametrize("rtt_ms", [100, 20])
def test_rtt_matches_configuration(rtt_ms):
    with WanEmulator(n_hosts=2, rtt_ms=rtt_ms, rate_mbit=1000) as wan:
        r = measure.rtt(wan, 0, 1, count=10)
        connect_ms = measure.tcp_throughput(wan, 1, 0, conns=5, seconds=0.2)["connect_ms"]
    assert len(r["samples_ms"]) == 10
    # Never early: the delay is a lower bound. Lateness comes from wake-ups only, and
    # on a VM with steal time single wake-ups can be 10+ ms late, hence medians.
    assert r["min_ms"] >= rtt_ms - 0.2
    assert r["median_ms"] <= rtt_ms + 3.0
    # A TCP handshake costs one round trip.
    assert min(connect_ms) >= rtt_ms - 0.2
    assert statistics.median(connect_ms) <= rtt_ms + 5.0


def test_zero_rtt_unlimited_rate():
    with WanEmulator(n_hosts=2, rtt_ms=0, rate_mbit=0) as wan:
        r = measure.rtt(wan, 0, 1, count=10)
        t = measure.tcp_throughput(wan, 0, 1, conns=1, seconds=1.0)
    assert r["median_ms"] < 3.0
    assert t["mbit"] > 1000


def _best_window_mbit(samples: list, after_s: float, window_s: float) -> float:
    """The highest receive rate over any stretch of at least window_s starting at
    or after after_s (the sink's (seconds, bytes) samples)."""
    best = 0.0
    for i, (t0, b0) in enumerate(samples):
        if t0 < after_s:
            continue
        end = next(((t, b) for t, b in samples[i + 1:] if t - t0 >= window_s), None)
        if end is not None:
            best = max(best, (end[1] - b0) * 8 / (end[0] - t0) / 1e6)
    return best


def test_rate_is_reached_and_not_exceeded():
    rate = 200
    with WanEmulator(n_hosts=2, rtt_ms=10, rate_mbit=rate) as wan:
        t0, s0 = time.monotonic(), wan.stats()["per_host"]["tx_bytes"][1]
        r = measure.tcp_throughput(wan, 0, 1, conns=4, seconds=3.0)
        t1, s1 = time.monotonic(), wan.stats()["per_host"]["tx_bytes"][1]
    # Not exceeded: the shaper's own promise, whatever the load (a starved
    # sender or forwarder only makes less get through).
    assert r["mbit"] <= 1.05 * rate
    assert sum(r["mbit_per_conn"]) <= 1.02 * rate
    # What the forwarder delivered, by wall clock (IP headers included).
    assert (s1 - s0) * 8 / (t1 - t0) / 1e6 <= 1.02 * rate
    # Reached: checked over the best second after slow start, not the whole
    # run. The whole run's average is also the sender's, the receiver's and
    # the forwarder's share of a loaded CPU, and TCP's recovery from drops
    # at the queue (RTOs with a few 64 KB segments in flight), all of which
    # a busy 2-core machine stretches: a fresh-clone CI run got 154 of 200
    # Mbit/s, and here under three busy loops 40 Mbit/s shaped gave 28. One
    # second in which the sender kept the queue full shows that the link
    # drains at the configured rate; a model that paces slower (capacity
    # lost at every wake-up, a wrong unit) has no such second: a late
    # wake-up's burst only delivers what the model had due before the
    # window (tens of ms of it under load), never more than its schedule.
    assert _best_window_mbit(r["samples"], 1.0, 1.0) >= 0.85 * rate


def test_single_connection_is_window_limited_on_long_fat_pipe():
    """Default buffers cap one flow at about window/RTT; parallel flows fill the pipe."""
    rate = 1000
    with WanEmulator(n_hosts=2, rtt_ms=100, rate_mbit=rate) as wan:
        one = measure.tcp_throughput(wan, 0, 1, conns=1, seconds=3.0)["mbit"]
        eight = measure.tcp_throughput(wan, 0, 1, conns=8, seconds=3.0)["mbit"]
    assert one < 0.6 * rate
    assert eight > 1.5 * one
    assert eight > 0.6 * rate
    assert eight <= 1.05 * rate


def test_four_hosts_concurrently():
    rate = 300
    with WanEmulator(n_hosts=4, rtt_ms=20, rate_mbit=rate) as wan:
        res = measure.tcp_flows(wan, [(0, 1), (1, 2), (2, 3), (3, 0)], conns=2, seconds=3.0)
        st = wan.stats()
    for r in res:
        assert 0.7 * rate <= r["mbit"] <= 1.05 * rate
    assert st["dropped_other"] == 0


def test_loss_rate_and_reproducibility():
    def run(seed):
        with WanEmulator(n_hosts=2, rtt_ms=5, rate_mbit=0, loss=0.01, seed=seed) as wan:
            d = measure.udp_delivery(wan, 0, 1, count=3000, gap_s=0.0002)
            return d, wan.stats()

    d1, st = run(7)
    d2, _ = run(7)
    d3, _ = run(8)
    # Every loss must be the emulator's. Under three busy loops this once saw 472
    # lost (15 of 20 runs failed): the forwarder dropped its ~30, the rest were
    # dropped by the destination's kernel at the sink's socket, whose default
    # buffer (~90 datagrams, 18 ms at this rate) overflowed while the sink waited
    # for a core. udp_delivery now gives the sink a buffer for all of them; these
    # say which side lost packets should it ever happen again.
    for d in (d1, d2, d3):
        assert d["sink_dropped"] in (0, None)
    # The loss draws follow the order the forwarder reads packets, so the same
    # seed gives the same pattern only if it read every datagram.
    assert st["received_packets"] == 3000
    # 3000 draws at p=0.01: mean 30, sd 5.4; 10..50 is beyond 3.5 sd either side.
    assert 10 <= len(d1["lost"]) <= 50
    assert st["dropped_loss"] == len(d1["lost"])
    assert st["forwarded_packets"] == d1["received"]
    assert abs(st["forwarded_packets"] / st["received_packets"] - 0.99) < 0.007
    assert d1["lost"] == d2["lost"]
    assert d1["lost"] != d3["lost"]


def test_only_ipv4_between_hosts_is_forwarded():
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "[s.sendto(b'x', ('10.87.0.99', 9)) for _ in range(5)]")
    with WanEmulator(n_hosts=2, rtt_ms=0, rate_mbit=0) as wan:
        assert wan.popen(0, [sys.executable, "-c", code]).wait(timeout=10) == 0
        deadline = time.monotonic() + 2
        while wan.stats()["dropped_other"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        st = wan.stats()
    assert st["dropped_other"] == 5
    assert st["forwarded_packets"] == 0


def test_default_tcp_settings_are_kept():
    with WanEmulator(n_hosts=2, rtt_ms=0, rate_mbit=0) as wan:
        inside = wan.sysctls(1)
    outside = subprocess.run(["sysctl", "-n", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"],
                             capture_output=True, text=True).stdout.split("\n")
    assert inside["net.ipv4.tcp_rmem"] == " ".join(outside[0].split())
    assert inside["net.ipv4.tcp_wmem"] == " ".join(outside[1].split())


def test_cleanup_after_exception_kills_processes_and_forwarder():
    with pytest.raises(ZeroDivisionError):
        with WanEmulator(n_hosts=3, rtt_ms=10, rate_mbit=100) as wan:
            names = {h.netns for h in wan.hosts}
            fwd = wan._forwarder.pid
            # Ignores SIGTERM, so only the SIGKILL escalation can end it.
            stubborn = wan.popen(1, [sys.executable, "-c",
                                     "import signal, time; signal.signal(signal.SIGTERM, "
                                     "signal.SIG_IGN); print('ok', flush=True); time.sleep(60)"],
                                 stdout=subprocess.PIPE)
            assert stubborn.stdout.readline() == b"ok\n"
            assert names <= _ours()
            1 / 0  # noqa: B018 - the failure under test
    assert not names & _ours()
    assert stubborn.poll() is not None
    assert not _alive(fwd)
    assert "wan0" not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                        text=True).stdout


def _hold_emulator(conn):
    # A shell starts background jobs with SIGINT ignored and Python keeps that:
    # restore Ctrl-C's usual meaning, whatever launched the test run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with WanEmulator(n_hosts=2, rtt_ms=10, rate_mbit=100) as wan:
        # A Pipe, not a Queue: a Queue's feeder thread could take the signal, and
        # Python only interrupts time.sleep when the main thread receives it.
        conn.send(([h.netns for h in wan.hosts], wan._forwarder.pid))
        time.sleep(60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_cleanup_when_owner_is_signalled(sig):
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_hold_emulator, args=(send,))
    p.start()
    assert recv.poll(20)
    names, fwd = recv.recv()
    os.kill(p.pid, sig)
    p.join(timeout=10)
    deadline = time.monotonic() + 5
    while _alive(fwd) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(fwd)  # SIGKILL included: the kernel's parent-death signal
    if sig == signal.SIGKILL:
        # Nothing could run in the owner; the next emulator sweeps what it left.
        assert set(names) <= _ours()
        assert set(names) <= set(ns.sweep_stale())
    assert not set(names) & _ours()
