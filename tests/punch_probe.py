"""One end of tests/test_nat_punch.py, run inside an emulated host's namespace.

    punch_probe.py relay PORT           a relay on every address; prints "ready",
                                        then at EOF on stdin its counters (JSON)
    punch_probe.py peer HOST:PORT ME PEER [N_CONNS]
                                        a link with PEER: punched through the
                                        relay's rendezvous, else spliced by it;
                                        both directions carry 1 MB; prints JSON
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

from peerlearn.transport import punch, relay

KEY = b"punch-probe-key-0123456789abcdef"


def run_relay(port: int) -> None:
    r = relay.Relay("0.0.0.0", port, KEY)
    print("ready", flush=True)
    sys.stdin.read()
    print(json.dumps({"pairs": r.pairs, "rendezvous": r.rendezvous,
                      "relayed_bytes": r.relayed_bytes, "refused": r.refused}), flush=True)
    r.close()


def run_peer(address: str, me: str, peer: str, n_conns: int) -> None:
    host, port = address.rsplit(":", 1)
    started = time.monotonic()
    failed = None
    try:
        link, punched = punch.connect_punched((host, int(port)), KEY, me, peer, 0, n_conns, 15.0)
    except punch.PunchFailed as e:
        failed = str(e)
        link, punched = relay.connect_relayed((host, int(port)), KEY, me, peer, 0, n_conns,
                                              15.0), False
    took = time.monotonic() - started
    x = torch.full((250_000,), float(me < peer))
    y = torch.empty_like(x)
    t = threading.Thread(target=lambda: link.recv_into(y, 1, timeout=30))
    t.start()
    link.send(x, 1, timeout=30)
    t.join()
    print(json.dumps({"punched": punched, "seconds": took, "failed": failed,
                      "remote": [list(s.getpeername()[:2]) for s in link._socks],
                      "ok": bool((y == float(peer < me)).all())}), flush=True)
    link.close()


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        run_relay(int(sys.argv[2]))
    else:
        run_peer(sys.argv[2], sys.argv[3], sys.argv[4],
                 int(sys.argv[5]) if len(sys.argv) > 5 else 4)
