#!/usr/bin/env python3
"""Run commands on hosts joined by an emulated WAN (thin CLI over peerlearn.netsim).

    # interactive: set up, print namespaces and addresses, tear down on Ctrl-C
    sudo python cmd/wan_emulator.py --hosts 2 --rtt-ms 100 --rate-mbit 1000

    # a server in host 1, a client in host 0; ends when the client does
    sudo python cmd/wan_emulator.py --rtt-ms 100 --rate-mbit 1000 \\
        --on 1 'iperf3 -s' -- iperf3 -c 10.87.0.2

    # the fidelity figures: RTT, one TCP connection vs 8, forwarder counters
    sudo python cmd/wan_emulator.py --rtt-ms 100 --rate-mbit 1000 --measure

Commands see PEERLEARN_WAN_HOST (their host index) and PEERLEARN_WAN_ADDRS (all
host addresses, comma-separated, by index) in their environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

# Run from a checkout without installing: the repository root holds `peerlearn`.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peerlearn.netsim import WanEmulator, measure, netns_available


def _rates(text: str) -> float | list[float]:
    parts = [float(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    main_cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, main_cmd = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--rate-mbit", type=_rates, default=1000.0,
                    help="access-link rate, 0 = unlimited; comma-separated for one per host")
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queue-bytes", type=int, default=None,
                    help="drop-tail queue per link (default: one BDP, at least 16 packets)")
    ap.add_argument("--mtu", type=int, default=65000)
    ap.add_argument("--on", nargs=2, action="append", default=[], metavar=("HOST", "CMD"),
                    help="start shell command CMD in host HOST in the background (repeatable)")
    ap.add_argument("--host", type=int, default=0, help="host that runs the command after --")
    ap.add_argument("--measure", action="store_true",
                    help="print RTT and 1-vs-8-connection TCP throughput from host 0 to 1")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each --measure transfer")
    return ap.parse_args(argv), main_cmd


def _env(wan: WanEmulator, host: int) -> dict[str, str]:
    return {**os.environ, "PEERLEARN_WAN_HOST": str(host),
            "PEERLEARN_WAN_ADDRS": ",".join(h.addr for h in wan.hosts)}


def _measure(wan: WanEmulator, seconds: float) -> dict:
    out = {"rtt": {k: v for k, v in measure.rtt(wan, 0, 1, count=20).items()
                   if k != "samples_ms"},
           "tcp_settings": wan.sysctls(1)}
    for conns in (1, 8):
        r = measure.tcp_throughput(wan, 0, 1, conns=conns, seconds=seconds)
        out[f"tcp_{conns}conn_mbit"] = round(r["mbit"], 1)
    return out


def main(argv: list[str]) -> int:
    args, main_cmd = _parse(argv)
    ok, why = netns_available()
    if not ok:
        print(f"wan_emulator: {why}", file=sys.stderr)
        return 2
    wan = WanEmulator(n_hosts=args.hosts, rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit,
                      loss=args.loss, seed=args.seed, queue_bytes=args.queue_bytes,
                      mtu=args.mtu)
    rc = 0
    with wan:
        for h in wan.hosts:
            print(f"host {h.index}: netns {h.netns}  addr {h.addr}  "
                  f"(ip netns exec {h.netns} ...)", file=sys.stderr, flush=True)
        for host, cmd in args.on:
            wan.popen(int(host), ["sh", "-c", cmd], env=_env(wan, int(host)))
        try:
            if args.measure:
                print(json.dumps(_measure(wan, args.seconds), indent=1))
            elif main_cmd:
                rc = wan.popen(args.host, main_cmd, env=_env(wan, args.host)).wait()
            else:
                print("running; Ctrl-C to tear down", file=sys.stderr, flush=True)
                signal.pause()
        except KeyboardInterrupt:
            rc = 130
        finally:
            try:
                stats = wan.stats()
                stats.pop("per_host")
                print("forwarder: " + json.dumps(stats), file=sys.stderr)
            except OSError as e:
                print(f"forwarder: no stats ({e})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
