"""``WanEmulator``: hosts in network namespaces joined by an emulated long fat pipe.

A star: each host is a network namespace with one TUN device and one IPv4 address;
a forwarder process (``forwarder.py``) in the root namespace carries packets between
the TUN devices with the configured delay, rate, queue and loss. The hosts keep the
kernel's default TCP settings (buffers, congestion control), so TCP behaves as it
would between two ordinary machines on such a path.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from . import netns as _ns
from .nat import NatOptions

_FORWARDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forwarder.py")
_IFNAME = "wan0"


@dataclasses.dataclass(frozen=True)
class Host:
    """One emulated machine: ``ip netns exec {netns} ...`` runs on it; peers reach it
    at ``addr``."""

    index: int
    netns: str
    addr: str
    ifname: str
    rate_mbit: float
    site: str | None = None  # the NAT site it sits behind; addr is then private


@dataclasses.dataclass(frozen=True)
class Site:
    """A NAT gateway: ``hosts`` (indices) share the public address ``addr`` and
    the private subnet ``subnet``.0/24."""

    name: str
    addr: str
    subnet: str
    hosts: tuple[int, ...]
    options: NatOptions


class WanEmulator:
    """Hosts joined by a path of round-trip time ``rtt_ms`` (any pair of hosts).

    Each host has an access link of ``rate_mbit`` (one figure, or one per host; 0 means
    unlimited) in each direction, with a drop-tail queue of ``queue_bytes`` (default:
    one bandwidth-delay product of that link, at least 16 packets of ``mtu``). Packets
    are lost at random with probability ``loss``, reproducibly for a given ``seed``.

    Use as a context manager; on exit (also on an exception, Ctrl-C, or SIGTERM when
    entered in the main thread) every process started in the hosts is ended and the
    namespaces, devices and forwarder are removed.

    The large default MTU keeps the forwarder's packet rate low enough for Python; the
    price is that TCP counts its initial and slow-start windows in 64 KB segments.

    ``nat_sites`` puts hosts behind NAT gateways: ``{"a": [1, 2], "b": [3]}`` gives
    site ``a`` hosts 1 and 2 on ``{nat_subnet}.0.0/24`` and site ``b`` host 3 on
    ``{nat_subnet}.1.0/24``; each site gets a public address on ``subnet`` after the
    hosts' (``sites[name].addr``). ``nat_options`` is one ``NatOptions`` for every
    site or a dict of them by site name. Without ``nat_sites`` nothing changes.
    """

    def __init__(self, n_hosts: int = 2, rtt_ms: float = 100.0,
                 rate_mbit: float | Sequence[float] = 1000.0, loss: float = 0.0,
                 seed: int = 0, queue_bytes: int | None = None, mtu: int = 65000,
                 subnet: str = "10.87.0", forwarder_nice: int = -5,
                 nat_sites: Mapping[str, Sequence[int]] | None = None,
                 nat_options: NatOptions | Mapping[str, NatOptions] = NatOptions(),
                 nat_subnet: str = "10.88"):
        if n_hosts < 2 or n_hosts > 250:
            raise ValueError("n_hosts must be between 2 and 250")
        if rtt_ms < 0 or not 0.0 <= loss < 1.0 or not 576 <= mtu <= 65535:
            raise ValueError("need rtt_ms >= 0, 0 <= loss < 1 and 576 <= mtu <= 65535")
        rates = list(rate_mbit) if isinstance(rate_mbit, Sequence) else [rate_mbit] * n_hosts
        if len(rates) != n_hosts or any(r < 0 for r in rates):
            raise ValueError("rate_mbit: one non-negative figure, or one per host")
        self.rtt_ms = float(rtt_ms)
        self.loss = float(loss)
        self.seed = int(seed)
        self.mtu = int(mtu)
        self._nice = forwarder_nice
        self._queue = [queue_bytes if queue_bytes is not None else
                       max(int(r * 1e6 / 8 * self.rtt_ms / 1e3), 16 * self.mtu) for r in rates]
        tag = f"{_ns.NAME_PREFIX}{os.getpid()}-{id(self) & 0xFFFFFF:x}"
        self.hosts = [Host(i, f"{tag}-h{i}", f"{subnet}.{i + 1}", _IFNAME, float(r))
                      for i, r in enumerate(rates)]
        self.sites: dict[str, Site] = {}
        if nat_sites:
            self._place_sites(dict(nat_sites), nat_options, subnet, nat_subnet)
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._forwarder: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._ctl_file = None
        self._ctl_lock = threading.Lock()
        self._old_sigterm = None
        self._closed = True

    def _place_sites(self, nat_sites: dict[str, Sequence[int]],
                     nat_options: NatOptions | Mapping[str, NatOptions], subnet: str,
                     nat_subnet: str) -> None:
        n = len(self.hosts)
        if n + len(nat_sites) > 254:
            raise ValueError("hosts plus NAT sites must fit the /24 public subnet")
        if any(f"{nat_subnet}.{s}" == subnet for s in range(len(nat_sites))):
            raise ValueError("a NAT site's private subnet would be the public one")
        if not isinstance(nat_options, NatOptions) and set(nat_options) - set(nat_sites):
            raise ValueError("nat_options names a site that nat_sites does not")
        placed: set[int] = set()
        for s, (name, members) in enumerate(nat_sites.items()):
            members = tuple(members)
            if not members or any(not 0 <= i < n for i in members) or placed & set(members):
                raise ValueError(f"NAT site {name!r}: host indices in range, each in one site")
            placed |= set(members)
            opts = nat_options if isinstance(nat_options, NatOptions) else \
                nat_options.get(name, NatOptions())
            self.sites[name] = Site(name, f"{subnet}.{n + 1 + s}", f"{nat_subnet}.{s}",
                                    members, opts)
            for i in members:
                self.hosts[i] = dataclasses.replace(
                    self.hosts[i], addr=f"{nat_subnet}.{s}.{i + 1}", site=name)

    def public_addr(self, host: int) -> str:
        """Where others on the public subnet see ``host``'s packets come from."""
        site = self.hosts[host].site
        return self.hosts[host].addr if site is None else self.sites[site].addr

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> WanEmulator:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        ok, why = _ns.netns_available()
        if not ok:
            raise RuntimeError(f"WAN emulator unavailable: {why}")
        self._closed = False
        atexit.register(self.close)
        self._install_sigterm()
        fds: list[int] = []
        try:
            _ns.sweep_stale()
            for h in self.hosts:
                _ns.create(h.netns)
                self._created.append(h.netns)
                fds.append(_ns.open_tun(h.netns, h.ifname))
                # With NAT every host gets a default route, as a real one has:
                # packets to private or unknown addresses then reach the forwarder,
                # which drops and counts them, instead of failing in the sender.
                _ns.configure(h.netns, h.ifname, f"{h.addr}/24", self.mtu, txqueuelen=1000,
                              default_route=bool(self.sites))
            self._spawn_forwarder(fds)
        except BaseException:
            self.close()
            raise
        finally:
            # From here on the forwarder holds the only copies, so the devices
            # vanish with it however it ends.
            for fd in fds:
                os.close(fd)

    def _spawn_forwarder(self, fds: list[int]) -> None:
        mine, theirs = socket.socketpair()
        cfg = {
            "hosts": [{"fd": fd, "addr": h.addr, "rate_bps": h.rate_mbit * 1e6,
                       "queue_bytes": q} for fd, h, q in zip(fds, self.hosts, self._queue)],
            "rtt_s": self.rtt_ms / 1e3, "loss": self.loss, "seed": self.seed,
            "ctl_fd": theirs.fileno(), "parent_pid": os.getpid(), "nice": self._nice,
        }
        if self.sites:
            index = {name: s for s, name in enumerate(self.sites)}
            cfg["nat"] = {
                "host_site": [None if h.site is None else index[h.site] for h in self.hosts],
                "sites": [{"addr": st.addr, "subnet": st.subnet,
                           "options": dataclasses.asdict(st.options)}
                          for st in self.sites.values()]}
        try:
            self._forwarder = subprocess.Popen(
                [sys.executable, _FORWARDER, json.dumps(cfg)],
                pass_fds=[*fds, theirs.fileno()], stdin=subprocess.DEVNULL,
                # Out of our process group, so a signal meant for the group (Ctrl-C,
                # `timeout`) reaches us and we tear down in order, not the forwarder
                # first under our feet.
                start_new_session=True)
        finally:
            theirs.close()
        self._ctl = mine
        self._ctl_file = mine.makefile("rb")
        mine.settimeout(10.0)
        if self._ctl_file.readline() != b"ready\n":
            raise RuntimeError(f"forwarder failed to start (exit {self._forwarder.poll()})")

    def close(self) -> None:
        """Idempotent teardown: processes, forwarder, namespaces, signal handler."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for p in self._procs:
            with contextlib.suppress(OSError):
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for name in self._created:
            _ns.kill_all(name)  # also whatever was started with `ip netns exec` by hand
        if self._ctl is not None:
            self._ctl_file.close()
            self._ctl.close()  # EOF tells the forwarder to exit
        if self._forwarder is not None:
            try:
                self._forwarder.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._forwarder.kill()
                self._forwarder.wait()
        for name in self._created:
            _ns.delete(name)
        self._created.clear()
        self._restore_sigterm()

    def _install_sigterm(self) -> None:
        # SIGTERM's default action skips finally blocks and atexit; turning it into
        # SystemExit lets the context manager clean up. Only when nobody else has
        # claimed the signal, and only from the main thread (a Python restriction).
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def _raise(signum, frame):
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, _raise)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and \
                threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # -- use -----------------------------------------------------------------------

    def popen(self, host: int, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``args`` inside host ``host``'s namespace (``subprocess.Popen`` kwargs).

        The process is ended when the emulator closes, if it is still running.
        """
        if self._closed:
            raise RuntimeError("emulator is not running")
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].netns, *args], **kwargs)
        self._procs.append(p)
        return p

    def stats(self) -> dict:
        """Counters since start, totals plus per-host lists.

        ``forwarded_*`` counts packets delivered to a destination TUN; the ``dropped_*``
        totals split losses by cause (``queue``: a full drop-tail queue, ``loss``: the
        random loss, ``other``: not IPv4 between two hosts). ``per_host`` has the raw
        lists, indexed by host (``rx``: read from that host, ``tx``: delivered to it).

        With ``nat_sites`` also ``dropped_nat`` (refused by a NAT: unsolicited or
        filtered inbound, hairpin, table full, neither TCP nor UDP),
        ``dropped_unroutable`` (to a private address from outside its site), both by
        source host, and ``nat``: per site its public ``addr``, live ``mappings`` and
        the table's counters.
        """
        if self._ctl is None or self._closed:
            raise RuntimeError("emulator is not running")
        with self._ctl_lock:
            self._ctl.sendall(b"s")
            raw = json.loads(self._ctl_file.readline())
        return {
            "forwarded_packets": sum(raw["tx_packets"]),
            "forwarded_bytes": sum(raw["tx_bytes"]),
            "received_packets": sum(raw["rx_packets"]),
            "dropped_queue": sum(raw["dropped_queue"]),
            "dropped_loss": sum(raw["dropped_loss"]),
            "dropped_other": sum(raw["dropped_other"]),
            "dropped_partition": sum(raw["dropped_partition"]),
            "late_max_ms": raw["late_max_s"] * 1e3,
            "per_host": {k: v for k, v in raw.items() if isinstance(v, list)
                         and k != "nat_sites"},
            **self._nat_stats(raw),
        }

    def _nat_stats(self, raw: dict) -> dict:
        if not self.sites:
            return {}
        return {"dropped_nat": sum(raw["dropped_nat"]),
                "dropped_unroutable": sum(raw["dropped_unroutable"]),
                "nat": {name: {"addr": st.addr, **counters} for (name, st), counters
                        in zip(self.sites.items(), raw["nat_sites"])}}

    def partition(self, *groups: Sequence[int]) -> None:
        """Cut the network: hosts in different groups stop reaching each other.

        Hosts not named form one more group. Packets already in flight still
        arrive; new ones across the cut are dropped (counted as dropped_partition).
        """
        group = [len(groups)] * len(self.hosts)
        for g, hosts in enumerate(groups):
            for h in hosts:
                group[h] = g
        self._set_groups(group)

    def heal(self) -> None:
        """Undo partition(): every host reaches every other again."""
        self._set_groups([0] * len(self.hosts))

    def _set_groups(self, group: list[int]) -> None:
        if self._ctl is None or self._closed:
            raise RuntimeError("emulator is not running")
        with self._ctl_lock:
            self._ctl.sendall(b"p" + bytes([len(group), *group]))
            if self._ctl_file.readline() != b"ok\n":
                raise RuntimeError("the forwarder refused the partition")

    def sysctls(self, host: int = 0) -> dict[str, str]:
        """The TCP settings a host's sockets get (read, never changed, by the emulator)."""
        keys = ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_congestion_control",
                "net.core.rmem_max", "net.core.wmem_max"]
        out = subprocess.run(["ip", "netns", "exec", self.hosts[host].netns, "sysctl", *keys],
                             capture_output=True, text=True, check=True).stdout
        return {k.strip(): " ".join(v.split()) for k, v in
                (line.split("=", 1) for line in out.splitlines() if "=" in line)}
