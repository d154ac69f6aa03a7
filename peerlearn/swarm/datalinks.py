"""Data-plane links keyed by peer id, for the daemon.

Each peer keeps at most one outgoing link per (peer, channel) it sends to (it
connected) and one incoming link per (peer, channel) it receives from (it
accepted). A link carries one operation at a time, so operations that may be
in flight together use different channels (an all-reduce round, gossip,
state transfer: see the CHANNEL_* constants). The connecting side names
itself and the channel in a greeting, the first op on a new link, so the
acceptor can file the link under the right key; the link itself is
authenticated by the data-plane secret.

Binding the name: the data-plane secret is shared by every member, so it
cannot tell members apart. A PeerLinks given an `identity` signs its greeting
with its Ed25519 key, over the name, the channel and the link's binding (a
hash of the link's handshakes that covers the acceptor's fresh nonces, see
transport.link.Link), and demands the same of every greeting it reads: the
key must hash to the claimed peer id (state.identity.peer_id_of) and the
signature must verify. So a link filed under peer X was opened by the holder
of X's private key, for this very link (a greeting recorded on one link fails
on any other). It does not stop an on-path attacker who also holds the data
secret from relaying a link X opened, then injecting frames into it: the
bulk frames carry no MAC (see wire.handshake's threat model).

Bounds (a member can mint identities: the data handshake proves the key, not
a membership, so thousands of links each greeted by a fresh identity used to
be kept, until a real member's link was refused and rounds stopped):

  * Greetings are read on short-lived threads, at most MAX_GREETINGS at
    once (MAX_GREETINGS_PER_SOURCE per address and per address prefix),
    each bounded by GREETING_TIMEOUT_S. When all are taken, a link from a
    prefix holding fewer takes the oldest greeting of the busiest prefix
    (transport.admission.FairAdmission): links that never greet cannot keep
    a member's out.
  * Incoming links are filed by the standing of the identity that greeted
    them (`standing`, set by the daemon: 2 a member of the view, 1 a peer the
    round logic knows, 0 anyone else): per identity at most
    MAX_CHANNELS_PER_PEER (members) or MAX_CHANNELS_PER_STRANGER; known
    non-members' links at most MAX_INCOMING_KNOWN, unknown identities' at
    most MAX_INCOMING_UNKNOWN, all at most MAX_INCOMING. A link over its
    tier's cap, or over the total, takes the place of the least recently
    used idle link of its own tier or a lower one (members' links are never
    displaced by a lower tier's); with none to take, it is refused.
  * Links of non-members idle for IDLE_LINK_S, and links whose far end
    closed, are closed (`reclaimed_links`) every SWEEP_EVERY_S.

Every refusal and eviction is counted (refused_links, evicted_links).

Broken links are replaced, never repaired: `outgoing` reconnects when the
cached link is unhealthy, and a new link from a peer replaces (and closes) the
one it had before; a receive in flight on the old one moves to the new one.
Threads: one accept thread (owned, joined by close()).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from peerlearn.state.identity import Identity, peer_id_of
from peerlearn.wire.control import DIAL_BACK
from peerlearn.swarm.natlinks import DialBackLinks
from peerlearn.transport.admission import FairAdmission
from peerlearn.transport.stream import (
    Link,
    LinkListener,
    StreamError,
    StreamProtocolError,
    connect_link,
)

GREETING_OP = (1 << 64) - 1
# [0, 56) peer id (ASCII, NUL padded), [56, 64) channel u64 LE, [64, 96) the
# sender's Ed25519 public key, [96, 160) its signature (both zero: unsigned).
GREETING_BYTES = 160
ID_BYTES = 56
_SIGNED_PART = 96
_GREETING_LABEL = b"peerlearn-greeting\0"
MAX_CHANNEL = 1 << 16
MAX_GREETINGS = 64
MAX_GREETINGS_PER_SOURCE = 32  # per address, and per address prefix
GREETING_TIMEOUT_S = 5.0
MAX_CHANNELS_PER_PEER = 16  # a view member (it uses 3: round, state, gossip)
MAX_CHANNELS_PER_STRANGER = 4  # anyone else
MAX_INCOMING = 1024
MAX_INCOMING_KNOWN = 256  # from peers the round logic knows, outside the view
MAX_INCOMING_UNKNOWN = 32  # from identities it does not know
IDLE_LINK_S = 60.0
SWEEP_EVERY_S = 5.0
MEMBER, KNOWN, UNKNOWN = 2, 1, 0  # standings

CHANNEL_ROUND = 0  # the all-reduce of a round
CHANNEL_STATE = 1 << 12  # state transfer to a syncing peer
CHANNEL_GOSSIP = 1 << 13  # gossip exchanges, outside rounds


def traffic_of(channel: int) -> str:
    """The traffic class a channel's bytes are counted under (transport.traffic.WIRE)."""
    return "round" if channel < CHANNEL_STATE else "state" if channel < CHANNEL_GOSSIP \
        else "gossip"


