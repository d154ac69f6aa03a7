"""Training algorithms over a swarm `Peer`: the DiLoCo family, the
data-parallel baseline and the gossip algorithms (NoLoCo, gossip averaging
with or without variance correction: no global collective). One module per
algorithm, each reading like its paper's pseudo-code; the shared/local split
of their state is stated at the top of each module."""

from peerlearn.algorithms.async_diloco import AsyncDiLoCo, EagerDiLoCo
from peerlearn.algorithms.ddp import DDP
from peerlearn.algorithms.diloco import DiLoCo
from peerlearn.algorithms.gossip import GossipAveraging
from peerlearn.algorithms.noloco import NoLoCo
from peerlearn.algorithms.outer import SGD, HeavyBall, Nesterov
from peerlearn.algorithms.streaming import StreamingDiLoCo, fragments_of

__all__ = ["AsyncDiLoCo", "DDP", "DiLoCo", "EagerDiLoCo", "GossipAveraging", "HeavyBall",
           "NoLoCo", "Nesterov", "SGD", "StreamingDiLoCo", "fragments_of"]
