"""User-space forwarder of the WAN emulator: moves IPv4 packets between TUN devices.

Runs as its own process so it gets a core of its own, and uses only the standard
library so it can be started by file path (``python forwarder.py CONFIG``) whatever
``peerlearn`` an interpreter would otherwise import. ``WanEmulator`` starts it; it is
not meant to be run by hand.

Path model, per packet from host ``s`` to host ``d``:

    s's egress link (rate R_s, drop-tail queue of Q_s bytes)
      -> random loss (probability p, one seeded RNG per source host)
      -> propagation delay (rtt/2)
      -> d's ingress link (rate R_d, drop-tail queue of Q_d bytes)
      -> written to d's TUN device

Invariants:
  * A link's departure times are computed from the arrival time, not from when the
    loop happened to run: ``next_free = max(t, next_free) + size / rate``. A late
    wake-up therefore delays packets but never changes the long-run rate.
  * Ingress admission happens at the packet's exact arrival time (a heap event), so
    packets from several sources reach a shared ingress link in arrival order.
  * Only IPv4 packets whose destination is another configured host are forwarded;
    everything else is counted as ``dropped_other`` and discarded.
  * The process exits when its control socket reaches EOF, i.e. when the emulator
    (its parent) goes away; the kernel then removes the non-persistent TUN devices.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import os
import random
import select
import signal
import socket
import sys
import time

try:
    from . import nat as _nat
except ImportError:  # started by file path, outside the package: a sibling module
    import nat as _nat

# Large enough for any IPv4 packet (total length is a 16-bit field).
_READ_SIZE = 65536
# Bound on packets taken from one TUN per wake-up, so one busy host cannot starve
# the timer events of the others.
_READ_BATCH = 64
_PR_SET_PDEATHSIG = 1


class Link:
    """One direction of an access link: a serialiser behind a drop-tail FIFO.

    ``next_free`` is when the last admitted byte leaves the link; the bytes still
    waiting at time t are ``(next_free - t) * rate``, which is exactly the backlog
    of a FIFO drained at a constant rate, so no per-packet queue is needed.
    """

    __slots__ = ("limit", "next_free", "rate")

    def __init__(self, rate_bytes_per_s: float, queue_bytes: int):
        self.rate = rate_bytes_per_s
        self.limit = queue_bytes
        self.next_free = 0.0

    def admit(self, t: float, size: int) -> float:
        """Departure time of a packet arriving at ``t``, or -1.0 if the queue is full."""
        rate = self.rate
        if rate <= 0.0:
            return t
        start = self.next_free if self.next_free > t else t
        if (start - t) * rate + size > self.limit:
            return -1.0
        self.next_free = start + size / rate
        return self.next_free


class Forwarder:
    """Event loop over the hosts' TUN fds; see the module docstring for the model."""

    def __init__(self, cfg: dict):
        hosts = cfg["hosts"]
        self.fds = [h["fd"] for h in hosts]
        self.by_addr = {socket.inet_aton(h["addr"]): i for i, h in enumerate(hosts)}
        self.egress = [Link(h["rate_bps"] / 8.0, h["queue_bytes"]) for h in hosts]
        self.ingress = [Link(h["rate_bps"] / 8.0, h["queue_bytes"]) for h in hosts]
        self.delay = cfg["rtt_s"] / 2.0
        self.loss = cfg["loss"]
        # One stream per source so that one host's traffic does not shift the loss
        # pattern seen by another: a flow's losses are reproducible on their own.
        self.rngs = [random.Random(f"{cfg['seed']}/{i}") for i in range(len(hosts))]
        self.ctl = socket.socket(fileno=cfg["ctl_fd"])
        self.heap: list = []
        self.seq = 0
        n = len(hosts)
        self.group = [0] * n  # hosts in different groups cannot reach each other
        self.ctl_buf = b""
        self.stats = {
            "rx_packets": [0] * n, "rx_bytes": [0] * n,  # read from host i's TUN
            "tx_packets": [0] * n, "tx_bytes": [0] * n,  # written to host i's TUN
            "dropped_queue": [0] * n,  # by the drop-tail queue of host i's links
            "dropped_loss": [0] * n,  # random loss, by source host
            "dropped_other": [0] * n,  # not IPv4 to another host, by source host
            "dropped_partition": [0] * n,  # between hosts a partition separates, by source
            "late_max_s": 0.0,  # worst lateness of a delivery vs. its due time
        }

    def _read(self, src: int, now: float) -> None:
        fd = self.fds[src]
        st = self.stats
        egress = self.egress[src]
        by_addr = self.by_addr
        heap = self.heap
        delay = self.delay
        loss = self.loss
        rng = self.rngs[src]
        for _ in range(_READ_BATCH):
            try:
                pkt = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            size = len(pkt)
            st["rx_packets"][src] += 1
            st["rx_bytes"][src] += size
            dst = by_addr.get(pkt[16:20]) if size >= 20 and pkt[0] >> 4 == 4 else None
            if dst is None or dst == src:
                st["dropped_other"][src] += 1
                continue
            if self.group[src] != self.group[dst]:
                st["dropped_partition"][src] += 1
                continue
            t = egress.admit(now, size)
            if t < 0.0:
                st["dropped_queue"][src] += 1
                continue
            if loss and rng.random() < loss:
                st["dropped_loss"][src] += 1
                continue
            self.seq += 1
            heapq.heappush(heap, (t + delay, self.seq, dst, False, pkt))

    def _due(self, now: float) -> None:
        heap = self.heap
        st = self.stats
        while heap and heap[0][0] <= now:
            t, seq, dst, admitted, pkt = heapq.heappop(heap)
            if not admitted:
                t = self.ingress[dst].admit(t, len(pkt))
                if t < 0.0:
                    st["dropped_queue"][dst] += 1
                    continue
                if t > now:
                    heapq.heappush(heap, (t, seq, dst, True, pkt))
                    continue
            late = now - t
            if late > st["late_max_s"]:
                st["late_max_s"] = late
            try:
                os.write(self.fds[dst], pkt)
            except OSError:
                st["dropped_other"][dst] += 1
                continue
            st["tx_packets"][dst] += 1
            st["tx_bytes"][dst] += len(pkt)

    def _snapshot(self) -> dict:
        return self.stats

    def _control(self) -> bool:
        """Serve the emulator's requests; False once it has closed the socket.

        b"s": send the stats as one JSON line. b"p" n g0..g(n-1): set each host's
        partition group (one byte each; equal groups can talk), answered b"ok\n".
        """
        try:
            req = self.ctl.recv(4096)
        except BlockingIOError:
            return True
        if not req:
            return False
        buf = self.ctl_buf + req
        while buf:
            if buf[:1] == b"s":
                self.ctl.sendall(json.dumps(self._snapshot()).encode() + b"\n")
                buf = buf[1:]
            elif buf[:1] == b"p":
                if len(buf) < 2 or len(buf) < 2 + buf[1]:
                    break  # the rest of the command is still on its way
                n = buf[1]
                if n == len(self.group):
                    self.group = list(buf[2:2 + n])
                buf = buf[2 + n:]
                self.ctl.sendall(b"ok\n")
            else:
                buf = buf[1:]  # unknown byte: skip it
        self.ctl_buf = buf
        return True

    def run(self) -> None:
        for fd in self.fds:
            os.set_blocking(fd, False)
        self.ctl.setblocking(False)
        ctl_fd = self.ctl.fileno()
        watch = self.fds + [ctl_fd]
        src_of = {fd: i for i, fd in enumerate(self.fds)}
        clock = time.monotonic
        self.ctl.sendall(b"ready\n")
        while True:
            heap = self.heap
            timeout = max(0.0, heap[0][0] - clock()) if heap else None
            # select() takes microseconds; epoll/poll round timeouts up to whole
            # milliseconds, which would add up to 1 ms of jitter per hop.
            readable, _, _ = select.select(watch, [], [], timeout)
            now = clock()
            for fd in readable:
                if fd == ctl_fd:
                    if not self._control():
                        return
                else:
                    self._read(src_of[fd], now)
            self._due(clock())


