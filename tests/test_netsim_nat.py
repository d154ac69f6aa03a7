"""NAT emulation in the WAN emulator (peerlearn.netsim.nat and ``nat_sites=``).

The first half drives the NAT table and router with synthetic packets and needs
nothing; the second builds real namespaces (root, ``ip netns``, /dev/net/tun; else
skipped with the reason) and checks that the kernels on both sides accept the
rewritten packets, that unsolicited traffic is refused, and that UDP hole punching
works across endpoint-independent mappings and fails across symmetric ones.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys

import pytest

from peerlearn.netsim import NatOptions, WanEmulator, measure, netns_available
from peerlearn.netsim import nat
from peerlearn.netsim import netns as ns

_OK, _WHY = netns_available()


def netns(test):
    """For tests that build real namespaces: the same skip as tests/test_netsim.py."""
    return pytest.mark.netns(pytest.mark.skipif(not _OK, reason=_WHY)(test))


ip = socket.inet_aton
PUB = ip("10.87.0.9")
A, B = ip("10.88.0.2"), ip("10.88.0.3")
X, Y = ip("10.87.0.1"), ip("10.87.0.2")


# -- packets ---------------------------------------------------------------------


def _packet(proto: int, src: bytes, sport: int, dst: bytes, dport: int,
            payload: bytes = b"hello", flags: int = 0x10, udp_csum: bool = True) -> bytes:
    """A well-formed IPv4 TCP/UDP packet with correct checksums."""
    if proto == nat.TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    seg = bytearray(l4 + payload)
    if proto == nat.TCP or udp_csum:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(seg))
        c = nat.checksum(pseudo + bytes(seg)) or 0xFFFF
        off = 16 if proto == nat.TCP else 6
        seg[off:off + 2] = c.to_bytes(2, "big")
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 7, 0x4000, 64,
                                proto, 0, src, dst))
    hdr[10:12] = nat.checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr + seg)


def _valid(pkt: bytes) -> bool:
    """Both checksums verify, as the receiving kernel checks them."""
    if nat.checksum(pkt[:20]) != 0:
        return False
    proto, seg = pkt[9], pkt[20:]
    if proto == nat.UDP and seg[6:8] == b"\0\0":
        return True
    pseudo = pkt[12:16] + pkt[16:20] + struct.pack("!BBH", 0, proto, len(seg))
    return nat.checksum(pseudo + seg) == 0


def _ends(pkt: bytes) -> tuple[str, int, str, int]:
    return (socket.inet_ntoa(pkt[12:16]), int.from_bytes(pkt[20:22], "big"),
            socket.inet_ntoa(pkt[16:20]), int.from_bytes(pkt[22:24], "big"))


def test_rewrite_keeps_checksums_valid():
    rng = random.Random(1)
    for _ in range(300):
        proto = rng.choice([nat.TCP, nat.UDP])
        payload = rng.randbytes(rng.randrange(0, 300))  # odd lengths included
        pkt = bytearray(_packet(proto, rng.randbytes(4), rng.randrange(65536),
                                rng.randbytes(4), rng.randrange(65536), payload))
        assert _valid(pkt)
        new_ip, new_port = rng.randbytes(4), rng.randrange(65536)
        nat.rewrite(pkt, 20, proto, rng.random() < 0.5, new_ip, new_port)
        assert _valid(pkt)
        assert new_ip in (pkt[12:16], pkt[16:20])


def test_rewrite_leaves_absent_udp_checksum_absent():
    pkt = bytearray(_packet(nat.UDP, A, 4000, X, 5000, udp_csum=False))
    nat.rewrite(pkt, 20, nat.UDP, False, PUB, 20000)
    assert pkt[26:28] == b"\0\0"
    assert _valid(pkt) and _ends(pkt)[:2] == ("10.87.0.9", 20000)


def test_parse_refuses_fragments_and_other_protocols():
    pkt = bytearray(_packet(nat.UDP, A, 1, X, 2))
    assert nat.parse_l4(bytes(pkt))[:4] == (nat.UDP, 20, 1, 2)
    pkt[6:8] = (0x2000).to_bytes(2, "big")  # more fragments
    assert nat.parse_l4(bytes(pkt)) is None
    pkt[9] = 1  # ICMP
    assert nat.parse_l4(bytes(pkt)) is None


# -- the table ---------------------------------------------------------------------


def test_endpoint_independent_mapping_and_port_dependent_filtering():
    t = nat.NatTable(PUB)
    p = t.outbound(nat.UDP, A, 4000, X, 5000, 0, 0.0)
    assert t.outbound(nat.UDP, A, 4000, Y, 6000, 0, 0.0) == p  # same port, any destination
    q = t.outbound(nat.UDP, B, 4000, X, 5000, 0, 0.0)
    assert q != p and t.outbound(nat.TCP, A, 4000, X, 5000, 0x02, 0.0) is not None
    m = t.inbound(nat.UDP, p, X, 5000, 0, 1.0)
    assert (m.priv_ip, m.priv_port) == (A, 4000)
    assert t.inbound(nat.UDP, p, Y, 6000, 0, 1.0) is not None
    assert t.inbound(nat.UDP, p, X, 5001, 0, 1.0) is None  # right host, wrong port
    assert t.inbound(nat.UDP, p, ip("10.87.0.3"), 5000, 0, 1.0) is None  # never sent to
    assert t.inbound(nat.UDP, 65000, X, 5000, 0, 1.0) is None
    assert t.counters["dropped_filtered"] == 2 and t.counters["dropped_no_mapping"] == 1


def test_symmetric_mapping_gives_a_port_per_destination():
    t = nat.NatTable(PUB, NatOptions(mapping=nat.SYMMETRIC))
    p = t.outbound(nat.UDP, A, 4000, X, 5000, 0, 0.0)
    q = t.outbound(nat.UDP, A, 4000, Y, 5000, 0, 0.0)
    assert p != q
    assert t.outbound(nat.UDP, A, 4000, X, 5000, 0, 0.5) == p
    assert t.inbound(nat.UDP, p, X, 5000, 0, 1.0) is not None
    assert t.inbound(nat.UDP, p, Y, 5000, 0, 1.0) is None  # Y belongs to port q
    assert t.inbound(nat.UDP, q, Y, 5000, 0, 1.0) is not None


def test_udp_mapping_expires_when_idle_and_replies_keep_it_alive():
    t = nat.NatTable(PUB, NatOptions(udp_timeout_s=30))
    p = t.outbound(nat.UDP, A, 4000, X, 5000, 0, 0.0)
    assert t.inbound(nat.UDP, p, X, 5000, 0, 25.0) is not None  # refreshed to 55
    assert t.inbound(nat.UDP, p, X, 5000, 0, 50.0) is not None
    assert t.inbound(nat.UDP, p, X, 5000, 0, 81.0) is None
    assert t.live_mappings(81.0) == 0
    t.expire(81.0)
    assert not t.by_private and not t.by_public
    assert t.outbound(nat.UDP, A, 4000, X, 5000, 0, 82.0) != p  # a fresh mapping


def test_tcp_mapping_lingers_briefly_after_close():
    o = NatOptions(tcp_idle_s=100, tcp_closed_s=5)
    t = nat.NatTable(PUB, o)
    p = t.outbound(nat.TCP, A, 4000, X, 80, 0x02, 0.0)
    assert t.inbound(nat.TCP, p, X, 80, 0x12, 90.0) is not None  # idle timer: 100 s
    t.outbound(nat.TCP, A, 4000, X, 80, 0x11, 91.0)  # FIN out
    assert t.inbound(nat.TCP, p, X, 80, 0x11, 92.0) is not None  # FIN in: closed
    assert t.inbound(nat.TCP, p, X, 80, 0x10, 96.0) is not None  # last ACK, 5 s grace
    assert t.inbound(nat.TCP, p, X, 80, 0x10, 101.5) is None
    t = nat.NatTable(PUB, o)
    q = t.outbound(nat.TCP, B, 4000, X, 80, 0x02, 0.0)
    t.inbound(nat.TCP, q, X, 80, 0x04, 1.0)  # RST
    assert t.live_mappings(5.0) == 1 and t.live_mappings(6.5) == 0


def test_table_is_bounded_and_frees_ports():
    t = nat.NatTable(PUB, NatOptions(max_mappings=3, udp_timeout_s=10, port_lo=100,
                                     port_hi=104))
    ports = [t.outbound(nat.UDP, A, 4000 + i, X, 5000, 0, 0.0) for i in range(3)]
    assert ports == [100, 101, 102]
    assert t.outbound(nat.UDP, A, 4010, X, 5000, 0, 1.0) is None
    assert t.counters["dropped_full"] == 1
    assert t.outbound(nat.UDP, A, 4010, X, 5000, 0, 11.0) == 103  # the old ones expired
    spray = nat.NatTable(PUB, NatOptions(max_sessions=2))
    assert spray.outbound(nat.UDP, A, 1, X, 1, 0, 0.0) == spray.outbound(nat.UDP, A, 1, X, 2,
                                                                        0, 0.0)
    assert spray.outbound(nat.UDP, A, 1, X, 3, 0, 0.0) is None  # a third remote endpoint
    assert spray.outbound(nat.UDP, A, 1, X, 2, 0, 0.1) is not None  # known ones still go
    tight = nat.NatTable(PUB, NatOptions(port_lo=7, port_hi=7))
    assert tight.outbound(nat.UDP, A, 1, X, 2, 0, 0.0) == 7
    assert tight.outbound(nat.UDP, B, 1, X, 2, 0, 0.0) is None  # range exhausted


# -- the router --------------------------------------------------------------------


def _router(**opts) -> nat.NatRouter:
    # host 0 public 10.87.0.1, hosts 1 and 2 behind site 0, host 3 behind site 1
    return nat.NatRouter(["10.87.0.1", "10.88.0.2", "10.88.0.3", "10.88.1.4"],
                         [None, 0, 0, 1],
                         [("10.87.0.5", "10.88.0", NatOptions(**opts)),
                          ("10.87.0.6", "10.88.1", NatOptions(**opts))])


def test_router_translates_both_ways():
    r = _router()
    out, pkt = r.on_read(1, _packet(nat.TCP, ip("10.88.0.2"), 3333, X, 80, flags=0x02), 0.0)
    assert out == 0 and _valid(pkt)
    assert _ends(pkt) == ("10.87.0.5", 20000, "10.87.0.1", 80)
    back, pkt = r.on_read(0, _packet(nat.TCP, X, 80, ip("10.87.0.5"), 20000, flags=0x12), 0.1)
    assert back == -1  # site 0, translated on arrival
    dst, pkt = r.on_arrival(0, pkt, 0.2)
    assert dst == 1 and _valid(pkt)
    assert _ends(pkt) == ("10.87.0.1", 80, "10.88.0.2", 3333)


def test_router_drops_what_a_real_network_would():
    r = _router()
    udp = _packet(nat.UDP, X, 9, ip("10.87.0.5"), 20000)
    assert r.on_arrival(0, udp, 0.0)[0] == "dropped_nat"  # unsolicited
    assert r.on_read(0, _packet(nat.UDP, X, 9, ip("10.88.0.2"), 9), 0.0)[0] == \
        "dropped_unroutable"
    assert r.on_read(3, _packet(nat.UDP, ip("10.88.1.4"), 9, ip("10.88.0.2"), 9), 0.0)[0] == \
        "dropped_unroutable"
    assert r.on_read(0, _packet(nat.UDP, X, 9, ip("10.87.0.77"), 9), 0.0)[0] == "dropped_other"
    icmp = bytearray(_packet(nat.UDP, ip("10.88.0.2"), 9, X, 9))
    icmp[9] = 1
    assert r.on_read(1, bytes(icmp), 0.0)[0] == "dropped_nat"
    # Nothing above left state behind: no mapping was made for a dropped packet.
    assert r.tables[0].by_private == {} and r.tables[1].by_private == {}


def test_router_lan_is_direct_and_hairpin_is_optional():
    r = _router()
    pkt = _packet(nat.UDP, ip("10.88.0.2"), 1, ip("10.88.0.3"), 2)
    assert r.on_read(1, pkt, 0.0) == (2, pkt)  # untouched
    r.on_read(2, _packet(nat.UDP, ip("10.88.0.3"), 2, X, 7), 0.0)  # host 2 maps 20000
    loop = _packet(nat.UDP, ip("10.88.0.2"), 1, ip("10.87.0.5"), 20000)
    assert r.on_read(1, loop, 0.0)[0] == "dropped_nat"
    assert r.tables[0].counters["dropped_hairpin"] == 1
    r = _router(hairpin=True)
    r.on_read(2, _packet(nat.UDP, ip("10.88.0.3"), 2, ip("10.87.0.5"), 20001), 0.0)
    target, pkt = r.on_read(1, loop, 0.1)
    assert target == -1 and _ends(pkt)[:2] == ("10.87.0.5", 20001)
    dst, pkt = r.on_arrival(0, pkt, 0.2)
    assert dst == 2 and _ends(pkt) == ("10.87.0.5", 20001, "10.88.0.3", 2) and _valid(pkt)


# -- real namespaces ---------------------------------------------------------------

_TCP_SERVER = """
import json, socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(json.dumps(peer).encode())
    c.close()
