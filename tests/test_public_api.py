"""`import peerlearn` gives what a user needs, and one root catches every failure."""

from __future__ import annotations

import subprocess
import sys

import peerlearn


def test_every_public_name_resolves_and_every_error_has_one_root():
    for name in peerlearn.__all__:
        value = getattr(peerlearn, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, peerlearn.PeerlearnError), name
    assert issubclass(peerlearn.CollectiveTimeout, TimeoutError)
    assert issubclass(peerlearn.CheckpointError, ValueError)


def test_the_library_raises_no_bare_runtime_errors_at_its_surface():
    """Internal failure types a caller could see also derive from the root."""
    from peerlearn.swarm.allreduce import AllReduceAborted
    from peerlearn.swarm.statesync import SyncFailed
    from peerlearn.wire.handshake import HandshakeError

    from peerlearn import _native

    for cls in (AllReduceAborted, SyncFailed, HandshakeError):
        assert issubclass(cls, peerlearn.PeerlearnError), cls
    # The native extension's roots join the tree, beside the builtin each
    # behaves like (a transfer's failure is still a ConnectionError).
    for cls, builtin in ((_native.StreamError, ConnectionError),
                         (_native.StreamTimeout, TimeoutError),
                         (_native.StreamInputError, ValueError),
                         (_native.CodecError, ValueError),
                         (_native.DecodeError, ValueError)):
        assert issubclass(cls, peerlearn.PeerlearnError) and issubclass(cls, builtin), cls


def test_import_is_cheap_until_a_name_is_used():
    out = subprocess.run([sys.executable, "-c",
                          "import sys, peerlearn; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
