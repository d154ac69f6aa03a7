"""NAT gateways of the WAN emulator, in user space: mapping, filtering, rewriting.

Pure logic on raw IPv4 packets, standard library only: the forwarder imports it by
file path (``forwarder.py`` runs outside the package), and tests drive it directly
with synthetic packets, without namespaces.

Model (what Linux ``masquerade`` gives, plus an explicit mapping policy):

* A *site* has one public address and private hosts on a private subnet. A packet
  from a private host to any address outside that subnet leaves through the site's
  ``NatTable``: its source ip:port becomes public ip:mapped port.
* Mapping: endpoint-independent by default (one public port per private ip:port,
  whatever the destination, RFC 4787 "EIM"), or ``symmetric`` (one per private
  ip:port *and* destination), the two ends hole punching is compared across.
* Filtering: address-and-port dependent. An inbound packet passes only if its
  public port is mapped and the mapping has a live *session* with the packet's
  remote ip:port, i.e. the private side sent to exactly that endpoint (Linux
  conntrack keeps one entry per 5-tuple, which is what filters this way).
* Sessions expire: UDP after ``udp_timeout_s`` without a packet either way; TCP after
  ``tcp_idle_s`` idle, or ``tcp_closed_s`` after a RST or FINs both ways. A mapping
  lives while it has a session. ``max_mappings`` bounds the table per site and
  ``max_sessions`` the remote endpoints per mapping; beyond them packets that would
  need a new entry are dropped (``dropped_full``).
* Only TCP and UDP cross a NAT, unfragmented; the rest is dropped and counted
  (Linux would also translate ICMP and reassemble fragments).
"""

from __future__ import annotations

import dataclasses
import socket
from struct import unpack

TCP = 6
UDP = 17
_FIN, _SYN, _RST = 0x01, 0x02, 0x04

EIM = "endpoint-independent"
SYMMETRIC = "symmetric"


@dataclasses.dataclass(frozen=True)
class NatOptions:
    """One site's NAT behaviour; defaults after Linux masquerade and RFC 4787/5382."""

    mapping: str = EIM  # or SYMMETRIC
    hairpin: bool = False  # Linux masquerade alone does not loop back to itself
    port_lo: int = 20000
    port_hi: int = 59999
    max_mappings: int = 8192
    max_sessions: int = 1024  # remote endpoints one mapping may talk to at once
    udp_timeout_s: float = 30.0  # nf_conntrack_udp_timeout
    tcp_idle_s: float = 7440.0  # RFC 5382's floor for established connections
    # Shorter than Linux's 120 s TIME_WAIT, so connection churn in long runs
    # holds fewer ports; a lost last ACK is answered by a FIN within seconds here.
    tcp_closed_s: float = 10.0

    def __post_init__(self):
        if self.mapping not in (EIM, SYMMETRIC):
            raise ValueError(f"mapping must be {EIM!r} or {SYMMETRIC!r}")
        if not 1 <= self.port_lo <= self.port_hi <= 65535 or \
                self.max_mappings < 1 or self.max_sessions < 1:
            raise ValueError("need 1 <= port_lo <= port_hi <= 65535 and positive maxima")


class _Session:
    __slots__ = ("expires", "fin_in", "fin_out")

    def __init__(self):
        self.expires = 0.0
        self.fin_out = False
        self.fin_in = False


class Mapping:
    """A private endpoint's public port, and the remote endpoints it may hear from."""

    __slots__ = ("priv_ip", "priv_port", "proto", "pub_port", "sessions")

    def __init__(self, proto: int, priv_ip: bytes, priv_port: int, pub_port: int):
        self.proto = proto
        self.priv_ip = priv_ip
        self.priv_port = priv_port
        self.pub_port = pub_port
        self.sessions: dict[tuple[bytes, int], _Session] = {}