def _signed_message(link: Link, head: bytes) -> bytes:
    return _GREETING_LABEL + link.binding + head


def send_greeting(link: Link, name: str, channel: int, timeout: float,
                  identity: Identity | None = None) -> None:
    """The first op on a new link: who connected (printable ASCII, at most 56
    bytes) and for which channel, signed by identity if given. Raises
    StreamError; the caller closes the link."""
    raw = name.encode("ascii")
    if not raw or len(raw) > ID_BYTES or not name.isprintable():
        raise ValueError(f"greeting name {name!r} is not 1..{ID_BYTES} printable ASCII bytes")
    if not 0 <= channel < MAX_CHANNEL:
        raise ValueError(f"channel {channel} out of range")
    head = raw.ljust(ID_BYTES, b"\0") + channel.to_bytes(8, "little")
    if identity is None:
        greet = head.ljust(GREETING_BYTES, b"\0")
    else:
        head += identity.public_raw
        greet = head + identity.sign(_signed_message(link, head))
    link.send(torch.frombuffer(bytearray(greet), dtype=torch.uint8), GREETING_OP, timeout=timeout)


def read_greeting(link: Link, timeout: float, *, verify: bool = False) -> tuple[str, int]:
    """(name, channel) from a new link's greeting. Raises StreamError, or
    ValueError for a malformed one or, with verify, for one not signed for
    this link by the key the name is derived from."""
    buf = bytearray(GREETING_BYTES)
    # The tensor shares buf's memory: the bytes are read back without numpy.
    link.recv_into(torch.frombuffer(buf, dtype=torch.uint8), GREETING_OP, timeout=timeout)
    raw = bytes(buf)
    try:
        name = raw[:ID_BYTES].rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("greeting name is not ASCII") from None
    channel = int.from_bytes(raw[ID_BYTES:64], "little")
    if not name or not name.isprintable() or channel >= MAX_CHANNEL:
        raise ValueError("bad greeting")
    if verify:
        public = raw[64:_SIGNED_PART]
        if peer_id_of(public) != name or not Identity.verify(
                public, raw[_SIGNED_PART:], _signed_message(link, raw[:_SIGNED_PART])):
            raise ValueError(f"greeting is not signed for this link by {name}")
    return name, channel


