"""peerlearn: train one model together over slow, unreliable internet links.

Everything a user needs is here, with no reaching into submodules::

    import peerlearn

    with peerlearn.Peer(peerlearn.PeerConfig(data_dir, secret, join="host:7400"),
                        initial_state=make_state) as peer:
        ...

Names are imported on first use (PEP 562), so `import peerlearn` stays cheap
for the command line.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it ("module:attr" where the name differs)
_EXPORTS = {
    "Peer": "peerlearn.swarm.api",
    "PendingAllReduce": "peerlearn.swarm.api",
    "PeerConfig": "peerlearn.swarm.config",
    "Timeouts": "peerlearn.swarm.actions",
    "SharedState": "peerlearn.state.shared",
    "PeerlearnError": "peerlearn.errors",
    "PeerError": "peerlearn.swarm.errors",
    "PeerClosed": "peerlearn.swarm.errors",
    "PeerStartError": "peerlearn.swarm.errors",
    "JoinTimeout": "peerlearn.swarm.errors",
    "StateReplaced": "peerlearn.swarm.errors",
    "CollectiveTimeout": "peerlearn.swarm.errors",
    "ContributionLost": "peerlearn.swarm.errors",
    "Withdrawn": "peerlearn.swarm.errors",
    "GossipFailed": "peerlearn.swarm.errors",
    "CheckpointError": "peerlearn.state.checkpoint",
    "MessageError": "peerlearn.wire.control",
    "WeakSecretError": "peerlearn.transport.swarm_secret",
    "Codec": "peerlearn.wire.codecs",
    "DiLoCo": "peerlearn.algorithms",
    "StreamingDiLoCo": "peerlearn.algorithms",
    "AsyncDiLoCo": "peerlearn.algorithms",
    "EagerDiLoCo": "peerlearn.algorithms",
    "DDP": "peerlearn.algorithms",
    "NoLoCo": "peerlearn.algorithms",
    "GossipAveraging": "peerlearn.algorithms",
    "Nesterov": "peerlearn.algorithms",
    "HeavyBall": "peerlearn.algorithms",
    "SGD": "peerlearn.algorithms",
    "Task": "peerlearn.tasks",
    "TaskError": "peerlearn.tasks",
    "load_task": "peerlearn.tasks:load",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'peerlearn' has no attribute {name!r}")
    module, _, attr = where.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
