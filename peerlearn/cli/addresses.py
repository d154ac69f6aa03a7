"""The addresses a peer's command line works out: HOST:PORT checked, what
the other peers are told to reach this one at, whether an address is this
machine's only, and which of this machine's addresses a far host can reach."""

from __future__ import annotations

import socket


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise SystemExit(f"peerlearn: expected HOST:PORT with a port of 0..65535, got {addr!r}")
    return host, int(port)


def resolve_advertise(listen: str, advertise: str | None, join: str | None) -> str | None:
    """What the other peers are told to reach us at (PeerConfig.advertise).
    --advertise if given; else, when --listen binds every interface, the
    address the route to the --join target leaves from; else None (the
    listen address). An unspecified address to advertise exits with one line."""
    from peerlearn.swarm.config import split_host_port, unspecified
    from peerlearn.transport.control import split_target
    from peerlearn.wire.control import DIAL_BACK

    host, _ = split_addr(listen)
    if advertise == DIAL_BACK:  # reached only over the connections it opens
        if join is None:
            raise SystemExit("peerlearn: --advertise dial-back needs --join: a peer nobody "
                             "can reach cannot found a swarm")
        return advertise
    if advertise:
        try:
            ahost, aport = split_host_port(advertise)
        except ValueError:
            aport = -1
        if aport is not None and not 0 < aport <= 65535:
            raise SystemExit(f"peerlearn: --advertise wants HOST or HOST:PORT with a port of "
                             f"1..65535, got {advertise!r}")
        if unspecified(ahost):
            raise SystemExit(f"peerlearn: --advertise {advertise} names no machine: give the "
                             "address the other peers reach this one at")
        return advertise
    if not unspecified(host):
        return None
    if join is None:
        raise SystemExit(f"peerlearn: --listen {listen} binds every interface but names none to "
                         "the other peers: add --advertise HOST[:PORT] (the address they reach)")
    jhost, jport = split_addr(split_target(join)[1])
    try:
        return local_address_towards(jhost, jport)
    except OSError as e:
        raise SystemExit(f"peerlearn: no route to --join {join}: {e.strerror or e}") from None


def loopback(control: str) -> bool:
    """Whether HOST:PORT names this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    from peerlearn.swarm.config import split_host_port

    host = split_host_port(control)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine that the route to host:port leaves from:
    what a peer there can reach us at. (A UDP connect sends nothing.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host.strip("[]"), port))
        addr = s.getsockname()[0]
    # Bracketed, so "HOST:PORT" built from it stays one address (PeerConfig.advertised).
    return f"[{addr}]" if ":" in addr else addr