class NatTable:
    """The translation state of one site (see the module docstring for the model).

    Addresses are 4-byte strings as they appear in packets; ports are ints.
    """

    def __init__(self, public_ip: bytes, opts: NatOptions = NatOptions()):
        self.public_ip = public_ip
        self.opts = opts
        self.by_private: dict[tuple, Mapping] = {}
        self.by_public: dict[tuple[int, int], Mapping] = {}
        self._cursor = {TCP: opts.port_lo, UDP: opts.port_lo}
        self._next_sweep = 0.0
        self.counters = {"translated_out": 0, "translated_in": 0, "mappings_created": 0,
                         "dropped_no_mapping": 0, "dropped_filtered": 0,
                         "dropped_full": 0, "dropped_hairpin": 0, "dropped_proto": 0}

    def _touch(self, m: Mapping, s: _Session, proto: int, flags: int, outbound: bool,
               now: float) -> None:
        o = self.opts
        if proto == UDP:
            s.expires = now + o.udp_timeout_s
            return
        if flags & _SYN:
            s.fin_out = s.fin_in = False  # the 5-tuple is being reused
        if flags & _FIN:
            if outbound:
                s.fin_out = True
            else:
                s.fin_in = True
        # A closed connection's mapping is held briefly for the last ACKs and
        # retransmitted FINs, then freed, so port reuse is bounded by churn.
        closed = flags & _RST or (s.fin_out and s.fin_in)
        s.expires = now + (o.tcp_closed_s if closed else o.tcp_idle_s)

    def _alloc_port(self, proto: int) -> int | None:
        lo, hi = self.opts.port_lo, self.opts.port_hi
        port = self._cursor[proto]
        # Sequential, as many home routers do: predictable on purpose, so port
        # prediction can be tried against the symmetric mode.
        for _ in range(hi - lo + 1):
            if (proto, port) not in self.by_public:
                self._cursor[proto] = lo if port >= hi else port + 1
                return port
            port = lo if port >= hi else port + 1
        return None

    def expire(self, now: float) -> None:
        """Drop dead sessions and the mappings left without one."""
        for key, m in list(self.by_private.items()):
            for r, s in list(m.sessions.items()):
                if s.expires <= now:
                    del m.sessions[r]
            if not m.sessions:
                self._forget(key, m)
        self._next_sweep = now + 1.0

    def _forget(self, key: tuple, m: Mapping) -> None:
        del self.by_private[key]
        del self.by_public[(m.proto, m.pub_port)]

    def outbound(self, proto: int, priv_ip: bytes, priv_port: int, rem_ip: bytes,
                 rem_port: int, flags: int, now: float) -> int | None:
        """The public port a private endpoint's packet leaves with; None: table full."""
        o = self.opts
        if now >= self._next_sweep:
            self.expire(now)  # sessions are only ever removed here: keeps memory bounded
        key = (proto, priv_ip, priv_port)
        if o.mapping == SYMMETRIC:
            key += (rem_ip, rem_port)
        m = self.by_private.get(key)
        if m is not None and not any(s.expires > now for s in m.sessions.values()):
            # Expired but not swept yet: the private side gets a fresh mapping, as
            # it would after a real router forgot the old one.
            self._forget(key, m)
            m = None
        if m is None:
            # A full table waits for the next sweep (within a second): sweeping
            # per refused packet would let a flood cost O(table) each.
            port = self._alloc_port(proto) if len(self.by_private) < o.max_mappings else None
            if port is None:
                self.counters["dropped_full"] += 1
                return None
            m = Mapping(proto, priv_ip, priv_port, port)
            self.by_private[key] = m
            self.by_public[(proto, port)] = m
            self.counters["mappings_created"] += 1
        s = m.sessions.get((rem_ip, rem_port))
        if s is None:
            if len(m.sessions) >= o.max_sessions:
                # One socket spraying many destinations (a scan, a big swarm) must
                # not grow the table without bound either.
                self.counters["dropped_full"] += 1
                return None
            s = m.sessions[(rem_ip, rem_port)] = _Session()
        self._touch(m, s, proto, flags, True, now)
        self.counters["translated_out"] += 1
        return m.pub_port

    def inbound(self, proto: int, pub_port: int, rem_ip: bytes, rem_port: int, flags: int,
                now: float) -> Mapping | None:
        """The mapping an inbound packet belongs to, or None (unsolicited: drop it)."""
        m = self.by_public.get((proto, pub_port))
        if m is None:
            self.counters["dropped_no_mapping"] += 1
            return None
        s = m.sessions.get((rem_ip, rem_port))
        if s is None or s.expires <= now:
            self.counters["dropped_filtered"] += 1
            return None
        self._touch(m, s, proto, flags, False, now)
        self.counters["translated_in"] += 1
        return m

    def live_mappings(self, now: float) -> int:
        return sum(1 for m in self.by_private.values()
                   if any(s.expires > now for s in m.sessions.values()))


# -- packets -------------------------------------------------------------------


_WORDS = {4: "!2H", 6: "!3H"}


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _adjust(csum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), over 16-bit words: only the changed
    words are summed, so a 64 KB segment costs what a 40-byte one does."""
    fmt = _WORDS[len(old)]
    # ~m is 0xFFFF - m for a 16-bit word.
    s = (~csum & 0xFFFF) + 0xFFFF * (len(old) // 2) - sum(unpack(fmt, old)) + \
        sum(unpack(fmt, new))
    return ~_fold(s) & 0xFFFF


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071); for tests and header construction."""
    if len(data) % 2:
        data += b"\0"
    return ~_fold(sum(int.from_bytes(data[i:i + 2], "big")
                      for i in range(0, len(data), 2))) & 0xFFFF


def parse_l4(pkt: bytes) -> tuple[int, int, int, int, int] | None:
    """(proto, ihl, src port, dst port, TCP flags) of an unfragmented TCP/UDP packet."""
    proto = pkt[9]
    ihl = (pkt[0] & 0x0F) * 4
    if proto not in (TCP, UDP) or int.from_bytes(pkt[6:8], "big") & 0x3FFF:
        return None  # not TCP/UDP, or a fragment (MF set or a non-zero offset)
    need = ihl + (20 if proto == TCP else 8)
    if ihl < 20 or len(pkt) < need:
        return None
    flags = pkt[ihl + 13] if proto == TCP else 0
    return (proto, ihl, int.from_bytes(pkt[ihl:ihl + 2], "big"),
            int.from_bytes(pkt[ihl + 2:ihl + 4], "big"), flags)


