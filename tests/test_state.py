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
