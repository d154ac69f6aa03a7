"""Collectives and membership of a swarm of peers."""

from .allreduce import AllReduceAborted, CodecSpec, op_id, ring_allreduce, segment_bounds
from .ring import RingError, RingLinks, connect_ring

__all__ = [
    "AllReduceAborted",
    "CodecSpec",
    "RingError",
    "RingLinks",
    "connect_ring",
    "op_id",
    "ring_allreduce",
    "segment_bounds",
]
