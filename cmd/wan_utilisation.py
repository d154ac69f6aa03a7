"""Compute utilisation over an emulated wide-area path (docs/benchmarks.md).

    python cmd/wan_utilisation.py --wan 100,100 --steps 200 --H 20 --tau 4

Three `peerlearn demo --wan` runs of 4 peers, each on its own emulated host
(network namespaces, needs root), on the built-in task, in one invocation so
they share this machine's conditions: no communication (`--algo local`),
plain DiLoCo (fp32), Streaming DiLoCo (P fragments, E3M0 on the wire, the
reduction overlapping tau inner steps). Utilisation is each peer's time in
forward, backward and inner step over its wall time; the figure of merit is
Streaming's utilisation over the no-communication run's. Plain DiLoCo's time
blocked per outer step is reported too: the Done-when asks for a model whose
fp32 all-reduce takes at least a fifth of an H-step compute phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def demo(algo: str, args, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "peerlearn.cli.app", "demo", "--algo", algo,
            "--peers", str(args.peers), "--steps", str(args.steps), "--H", str(args.H),
            "--wan", args.wan, "--progress-every", "0", "--json", *extra]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{algo}: exit {out.returncode}\n{out.stderr[-3000:]}")
    s = json.loads(out.stdout)
    reports = s.pop("peers_report")
    util = [u for u in s["compute_utilisation_per_peer"] if u is not None]
    row = {"algo": algo, "argv": argv[3:], "val_loss": s["val_loss"], "wall_s": s["wall_s"],
           "utilisation_mean": statistics.mean(util), "utilisation_per_peer": util,
           "bytes_sent_per_peer": s["bytes_sent_per_peer"],
           "algorithm": [r.get("algorithm", {}) for r in reports]}
    outer = [a.get("outer_steps", 0) for a in row["algorithm"]]
    if algo != "local" and min(outer) > 0:
        # Time each peer spent not computing, per sync: what the syncs cost it.
        blocked = [(r["wall_s"] - r["compute_s"]) / a["outer_steps"]
                   for r, a in zip(reports, row["algorithm"])]
        row["blocked_s_per_sync"] = statistics.mean(blocked)
        row["compute_s_per_phase"] = statistics.mean(
            r["compute_s"] / a["outer_steps"] for r, a in zip(reports, row["algorithm"]))
    print(json.dumps({k: v for k, v in row.items() if k != "argv"}), file=sys.stderr)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wan", default="100,100", help="RTT_MS,MBIT")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--H", type=int, default=20)
    p.add_argument("--P", type=int, default=4)
    p.add_argument("--tau", type=int, default=4)
    args = p.parse_args()
    local = demo("local", args, [])
    diloco = demo("diloco", args, [])
    streaming = demo("streaming", args, ["--P", str(args.P), "--tau", str(args.tau),
                                         "--codec", "e3m0"])
    base = local["utilisation_mean"]
    print(json.dumps({
        "path": f"emulated WAN {args.wan} (RTT ms, Mbit/s per host)",
        "peers": args.peers, "steps": args.steps, "H": args.H, "P": args.P, "tau": args.tau,
        "utilisation": {"local": base, "diloco": diloco["utilisation_mean"],
                        "streaming": streaming["utilisation_mean"]},
        "of_no_communication": {"diloco": diloco["utilisation_mean"] / base,
                                "streaming": streaming["utilisation_mean"] / base},
        "diloco_fp32_sync_over_compute_phase":
            diloco.get("blocked_s_per_sync", 0) / diloco.get("compute_s_per_phase", 1),
        "runs": [local, diloco, streaming],
    }, indent=2))


if __name__ == "__main__":
    main()
