"""Data-plane links keyed by peer id, for the daemon.

Each peer keeps at most one outgoing link to every peer it sends to (it
connected) and one incoming link from every peer it receives from (it
accepted). The connecting side names itself in a 64-byte greeting, the first
op on a new link, so the acceptor can file the link under the right peer; the
link itself is authenticated by the data-plane secret. Greetings are read on
short-lived threads bounded by a 5 s timeout.

Broken links are replaced, never repaired: `outgoing` reconnects when the
cached link is unhealthy, and a new link from a peer replaces (and closes) the
one it had before. Threads: one accept thread (owned, joined by close()).
"""

from __future__ import annotations

import threading
import time

import torch

from peerlearn.transport.stream import Link, LinkListener, StreamError, connect_link

GREETING_OP = (1 << 64) - 1
GREETING_BYTES = 64


class PeerLinks:
    def __init__(self, my_id: str, host: str, port: int, secret: bytes, n_conns: int = 4):
        self.my_id = my_id
        self.secret = secret
        self.n_conns = n_conns
        self.listener = LinkListener(host, port, secret)
        self.port = self.listener.address[1]
        self._out: dict[str, Link] = {}
        self._in: dict[str, Link] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.bad_greetings = 0
        self._thread = threading.Thread(target=self._accept_loop, name="peer-links", daemon=True)
        self._thread.start()

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
            threading.Thread(target=self._greet, args=(link,), daemon=True).start()

    def _greet(self, link: Link) -> None:
        greet = torch.zeros(GREETING_BYTES, dtype=torch.uint8)
        try:
            link.recv_into(greet, GREETING_OP, timeout=5)
            peer = bytes(greet.numpy()).rstrip(b"\0").decode("ascii")
            if not peer or not peer.isprintable():
                raise ValueError("empty greeting")
        except (StreamError, ValueError, UnicodeDecodeError):
            with self._cv:
                self.bad_greetings += 1
            link.close()
            return
        with self._cv:
            if self._closed:
                old = link  # too late: close it rather than file it
            else:
                old = self._in.pop(peer, None)
                self._in[peer] = link
                self._cv.notify_all()
        if old is not None:
            old.close()

    def outgoing(self, peer: str, address: str, timeout: float = 10.0) -> Link:
        """A healthy link to peer at host:port, connecting (and greeting) if needed."""
        with self._cv:
            link = self._out.get(peer)
        if link is not None and link.healthy():
            return link
        if link is not None:
            link.close()
        host, port = address.rsplit(":", 1)
        link = connect_link(host, int(port), self.secret, self.n_conns, timeout=timeout)
        greet = torch.zeros(GREETING_BYTES, dtype=torch.uint8)
        name = self.my_id.encode("ascii")[:GREETING_BYTES]
        greet[: len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
        try:
            link.send(greet, GREETING_OP, timeout=timeout)
        except StreamError:
            link.close()
            raise
        with self._cv:
            self._out[peer] = link
        return link

    def incoming(self, peer: str, timeout: float = 10.0) -> Link:
        """The healthy link from peer, waiting up to timeout for it to connect."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                link = self._in.get(peer)
                if link is not None and link.healthy():
                    return link
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no healthy link from {peer}")
                self._cv.wait(min(left, 0.1))

    def drop(self, peer: str) -> None:
        with self._cv:
            links = [self._out.pop(peer, None), self._in.pop(peer, None)]
        for link in links:
            if link is not None:
                link.close()

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
