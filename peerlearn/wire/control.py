"""Control-plane messages: msgpack maps checked against a declared schema.

Every message is a msgpack map ``{"t": <type>, ...fields}``. Decoding checks
the size before parsing, parses with msgpack's own length caps, then checks
every field's presence, type and range; anything else raises MessageError and
the caller counts and drops the message. Nothing is ever unpickled.

The sender of a message is not in the message: the transport knows who is
speaking (an authenticated connection), and the round logic takes the sender
from there. Layouts are listed in docs/protocol.md.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

from dataclasses import dataclass, fields

import msgpack

MAX_MESSAGE_BYTES = 256 * 1024
MAX_MEMBERS = 1024
MAX_ID_CHARS = 64
MAX_ADDR_CHARS = 256
U64 = (1 << 64) - 1
# The address a peer that cannot be dialled (behind NAT, no forwarded port)
# advertises: reach it over the connections it opens (transport/dialback.py).
DIAL_BACK = "dial-back"


class MessageError(PeerlearnError, ValueError):
    """A control message failed validation; the message must be dropped."""


@dataclass(frozen=True)
class PeerInfo:
    """How to reach a peer: its id (from its public key) and addresses."""

    id: str
    control: str  # host:port of its control socket
    data: str  # host:port of its data-plane listener

    def to_wire(self) -> list:
        return [self.id, self.control, self.data]

    @staticmethod
    def from_wire(v) -> PeerInfo:
        if not isinstance(v, list) or len(v) != 3:
            raise MessageError("peer info must be [id, control, data]")
        return PeerInfo(_peer_id(v[0]), _addr(v[1]), _addr(v[2]))


def _peer_id(v) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_ID_CHARS or not v.isprintable():
        raise MessageError("peer id must be 1..64 printable characters")
    return v


def _blame(v) -> str:
    """A peer id, or "" for none."""
    return v if v == "" else _peer_id(v)


def _addr(v) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_ADDR_CHARS or not v.isprintable():
        raise MessageError("address must be 1..256 printable characters")
    return v


def _u64(v) -> int:
    if type(v) is not int or not 0 <= v <= U64:
        raise MessageError("expected an unsigned 64-bit integer")
    return v


def _hash(v) -> bytes:
    if not isinstance(v, bytes) or len(v) != 8:
        raise MessageError("state hash must be 8 bytes")
    return v


def _flag(v) -> bool:
    if type(v) is not bool:
        raise MessageError("expected a boolean")
    return v


def _ids(v) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_MEMBERS:
        raise MessageError(f"id list must be a list of at most {MAX_MEMBERS}")
    out = tuple(_peer_id(x) for x in v)
    if len(set(out)) != len(out):
        raise MessageError("id list has duplicates")
    return out


def _peers(v) -> tuple[PeerInfo, ...]:
    if not isinstance(v, list) or len(v) > MAX_MEMBERS:
        raise MessageError(f"peer list must be a list of at most {MAX_MEMBERS}")
    out = tuple(PeerInfo.from_wire(x) for x in v)
    if len({p.id for p in out}) != len(out):
        raise MessageError("peer list has duplicate ids")
    return out


_DTYPE_NAMES = ("float32", "bfloat16", "float16", "int64", "int32", "uint8")
MAX_TENSORS = 4096
MAX_DIMS = 8
# lost: a view member that is unreachable (it still counts in the quorum);
# dead: an unreachable peer outside the view.
ROLES = ("coordinator", "member", "joiner", "lost", "dead")


def _tensors(v) -> tuple[tuple, ...]:
    """A state manifest: [[name, dtype, shape, xxh64], ...]."""
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        raise MessageError(f"manifest must be a list of at most {MAX_TENSORS}")
    out = []
    for e in v:
        if not isinstance(e, list) or len(e) != 4:
            raise MessageError("manifest entry must be [name, dtype, shape, hash]")
        name, dtype, shape, h = e
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_ADDR_CHARS:
            raise MessageError("tensor name must be 1..256 characters")
        if dtype not in _DTYPE_NAMES:
            raise MessageError(f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
                any(type(d) is not int or not 0 <= d < 2**40 for d in shape):
            raise MessageError("bad tensor shape")
        out.append((name, dtype, tuple(shape), _u64(h)))
    if len({e[0] for e in out}) != len(out):
        raise MessageError("manifest has duplicate names")
    return tuple(out)


def _status_rows(v) -> tuple[tuple, ...]:
    """[[id, control, data, role, step, state_hash, alive], ...]."""
    if not isinstance(v, list) or len(v) > MAX_MEMBERS:
        raise MessageError("status must be a list")
    out = []
    for e in v:
        if not isinstance(e, list) or len(e) != 7 or e[3] not in ROLES:
            raise MessageError("bad status row")
        out.append((_peer_id(e[0]), _addr(e[1]), _addr(e[2]), e[3], _u64(e[4]), _hash(e[5]),
                    _flag(e[6])))
    return tuple(out)


def _key32(v) -> bytes:
    if not isinstance(v, bytes) or len(v) != 32:
        raise MessageError("key must be 32 bytes")
    return v


def _nonce(v) -> bytes:
    if not isinstance(v, bytes) or len(v) != 16:
        raise MessageError("nonce must be 16 bytes")
    return v


def _part(v) -> int:
    if type(v) is not int or not 0 <= v < 256:
        raise MessageError("part out of range")
    return v


def _transfer(v) -> int:
    if type(v) is not int or not 0 <= v < 1 << 40:
        raise MessageError("transfer number out of range")
    return v


# field name -> validator; the wire form of ids/peers is a list.
_CHECKS = {
    "epoch": _u64, "aborted": _u64, "round_id": _u64, "term": _u64, "step": _u64,
    "state_hash": _hash, "result_hash": _hash, "ok": _flag, "synced": _flag, "departed": _flag,
    "poisoned": _flag, "blame": _blame, "leader": _blame,
    "participants": _ids, "members": _peers, "peer": PeerInfo.from_wire,
    "part": _part, "parts": _part, "tensors": _tensors, "reply_to": _addr, "peers": _status_rows,
    "key": _key32, "transfer": _transfer, "holding": _u64, "nonce": _nonce, "fast": _flag,
    "introduce": _flag,
}


@dataclass(frozen=True)
class Heartbeat:
    """I am alive; my applied view, the last committed round I saw aborted, the
    highest term I know, my shared state's step and hash, whether it is
    synced. `epoch` and `aborted` let a peer that missed a round's Apply or
    Abort learn how it ended; with `term` they let a coordinator that
    restarted go on from the swarm's counters instead of its own zeros.
    `departed`: I left this view for good (Leave with departed) and have not
    taken part in a round since: my vote counts in no quorum of it.
    `leader`: whom my own evidence picks to lead ("" if nobody): peers that
    judged a stalling leader at different moments agree by following the
    most chosen (deposing.py). `holding`: the committed round I hold
    undecided (0: none), so a participant does not hand the Commit back to
    a leader that is running it."""

    epoch: int
    aborted: int
    term: int
    step: int
    state_hash: bytes
    synced: bool
    peer: PeerInfo
    departed: bool = False
    leader: str = ""
    holding: int = 0


@dataclass(frozen=True)
class Join:
    """A new peer asks a member for the current view; `introduce`: it has a
    view already and only tells the member who it is (no Welcome back: at
    1,024 members each answer was the whole view, 69 MB a joiner)."""

    peer: PeerInfo
    introduce: bool = False


@dataclass(frozen=True)
class Welcome:
    """The answer to Join: the members of the last applied view."""

    epoch: int
    step: int
    members: tuple[PeerInfo, ...]


@dataclass(frozen=True)
class Leave:
    """Graceful departure: drop me now, do not wait for my heartbeats to stop.

    departed=False: I am stopping (members still staying answer Staying).
    departed=True: a staying member answered and my record now says I left
    this view: I never vote in it again, so the others drop me from it and
    their quorum shrinks. A peer that stops without that answer (the whole
    swarm stopping at once) stays in its view, and a restart resumes it.
    round_id (with departed): the highest round I took part in; a round up
    to it that applies later does not bring me back into the view."""

    departed: bool = False
    round_id: int = 0


@dataclass(frozen=True)
class Staying:
    """The answer to Leave(departed=False) from a member that is not leaving."""


@dataclass(frozen=True)
class Ready:
    """My shared state is at `step` with `state_hash` and my update for it is
    ready. `departed` as in Heartbeat: take part, but count no vote of mine."""

    step: int
    state_hash: bytes
    peer: PeerInfo
    departed: bool = False


@dataclass(frozen=True)
class Propose:
    """Coordinator: run round `round_id` at `step` among `participants` (sorted ids)."""

    round_id: int
    term: int
    step: int
    state_hash: bytes
    participants: tuple[str, ...]


@dataclass(frozen=True)
class Ack:
    round_id: int
    term: int


@dataclass(frozen=True)
class Commit:
    """Start the collective for round_id: every participant acked, or (fast)
    the coordinator commits without a Propose because the round repeats the
    last one it led among the same participants; a participant then checks
    the round as it would a Propose (state_hash is the state it runs on)
    and answers a refusal with a failed Done."""

    round_id: int
    term: int
    step: int
    participants: tuple[str, ...]
    members: tuple[PeerInfo, ...]
    state_hash: bytes = b"\0" * 8
    fast: bool = False


@dataclass(frozen=True)
class Done:
    """My collective for round_id ended: ok with the result's hash, or failed.
    poisoned: it failed because the mean failed my check (not finite, or far
    larger than my own contribution): a participant sent it. Sent to every
    member (the leader decides; the others watch it: deposing.py)."""

    round_id: int
    ok: bool
    result_hash: bytes
    poisoned: bool = False
    # Failed because the link to this participant stalled (a transfer from
    # or to it timed out), or "": the accused and the accuser are both left
    # out for a while (suspicion.py).
    blame: str = ""


@dataclass(frozen=True)
class Apply:
    round_id: int


@dataclass(frozen=True)
class Abort:
    round_id: int


@dataclass(frozen=True)
class StateRequest:
    """Send me, over your data link to me, the tensors i (in name order) with
    i % parts == part of state (step, state_hash), or of your newer state."""

    step: int
    state_hash: bytes
    part: int
    parts: int
    transfer: int  # the requester's number for this fetch (op ids derive from it)


@dataclass(frozen=True)
class StateOffer:
    """The state I hold now (the one asked for, or a newer one): its whole manifest.

    Tensor i follows on my data link to you as op SYNC_OP + (transfer << 16) + i.
    """

    step: int
    state_hash: bytes
    part: int
    parts: int
    transfer: int
    tensors: tuple[tuple, ...]


@dataclass(frozen=True)
class StateRefused:
    step: int
    state_hash: bytes


@dataclass(frozen=True)
class DataKey:
    """The data-plane key of an allowlist swarm, sent to a peer that joins.

    Only ever sent over the CURVE-encrypted control plane, to an admitted
    (allowlisted) peer; secret swarms derive the key from the secret instead."""

    key: bytes


@dataclass(frozen=True)
class DialBack:
    """I cannot be dialled: send me what you have for me on this connection,
    each message signed with my key's peer and this nonce (transport/dialback.py).
    Handled by the control plane; the round logic never sees it."""

    nonce: bytes


@dataclass(frozen=True)
class StatusRequest:
    """Tell me the swarm as you see it; answer to reply_to (host:port)."""

    reply_to: str


@dataclass(frozen=True)
class StatusReply:
    peers: tuple[tuple, ...]


MESSAGES = {
    cls.__name__.lower(): cls
    for cls in (Heartbeat, Join, Welcome, Leave, Staying, Ready, Propose, Ack, Commit, Done,
                Apply, Abort, StateRequest, StateOffer, StateRefused, DataKey, StatusRequest,
                StatusReply, DialBack)
}
_TYPE_OF = {cls: name for name, cls in MESSAGES.items()}


def encode(msg) -> bytes:
    """Serialises a message; the result always passes decode()."""
    body = {"t": _TYPE_OF[type(msg)]}
    for f in fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, PeerInfo):
            v = v.to_wire()
        elif isinstance(v, tuple):
            v = [x.to_wire() if isinstance(x, PeerInfo)
                 else [list(y) if isinstance(y, tuple) else y for y in x] if isinstance(x, tuple)
                 else x for x in v]
        body[f.name] = v
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes):
    """Parses and validates one message; raises MessageError on anything off."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("message must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_str_len=MAX_ADDR_CHARS,
            max_bin_len=64, max_array_len=MAX_TENSORS, max_map_len=16, max_ext_len=0,
        )
    except Exception as e:  # msgpack raises a zoo of types for hostile input
        raise MessageError(f"not a valid msgpack message: {type(e).__name__}") from None
    if not isinstance(body, dict):
        raise MessageError("message must be a map")
    cls = MESSAGES.get(body.get("t")) if isinstance(body.get("t"), str) else None
    if cls is None:
        raise MessageError("unknown message type")
    names = {f.name for f in fields(cls)}
    if set(body) - {"t"} != names:
        raise MessageError(f"{cls.__name__} needs exactly the fields {sorted(names)}")
    return cls(**{n: _CHECKS[n](body[n]) for n in names})
