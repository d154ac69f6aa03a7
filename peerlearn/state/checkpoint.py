"""Checkpoints of the shared state: a self-describing file, written atomically.

Layout (little-endian):
    8 bytes   magic b"PLCKPT01"
    4 bytes   header length H (at most 16 MiB)
    H bytes   msgpack {"step": int, "hash": bytes(8),
                       "tensors": [[name, dtype, shape, offset, nbytes], ...]}
    payload   tensor bytes at their offsets (relative to the payload start),
              in header order, each padded with zeros to a multiple of 64

Invariants of a file load() accepts: tensor names are unique and in sorted
order (as save() writes them); each entry starts where the previous one's
padding ends; nbytes = prod(shape) * itemsize; and the entries' padded sizes
add up to exactly the file's size. All of that is checked on the header
alone, before any tensor is allocated, so what load() allocates is bounded
by the file's size (the header is parsed field by field with msgpack limits,
never unpacked wholesale). Tensors are then read straight into place and the
state hash recomputed before anything is returned. Every failure is a
CheckpointError naming the file; nothing is unpickled and nothing is
half-loaded. Files are written 0600: they hold the model's weights.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch

from peerlearn.state.atomic import write_atomic
from peerlearn.state.shared import DTYPES, SharedState, TensorEntry
from peerlearn.tensorbytes import byte_view
from peerlearn.wire.codecs import hash_tensor

MAGIC = b"PLCKPT01"
MAX_HEADER = 16 << 20
ALIGN = 64
MAX_TENSORS = 1 << 16  # the control plane moves at most 4096; this bounds the header's entries
MAX_NAME_BYTES = 4096
MAX_DIMS = 32
MAX_NUMEL = 1 << 62  # product of a shape's non-zero dims; torch counts in int64
FILE_MODE = 0o600

# msgpack type bytes allowed for each field, checked before a value is
# unpacked so a hostile header cannot make the unpacker build big objects.
_UINT = frozenset(range(0x00, 0x80)) | {0xCC, 0xCD, 0xCE, 0xCF}
_STR = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}
_BIN = frozenset({0xC4, 0xC5, 0xC6})


class CheckpointError(PeerlearnError, ValueError):
    pass


class _Bad(Exception):
    """A header problem; load() re-raises it as a CheckpointError naming the file."""


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    pad: int


def _padding(nbytes: int) -> int:
    return -nbytes % ALIGN


def save(state: SharedState, path: str | Path) -> bytes:
    """Writes state to path atomically, mode 0600; returns the state hash recorded in it."""
    manifest = state.manifest()
    entries, offset = [], 0
    for e in manifest:
        entries.append([e.name, e.dtype, list(e.shape), offset, e.nbytes])
        offset += e.nbytes + _padding(e.nbytes)
    digest = state.state_hash(manifest)
    header = msgpack.packb({"step": state.step, "hash": digest, "tensors": entries},
                           use_bin_type=True)

    def chunks():
        yield MAGIC + struct.pack("<I", len(header)) + header
        for name, _, _, _, nbytes in entries:
            yield byte_view(state.tensors[name].view(-1).view(torch.uint8))
            yield b"\0" * _padding(nbytes)

    write_atomic(path, chunks(), mode=FILE_MODE)
    return digest


class _Fields:
    """Reads one msgpack header field at a time, checking its type byte first."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.u = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(raw), 1),
                                  max_str_len=MAX_NAME_BYTES, max_bin_len=64,
                                  max_array_len=MAX_TENSORS, max_map_len=8, max_ext_len=0)
        self.u.feed(raw)

    def _scalar(self, kinds: frozenset[int], what: str):
        pos = self.u.tell()
        if pos >= len(self.raw) or self.raw[pos] not in kinds:
            raise _Bad(f"{what} is missing or has the wrong type")
        return self.u.unpack()

    def uint(self, what: str) -> int:
        return self._scalar(_UINT, what)

    def text(self, what: str) -> str:
        return self._scalar(_STR, what)

    def bin(self, what: str) -> bytes:
        return self._scalar(_BIN, what)

    def array(self, what: str, n: int | None = None, most: int = MAX_TENSORS) -> int:
        try:
            length = self.u.read_array_header()
        except (ValueError, msgpack.OutOfData) as e:
            raise _Bad(f"{what} is not a list ({type(e).__name__})") from None
        if (n is not None and length != n) or length > most:
            raise _Bad(f"{what} has {length} items")
        return length