def rewrite(pkt: bytearray, ihl: int, proto: int, dst: bool, ip: bytes, port: int) -> None:
    """Replace the source (``dst`` False) or destination address and port in place,
    fixing the IPv4 header checksum and the TCP/UDP one (its pseudo-header holds
    the addresses)."""
    a = 16 if dst else 12
    p = ihl + (2 if dst else 0)
    c = ihl + (16 if proto == TCP else 6)
    old_ip = bytes(pkt[a:a + 4])
    old_port = bytes(pkt[p:p + 2])
    new_port = port.to_bytes(2, "big")
    pkt[10:12] = _adjust(int.from_bytes(pkt[10:12], "big"), old_ip, ip).to_bytes(2, "big")
    l4 = int.from_bytes(pkt[c:c + 2], "big")
    if proto == TCP or l4 != 0:  # a zero UDP checksum means "none" and stays so
        l4 = _adjust(l4, old_ip + old_port, ip + new_port)
        if proto == UDP and l4 == 0:
            l4 = 0xFFFF  # zero is reserved for "none" (RFC 768)
        pkt[c:c + 2] = l4.to_bytes(2, "big")
    pkt[a:a + 4] = ip
    pkt[p:p + 2] = new_port


# -- routing -------------------------------------------------------------------


class NatRouter:
    """Where each packet goes in a star whose hosts may sit behind NAT sites.

    ``host_addrs[i]`` is host i's own address (private for a host behind a site),
    ``host_site[i]`` its site index or None; ``sites`` lists (public address, private
    /24 prefix such as "10.88.0", NatOptions). Outbound translation happens when a
    packet leaves its host; inbound translation when it reaches the destination
    site (``on_arrival``), so a hole punch races the other side's packets as it
    would on a real path.

    Both methods return (target, packet): target is a host index, ``-1 - site`` for
    "translate on arrival at that site", or the name of the drop counter.
    """

    def __init__(self, host_addrs: list[str], host_site: list[int | None],
                 sites: list[tuple[str, str, NatOptions]]):
        self.by_addr = {socket.inet_aton(a): i for i, a in enumerate(host_addrs)}
        self.site_of = list(host_site)
        self.tables = [NatTable(socket.inet_aton(pub), opts) for pub, _, opts in sites]
        self.site_by_pub = {t.public_ip: s for s, t in enumerate(self.tables)}
        self.site_net = [socket.inet_aton(f"{net}.0")[:3] for _, net, _ in sites]
        self.private_nets = set(self.site_net)

    def on_read(self, src: int, pkt: bytes, now: float) -> tuple[int | str, bytes]:
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return "dropped_other", pkt
        dip = bytes(pkt[16:20])
        site = self.site_of[src]
        to_site = self.site_by_pub.get(dip)
        if site is None:
            if to_site is not None:
                return -1 - to_site, pkt
            return self._public(src, dip), pkt
        if dip[:3] == self.site_net[site]:
            d = self.by_addr.get(dip)  # the site's LAN: no translation
            return ("dropped_other" if d is None or d == src else d), pkt
        table = self.tables[site]
        if to_site is None:
            target = self._public(src, dip)
            if target.__class__ is str:
                return target, pkt  # no mapping for a packet that goes nowhere
        elif to_site == site and not table.opts.hairpin:
            table.counters["dropped_hairpin"] += 1
            return "dropped_nat", pkt
        else:
            target = -1 - to_site
        l4 = parse_l4(pkt)
        if l4 is None:
            table.counters["dropped_proto"] += 1
            return "dropped_nat", pkt
        proto, ihl, sport, dport, flags = l4
        port = table.outbound(proto, bytes(pkt[12:16]), sport, dip, dport, flags, now)
        if port is None:
            return "dropped_nat", pkt
        pkt = bytearray(pkt)
        rewrite(pkt, ihl, proto, False, table.public_ip, port)
        return target, pkt

    def _public(self, src: int, dip: bytes) -> int | str:
        """A public host's index, or why there is none."""
        d = self.by_addr.get(dip)
        if d is None or self.site_of[d] is not None:
            return "dropped_unroutable" if dip[:3] in self.private_nets else "dropped_other"
        return "dropped_other" if d == src else d

    def on_arrival(self, site: int, pkt: bytes, now: float) -> tuple[int | str, bytes]:
        l4 = parse_l4(pkt)
        if l4 is None:
            self.tables[site].counters["dropped_proto"] += 1
            return "dropped_nat", pkt
        proto, ihl, sport, dport, flags = l4
        m = self.tables[site].inbound(proto, dport, bytes(pkt[12:16]), sport, flags, now)
        d = None if m is None else self.by_addr.get(m.priv_ip)
        if d is None:
            return "dropped_nat", pkt
        pkt = bytearray(pkt)
        rewrite(pkt, ihl, proto, True, m.priv_ip, m.priv_port)
        return d, pkt

    def site_stats(self, now: float) -> list[dict]:
        return [{**t.counters, "mappings": t.live_mappings(now)} for t in self.tables]
