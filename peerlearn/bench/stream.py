"""`peerlearn bench stream`: striped-link throughput against one raw socket.

Both ends run as separate processes (in their own network namespaces when the
wide-area emulator is used), so the figures include everything a real peer
pays: syscalls, framing, reassembly and the kernel's TCP.

For each connection count the sender opens a fresh link, warms it up with one
transfer (TCP slow start is a property of a new connection, not of the path)
and then times `repeat` transfers of `mbytes`; the best is reported. A
transfer's time runs from the sender's first byte to the receiver holding the
last one: the receiver answers with its CLOCK_MONOTONIC reading, which both
processes share (they run on one machine), so the answer's own trip back is
not counted. The raw
baseline is one plain TCP socket moving the same bytes with sendall/recv_into,
no framing and no peerlearn code on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time

import torch

from peerlearn.tensorbytes import byte_view

SECRET = b"peerlearn-bench-secret-not-for-production"


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("closed")
        view = view[n:]


def receiver(host: str, counts: list[int], numel: int, repeat: int) -> None:
    from peerlearn.transport.stream import LinkListener

    out = torch.empty(numel)
    raw = socket.create_server((host, 0))
    with LinkListener(host, 0, SECRET) as lst:
        print("ready", lst.address[1], raw.getsockname()[1], flush=True)
        conn, _ = raw.accept()
        for _ in range(1 + repeat):
            _recv_exact_into(conn, byte_view(out))
            conn.sendall(struct.pack("<d", time.monotonic()))
        conn.close()
        for _ in counts:
            link = lst.accept_link(timeout=60)
            for op in range(1 + repeat):
                link.recv_into(out, op_id=op, timeout=120)
                link._socks[0].sendall(struct.pack("<d", time.monotonic()))
            link.close()
    raw.close()


def _done_at(sock: socket.socket) -> float:
    """The receiver's clock when it held the last byte."""
    return struct.unpack("<d", _recv_bytes(sock, 8))[0]


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def sender(host: str, port: int, raw_port: int, counts: list[int], numel: int,
           repeat: int) -> dict:
    from peerlearn.transport.stream import connect_link

    x = torch.randn(numel)
    nbytes = numel * 4
    deadline = time.monotonic() + 30
    while True:
        try:
            raw = socket.create_connection((host, raw_port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    raw.settimeout(None)
    raw_times = []
    for _ in range(1 + repeat):
        t0 = time.monotonic()
        raw.sendall(byte_view(x))
        raw_times.append(_done_at(raw) - t0)
    raw.close()
    result = {"raw_socket_gbit_s": nbytes * 8 / min(raw_times[1:]) / 1e9, "striped": {}}
    for n in counts:
        link = connect_link(host, port, SECRET, n)
        times = []
        for op in range(1 + repeat):
            t0 = time.monotonic()
            link.send(x, op_id=op, timeout=120)
            times.append(_done_at(link._socks[0]) - t0)
        link.close()
        result["striped"][str(n)] = {
            "gbit_s": nbytes * 8 / min(times[1:]) / 1e9,
            "first_transfer_gbit_s": nbytes * 8 / times[0] / 1e9,
        }
    return result


def _pair(popen, hosts: tuple[str, str], counts, numel, repeat) -> dict:
    """Runs receiver on host index 1 and sender on host index 0 via popen(idx, argv)."""
    base = [sys.executable, "-m", "peerlearn.bench.stream", "--host", hosts[1],
            "--counts", ",".join(map(str, counts)), "--numel", str(numel), "--repeat", str(repeat)]
    rx = popen(1, base + ["--role", "receiver"], stdout=subprocess.PIPE, text=True)
    try:
        line = rx.stdout.readline().split()
        if len(line) != 3 or line[0] != "ready":
            raise RuntimeError(f"receiver did not start: {line!r}")
        tx = popen(0, base + ["--role", "sender", "--port", line[1], "--raw-port", line[2]],
                   stdout=subprocess.PIPE, text=True)
        out, _ = tx.communicate(timeout=600)
        if tx.returncode != 0:
            raise RuntimeError(f"sender failed with exit code {tx.returncode}")
        rx.wait(timeout=60)
        return json.loads(out)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


def _with_ratios(res: dict, link_gbit: float | None) -> dict:
    raw = res["raw_socket_gbit_s"]
    for v in res["striped"].values():
        v["vs_raw_socket"] = v["gbit_s"] / raw
        v["vs_single_link_conn"] = v["gbit_s"] / res["striped"].get("1", v)["gbit_s"]
        if link_gbit:
            v["of_link_rate"] = v["gbit_s"] / link_gbit
    if link_gbit:
        res["raw_socket_of_link_rate"] = raw / link_gbit
    return res


def run(conns=(1, 2, 4, 8, 16), mbytes: int = 256, wan=None, repeat: int = 2) -> dict:
    numel = mbytes * 2**20 // 4
    counts = list(conns)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def local_popen(_idx, argv, **kw):
        return subprocess.Popen(argv, env=env, **kw)

    out: dict = {"bytes": numel * 4, "repeat": repeat, "cores": os.cpu_count()}
    out["loopback"] = _with_ratios(
        _pair(local_popen, ("127.0.0.1", "127.0.0.1"), counts, numel, repeat), None
    )
    if wan is not None:
        from peerlearn.netsim import WanEmulator

        rtt_ms, rate_mbit = wan
        with WanEmulator(n_hosts=2, rtt_ms=rtt_ms, rate_mbit=rate_mbit) as emu:
            res = _pair(lambda i, argv, **kw: emu.popen(i, argv, env=env, **kw),
                        (emu.hosts[0].addr, emu.hosts[1].addr), counts, numel, repeat)
            res["emulator"] = emu.stats()
        out["wan"] = {"rtt_ms": rtt_ms, "link_gbit_s": rate_mbit / 1000,
                      **_with_ratios(res, rate_mbit / 1000)}
    return out


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["sender", "receiver"], required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--counts", required=True)
    ap.add_argument("--numel", type=int, required=True)
    ap.add_argument("--repeat", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--raw-port", type=int, default=0)
    a = ap.parse_args()
    counts = [int(c) for c in a.counts.split(",")]
    if a.role == "receiver":
        receiver(a.host, counts, a.numel, a.repeat)
    else:
        print(json.dumps(sender(a.host, a.port, a.raw_port, counts, a.numel, a.repeat)))


if __name__ == "__main__":
    _main()