class PeerLinks(DialBackLinks):
    """Links to and from the swarm's peers (see the module docstring).

    With an identity, my_id must be its peer id, our greetings are signed and
    only signed greetings are accepted. Without one (tests, simulations) names
    are taken on trust.
    """

    def __init__(self, my_id: str, host: str, port: int, secret: bytes, n_conns: int = 4,
                 *, identity: Identity | None = None, dial_back: bool = False,
                 relay: list[tuple[str, int]] | None = None, hole_punch: bool = True):
        if identity is not None and identity.peer_id != my_id:
            raise ValueError("my_id must be the identity's peer id")
        self.my_id = my_id
        self.identity = identity
        # We cannot be dialled: every link is ours to open, and serves both
        # directions (a far end cannot dial back); see outgoing/incoming.
        self.dial_back = dial_back
        # Links with other dial-back peers: punched or relayed (natlinks.py).
        self._init_dial_back(relay, hole_punch)
        self._aborts: dict[tuple[str, int], int] = {}  # abort() calls, to end waits
        self.secret = secret
        self.n_conns = n_conns
        self.listener = LinkListener(host, port, secret)
        self.port = self.listener.address[1]
        self._out: dict[tuple[str, int], Link] = {}
        self._in: dict[tuple[str, int], Link] = {}
        self._used: dict[tuple[str, int], float] = {}  # incoming: filed or handed out last
        self._cv = threading.Condition()
        self._closed = False
        # Who a greeting's identity is (MEMBER, KNOWN, UNKNOWN); called on
        # greeting threads. Without a daemon every identity is a member.
        self.standing: Callable[[str], int] = lambda peer: MEMBER
        self.bad_greetings = 0  # malformed, unsigned or mis-signed, or timed out
        self.refused_links = 0  # over a greeting, per-identity or table bound
        self.evicted_links = 0  # links and greetings cut off for a newcomer
        self.reclaimed_links = 0  # idle links of non-members, links closed at the far end
        self._greetings = FairAdmission(MAX_GREETINGS_PER_SOURCE, MAX_GREETINGS,
                                        MAX_GREETINGS_PER_SOURCE)
        self._cut: set[int] = set()  # id() of links whose greeting was cut off
        self._swept_at = time.monotonic()
        self._thread = threading.Thread(target=self._accept_loop, name="peer-links", daemon=True)
        self._thread.start()

    def set_secret(self, secret: bytes) -> None:
        """Links opened or accepted from now on authenticate with this secret."""
        self.listener.set_secret(secret)
        self.secret = secret

    def _accept_loop(self) -> None:
        while not self._closed:
            if time.monotonic() - self._swept_at >= SWEEP_EVERY_S:
                self._swept_at = time.monotonic()
                self._sweep(self._swept_at)
            try:
                link = self.listener.accept_link(timeout=0.2)
            except TimeoutError:
                continue
            except StreamError:
                return
            # Each greeting on its own short-lived thread (bounded by its
            # timeout), so a silent or slow link cannot hold up the others.
            token, why, victims = self._greetings.acquire(
                link.remote_host() or "?", lambda link=link: self._cut_greeting(link))
            with self._cv:
                self.refused_links += why is not None
                self.evicted_links += len(victims)
            for cut in victims:
                cut()
            if why is not None:
                link.close()
                continue
            try:
                threading.Thread(target=self._greet, args=(link, token), daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, go on
                self._greetings.release(token)
                with self._cv:
                    self.refused_links += 1
                link.close()

    def _cut_greeting(self, link: Link) -> None:
        with self._cv:
            self._cut.add(id(link))
        link.abort()  # the greeting's read fails at once; its thread closes the link

    def _greet(self, link: Link, token: int) -> None:
        try:
            peer, channel = read_greeting(link, timeout=GREETING_TIMEOUT_S,
                                          verify=self.identity is not None)
        except (StreamError, ValueError):
            self._greetings.release(token)
            with self._cv:
                if id(link) in self._cut:
                    self._cut.discard(id(link))  # counted as evicted already
                else:
                    self.bad_greetings += 1
            link.close()
            return
        self._greetings.release(token)
        try:
            standing = self.standing(peer)
        except Exception:  # noqa: BLE001 - a view being rebuilt: the lowest standing
            standing = UNKNOWN
        drop: list[Link] = []
        with self._cv:
            self._cut.discard(id(link))
            key = (peer, channel)
            if self._closed:
                drop.append(link)  # too late: close it rather than file it
            elif key in self._in:  # the same identity's new link replaces its old one
                drop.append(self._in.pop(key))
                self._file(key, link)
            else:
                room, evicted = self._room_for(peer, standing)
                if room:
                    drop += evicted
                    self.evicted_links += len(evicted)
                    self._file(key, link)
                else:
                    self.refused_links += 1
                    drop.append(link)
        for old in drop:
            old.close()  # an op still using it fails now; its descriptors close after

    def _file(self, key: tuple[str, int], link: Link) -> None:
        """Under _cv."""
        link.traffic = traffic_of(key[1])
        self._in[key] = link
        self._used[key] = time.monotonic()
        self._cv.notify_all()

    def _room_for(self, peer: str, standing: int) -> tuple[bool, list[Link]]:
        """Under _cv: whether a new link from peer may be filed, and the links
        to close to make room (taken out of the table here)."""
        per_peer = MAX_CHANNELS_PER_PEER if standing == MEMBER else MAX_CHANNELS_PER_STRANGER
        if sum(p == peer for p, _ in self._in) >= per_peer:
            return False, []
        ranks: dict[str, int] = {}
        for p, _ in self._in:
            if p not in ranks:
                try:
                    ranks[p] = self.standing(p)
                except Exception:  # noqa: BLE001 - as in _greet
                    ranks[p] = UNKNOWN
        tier_cap = {MEMBER: MAX_INCOMING, KNOWN: MAX_INCOMING_KNOWN,
                    UNKNOWN: MAX_INCOMING_UNKNOWN}[standing]
        if standing != MEMBER and \
                sum(ranks[p] == standing for p, _ in self._in) >= tier_cap:
            victim = self._idle_victim(ranks, {standing})
        elif len(self._in) >= MAX_INCOMING:
            victim = self._idle_victim(ranks, set(range(UNKNOWN, standing + 1)))
        else:
            return True, []
        if victim is None:
            return False, []
        link = self._in.pop(victim)
        self._used.pop(victim, None)
        return True, [link]

    def _idle_victim(self, ranks: dict[str, int], tiers: set[int]):
        """The least recently used link not in use, of the lowest of tiers."""
        best = None
        for key, link in self._in.items():
            rank = ranks[key[0]]
            if rank not in tiers or link.in_use:
                continue
            order = (rank, self._used.get(key, 0.0))
            if best is None or order < best[0]:
                best = (order, key)
        return None if best is None else best[1]

    def _sweep(self, now: float) -> None:
        """Closes links whose far end closed, and non-members' idle ones."""
        drop = []
        with self._cv:
            for key, link in list(self._in.items()):
                if link.in_use:
                    continue
                idle = now - self._used.get(key, now) >= IDLE_LINK_S
                if idle:
                    try:
                        idle = self.standing(key[0]) != MEMBER
                    except Exception:  # noqa: BLE001 - as in _greet
                        pass
                if idle or not link.healthy():
                    drop.append(self._in.pop(key))
                    self._used.pop(key, None)
            self.reclaimed_links += len(drop)
        for link in drop:
            link.close()

    @property
    def incoming_links(self) -> int:
        with self._cv:
            return len(self._in)

    def outgoing(self, peer: str, address: str, timeout: float = 10.0,
                 channel: int = CHANNEL_ROUND) -> Link:
        """A healthy link to peer at host:port on channel, connecting (and greeting) if needed.

        A peer that cannot be dialled (address DIAL_BACK) opens the link
        itself (its incoming(), or its own outgoing() to us): we wait up to
        timeout for it and send on it. Two such peers punch one through
        their NATs or have a relay carry it (natlinks.py).
        """
        if not 0 <= channel < MAX_CHANNEL:
            raise ValueError(f"channel {channel} out of range")
        if address == DIAL_BACK:
            if self.dial_back:
                return self._relayed(peer, timeout, channel)
            return self._wait_incoming(peer, timeout, channel)
        with self._dial_lock((peer, channel)):  # concurrent callers: one connection
            with self._cv:
                link = self._out.get((peer, channel))
            if link is not None and link.healthy():
                return link
            if link is not None:
                link.close()
            host, port = address.rsplit(":", 1)
            link = connect_link(host, int(port), self.secret, self.n_conns, timeout=timeout)
            try:
                send_greeting(link, self.my_id, channel, timeout, self.identity)
            except StreamError:
                link.close()
                raise
            with self._cv:
                link.traffic = traffic_of(channel)
                self._out[(peer, channel)] = link
            return link

    def incoming(self, peer: str, timeout: float = 10.0, channel: int = CHANNEL_ROUND,
                 address: str | None = None) -> Link:
        """The healthy link from peer on channel, waiting up to timeout for it to connect.

        When this peer cannot be dialled, it is the link it opens to peer at
        `address` (the same one outgoing() returns: a link serves both ways).
        """
        if self.dial_back and address is not None:
            return self.outgoing(peer, address, timeout, channel)
        return self._wait_incoming(peer, timeout, channel)

    def _wait_incoming(self, peer: str, timeout: float, channel: int) -> Link:
        deadline = time.monotonic() + timeout
        with self._cv:
            aborts = self._aborts.get((peer, channel), 0)
            while True:
                if self._aborts.get((peer, channel), 0) != aborts:
                    raise StreamError(f"the wait for a link from {peer} was aborted")
                link = self._in.get((peer, channel))
                if link is not None and link.healthy():
                    self._used[peer, channel] = time.monotonic()
                    return link
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no healthy link from {peer}")
                self._cv.wait(min(left, 0.1))

    def recv_into(self, peer: str, out: torch.Tensor, op_id: int, *, channel: int,
                  timeout: float, address: str | None = None,
                  follow: bool = False) -> Link:
        """Receives op_id from peer on channel into out (Link.recv_into
        semantics); returns the link it came on.

        A link whose sender failed an earlier op after sending it still looks
        healthy here (its frames are pending, so no EOF shows) until reading
        meets those stale frames and breaks it; the sender has meanwhile
        connected afresh, so the receive moves to that link. Likewise when a
        new link from peer replaces the one being read (closing it under the
        receive), and, with follow, whenever the link fails: the sender gave
        it up, and what we wait for comes on its next one. Raises what
        Link.recv_into raises, or TimeoutError, at the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.1, deadline - time.monotonic())
            link = self.incoming(peer, timeout=left, channel=channel, address=address)
            try:
                link.recv_into(out, op_id, timeout=left)
                return link
            except StreamError as e:
                replaced = link.closed and not self._closed
                if time.monotonic() >= deadline or not (
                        replaced or follow or isinstance(e, StreamProtocolError)):
                    raise

    def abort(self, peer: str, channel: int) -> None:
        """Fails whatever is in flight to or from peer on channel, at both ends,
        and a wait for a dial-back peer's link there (outgoing())."""
        with self._cv:
            links = [d.get((peer, channel)) for d in (self._out, self._in)]
            self._aborts[peer, channel] = self._aborts.get((peer, channel), 0) + 1
            if len(self._aborts) > MAX_INCOMING:
                self._aborts.pop(next(iter(self._aborts)))
            self._cv.notify_all()
        for link in links:
            if link is not None:
                link.abort()

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.listener.close()
        with self._cv:
            links = list(self._out.values()) + list(self._in.values())
            self._out.clear()
            self._in.clear()
            self._used.clear()
        for link in links:
            link.close()