class NatForwarder(Forwarder):
    """The same path, with hosts behind NAT sites (``nat.py`` has the model).

    A separate class so the plain forwarder's per-packet loop stays as it was. NAT
    happens outside the link model: outbound translation when a packet is read
    from its host (the site's router sits before the access link), inbound
    translation at the packet's arrival time, before the destination's ingress
    link. Heap entries carry the source host as a sixth element, for counters and
    for the partition check of packets whose destination host is only known on
    arrival.
    """

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        n = len(self.fds)
        self.stats["dropped_nat"] = [0] * n  # refused by a NAT, by source host
        self.stats["dropped_unroutable"] = [0] * n  # to a private address from outside
        nat = cfg["nat"]
        self.router = _nat.NatRouter(
            [h["addr"] for h in cfg["hosts"]], nat["host_site"],
            [(s["addr"], s["subnet"], _nat.NatOptions(**s["options"])) for s in nat["sites"]])

    def _snapshot(self) -> dict:
        return {**self.stats, "nat_sites": self.router.site_stats(time.monotonic())}

    def _read(self, src: int, now: float) -> None:
        fd = self.fds[src]
        st = self.stats
        egress = self.egress[src]
        heap = self.heap
        route = self.router.on_read
        group = self.group
        for _ in range(_READ_BATCH):
            try:
                pkt = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            size = len(pkt)
            st["rx_packets"][src] += 1
            st["rx_bytes"][src] += size
            dst, pkt = route(src, pkt, now)
            if dst.__class__ is str:
                st[dst][src] += 1
                continue
            if dst >= 0 and group[src] != group[dst]:
                st["dropped_partition"][src] += 1
                continue
            t = egress.admit(now, size)
            if t < 0.0:
                st["dropped_queue"][src] += 1
                continue
            if self.loss and self.rngs[src].random() < self.loss:
                st["dropped_loss"][src] += 1
                continue
            self.seq += 1
            heapq.heappush(heap, (t + self.delay, self.seq, dst, False, pkt, src))

    def _due(self, now: float) -> None:
        heap = self.heap
        st = self.stats
        while heap and heap[0][0] <= now:
            t, seq, dst, admitted, pkt, src = heapq.heappop(heap)
            if not admitted:
                if dst < 0:
                    dst, pkt = self.router.on_arrival(-1 - dst, pkt, now)
                    if dst.__class__ is str:
                        st[dst][src] += 1
                        continue
                    if self.group[src] != self.group[dst]:
                        st["dropped_partition"][src] += 1
                        continue
                t = self.ingress[dst].admit(t, len(pkt))
                if t < 0.0:
                    st["dropped_queue"][dst] += 1
                    continue
                if t > now:
                    heapq.heappush(heap, (t, seq, dst, True, pkt, src))
                    continue
            late = now - t
            if late > st["late_max_s"]:
                st["late_max_s"] = late
            try:
                os.write(self.fds[dst], pkt)
            except OSError:
                st["dropped_other"][dst] += 1
                continue
            st["tx_packets"][dst] += 1
            st["tx_bytes"][dst] += len(pkt)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us if the emulator dies without closing the socket."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    _die_with_parent()
    if os.getppid() != cfg["parent_pid"]:
        return 1  # the parent died before we could register for its death
    try:
        # Deliveries are timed events; running ahead of the TCP endpoints on a busy
        # machine keeps the emulated delay close to the configured one.
        os.nice(cfg.get("nice", 0))
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the emulator's to handle
    (NatForwarder if cfg.get("nat") else Forwarder)(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
