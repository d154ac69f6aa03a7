"""Control-plane messages: exact round trips and hostile input rejected cleanly."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.wire import control as m

P = m.PeerInfo("abc123", "10.0.0.1:5000", "10.0.0.1:5001")
H = b"\x01" * 8

SAMPLES = [
    m.Heartbeat(3, 2, 4, 7, H, True, P),
    m.Join(P),
    m.Welcome(3, 7, (P, m.PeerInfo("def", "h:1", "h:2"))),
    m.Leave(),
    m.Ready(7, H, P),
    m.Propose(4, 2, 7, H, ("abc123", "def")),
    m.Ack(4, 2),
    m.Commit(4, 2, 7, ("abc123",), (P,)),
    m.Done(4, True, H),
    m.Done(4, False, H, False, "abc123"),
    m.Apply(4),
    m.Abort(4),
    m.StateRequest(7, H, 1, 3, 2**40 - 1),
    m.StateOffer(7, H, 1, 3, 12, (("w", "float32", (3, 4), 2**64 - 1), ("b", "bfloat16", (), 0))),
    m.StateRefused(7, H),
    m.DataKey(b"k" * 32),
    m.StatusRequest("127.0.0.1:4000"),
    m.StatusReply((("abc", "h:1", "h:2", "coordinator", 5, H, True),)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip_is_exact(msg):
    assert m.decode(m.encode(msg)) == msg


def raw(**body):
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        raw(t="nope"),
        raw(t=5),
        msgpack.packb([1, 2, 3]),
        raw(t="ack", round_id=1),  # missing field
        raw(t="ack", round_id=1, term=2, extra=3),  # unknown field
        raw(t="ack", round_id=-1, term=2),
        b"\x83\xa1t\xa3ack\xa8round_id\xd3\xff\xff\xff\xff\xff\xff\xff\xff\xa4term\x02",
        raw(t="ack", round_id=1.5, term=2),
        raw(t="ack", round_id=True, term=2),  # bool is not an int here
        raw(t="done", round_id=1, ok=1, result_hash=H),
        raw(t="done", round_id=1, ok=True, result_hash=b"short"),
        raw(t="done", round_id=1, ok=False, result_hash=H, poisoned=False, blame="x" * 65),
        raw(t="done", round_id=1, ok=False, result_hash=H, poisoned=False, blame=7),
        raw(t="join", peer=["", "a:1", "a:2"]),
        raw(t="join", peer=["x" * 65, "a:1", "a:2"]),
        raw(t="join", peer=["id\n", "a:1", "a:2"]),
        raw(t="join", peer=["id", "a:1"]),
        raw(t="propose", round_id=1, term=1, step=1, state_hash=H, participants=["a", "a"]),
        raw(t="welcome", epoch=1, step=1, members=[P.to_wire(), P.to_wire()]),
        raw(t="apply", round_id=1, **{"1": 2}),
        b"\x92" * 100_000,  # deep nesting
        raw(t="apply", round_id=1) + b"trailing",
        b"\x00" * (m.MAX_MESSAGE_BYTES + 1),
        msgpack.packb({1: 2}),  # non-string key
        msgpack.packb({"t": "apply", "round_id": msgpack.ExtType(1, b"x")}),
    ],
)
def test_hostile_messages_raise_message_error(data):
    with pytest.raises(m.MessageError):
        m.decode(data)


def test_oversized_member_list_is_refused_on_encode_and_decode():
    big = tuple(m.PeerInfo(f"p{i}", "h" * 200, "h" * 200) for i in range(m.MAX_MEMBERS))
    with pytest.raises(m.MessageError):
        m.encode(m.Welcome(1, 1, big))
    with pytest.raises(m.MessageError):
        m.decode(raw(t="commit", round_id=1, term=1, step=1,
                     participants=[f"p{i}" for i in range(m.MAX_MEMBERS + 1)], members=[]))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data):
    try:
        m.decode(data)
    except m.MessageError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_messages_decode_or_raise_message_error(msg, data):
    b = bytearray(m.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(b)))
    try:
        out = m.decode(bytes(b[:cut]))
    except m.MessageError:
        return
    assert type(out) in m.MESSAGES.values()
