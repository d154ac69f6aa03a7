"""The relay's requests and answers (transport/relay.py, transport/punch.py), sans-IO.

Request, 155 bytes, client -> relay:

    "PLR2" | from id [32, ASCII] | to id [32] | channel u64 LE
    | conn_index u16 LE | n_conns u16 LE | unix time u64 LE | nonce [16]
    | flags u8 | local endpoint [18] | HMAC-SHA256(relay key, everything before) [32]

The relay key is derived from the data key, so only swarm members can use
a relay. A request is accepted within CLOCK_SKEW_S of the relay's clock; a
replayed one can only splice its sender to a peer that will then fail the
link handshake (or have it punch towards that peer, which fails the same
way). The relay pairs connection i of one request with connection i of the
other's and answers "PLRK" once they are spliced.

Rendezvous for a hole punch: a request with flag PUNCH names the local
endpoint its connection was opened from (where the client will punch
from; zero without the flag). When both halves of a pair ask to punch, the
relay splices nothing: it answers each with

    "PLRP" | your endpoint as the relay saw it [18] | the other's as the
    relay saw it [18] | the other's local endpoint [18]

and closes both (an endpoint: IPv6 address, IPv4 mapped, [16] | port u16 BE).
If either half did not ask, the pair is spliced as usual ("PLRK"), so the
two ends always agree on what their link is. Both answers leave together,
so the two ends' connects cross in flight, as a port-dependent filter needs.
The answer carries no MAC: a forged one can only make the punch fail (the
link handshake and the signed greeting run over what it connects), and the
ends then fall back to a splice.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from typing import NamedTuple

MAGIC, OK, PUNCH_ANSWER = b"PLR2", b"PLRK", b"PLRP"
REQUEST_BYTES = 155
ENDPOINT_BYTES = 18
ANSWER_BYTES = 4 + 3 * ENDPOINT_BYTES
PUNCH = 1  # request flag: rendezvous for a hole punch rather than a splice
ID_BYTES = 32
CLOCK_SKEW_S = 120.0


def relay_key(data_key: bytes) -> bytes:
    return hmac.new(data_key, b"peerlearn relay v1", hashlib.sha256).digest()


class Request(NamedTuple):
    me: str
    to: str
    channel: int
    index: int
    n: int
    punch: bool
    local: tuple[str, int] | None  # where a punch leaves from, as the client says


def encode_endpoint(host: str, port: int) -> bytes:
    """An IP endpoint in 18 bytes; ValueError for a name or a bad port."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    raw = (ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4
           else addr).packed
    return raw + port.to_bytes(2, "big")


def decode_endpoint(raw: bytes) -> tuple[str, int]:
    """(host, port) of an endpoint; ValueError for one nobody can connect to."""
    if len(raw) != ENDPOINT_BYTES:
        raise ValueError("bad endpoint length")
    v6 = ipaddress.IPv6Address(raw[:16])
    addr = v6.ipv4_mapped or v6
    port = int.from_bytes(raw[16:], "big")
    if not port or addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"endpoint {addr}:{port} cannot be connected to")
    return str(addr), port


def request(key: bytes, me: str, to: str, channel: int, index: int, n: int,
            now: float | None = None, *, punch_from: tuple[str, int] | None = None) -> bytes:
    """One connection's request (module docstring); punch_from asks for a
    rendezvous, the client's local endpoint."""
    head = (MAGIC + me.encode("ascii").ljust(ID_BYTES, b"\0")[:ID_BYTES]
            + to.encode("ascii").ljust(ID_BYTES, b"\0")[:ID_BYTES]
            + channel.to_bytes(8, "little") + index.to_bytes(2, "little")
            + n.to_bytes(2, "little") + int(time.time() if now is None else now)
            .to_bytes(8, "little") + os.urandom(16)
            + (bytes([PUNCH]) + encode_endpoint(*punch_from) if punch_from
               else bytes(1 + ENDPOINT_BYTES)))
    return head + hmac.new(key, head, hashlib.sha256).digest()


def parse_request(key: bytes, data: bytes, now: float | None = None) -> Request:
    """The fields of a valid request; ValueError otherwise."""
    if len(data) != REQUEST_BYTES or data[:4] != MAGIC:
        raise ValueError("not a relay request")
    head, mac = data[:-32], data[-32:]
    if not hmac.compare_digest(mac, hmac.new(key, head, hashlib.sha256).digest()):
        raise ValueError("relay request not made with the swarm's key")
    sent = int.from_bytes(head[80:88], "little")
    if abs((time.time() if now is None else now) - sent) > CLOCK_SKEW_S:
        raise ValueError("relay request too old or from the future")
    try:
        me = head[4:36].rstrip(b"\0").decode("ascii")
        to = head[36:68].rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("relay request ids are not ASCII") from None
    index, n = int.from_bytes(head[76:78], "little"), int.from_bytes(head[78:80], "little")
    if not me or not to or me == to or not 0 <= index < n <= 256:
        raise ValueError("bad relay request")
    flags, endpoint = head[104], head[105:105 + ENDPOINT_BYTES]
    if flags not in (0, PUNCH) or (flags == 0 and any(endpoint)):
        raise ValueError("bad relay request flags")
    local = decode_endpoint(endpoint) if flags == PUNCH else None
    return Request(me, to, int.from_bytes(head[68:76], "little"), index, n, flags == PUNCH, local)


def punch_answer(you: tuple[str, int], other: tuple[str, int],
                 other_local: tuple[str, int]) -> bytes:
    return PUNCH_ANSWER + b"".join(encode_endpoint(*e) for e in (you, other, other_local))


def parse_punch_answer(data: bytes) -> tuple[tuple[str, int], ...]:
    """(you, other, other_local) of a rendezvous answer; ValueError otherwise."""
    if len(data) != ANSWER_BYTES or data[:4] != PUNCH_ANSWER:
        raise ValueError("not a rendezvous answer")
    return tuple(decode_endpoint(data[4 + i * ENDPOINT_BYTES:4 + (i + 1) * ENDPOINT_BYTES])
                 for i in range(3))
