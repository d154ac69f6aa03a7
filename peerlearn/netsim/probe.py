"""Traffic endpoints run inside emulated hosts by ``peerlearn.netsim.measure``.

Standard library only, started by file path, so it works under any interpreter that
can reach the file. Each command prints ``listening`` (servers) once it is ready,
then exactly one JSON line with its results.

    sink PORT CONNS           accept CONNS TCP connections, read to EOF
    source ADDR PORT CONNS S  open CONNS TCP connections, send for S seconds
    echo PORT                 UDP echo until killed
    ping ADDR PORT COUNT GAP  UDP round trips, one every GAP seconds
    udpsink PORT IDLE [RCVBUF] collect UDP sequence numbers (first 4 bytes) until IDLE s quiet
    udpsend ADDR PORT COUNT GAP SIZE
    rendezvous PORT           UDP: tell each of two registered peers the other's endpoint
    punch ADDR PORT LPORT S   UDP hole punch from LPORT via rendezvous ADDR:PORT for S s
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import threading
import time

_SAMPLE_S = 0.05
_CHUNK = 1 << 20


def _ready() -> None:
    print("listening", flush=True)


def _emit(obj) -> None:
    print(json.dumps(obj), flush=True)


# struct tcp_info's tcpi_bytes_received (u64): fixed in the Linux ABI since 4.1.
_TCPI_BYTES_RECEIVED = 128


def _kernel_received(socks) -> int:
    return sum(struct.unpack_from("Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 192),
                                  _TCPI_BYTES_RECEIVED)[0] for s in socks)


def sink(port: int, conns: int) -> None:
    """Default socket buffers on purpose: the receive window is the kernel's choice.

    Samples are (seconds since first data, bytes the kernel has received), both taken
    at the same instant: a reader that falls behind on a busy machine does not skew
    the rate, as counting bytes read would (data parked in the receive buffer would
    later look like a burst above the link rate).
    """
    lsock = socket.create_server(("0.0.0.0", port), backlog=conns)
    _ready()
    socks = [lsock.accept()[0] for _ in range(conns)]
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    buf = bytearray(_CHUNK)
    total = 0
    per_conn = {s.fileno(): 0 for s in socks}
    t0 = None
    samples = []
    next_sample = 0.0
    open_ = len(socks)
    while open_:
        for key, _ in sel.select(timeout=1.0):
            n = key.fileobj.recv_into(buf)
            if n == 0:
                sel.unregister(key.fileobj)
                open_ -= 1
                continue
            now = time.monotonic()
            if t0 is None:
                t0 = now
            total += n
            per_conn[key.fileobj.fileno()] += n
            if now >= next_sample:
                samples.append((now - t0, _kernel_received(socks)))
                next_sample = now + _SAMPLE_S
    if t0 is not None:
        samples.append((time.monotonic() - t0, _kernel_received(socks)))
    _emit({"bytes": total, "per_conn": list(per_conn.values()), "samples": samples})


def source(addr: str, port: int, conns: int, seconds: float) -> None:
    connect_s = []
    socks = []
    for _ in range(conns):
        t = time.monotonic()
        socks.append(socket.create_connection((addr, port)))
        connect_s.append(time.monotonic() - t)
    deadline = time.monotonic() + seconds
    sent = [0] * conns
    payload = memoryview(bytes(_CHUNK))

    def pump(i: int) -> None:
        s = socks[i]
        while time.monotonic() < deadline:
            sent[i] += s.send(payload)
        s.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=pump, args=(i,)) for i in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in socks:
        s.close()
    _emit({"connect_ms": [c * 1e3 for c in connect_s], "sent": sent})


def echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    _ready()
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)


def ping(addr: str, port: int, count: int, gap: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((addr, port))
    s.settimeout(max(2.0, 20 * gap))
    rtts = []
    for seq in range(count):
        t = time.monotonic()
        s.send(struct.pack("!I", seq))
        while True:
            try:
                data = s.recv(2048)
            except TimeoutError:
                break
            if struct.unpack("!I", data[:4])[0] == seq:
                rtts.append((time.monotonic() - t) * 1e3)
                break
        time.sleep(gap)
    _emit({"rtt_ms": rtts})


# Linux socket options Python's socket module does not name (asm-generic values).
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_SK_MEMINFO_DROPS = 8  # index of sk_drops in SO_MEMINFO's u32 array


def _socket_drops(s: socket.socket) -> int | None:
    """Datagrams the kernel dropped at this socket (full receive buffer), or None
    where SO_MEMINFO is not available."""
    try:
        raw = s.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 64)
    except OSError:
        return None
    if len(raw) < 4 * (_SK_MEMINFO_DROPS + 1):
        return None
    return struct.unpack_from("I", raw, 4 * _SK_MEMINFO_DROPS)[0]


def udpsink(port: int, idle_s: float, rcvbuf: int = 0) -> None:
    """Stops once ``idle_s`` pass without a datagram (waiting at most 10 s for the first).

    ``rcvbuf`` (bytes, 0: the kernel's default) sizes the receive buffer so that
    datagrams wait in it while this process is not scheduled: with the default
    (about 100 small datagrams) a sink starved for a few tens of milliseconds on a
    busy machine loses whole runs of them, which would count as path loss. Forced
    past net.core.rmem_max where allowed (CAP_NET_ADMIN, as in the emulator's
    hosts). ``dropped`` reports what the kernel still dropped at this socket.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf > 0:
        try:
            s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind(("0.0.0.0", port))
    _ready()
    seqs = []
    s.settimeout(max(idle_s, 10.0))
    while True:
        try:
            seqs.append(struct.unpack("!I", s.recv(65536)[:4])[0])
        except TimeoutError:
            break
        s.settimeout(idle_s)
    _emit({"seqs": seqs, "dropped": _socket_drops(s)})


def udpsend(addr: str, port: int, count: int, gap: float, size: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((addr, port))
    pad = bytes(max(0, size - 4))
    for seq in range(count):
        s.send(struct.pack("!I", seq) + pad)
        if gap:
            time.sleep(gap)
    _emit({"sent": count})


def rendezvous(port: int) -> None:
    """Waits for two datagrams, then answers each with both endpoints as it saw
    them: the sender's own (its public mapping) first, the other's second."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    _ready()
    seen: list = []
    while len(seen) < 2:
        _, peer = s.recvfrom(2048)
        if peer not in seen:
            seen.append(peer)
    for me, other in ((seen[0], seen[1]), (seen[1], seen[0])):
        s.sendto(json.dumps([me, other]).encode(), me)
    _emit({"observed": seen})


def punch(addr: str, port: int, lport: int, seconds: float) -> None:
    """Registers with the rendezvous from ``lport``, then sends to the peer's
    public endpoint every 20 ms for ``seconds``, counting what arrives from it.

    The same socket throughout: the hole is the mapping the rendezvous saw.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", lport))
    s.settimeout(0.2)
    deadline = time.monotonic() + 10.0
    while True:
        s.sendto(b"register", (addr, port))
        try:
            data, frm = s.recvfrom(2048)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise SystemExit("no answer from the rendezvous") from None
            continue
        if frm == (addr, port):
            break
    me, peer = (tuple(e) for e in json.loads(data))
    t0 = time.monotonic()
    end = t0 + seconds
    s.settimeout(0.02)
    sent = received = 0
    first_ms = None
    while time.monotonic() < end:
        s.sendto(b"punch", peer)
        sent += 1
        try:
            data, frm = s.recvfrom(2048)
        except TimeoutError:
            continue
        if frm == peer and data == b"punch":
            received += 1
            if first_ms is None:
                first_ms = (time.monotonic() - t0) * 1e3
    _emit({"me": me, "peer": peer, "sent": sent, "received": received,
           "first_ms": first_ms})


def main(argv: list[str]) -> None:
    cmd, args = argv[1], argv[2:]
    if cmd == "sink":
        sink(int(args[0]), int(args[1]))
    elif cmd == "source":
        source(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif cmd == "echo":
        echo(int(args[0]))
    elif cmd == "ping":
        ping(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif cmd == "udpsink":
        udpsink(int(args[0]), float(args[1]), int(args[2]) if len(args) > 2 else 0)
    elif cmd == "udpsend":
        udpsend(args[0], int(args[1]), int(args[2]), float(args[3]), int(args[4]))
    elif cmd == "rendezvous":
        rendezvous(int(args[0]))
    elif cmd == "punch":
        punch(args[0], int(args[1]), int(args[2]), float(args[3]))
    else:
        raise SystemExit(f"unknown probe command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv)
