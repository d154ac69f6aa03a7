"""Every message the control plane carries: the round protocol's (control.py,
msgpack maps) and SWIM's (swim.py, msgpack arrays), told apart by their
first byte, so neither codec wraps the other and a SWIM probe stays a few
bytes. Both decoders validate sizes, types and ranges and raise
MessageError, which the plane counts and drops; nothing is unpickled.
"""

from __future__ import annotations

from peerlearn.wire import control, swim
from peerlearn.wire.control import MessageError

__all__ = ["SWIM_MESSAGES", "encode", "decode", "MessageError"]

SWIM_MESSAGES = (swim.Ping, swim.Ack, swim.PingReq, swim.Nack, swim.Join, swim.Members)
# msgpack's first byte of an array: fixarray (up to 15 items), array 16, array 32.
_ARRAY_FIRST = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


def encode(msg) -> bytes:
    """Serialises a control or SWIM message; the result passes decode()."""
    if isinstance(msg, SWIM_MESSAGES):
        return swim.encode(msg)
    return control.encode(msg)


def decode(data: bytes):
    """One control message (a map) or SWIM message (an array); raises
    MessageError on anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("message must be bytes")
    if len(data) and data[0] in _ARRAY_FIRST:
        return swim.decode(data)
    return control.decode(data)