def _parse_entries(f: _Fields, payload_bytes: int) -> list[_Entry]:
    entries: list[_Entry] = []
    offset = 0
    for i in range(f.array("the tensor list")):
        f.array(f"tensor entry {i}", n=5)
        name = f.text(f"tensor {i}'s name")
        if not name or (entries and name <= entries[-1].name):
            raise _Bad(f"tensor {i}'s name {name[:64]!r} is empty, repeated or out of order")
        dtype = f.text(f"{name!r}'s dtype")
        if dtype not in DTYPES:
            raise _Bad(f"{name!r} has an unknown dtype {dtype[:32]!r}")
        dims = f.array(f"{name!r}'s shape", most=MAX_DIMS)
        shape = tuple(f.uint(f"{name!r}'s shape") for _ in range(dims))
        if any(d >= 1 << 63 for d in shape) or math.prod(d for d in shape if d) > MAX_NUMEL:
            raise _Bad(f"{name!r}'s shape {list(shape)} overflows")
        off, nbytes = f.uint(f"{name!r}'s offset"), f.uint(f"{name!r}'s size")
        if off != offset:
            raise _Bad(f"{name!r} starts at {off}, not where the previous tensor ends ({offset})")
        if nbytes != math.prod(shape) * DTYPES[dtype].itemsize:
            raise _Bad(f"{name!r} declares {nbytes} bytes for shape {list(shape)} of {dtype}")
        offset += nbytes + _padding(nbytes)
        if offset > payload_bytes:  # stop at the first entry the file cannot hold
            raise _Bad(f"the tensors up to {name!r} need {offset} bytes, "
                       f"the file holds {payload_bytes}")
        entries.append(_Entry(name, dtype, shape, nbytes, _padding(nbytes)))
    if offset != payload_bytes:
        raise _Bad(f"the tensors need {offset} bytes but the file holds {payload_bytes}")
    return entries


def _parse_header(raw: bytes, payload_bytes: int) -> tuple[int, bytes, list[_Entry]]:
    f = _Fields(raw)
    try:
        n = f.u.read_map_header()
    except (ValueError, msgpack.OutOfData):
        raise _Bad("the header is not a map") from None
    fields: dict = {}
    for _ in range(n):
        key = f.text("a header key")
        if key in fields or key not in ("step", "hash", "tensors"):
            raise _Bad(f"unexpected or repeated header key {key[:32]!r}")
        if key == "step":
            fields[key] = f.uint("the step")
        elif key == "hash":
            fields[key] = f.bin("the state hash")
        else:
            fields[key] = _parse_entries(f, payload_bytes)
    if set(fields) != {"step", "hash", "tensors"}:
        raise _Bad(f"the header lacks {sorted({'step', 'hash', 'tensors'} - set(fields))}")
    if fields["step"] >= 1 << 63 or len(fields["hash"]) != 8:
        raise _Bad("the step or the state hash is out of range")
    if f.u.tell() != len(raw):
        raise _Bad(f"{len(raw) - f.u.tell()} stray bytes after the header")
    return fields["step"], fields["hash"], fields["tensors"]


def _read_exact(f, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise _Bad("the file is shorter than its header says (changed while reading?)")
        got += n


def _read_tensors(f, entries: list[_Entry], state: SharedState) -> list[TensorEntry]:
    manifest = []
    for e in entries:
        # Bounded: the header check proved these sizes add up to the file's size.
        t = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        if e.nbytes:
            _read_exact(f, byte_view(t.view(-1).view(torch.uint8)))
        pad = bytearray(e.pad)
        _read_exact(f, memoryview(pad))
        if any(pad):
            raise _Bad(f"non-zero padding after {e.name!r}")
        state.tensors[e.name] = t
        manifest.append(TensorEntry(e.name, e.dtype, e.shape, e.nbytes, hash_tensor(t)))
    if f.read(1):
        raise _Bad("the file is longer than its header says (changed while reading?)")
    return manifest


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path, mode: int) -> CheckpointError | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return CheckpointError(f"{path}: is {kind}, not a checkpoint file (refusing to read it)")


def _open_regular(path: str | Path):
    """path opened for reading, if it is a regular file (a symlink to one
    included); else CheckpointError. A FIFO is never opened in blocking mode
    (that waits for a writer for ever), and what is opened is checked again
    (the path may have been swapped between the two looks)."""
    bad = _not_regular(path, os.stat(path).st_mode)
    if bad is not None:
        raise bad
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        bad = _not_regular(path, os.fstat(fd).st_mode)
        if bad is not None:
            raise bad
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def load(path: str | Path) -> SharedState:
    """The state saved at path. Raises CheckpointError for anything that is
    not a regular file (a directory, a FIFO, a device: without opening a FIFO
    in blocking mode) and for any file save() did not write (bad magic,
    header, sizes, padding or hash); OSError if the file cannot be read at all."""
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise CheckpointError(f"{path}: not a peerlearn checkpoint (bad magic or version)")
        (hlen,) = struct.unpack_from("<I", head, 8)
        if hlen > MAX_HEADER or 12 + hlen > size:
            raise CheckpointError(f"{path}: header length {hlen} is out of range")
        try:
            raw = f.read(hlen)
            if len(raw) != hlen:
                raise _Bad("the file ends inside its header")
            step, digest, entries = _parse_header(raw, size - 12 - hlen)
            state = SharedState(step)
            manifest = _read_tensors(f, entries, state)
        except _Bad as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (msgpack.UnpackException, ValueError) as e:  # a limit or a malformed value
            raise CheckpointError(f"{path}: unreadable header ({type(e).__name__})") from None
    if state.state_hash(manifest) != digest:
        raise CheckpointError(f"{path}: state hash does not match its contents")
    return state
