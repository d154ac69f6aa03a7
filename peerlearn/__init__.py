"""peerlearn: train one model together over slow, unreliable internet links."""

__version__ = "0.1.0"
