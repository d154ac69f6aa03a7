"""Wiring a ring of striped links (for tests, benchmarks and simple launchers).

Each peer listens with a `LinkListener`, connects to its successor and accepts
from its predecessor, both at once (with two peers, each is the other's
successor and predecessor, so each opens one link and accepts one). Then every
link carries the data-plane greeting (swarm.datalinks) from its connecting
side, naming the ring tag and the sender's rank, so a link from a stranger
holding the secret, or from an earlier ring, is refused rather than wired in.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import threading
import time
from dataclasses import dataclass

from peerlearn.swarm.datalinks import read_greeting, send_greeting
from peerlearn.transport.stream import (
    DEFAULT_CONNS,
    Link,
    LinkListener,
    SocketOptions,
    connect_link,
)

class RingError(PeerlearnError, RuntimeError):
    """The ring could not be wired (a neighbour is missing or is not who it should be)."""


@dataclass
class RingLinks:
    """This peer's place in a ring. Links are None when world == 1."""

    rank: int
    world: int
    send: Link | None  # to (rank + 1) % world
    recv: Link | None  # from (rank - 1) % world

    def close(self) -> None:
        for link in (self.send, self.recv):
            if link is not None:
                link.close()


def _ring_name(ring_tag: int) -> str:
    return f"ring:{ring_tag:016x}"


def connect_ring(
    rank: int,
    addrs: list[tuple[str, int]],
    listener: LinkListener,
    secret: bytes,
    *,
    ring_tag: int,
    n_conns: int = DEFAULT_CONNS,
    options: SocketOptions = SocketOptions(),
    timeout: float = 30.0,
) -> RingLinks:
    """Wires rank `rank` into the ring addrs[0] -> addrs[1] -> ... -> addrs[0].

    addrs[i] is where rank i's listener accepts; `listener` is this rank's.
    ring_tag must be the same at every peer and new for every ring built.
    Raises RingError (or OSError / TimeoutError) and leaves no link open.
    """
    world = len(addrs)
    if not 0 <= rank < world:
        raise ValueError("rank out of range")
    if world == 1:
        return RingLinks(rank, 1, None, None)
    succ = addrs[(rank + 1) % world]
    deadline = time.monotonic() + timeout
    out: dict[str, Link] = {}
    errors: list[BaseException] = []

    def dial() -> None:
        # The successor may not be listening yet: retry until the deadline.
        while True:
            try:
                out["send"] = link = connect_link(succ[0], succ[1], secret, n_conns,
                                                  options=options, timeout=5.0)
                send_greeting(link, _ring_name(ring_tag), rank, timeout)
                return
            except ConnectionRefusedError as e:
                if time.monotonic() > deadline:
                    errors.append(e)
                    return
                time.sleep(0.05)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    dialer = threading.Thread(target=dial, name="ring-dial")
    dialer.start()
    try:
        link = out["recv"] = listener.accept_link(timeout=max(0.0, deadline - time.monotonic()))
        name, who = read_greeting(link, timeout=max(0.1, deadline - time.monotonic()))
        if (name, who) != (_ring_name(ring_tag), (rank - 1) % world):
            raise RingError(f"rank {rank}: link from rank {who} of {name}, expected rank "
                            f"{(rank - 1) % world} of {_ring_name(ring_tag)}")
    except BaseException as e:  # noqa: BLE001
        errors.append(e)
    finally:
        dialer.join()
    if errors:
        for link in out.values():
            link.close()
        raise errors[0]
    return RingLinks(rank, world, out["send"], out["recv"])
