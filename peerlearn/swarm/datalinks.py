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

Greetings are read on short-lived threads, at most MAX_GREETINGS at once,
each bounded by a 5 s timeout; incoming links are bounded per peer
(MAX_CHANNELS_PER_PEER) and in total (MAX_INCOMING). Every refusal is counted.

Broken links are replaced, never repaired: `outgoing` reconnects when the
cached link is unhealthy, and a new link from a peer replaces (and closes) the
one it had before; a receive in flight on the old one moves to the new one.
Threads: one accept thread (owned, joined by close()).
"""

from __future__ import annotations

import threading
import time

import torch

from peerlearn.state.identity import Identity, peer_id_of
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
MAX_CHANNELS_PER_PEER = 16
MAX_INCOMING = 4096

CHANNEL_ROUND = 0  # the all-reduce of a round
CHANNEL_STATE = 1 << 12  # state transfer to a syncing peer
CHANNEL_GOSSIP = 1 << 13  # gossip exchanges, outside rounds


def traffic_of(channel: int) -> str:
    """The traffic class a channel's bytes are counted under (transport.link.WIRE)."""
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


class PeerLinks:
    """Links to and from the swarm's peers (see the module docstring).

    With an identity, my_id must be its peer id, our greetings are signed and
    only signed greetings are accepted. Without one (tests, simulations) names
    are taken on trust.
    """

    def __init__(self, my_id: str, host: str, port: int, secret: bytes, n_conns: int = 4,
                 *, identity: Identity | None = None):
        if identity is not None and identity.peer_id != my_id:
            raise ValueError("my_id must be the identity's peer id")
        self.my_id = my_id
        self.identity = identity
        self.secret = secret
        self.n_conns = n_conns
        self.listener = LinkListener(host, port, secret)
        self.port = self.listener.address[1]
        self._out: dict[tuple[str, int], Link] = {}
        self._in: dict[tuple[str, int], Link] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.bad_greetings = 0  # malformed, unsigned or mis-signed, or timed out
        self.refused_links = 0  # over MAX_GREETINGS, MAX_CHANNELS_PER_PEER or MAX_INCOMING
        self._greeting = 0  # greetings being read now
        self._thread = threading.Thread(target=self._accept_loop, name="peer-links", daemon=True)
        self._thread.start()

    def set_secret(self, secret: bytes) -> None:
        """Links opened or accepted from now on authenticate with this secret."""
        self.listener.set_secret(secret)
        self.secret = secret

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                link = self.listener.accept_link(timeout=0.2)
            except TimeoutError:
                continue
            except StreamError:
                return
            # Each greeting on its own short-lived thread (bounded by its
            # timeout), so a silent or slow link cannot hold up the others.
            with self._cv:
                full = self._greeting >= MAX_GREETINGS
                self.refused_links += full
                self._greeting += not full
            if full:
                link.close()
                continue
            try:
                threading.Thread(target=self._greet, args=(link,), daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, go on
                with self._cv:
                    self._greeting -= 1
                    self.refused_links += 1
                link.close()

    def _greet(self, link: Link) -> None:
        try:
            peer, channel = read_greeting(link, timeout=5, verify=self.identity is not None)
        except (StreamError, ValueError):
            with self._cv:
                self.bad_greetings += 1
                self._greeting -= 1
            link.close()
            return
        with self._cv:
            self._greeting -= 1
            key = (peer, channel)
            if self._closed:
                old = link  # too late: close it rather than file it
            elif key not in self._in and (
                    len(self._in) >= MAX_INCOMING
                    or sum(p == peer for p, _ in self._in) >= MAX_CHANNELS_PER_PEER):
                self.refused_links += 1
                old = link
            else:
                old = self._in.pop(key, None)
                link.traffic = traffic_of(key[1])
                self._in[key] = link
                self._cv.notify_all()
        if old is not None:
            old.close()  # an op still using it fails now; its descriptors close after

    def outgoing(self, peer: str, address: str, timeout: float = 10.0,
                 channel: int = CHANNEL_ROUND) -> Link:
        """A healthy link to peer at host:port on channel, connecting (and greeting) if needed."""
        if not 0 <= channel < MAX_CHANNEL:
            raise ValueError(f"channel {channel} out of range")
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

    def incoming(self, peer: str, timeout: float = 10.0, channel: int = CHANNEL_ROUND) -> Link:
        """The healthy link from peer on channel, waiting up to timeout for it to connect."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                link = self._in.get((peer, channel))
                if link is not None and link.healthy():
                    return link
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no healthy link from {peer}")
                self._cv.wait(min(left, 0.1))

    def recv_into(self, peer: str, out: torch.Tensor, op_id: int, *, channel: int,
                  timeout: float) -> None:
        """Receives op_id from peer on channel into out (Link.recv_into semantics).

        A link whose sender failed an earlier op after sending it still looks
        healthy here (its frames are pending, so no EOF shows) until reading
        meets those stale frames and breaks it; the sender has meanwhile
        connected afresh, so the receive moves to that link. Likewise when a
        new link from peer replaces the one being read (closing it under the
        receive). Raises what Link.recv_into raises, or TimeoutError, at the
        deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.1, deadline - time.monotonic())
            link = self.incoming(peer, timeout=left, channel=channel)
            try:
                link.recv_into(out, op_id, timeout=left)
                return
            except StreamError as e:
                replaced = link.closed and not self._closed
                if time.monotonic() >= deadline or not (
                        replaced or isinstance(e, StreamProtocolError)):
                    raise

    def abort(self, peer: str, channel: int) -> None:
        """Fails whatever is in flight to or from peer on channel, at both ends."""
        with self._cv:
            links = [d.get((peer, channel)) for d in (self._out, self._in)]
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
        for link in links:
            link.close()
