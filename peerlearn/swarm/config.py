"""What a peer is configured with, and what a caller hands the daemon to reduce."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peerlearn.wire.control import DIAL_BACK
from peerlearn.state.shared import SharedState
from peerlearn.swarm.actions import Timeouts
from peerlearn.swarm.aggregate import check_rule
from peerlearn.transport.swarm_secret import check_secret


@dataclass
class PeerConfig:
    data_dir: Path
    secret: bytes | None  # None: an allowlist swarm (then allowlist is required)
    host: str = "127.0.0.1"  # bound; advertised too unless `advertise` says otherwise
    control_port: int = 0
    data_port: int = 0
    join: str | None = None  # host:port of any member's control socket; None founds a swarm
    timeouts: Timeouts = field(default_factory=Timeouts)
    codec: int | None = None
    block_size: int = 64
    n_conns: int = 4
    # The ring all-reduce runs this many lanes, one per connection by default
    # (see swarm.allreduce). Like codec, it must be the same at every peer.
    ring_lanes: int = 4
    # How a round combines the contributions: "mean" (the ring all-reduce)
    # or a robust rule of swarm.aggregate ("centered-clip", ...), which
    # all-gathers them. Like codec, it must be the same at every peer.
    aggregate: str = "mean"
    checkpoint_every: int = 10
    step_timeout: float = 30.0  # one all-reduce step may take this long
    allowlist: list[bytes] | None = None  # Ed25519 public keys admitted (raw 32 bytes)
    # A joiner gives up (JoinTimeout) when no member answers within this; None: never.
    join_timeout: float | None = 60.0
    # HOST or HOST:PORT the other peers reach this one at (a public address
    # behind NAT, a VPN address while binding 0.0.0.0). The data port is
    # advertised on the same host with its bound number. None: `host`.
    advertise: str | None = None
    # This peer cannot be dialled (behind NAT, no port forwarded): it
    # advertises wire.control.DIAL_BACK for both addresses and opens every
    # control and data connection itself; the far ends use them both ways.
    # advertise="dial-back" (the CLI's --advertise dial-back) sets it.
    dial_back: bool = False
    # Run SWIM membership (swim_driver.py) beside the heartbeats: observed,
    # logged and exported; the round logic does not use it yet (issue 19).
    swim: bool = False
    # Serve a relay (transport/relay.py) on this port of `host` (0: any free
    # one) for members that cannot dial each other; None: none.
    relay_port: int | None = None
    # HOST:PORT[,HOST:PORT...] of members' relays: a dial-back peer's links
    # to other dial-back peers go through the first that answers, in this
    # order (give every peer the same list); without one they cannot be made.
    relay_via: str | None = None
    # Links between two dial-back peers are first punched through their
    # NATs, the relay only introducing them (transport/punch.py), and
    # relayed only if that fails; False: always relayed.
    hole_punch: bool = True

    def __post_init__(self) -> None:
        # Refused here, before any socket or file exists, with the rule's
        # one-line reason (WeakSecretError, a ValueError).
        if self.secret is not None:
            self.secret = check_secret(self.secret)
        if self.advertise == DIAL_BACK:
            self.dial_back, self.advertise = True, None
        host = split_host_port(self.advertise)[0] if self.advertise else self.host
        if unspecified(host) and not self.dial_back:
            raise ValueError(f"{host} names no machine to the other peers: advertise an "
                             "address they reach (advertise=HOST[:PORT])")
        check_rule(self.aggregate)
        if not 1 <= self.ring_lanes <= self.n_conns:
            raise ValueError("ring_lanes must be between 1 and n_conns (one connection a lane)")


    def advertised(self, control_port: int, data_port: int) -> tuple[str, str]:
        """(control, data) addresses told to the other peers, given the bound ports."""
        if self.dial_back:
            return DIAL_BACK, DIAL_BACK
        host, port = self.host, control_port
        if self.advertise:
            host, port = split_host_port(self.advertise)
        return f"{host}:{port or control_port}", f"{host}:{data_port}"


def split_host_port(addr: str) -> tuple[str, int | None]:
    """"HOST", "HOST:PORT", "[V6]" or "[V6]:PORT" -> (host, port or None);
    ValueError for a port that is not a number."""
    if addr.startswith("["):
        host, _, rest = addr.partition("]")
        host += "]"
        port = rest[1:] if rest.startswith(":") else None
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address
        host, port = addr, None
    if port is not None and not port.isdigit():
        raise ValueError(f"{addr!r}: the port must be a number")
    return host, None if port is None else int(port)


def unspecified(host: str) -> bool:
    """0.0.0.0 and ::, which bind every interface and reach none."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""  # a name


@dataclass(eq=False)
class Submission:
    """One contribution waiting for a round.

    tensor: flat contiguous fp32, owned by the daemon until the future is
    settled (it is only read); None once settled (a collective already
    running keeps its own reference). apply(state, mean) runs on the daemon's state
    thread (swarm/keeper.py) when a round applies; it must be deterministic
    (every peer runs it on identical inputs). Heartbeats go on while it runs;
    the next round's apply, a checkpoint and a donor's copy wait for it.
    The future gets the mean, or StateReplaced / PeerClosed.
    """

    tensor: torch.Tensor | None
    apply: Callable[[SharedState, torch.Tensor], None] | None
    future: Future = field(default_factory=Future)
