"""The control plane: CURVE-encrypted zmq messages between peers (I/O only).

Each peer binds one ROUTER socket and keeps one DEALER per peer it talks to.
In a secret swarm every ROUTER presents the swarm's server key (derived from
the secret); in an allowlist swarm each presents its own identity's CURVE key,
and a DEALER names the peer it expects (`send(..., to=peer_id)`), so only
that peer can complete the handshake: the allowlist being public, a shared
server key derived from it would let anyone who knows it answer as a peer.
Admission happens in the CURVE handshake and the ZAP authenticator (see
keys.py); a connection that fails either is counted in `refused_connections`.
Every message is one frame: the sender's Ed25519 public key (32 bytes), then a
control message (peerlearn.wire.control). The frame's CURVE User-Id must be
the CURVE key derived from that Ed25519 key, so a member cannot speak in
another's name; the sender's id comes from there, never from the message.

Refused handshakes are also logged (handshakes.py), at most once a minute
with their count and source addresses: a peer started with another secret
shows up in the log of the peer it tries to reach, not only in a counter. On
the other side, each outgoing connection is watched until its first handshake
succeeds, so a joiner whose handshakes are refused learns it in about a second
(`refused`) instead of waiting out its join timeout.

Outgoing sockets are bounded: a member holding the secret names any control
address it likes (in a Join, a heartbeat, a StatusRequest's reply_to), and
each new address used to cost a DEALER (a zmq socket, a descriptor or two)
that was never closed; about a thousand exhausted zmq's socket limit and the
daemon died. Sockets to addresses `keep()` names (the daemon pins its view's
members) are never closed here; the others form an LRU of at most
MAX_DEALERS, the least recently used closed to make room
(`evicted_dealers`), and any of them unused for DEALER_IDLE_S is closed too
(a peer the round logic forgot, a status querier). New unpinned sockets are
opened at most DEALER_OPENS_PER_S a second (burst MAX_DEALERS); a send that
would open one beyond that is dropped and counted (`refused_dealers`): what a
flood of new addresses costs is bounded in sockets and in CPU alike.

A peer that cannot be dialled (behind NAT) advertises m.DIAL_BACK and is
answered on the connections it opens, each message signed (dialback.py;
this plane's half: control_dialback.py).

Incoming connections are bounded per source address, per address prefix and
in total (inbound.py); the rest are cut as soon as the monitor reports them.

Bad input is counted in `rejected_messages` and dropped: oversized frames
(zmq's MAXMSGSIZE closes such connections), wrong frame counts, unbound keys,
undecodable or invalid messages. Sending never blocks: a peer that cannot
take more (its queue is at the high-water mark) loses the message, which the
round logic tolerates like any lost datagram. Frames sent and received are
counted in transport.traffic.WIRE (traffic "control"; what that leaves out: there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from peerlearn.state.identity import Identity, peer_id_of
from peerlearn.transport import dialback, keys
from peerlearn.transport.admission import raise_fd_limit
from peerlearn.transport.control_dialback import FORWARDED_EXTRA, MAX_FRAME, DialBackAnswering
from peerlearn.transport.handshakes import _FAILED_HANDSHAKE, _WATCHES_MAX, HandshakeWatching
from peerlearn.transport.inbound import InboundConnections
from peerlearn.transport.traffic import CONTROL, WIRE
from peerlearn.wire import control as m
from peerlearn.wire import messages

log = logging.getLogger(__name__)

# zmq-level liveness of each outgoing connection (see ControlPlane._dealer).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
RECONNECT_MAX_MS = 2000
HANDSHAKE_IVL_MS = 10_000
# Outgoing sockets to addresses keep() does not pin (see the module docstring).
MAX_DEALERS = 256
DEALER_IDLE_S = 60.0
DEALER_OPENS_PER_S = 50.0
_SWEEP_EVERY_S = 1.0
# zmq's own cap on sockets per context (1023 by default, which the old unbounded
# table ran into): room for the pinned view (at most m.MAX_MEMBERS), the LRU,
# the monitors of watched connections (2 sockets each) and the plane's own.
_MAX_SOCKETS = m.MAX_MEMBERS + MAX_DEALERS + 2 * _WATCHES_MAX + 64


def split_target(target: str) -> tuple[str | None, str]:
    """"ID@HOST:PORT" -> (ID, "HOST:PORT"); "HOST:PORT" -> (None, "HOST:PORT").

    An allowlist swarm is joined (and queried) with the id: it names the only
    peer whose server key the handshake will accept at that address.
    """
    peer, at, address = target.rpartition("@")
    if not at:
        return None, target
    if len(peer) != 32 or any(c not in "0123456789abcdef" for c in peer):
        raise ValueError(f"not a peer id: {peer!r} (32 lowercase hex digits)")
    return peer, address


class ControlPlane(HandshakeWatching, DialBackAnswering):
    """One peer's control sockets. Owned by one asyncio loop; close() joins everything."""

    def __init__(self, identity: Identity, bind_host: str, port: int, *,
                 secret: bytes | None = None, allowlist: list[bytes] | None = None,
                 hwm: int = 1000, inbound_limits: dict[str, int] | None = None,
                 dial_back: bool = False):
        self.identity = identity
        self.peer_id = identity.peer_id
        # This peer cannot be dialled: it asks to be answered on the
        # connections it opens, and reads them (dialback.py).
        self.dial_back = dial_back
        self._routes = dialback.Routes()  # peers that asked us to answer them so
        self._nonce_of: dict[zmq.asyncio.Socket, list] = {}  # our DEALER -> [nonce, hello at]
        # For a peer id neither end can dial: the control address of a member
        # to pass messages on through (the daemon's pick), or None.
        self.forward_via: Callable[[str], str | None] = lambda to: None
        self.forwarded = 0  # messages passed on for others
        self._forward_budget: dict[str, list] = {}  # sender -> [tokens, at]
        self._pub = identity.public_raw
        self._curve_pub, self._curve_sec = keys.curve_keypair_from_ed25519(identity.private_key)
        # Whose server key a DEALER expects: secret mode, the swarm's (only
        # holders of the secret can present it); allowlist mode, the listed
        # peer's own, so nobody but that peer can answer in its name.
        self._peer_servers: dict[str, bytes] | None = None
        allowed = None
        if secret:
            self._server_pub, server_sec = keys.swarm_server_keypair(secret)
        elif allowlist:
            self._server_pub, server_sec = self._curve_pub, self._curve_sec
            self._peer_servers = {peer_id_of(k): keys.curve_public_from_ed25519(k)
                                  for k in allowlist}
            allowed = set(self._peer_servers.values())
        else:
            raise ValueError("a swarm needs a secret or an allowlist")
        self._admission = keys.ZapAdmission(allowed)
        self._bound: dict[bytes, bytes] = {}  # Ed25519 key -> its CURVE key (cache)
        raise_fd_limit()  # each socket is a descriptor or two
        self.ctx = zmq.asyncio.Context()
        self.ctx.max_sockets = _MAX_SOCKETS
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self._admission)
        self._router = self.ctx.socket(zmq.ROUTER)
        self._router.curve_server = True
        self._router.curve_secretkey = server_sec
        self._router.curve_publickey = self._server_pub
        # zmq drops the connection of anything past this; frames between
        # MAX_FRAME and it reach recv(), which counts and drops them.
        self._router.maxmsgsize = 4 * MAX_FRAME
        self._router.linger = 0
        self._router.rcvhwm = hwm
        self._router.router_mandatory = True  # a route gone stale is a counted drop
        # A connection holds one of the bounded inbound slots until its
        # handshake fails: honest handshakes take a few round trips.
        self._router.handshake_ivl = HANDSHAKE_IVL_MS
        self._router.bind(f"tcp://{bind_host}:{port}")
        endpoint = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(endpoint.rsplit(":", 1)[1])
        self._monitor = self._router.get_monitor_socket(
            _FAILED_HANDSHAKE | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        # Accepted connections, bounded (inbound.py); read where the monitor is.
        self.inbound = InboundConnections(self.port, **(inbound_limits or {}))
        self._refused_from: Counter[str] = Counter()  # since the last log line
        self._refused_logged_at: float | None = None
        # Oldest use first: key -> [socket, last use (monotonic)].
        self._dealers: OrderedDict[tuple[str, bytes], list] = OrderedDict()
        # Addresses whose sockets are never evicted (the daemon: its view's members).
        self.keep: Callable[[], Iterable[str]] = lambda: ()
        self._opens = float(MAX_DEALERS)  # token bucket for new unpinned sockets
        self._opens_at = time.monotonic()
        self._swept_at = time.monotonic()
        self.evicted_dealers = 0  # closed to make room (LRU)
        self.refused_dealers = 0  # sends dropped: new sockets opened too fast, or none to be had
        self.idle_closed_dealers = 0  # closed after DEALER_IDLE_S unused
        # Outgoing connections not yet through a handshake: their monitors, and
        # [failures in a row, whether the last one was the server refusing our key].
        self._watches: dict[tuple[str, bytes], tuple[zmq.asyncio.Socket, asyncio.Task]] = {}
        self._outcomes: dict[tuple[str, bytes], list] = {}
        self._hwm = hwm
        self.failed_handshakes = 0
        self.rejected_messages = 0
        self.dropped_sends = 0
        self.closed = False

    @property
    def refused_connections(self) -> int:
        return self.failed_handshakes + self._admission.denied

    def _dealer(self, address: str, server_pub: bytes) -> zmq.asyncio.Socket | None:
        """The socket for (address, server key), opened if needed; None when
        a new unpinned socket may not be opened now (counted, the send dropped)."""
        key = (address, server_pub)
        now = time.monotonic()
        entry = self._dealers.get(key)
        if entry is not None:
            entry[1] = now
            self._dealers.move_to_end(key)
            self._sweep(now)
            return entry[0]
        self._sweep(now)
        pinned = self._pinned()
        if address not in pinned:
            self._opens = min(float(MAX_DEALERS),
                              self._opens + (now - self._opens_at) * DEALER_OPENS_PER_S)
            self._opens_at = now
            if self._opens < 1.0:
                self.refused_dealers += 1
                return None
            self._opens -= 1.0
            unpinned = [k for k in self._dealers if k[0] not in pinned]  # oldest use first
            for victim in unpinned[:max(0, len(unpinned) - MAX_DEALERS + 1)]:
                self._close_dealer(victim)
                self.evicted_dealers += 1
        try:
            d = self.ctx.socket(zmq.DEALER)
        except zmq.ZMQError as e:  # EMFILE, or zmq's socket limit: drop, never die
            self.refused_dealers += 1
            log.debug("no socket for %s: %s", address, e)
            return None
        d.curve_serverkey = server_pub
        d.curve_publickey = self._curve_pub
        d.curve_secretkey = self._curve_sec
        d.sndhwm = self._hwm
        d.linger = 0
        # A cut link must be noticed and redialled within seconds, however
        # long the cut: without zmq heartbeats a dead TCP connection sits in
        # exponential retransmission backoff and a healed partition stays
        # deaf for about as long as it lasted.
        d.heartbeat_ivl = HEARTBEAT_IVL_MS
        d.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
        d.heartbeat_ttl = HEARTBEAT_TIMEOUT_MS
        d.reconnect_ivl = 100
        d.reconnect_ivl_max = RECONNECT_MAX_MS
        d.connect_timeout = HEARTBEAT_TIMEOUT_MS
        self._watch(address, server_pub, d)
        try:
            d.connect(f"tcp://{address}")
        except zmq.ZMQError as e:  # an address zmq cannot parse or resolve
            self._unwatch(key, d)
            self._outcomes.pop(key, None)
            d.close(linger=0)
            self.refused_dealers += 1
            log.debug("cannot connect to %s: %s", address, e)
            return None
        self._dealers[key] = [d, now]
        return d

    def _pinned(self) -> set[str]:
        try:
            return set(self.keep())
        except Exception:  # noqa: BLE001 - a view being rebuilt: pin nothing this once
            log.debug("keep() failed", exc_info=True)
            return set()

    def _sweep(self, now: float) -> None:
        """Closes unpinned sockets unused for DEALER_IDLE_S (at most once a second)."""
        if now - self._swept_at < _SWEEP_EVERY_S:
            return
        self._swept_at = now
        idle = []
        for key, (_, used) in self._dealers.items():  # oldest use first
            if now - used < DEALER_IDLE_S:
                break
            idle.append(key)
        if not idle:
            return
        pinned = self._pinned()
        for key in idle:
            if key[0] not in pinned:
                self._close_dealer(key)
                self.idle_closed_dealers += 1

    def _close_dealer(self, key) -> None:
        entry = self._dealers.pop(key, None)
        if entry is None:
            return
        self._unwatch(key, entry[0])
        self._outcomes.pop(key, None)
        self._nonce_of.pop(entry[0], None)
        entry[0].close(linger=0)

    def send(self, address: str, msg, to: str | None = None) -> None:
        """Queues msg for the peer at host:port; never blocks; a no-op once closed.

        to: the id of the peer expected there. In allowlist mode the handshake
        only completes with that peer (a message for an id not on the
        allowlist, or for no id, is counted in dropped_sends); secret mode
        ignores it.
        """
        if self.closed:
            return
        if address == m.DIAL_BACK:
            self._send_back(to, msg)
            return
        server_pub = self._server_pub
        if self._peer_servers is not None:
            server_pub = self._peer_servers.get(to or "")
            if server_pub is None:
                self.dropped_sends += 1
                return
        d = self._dealer(address, server_pub)
        if d is None:
            self.dropped_sends += 1
            return
        if self.dial_back:
            self._hello(d)
        self._send_on(d, self._pub + messages.encode(msg))

    def _send_on(self, d: zmq.asyncio.Socket, frame: bytes) -> None:
        try:
            sent = d.send(frame, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.dropped_sends += 1
            return
        # An asyncio socket reports a full queue (Again) through its future,
        # not by raising: settled here (a NOBLOCK send's at once), or every
        # drop becomes a "Future exception was never retrieved" traceback.
        if isinstance(sent, asyncio.Future) and not sent.done():
            sent.add_done_callback(lambda fut: self._sent(fut, len(frame)))
        else:
            self._sent(sent, len(frame))

    def _sent(self, fut, n: int) -> None:
        if isinstance(fut, asyncio.Future) and (fut.cancelled() or fut.exception() is not None):
            self.dropped_sends += 1
        else:
            WIRE.add("sent", CONTROL, n)

    @property
    def dealers(self) -> int:
        return len(self._dealers)

    def disconnect(self, address: str) -> None:
        for key in [k for k in self._dealers if k[0] == address]:
            self._close_dealer(key)

    def _sender_of(self, frame: zmq.Frame) -> str:
        data = frame.bytes
        pub = data[:32]
        curve = self._bound.get(pub)
        if curve is None:
            curve = keys.curve_public_from_ed25519(pub)
            if len(self._bound) < 65536:
                self._bound[pub] = curve
        if z85.encode(curve).decode() != frame.get("User-Id"):
            raise m.MessageError("sender key is not bound to its connection")
        return peer_id_of(pub)

    async def recv(self) -> tuple[str, object]:
        """The next valid message and its sender's id; invalid ones are counted
        and skipped. A dial-back peer also reads its DEALERs (dialback.py)."""
        while True:
            if self.dial_back:
                got = await self._recv_any()
                if got is None:
                    continue
                if got[0] is not None:  # from a DEALER: checked there
                    return got[0], got[1]
                frames = got[1]
            else:
                frames = await self._router.recv_multipart(copy=False)
            # Invalid frames crossed the wire too; the first is the routing id, made here.
            WIRE.add("received", CONTROL, sum(len(f) for f in frames[1:]))
            if len(frames) != 2 or not 33 <= len(frames[1]) <= MAX_FRAME + FORWARDED_EXTRA:
                self.rejected_messages += 1
                continue
            try:
                sender = self._sender_of(frames[1])
                if frames[1].bytes[32:36] == dialback.FORWARD:
                    self._pass_on(sender, frames[1].bytes)
                    continue
                msg = messages.decode(frames[1].bytes[32:])
            except (m.MessageError, ValueError) as e:
                self.rejected_messages += 1
                log.debug("dropped a control message: %s", e)
                continue
            routing_id = frames[0].bytes
            if isinstance(msg, m.DialBack):
                self._routes.learn(sender, routing_id, msg.nonce)
                continue
            self._routes.seen(sender, routing_id)
            return sender, msg

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for key in list(self._watches):
            entry = self._dealers.get(key)
            self._unwatch(key, entry[0] if entry else None)
        for d, _ in self._dealers.values():
            d.close(linger=0)
        self._dealers.clear()
        self._router.disable_monitor()
        self._monitor.close(linger=0)
        self._router.close(linger=0)
        self._auth.stop()
        self.ctx.term()
