"""SWIM membership messages (peerlearn/swarm/swim.py): compact msgpack arrays.

Every message is a msgpack array ``[type, ...fields]`` with a small integer
type, so a probe with nothing piggybacked is 4 to 8 bytes. Decoding checks
the size before parsing, parses with msgpack's own length caps, then checks
every field's type and range; anything else raises MessageError (the same
error as control messages: the caller counts and drops). Nothing is unpickled.

As in control.py the sender is not in the message: the transport knows who
speaks, and SwimMember.receive takes it from there.

Layouts (``ups`` is a list of at most MAX_UPDATES updates):

    Ping      [0, seq, ups]
    Ack       [1, seq, ups]
    PingReq   [2, seq, target, ups]      probe target for me, answer Ack(seq) or Nack(seq)
    Nack      [3, seq]                   I asked target and heard nothing in time
    Join      [4, incarnation, addr]     add me; send me your members
    Members   [5, part, parts, entries]  a share of the table (at most MAX_ENTRIES)

An update is ``[state, member, incarnation]`` plus ``addr`` when the state is
ALIVE, plus ``by`` (who suspects) when it is SUSPECT; a Members entry is
``[state, member, incarnation, addr]``. Member ids that are lowercase hex
(the daemon's ids: 32 hex digits of a key hash) travel as their bytes, 16
instead of 34; any other printable id as a string. Both decode to the same
str, so the encoding is canonical for the encoder and lenient for nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgpack

from peerlearn.wire.control import MessageError

__all__ = ["ALIVE", "SUSPECT", "DEAD", "LEFT", "STATE_NAMES", "MAX_UPDATES", "MAX_ENTRIES",
           "MAX_SWIM_BYTES", "Update", "Ping", "Ack", "PingReq", "Nack", "Join", "Members",
           "encode", "decode", "MessageError"]

ALIVE, SUSPECT, DEAD, LEFT = 0, 1, 2, 3
STATE_NAMES = ("alive", "suspect", "dead", "left")
MAX_UPDATES = 16  # piggybacked on one Ping, Ack or PingReq
MAX_ENTRIES = 256  # in one Members message
MAX_ID_CHARS = 64
MAX_ADDR_CHARS = 256
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
# 256 entries of the longest ids and addresses fit; anything longer is hostile.
MAX_SWIM_BYTES = 128 * 1024

_HEX_ID = re.compile(r"(?:[0-9a-f]{2}){1,32}")


@dataclass(frozen=True)
class Update:
    """One member's state as someone holds it: (incarnation, state) orders
    updates about the same member (higher wins; DEAD and LEFT beat SUSPECT
    beat ALIVE at one incarnation). `addr` (ALIVE, and every Members entry):
    where to probe it. `by` (SUSPECT): the member that suspects it, so that
    independent suspicions can shorten the suspicion timeout (Lifeguard)."""

    state: int
    member: str
    incarnation: int
    addr: str = ""
    by: str = ""


@dataclass(frozen=True)
class Ping:
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Ack:
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class PingReq:
    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Nack:
    seq: int


@dataclass(frozen=True)
class Join:
    incarnation: int
    addr: str


@dataclass(frozen=True)
class Members:
    part: int
    parts: int
    entries: tuple[Update, ...]


_TYPES = (Ping, Ack, PingReq, Nack, Join, Members)
_CODE = {cls: i for i, cls in enumerate(_TYPES)}


# ------------------------------------------------------------------ encode


def _id_out(v: str):
    return bytes.fromhex(v) if _HEX_ID.fullmatch(v) else v


def _update_out(u: Update, entry: bool = False) -> list:
    out = [u.state, _id_out(u.member), u.incarnation]
    if entry or u.state == ALIVE:
        out.append(u.addr)
    elif u.state == SUSPECT:
        out.append(_id_out(u.by))
    return out


def encode(msg) -> bytes:
    """Serialises a message. Counts and the total size are checked here
    (MessageError); the fields' own ranges are the caller's (SwimMember builds
    only valid ones, and tests/test_swim.py round-trips every layout)."""
    code = _CODE[type(msg)]
    if isinstance(msg, (Ping, Ack)):
        body = [code, msg.seq, [_update_out(u) for u in msg.updates]]
    elif isinstance(msg, PingReq):
        body = [code, msg.seq, _id_out(msg.target), [_update_out(u) for u in msg.updates]]
    elif isinstance(msg, Nack):
        body = [code, msg.seq]
    elif isinstance(msg, Join):
        body = [code, msg.incarnation, msg.addr]
    else:
        body = [code, msg.part, msg.parts, [_update_out(u, True) for u in msg.entries]]
    if len(getattr(msg, "updates", ())) > MAX_UPDATES or \
            len(getattr(msg, "entries", ())) > MAX_ENTRIES:
        raise MessageError("too many updates for one message")
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_SWIM_BYTES:
        raise MessageError(f"swim message of {len(data)} bytes exceeds {MAX_SWIM_BYTES}")
    return data


# ------------------------------------------------------------------ decode


def _int(v, top: int, what: str) -> int:
    if type(v) is not int or not 0 <= v <= top:
        raise MessageError(f"{what} must be an integer in 0..{top}")
    return v


def _id(v) -> str:
    if isinstance(v, bytes):
        if not 1 <= len(v) <= MAX_ID_CHARS // 2:
            raise MessageError("binary member id must be 1..32 bytes")
        return v.hex()
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_ID_CHARS or not v.isprintable():
        raise MessageError("member id must be 1..64 printable characters or 1..32 bytes")
    return v


def _addr(v) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_ADDR_CHARS or not v.isprintable():
        raise MessageError("address must be 1..256 printable characters")
    return v


def _update_in(v, entry: bool = False) -> Update:
    if not isinstance(v, list) or not 3 <= len(v) <= 4:
        raise MessageError("an update must be [state, member, incarnation, ...]")
    state = _int(v[0], LEFT, "state")
    member, inc = _id(v[1]), _int(v[2], U64, "incarnation")
    want = 4 if entry or state in (ALIVE, SUSPECT) else 3
    if len(v) != want:
        raise MessageError(f"a {STATE_NAMES[state]} {'entry' if entry else 'update'} "
                           f"has {want} fields")
    if entry or state == ALIVE:
        return Update(state, member, inc, addr=_addr(v[3]))
    if state == SUSPECT:
        return Update(state, member, inc, by=_id(v[3]))
    return Update(state, member, inc)


def _updates(v, top: int, entry: bool = False) -> tuple[Update, ...]:
    if not isinstance(v, list) or len(v) > top:
        raise MessageError(f"update list must be a list of at most {top}")
    out = tuple(_update_in(x, entry) for x in v)
    if entry and len({u.member for u in out}) != len(out):
        raise MessageError("members list has duplicates")
    return out


def decode(data: bytes):
    """Parses and validates one message; raises MessageError on anything off."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("message must be bytes")
    if len(data) > MAX_SWIM_BYTES:
        raise MessageError(f"swim message of {len(data)} bytes exceeds {MAX_SWIM_BYTES}")
    try:
        body = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_str_len=MAX_ADDR_CHARS,
            max_bin_len=MAX_ID_CHARS // 2, max_array_len=MAX_ENTRIES, max_map_len=0,
            max_ext_len=0)
    except Exception as e:  # msgpack raises many types for hostile input
        raise MessageError(f"not a valid msgpack message: {type(e).__name__}") from None
    if not isinstance(body, list) or not body or type(body[0]) is not int \
            or not 0 <= body[0] < len(_TYPES):
        raise MessageError("unknown swim message type")
    cls, n = _TYPES[body[0]], len(body)
    want = {Ping: 3, Ack: 3, PingReq: 4, Nack: 2, Join: 3, Members: 4}[cls]
    if n != want:
        raise MessageError(f"{cls.__name__} has {want - 1} fields, got {n - 1}")
    if cls in (Ping, Ack):
        return cls(_int(body[1], U32, "seq"), _updates(body[2], MAX_UPDATES))
    if cls is PingReq:
        return PingReq(_int(body[1], U32, "seq"), _id(body[2]), _updates(body[3], MAX_UPDATES))
    if cls is Nack:
        return Nack(_int(body[1], U32, "seq"))
    if cls is Join:
        return Join(_int(body[1], U64, "incarnation"), _addr(body[2]))
    parts = _int(body[2], 255, "parts")
    part = _int(body[1], 255, "part")
    if not part < parts:
        raise MessageError("part must be below parts")
    return Members(part, parts, _updates(body[3], MAX_ENTRIES, entry=True))
