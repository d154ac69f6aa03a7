"""Identity, shared-state hashing and checkpoints."""

import os
import stat

import pytest
import torch

from peerlearn.state import checkpoint
from peerlearn.state.atomic import write_atomic
from peerlearn.state.identity import Identity
from peerlearn.state.shared import SharedState


def make_state(step=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = SharedState(step)
    s.register("w", torch.randn(100, 7, generator=g))
    s.register("m", torch.randn(33, generator=g).to(torch.bfloat16))
    s.register("count", torch.tensor([5], dtype=torch.int64))
    s.register("empty", torch.empty(0, 4))
    return s


def test_identity_persists_and_signs(tmp_path):
    a = Identity.load_or_create(tmp_path)
    b = Identity.load_or_create(tmp_path)
    assert a.peer_id == b.peer_id and len(a.peer_id) == 32
    assert stat.S_IMODE(os.stat(tmp_path / "identity.key").st_mode) == 0o600
    sig = a.sign(b"hello")
    assert Identity.verify(a.public_raw, sig, b"hello")
    assert not Identity.verify(a.public_raw, sig, b"hellO")
    assert not Identity.verify(b"\x00" * 5, sig, b"hello")
    assert Identity.load_or_create(tmp_path / "other").peer_id != a.peer_id


def test_corrupt_identity_is_an_error_not_a_new_identity(tmp_path):
    (tmp_path / "identity.key").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        Identity.load_or_create(tmp_path)


def test_state_hash_sees_every_bit_and_the_step():
    base = make_state().state_hash()
    assert make_state().state_hash() == base
    assert make_state(step=4).state_hash() != base
    s = make_state()
    s.tensors["w"].view(torch.int32)[17, 3] ^= 1  # one bit
    assert s.state_hash() != base
    s = make_state()
    s.tensors["w"] = s.tensors["w"].reshape(7, 100)  # same bytes, other shape
    assert s.state_hash() != base


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    s = make_state()
    digest = checkpoint.save(s, tmp_path / "ck")
    back = checkpoint.load(tmp_path / "ck")
    assert back.step == s.step and back.state_hash() == digest == s.state_hash()
    for name, t in s.tensors.items():
        assert back.tensors[name].dtype == t.dtype and back.tensors[name].shape == t.shape
        assert torch.equal(back.tensors[name].view(-1).view(torch.uint8),
                           t.view(-1).view(torch.uint8))


def test_corrupt_checkpoints_are_refused(tmp_path):
    p = tmp_path / "ck"
    checkpoint.save(make_state(), p)
    good = p.read_bytes()
    cases = {
        "magic": b"X" + good[1:],
        "truncated": good[: len(good) // 2],
        "header_len": good[:8] + b"\xff\xff\xff\x7f" + good[12:],
        "payload_bit": good[:-100] + bytes([good[-100] ^ 1]) + good[-99:],
        "empty": b"",
    }
    for data in cases.values():
        p.write_bytes(data)
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.load(p)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    p = tmp_path / "f"
    write_atomic(p, [b"old"])

    def boom():
        yield b"new-partial"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(p, boom())
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["f"]  # no temp file left


# ---------------------------------------------------------------- hostile checkpoints


def craft(header: dict, payload: bytes = b"", magic: bytes = checkpoint.MAGIC) -> bytes:
    """A checkpoint file with any header and payload, as an attacker would write it."""
    import msgpack
    import struct

    raw = msgpack.packb(header, use_bin_type=True)
    return magic + struct.pack("<I", len(raw)) + raw + payload


def test_checkpoint_is_written_0600(tmp_path):
    p = tmp_path / "state.ckpt"
    checkpoint.save(make_state(), p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600  # it holds the weights
    assert [f.name for f in tmp_path.iterdir()] == ["state.ckpt"]


def test_checkpoint_save_load_save_is_byte_exact(tmp_path):
    s = make_state()
    checkpoint.save(s, tmp_path / "a")
    checkpoint.save(checkpoint.load(tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_overlapping_entries_allocate_nothing(tmp_path):
    """The +1 GB attack, scaled down: many entries naming the same bytes. The
    loader must refuse on the header alone, allocating about nothing."""
    import tracemalloc

    n, each = 256, 64 << 10  # 16 MiB declared, 64 KiB present
    entries = [[f"t{i:04}", "uint8", [each], 0, each] for i in range(n)]
    p = tmp_path / "ck"
    p.write_bytes(craft({"step": 1, "hash": b"\0" * 8, "tensors": entries}, b"\0" * each))
    tracemalloc.start()
    try:
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # today's loader copied each entry first: 16 MiB
    assert "t0001" in str(e.value)  # the first entry that overlaps is named


def test_declared_sizes_must_add_up_to_the_file_size(tmp_path):
    import tracemalloc

    p = tmp_path / "ck"
    # 2^40 floats declared in a file of a few dozen bytes: refused on the header.
    p.write_bytes(craft({"step": 0, "hash": b"\0" * 8,
                         "tensors": [["w", "float32", [1 << 40], 0, 4 << 40]]}))
    tracemalloc.start()
    try:
        with pytest.raises(checkpoint.CheckpointError, match="need"):
            checkpoint.load(p)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [[1 << 62, 1 << 62, 0], [(1 << 64) - 1, 0], [0] * 33])
def test_shape_overflow_is_a_checkpoint_error(tmp_path, shape):
    p = tmp_path / "ck"
    p.write_bytes(craft({"step": 0, "hash": b"\0" * 8,
                         "tensors": [["w", "float32", shape, 0, 0]]}))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(p)


def _good_header(tmp_path):
    import msgpack

    checkpoint.save(make_state(), tmp_path / "good")
    data = (tmp_path / "good").read_bytes()
    hlen = int.from_bytes(data[8:12], "little")
    return msgpack.unpackb(data[12:12 + hlen]), data[12 + hlen:]


def _mutations(header, payload):
    def with_entry(i, field, value):
        h = {**header, "tensors": [list(e) for e in header["tensors"]]}
        h["tensors"][i][field] = value
        return craft(h, payload)

    first = header["tensors"][0]  # "count": int64, 8 bytes, then 56 of padding
    return {
        "bad magic": craft(header, payload, magic=b"XLCKPT01"),
        "other version": craft(header, payload, magic=b"PLCKPT02"),
        "truncated in payload": craft(header, payload[:-1]),
        "truncated in header": craft(header, payload)[:20],
        "oversized": craft(header, payload + b"\0" * 64),
        "appended byte": craft(header, payload + b"\0"),
        "bad dtype": with_entry(0, 1, "complex128"),
        "dtype not a string": with_entry(0, 1, 7),
        "nbytes disagrees with shape": with_entry(0, 2, [2]),
        "negative dim": with_entry(0, 2, [-1]),
        "float dim": with_entry(0, 2, [1.0]),
        "offset gap": with_entry(1, 3, first[3] + 128),
        "duplicate name": with_entry(1, 0, first[0]),
        "entry too short": craft({**header, "tensors": [first[:4]]}, payload),
        "hash mismatch": craft({**header, "hash": b"\1" * 8}, payload),
        "hash wrong size": craft({**header, "hash": b"\0" * 7}, payload),
        "negative step": craft({**header, "step": -1}, payload),
        "missing key": craft({"step": 3, "hash": header["hash"]}, payload),
        "extra key": craft({**header, "pickle": b"x"}, payload),
        "payload bit flipped": craft(header, payload[:-100] + bytes([payload[-100] ^ 1])
                                     + payload[-99:]),
        "non-zero padding": craft(header, payload[:8] + b"\1" + payload[9:]),
        "header not a map": craft([1, 2, 3], payload),  # type: ignore[arg-type]
    }


def test_every_corruption_is_a_checkpoint_error(tmp_path):
    header, payload = _good_header(tmp_path)
    p = tmp_path / "ck"
    p.write_bytes(craft(header, payload))
    checkpoint.load(p)  # the unmutated file is fine: each case below is one change
    failures = []
    for case, data in _mutations(header, payload).items():
        p.write_bytes(data)
        try:
            checkpoint.load(p)
            failures.append(f"{case}: loaded")
        except checkpoint.CheckpointError as e:
            assert str(p) in str(e)
        except Exception as e:  # noqa: BLE001 - any other exception is the bug under test
            failures.append(f"{case}: {type(e).__name__}: {e}")
    assert not failures, failures