"""

_TCP_CLIENT = """
import json, socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(json.dumps({"seen": json.loads(c.recv(200))}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__}))
"""

# A UDP socket driven line by line: "send ADDR PORT MSG" / "recv TIMEOUT".
_UDP_AGENT = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
for line in sys.stdin:
    cmd, *a = line.split()
    if cmd == "send":
        s.sendto(a[2].encode(), (a[0], int(a[1])))
        print(json.dumps("sent"), flush=True)
    else:
        s.settimeout(float(a[0]))
        try:
            data, frm = s.recvfrom(2048)
            print(json.dumps([data.decode(), frm[0], frm[1]]), flush=True)
        except TimeoutError:
            print("null", flush=True)
"""


def _server(wan: WanEmulator, host: int, port: int) -> None:
    p = wan.popen(host, [sys.executable, "-c", _TCP_SERVER, str(port)],
                  stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"


def _connect_all(wan: WanEmulator, tries, timeout: float = 1.0) -> list:
    """Connect from each (host, addr, port) at once, so the timeouts overlap."""
    procs = [wan.popen(host, [sys.executable, "-c", _TCP_CLIENT, addr, str(port),
                              str(timeout)], stdout=subprocess.PIPE, text=True)
             for host, addr, port in tries]
    return [json.loads(p.communicate(timeout=timeout + 10)[0]) for p in procs]


def _connect(wan: WanEmulator, host: int, addr: str, port: int) -> dict:
    return _connect_all(wan, [(host, addr, port)])[0]


class _Udp:
    def __init__(self, wan: WanEmulator, host: int, port: int):
        self.p = wan.popen(host, [sys.executable, "-c", _UDP_AGENT, str(port)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "listening"

    def _ask(self, line: str):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def send(self, addr: str, port: int, msg: str = "x") -> None:
        self._ask(f"send {addr} {port} {msg}")

    def recv(self, timeout: float = 0.5):
        return self._ask(f"recv {timeout}")


def _ours() -> set[str]:
    mine = f"{ns.NAME_PREFIX}{os.getpid()}-"
    return {n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout.split() if n.startswith(mine)}


@pytest.fixture
def wan():
    # host 0 public (the founder / rendezvous), 1 and 2 behind site a, 3 behind b,
    # 4 public
    with WanEmulator(n_hosts=5, rtt_ms=10, rate_mbit=100,
                     nat_sites={"a": [1, 2], "b": [3]}) as w:
        yield w
    assert not _ours()  # this process's namespaces only: others share the machine


def test_addresses_and_sites():
    w = WanEmulator(n_hosts=5, nat_sites={"a": [1, 2], "b": [3]})  # not started
    assert [h.addr for h in w.hosts] == \
        ["10.87.0.1", "10.88.0.2", "10.88.0.3", "10.88.1.4", "10.87.0.5"]
    assert [h.site for h in w.hosts] == [None, "a", "a", "b", None]
    assert (w.sites["a"].addr, w.sites["b"].addr) == ("10.87.0.6", "10.87.0.7")
    assert w.public_addr(2) == "10.87.0.6" and w.public_addr(4) == "10.87.0.5"
    plain = WanEmulator(n_hosts=3)
    assert [h.addr for h in plain.hosts] == ["10.87.0.1", "10.87.0.2", "10.87.0.3"]
    assert plain.sites == {} and all(h.site is None for h in plain.hosts)
    for bad in ({"a": [1], "b": [1]}, {"a": [9]}, {"a": []}):
        with pytest.raises(ValueError):
            WanEmulator(n_hosts=3, nat_sites=bad)
    with pytest.raises(ValueError):
        WanEmulator(n_hosts=3, nat_sites={"a": [1]}, nat_options={"z": NatOptions()})
    with pytest.raises(ValueError):
        WanEmulator(n_hosts=3, nat_sites={"a": [1]}, nat_subnet="10.87")
    with pytest.raises(ValueError):
        NatOptions(mapping="full-cone")


@netns
def test_tcp_out_through_nat_is_seen_from_the_public_address(wan):
    _server(wan, 0, 7000)
    seen = [_connect(wan, h, wan.hosts[0].addr, 7000)["seen"] for h in (1, 2, 3, 4)]
    st = wan.stats()
    assert [s[0] for s in seen] == ["10.87.0.6", "10.87.0.6", "10.87.0.7", "10.87.0.5"]
    assert seen[0][1] != seen[1][1]  # two hosts behind one site: two public ports
    assert all(20000 <= s[1] <= 59999 for s in seen[:3])
    assert st["nat"]["a"]["translated_out"] > 0 and st["nat"]["a"]["translated_in"] > 0
    assert st["dropped_nat"] == 0 and st["dropped_other"] == 0


@netns
def test_tcp_server_behind_nat_is_unreachable_from_outside(wan):
    _server(wan, 1, 7000)
    site_a = wan.sites["a"].addr
    # From a public host and from behind the other site, to the site's public
    # address (no mapping) and to the private one (not routed on the public side).
    tries = _connect_all(wan, [(0, site_a, 7000), (3, site_a, 7000),
                               (0, wan.hosts[1].addr, 7000), (3, wan.hosts[1].addr, 7000)])
    st = wan.stats()
    assert all(t == {"error": "TimeoutError"} for t in tries), tries
    assert st["dropped_nat"] >= 2 and st["dropped_unroutable"] >= 2
    assert st["per_host"]["dropped_nat"][0] >= 1 and st["per_host"]["dropped_nat"][3] >= 1
    assert st["nat"]["a"]["dropped_no_mapping"] >= 2
    assert st["forwarded_packets"] == 0  # not even a RST came back
    # The server itself is fine: its LAN neighbour reaches it.
    assert _connect(wan, 2, wan.hosts[1].addr, 7000)["seen"][0] == wan.hosts[2].addr


@netns
def test_hosts_behind_one_site_talk_on_private_addresses(wan):
    _server(wan, 2, 7001)
    seen = _connect(wan, 1, wan.hosts[2].addr, 7001)["seen"]
    st = wan.stats()
    assert seen[0] == wan.hosts[1].addr  # no translation inside the site
    assert st["nat"]["a"]["translated_out"] == 0 and st["nat"]["a"]["mappings"] == 0


@netns
def test_udp_replies_only_from_the_endpoint_sent_to(wan):
    inside, x, x2, y = _Udp(wan, 1, 4000), _Udp(wan, 0, 5000), _Udp(wan, 0, 5001), \
        _Udp(wan, 4, 5000)
    inside.send(wan.hosts[0].addr, 5000, "out")
    msg, pub, port = x.recv(2.0)
    assert (msg, pub) == ("out", wan.sites["a"].addr)
    before = wan.stats()["dropped_nat"]
    y.send(pub, port, "from-y")  # another host, same port number
    x2.send(pub, port, "from-x-other-port")  # the right host, another port
    assert inside.recv(0.3) is None
    x.send(pub, port, "reply")
    assert inside.recv(2.0) == ["reply", wan.hosts[0].addr, 5000]
    st = wan.stats()
    assert st["dropped_nat"] - before == 2
    assert st["nat"]["a"]["dropped_filtered"] == 2
    # Once the inside has sent to y, y gets through too: same mapping, same port.
    inside.send(wan.hosts[4].addr, 5000, "to-y")
    assert y.recv(2.0) == ["to-y", pub, port]
    y.send(pub, port, "y-again")
    assert inside.recv(2.0) == ["y-again", wan.hosts[4].addr, 5000]


@netns
def test_partition_applies_to_translated_packets(wan):
    inside, x = _Udp(wan, 1, 4000), _Udp(wan, 0, 5000)
    inside.send(wan.hosts[0].addr, 5000, "out")
    _, pub, port = x.recv(2.0)
    wan.partition([1])
    x.send(pub, port, "cut")  # the destination host is only known on arrival
    inside.send(wan.hosts[0].addr, 5000, "cut")
    assert inside.recv(0.3) is None and x.recv(0.1) is None
    assert wan.stats()["dropped_partition"] == 2
    wan.heal()
    x.send(pub, port, "healed")
    assert inside.recv(2.0)[0] == "healed"


@netns
def test_bulk_tcp_through_nat_fills_the_link():
    """64 KB segments rewritten both ways: a wrong checksum would stall the flow."""
    rate = 100
    with WanEmulator(n_hosts=2, rtt_ms=10, rate_mbit=rate, nat_sites={"a": [1]}) as w:
        up = measure.tcp_throughput(w, 1, 0, conns=2, seconds=1.5)
        st = w.stats()
    assert 0.7 * rate <= up["mbit"] <= 1.1 * rate
    assert st["nat"]["a"]["mappings_created"] == 2 and st["dropped_nat"] == 0


@netns
@pytest.mark.parametrize("modes, works", [
    ((nat.EIM, nat.EIM), True),
    ((nat.SYMMETRIC, nat.SYMMETRIC), False),
    ((nat.SYMMETRIC, nat.EIM), False),
], ids=["eim-eim", "symmetric-symmetric", "symmetric-eim"])
def test_udp_hole_punch_between_sites(modes, works):
    opts = {"a": NatOptions(mapping=modes[0]), "b": NatOptions(mapping=modes[1])}
    with WanEmulator(n_hosts=3, rtt_ms=20, rate_mbit=100, nat_sites={"a": [1], "b": [2]},
                     nat_options=opts) as w:
        r = measure.udp_hole_punch(w, 0, 1, 2, seconds=0.6)
        st = w.stats()
    # What the rendezvous saw is each site's public address.
    assert r["a"]["me"][0] == w.sites["a"].addr and r["b"]["me"][0] == w.sites["b"].addr
    assert r["a"]["peer"] == r["b"]["me"] and r["b"]["peer"] == r["a"]["me"]
    assert r["ok"] is works, r
    if works:
        assert r["a"]["received"] >= r["a"]["sent"] // 2
        assert st["nat"]["a"]["mappings_created"] == 1  # one port for both destinations
    else:
        assert r["a"]["received"] == r["b"]["received"] == 0
        assert st["nat"]["a"]["dropped_filtered"] > 0 and st["nat"]["b"]["dropped_filtered"] > 0
        assert st["nat"]["a"]["mappings_created"] == (2 if modes[0] == nat.SYMMETRIC else 1)


@netns
def test_without_nat_sites_nothing_changes():
    with WanEmulator(n_hosts=2, rtt_ms=0, rate_mbit=0) as w:
        routes = subprocess.run(["ip", "-n", w.hosts[0].netns, "-4", "route"],
                                capture_output=True, text=True).stdout
        st = w.stats()
        fwd = w._forwarder.args
    assert "default" not in routes
    assert not {"dropped_nat", "dropped_unroutable", "nat"} & set(st)
    assert "dropped_nat" not in st["per_host"]
    assert '"nat"' not in fwd[-1]
