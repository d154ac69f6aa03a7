"""Wide-area-network emulator: hosts in network namespaces joined by a long fat pipe.

    from peerlearn.netsim import WanEmulator, netns_available
    with WanEmulator(n_hosts=2, rtt_ms=100, rate_mbit=1000, loss=0.0, seed=0) as wan:
        proc = wan.popen(1, ["python", "server.py", "--bind", wan.hosts[1].addr])
        wan.popen(0, ["python", "client.py", wan.hosts[1].addr]).wait()
        print(wan.stats())

Linux only, needs root; ``netns_available()`` says whether and why not.
``nat_sites=`` puts hosts behind emulated NAT gateways (``nat.py``).
``peerlearn.netsim.measure`` has RTT / throughput / loss probes built on it.
"""

from .emulator import Host, Site, WanEmulator
from .nat import NatOptions
from .netns import netns_available

__all__ = ["Host", "NatOptions", "Site", "WanEmulator", "netns_available"]
