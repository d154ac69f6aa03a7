"""Asking one peer for the swarm as it sees it (a StatusRequest over the
control plane): `peerlearn status`, and the local swarm's table at its end."""

from __future__ import annotations

import asyncio
from pathlib import Path

from peerlearn.cli.addresses import local_address_towards, split_addr


def query_status(target: str, secret: bytes | None, timeout: float = 5.0, *,
                 data_dir: str | None = None, allowlist: list[bytes] | None = None) -> list[dict]:
    """The target's status rows. A secret swarm answers anyone holding the
    secret (a throwaway identity asks); an allowlist swarm only an identity on
    its allowlist: pass the data_dir holding one (read, never created)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peerlearn.state.identity import KEY_FILE, Identity
    from peerlearn.transport.control import ControlPlane
    from peerlearn.wire import control as m

    if secret:
        identity = Identity(Ed25519PrivateKey.generate())
    elif data_dir is None or not (Path(data_dir) / KEY_FILE).exists():
        raise SystemExit("an allowlist swarm answers only a listed identity: "
                         "give --data-dir of a peer on the allowlist")
    else:
        identity = Identity.load_or_create(data_dir)

    from peerlearn.transport.control import split_target

    peer, target = split_target(target)
    if not secret and peer is None:
        raise SystemExit("an allowlist swarm is queried as PEER_ID@HOST:PORT")
    host, port = split_addr(target)
    # The answer comes to reply_to: it must be an address the target can reach.
    here = local_address_towards(host, port)

    async def ask() -> list[dict]:
        plane = ControlPlane(identity, here, 0, secret=secret, allowlist=allowlist)
        try:
            plane.send(target, m.StatusRequest(f"{here}:{plane.port}"), to=peer)
            while True:
                _, msg = await asyncio.wait_for(plane.recv(), timeout)
                if isinstance(msg, m.StatusReply):
                    break
        finally:
            plane.close()
        keys = ("id", "control", "data", "role", "step", "state_hash", "alive")
        return [dict(zip(keys, (*row[:5], row[5].hex(), row[6]))) for row in msg.peers]

    try:
        return asyncio.run(ask())
    except TimeoutError:
        raise SystemExit(f"no status answer from {target} within {timeout} s") from None
