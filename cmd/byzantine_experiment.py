"""Aggregation rules under attack (issue 16): DiLoCo (the "diloco-H50-warm"
config of cmd/train_experiments.py: H 50, outer lr 1.0, from the warm start)
with 5 loopback peers of which one attacks (cmd/byzantine_peer.py), or 7 with
two for "a little is enough", under the plain mean and a robust rule.

    python cmd/byzantine_experiment.py run --steps 250                      # mean
    python cmd/byzantine_experiment.py run --steps 250 --aggregate centered-clip
    python cmd/byzantine_experiment.py run --steps 200 --only clean         # timing probe
    python cmd/byzantine_experiment.py report --steps 250                   # markdown table

Each run is one peerlearn.cli.train.run_demo whose attacker indexes run the
attacker wrapper instead of `peerlearn run`. Rows go to
docs/experiments/byzantine.jsonl, one per (config, aggregate, seed, steps);
a row already there is skipped, so an interrupted sweep resumes. The peers'
log lines go to --log-dir, one file per run. Loss and bytes are the honest
peers' (the summary's val_loss would include the attacker's copy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import train_experiments as te  # noqa: E402

RESULTS = te.OUT / "byzantine.jsonl"
ATTACKER = HERE / "byzantine_peer.py"
BASE = "diloco-H50-warm"
ALIE = ["--attack", "alie", "--n", "7", "--f", "2"]
# name -> (peers, {attacker index: byzantine_peer.py flags}). Index 0 founds
# the swarm: never an attacker.
CONFIGS: dict[str, tuple[int, dict[int, list[str]]]] = {
    "clean": (5, {}),
    "sign-flip": (5, {4: ["--attack", "sign-flip", "--scale", "10"]}),
    "scale": (5, {4: ["--attack", "scale", "--scale", "1e30"]}),
    "nan": (5, {4: ["--attack", "nan"]}),
    "noise": (5, {4: ["--attack", "noise", "--scale", "10"]}),
    "alie": (7, {5: ALIE, 6: ALIE}),
    # ALIE's own honest baseline (7 peers, other shards): not in the default sweep.
    "clean7": (7, {}),
}
DEFAULT = ["clean", "sign-flip", "scale", "nan", "noise", "alie"]
# peerlearn.swarm's warnings: a mean refused (the round fails), a robust
# round's non-finite row left out (the round applies without it).
POISONED = re.compile(r"round (\d+): the mean .*; failing the round")
LEFT_OUT = re.compile(r"round (\d+): .* contributed non-finite values; left out")


def base_flags(H: int | None) -> tuple[str, list[str]]:
    """The algorithm and run flags of the BASE config, H replaced if given."""
    argv = list(te.CONFIGS[BASE][1])
    algo = argv[argv.index("--algo") + 1]
    del argv[argv.index("--algo"):argv.index("--algo") + 2]
    if H is not None:
        argv[argv.index("--H") + 1] = str(H)
    return algo, argv


def done_keys() -> set[tuple]:
    if not RESULTS.exists():
        return set()
    return {(r["config"], r["aggregate"], r["seed"], r["steps"]) for r in read_rows()}


def read_rows() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


class LoggedBoard:
    """run_demo's output board, writing the peers' lines to one file and
    counting the ones this experiment reads (refused rounds, errors)."""

    def __init__(self, path: Path):
        self.path, self.poisoned, self.left_out, self.errors = path, set(), set(), {}

    def install(self):
        from peerlearn.cli import output

        log, outer = self.path.open("w"), self

        class Board(output.Board):
            def __init__(self, mode, names, fd=None):
                super().__init__("plain", names, log.fileno())

            def line(self, name, text):
                refused = POISONED.search(text)
                if refused:  # not every participant sees (and logs) a refused mean
                    outer.poisoned.add(int(refused.group(1)))
                left = LEFT_OUT.search(text)
                if left:
                    outer.left_out.add(int(left.group(1)))
                if text.startswith(("ERROR", "CRITICAL", "Traceback")):
                    outer.errors.setdefault(name, []).append(text[:300])
                super().line(name, text)

        original, output.Board = output.Board, Board
        return lambda: (setattr(output, "Board", original), log.close())



def demo_logged(log: Path, timeout: float, algo: str, peers: int, steps: int,
                extra: list[str], program) -> tuple[dict, threading.Event, LoggedBoard]:
    """run_demo with the peers' lines going to `log`; a run that hangs past
    `timeout` is interrupted (SIGINT: run_demo stops its peers and still
    collects their reports). Returns the summary, whether it timed out, and
    the board that read the peers' lines."""
    from peerlearn.cli.train import run_demo

    board = LoggedBoard(log)
    restore = board.install()
    fired = threading.Event()

    def interrupt() -> None:
        fired.set()
        os.kill(os.getpid(), signal.SIGINT)
    timer = threading.Timer(timeout, interrupt)
    timer.start()
    try:
        summary = run_demo(algo, peers, steps, None, extra, progress="plain", program=program)
    finally:
        timer.cancel()
        restore()
    return summary, fired, board

def version() -> dict:
    """The commit, and the peerlearn/ files changed from it: the tree may
    change between runs of a sweep (someone else working in it)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True,
                              text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--porcelain", "--", "peerlearn").splitlines()}


def run_one(name: str, aggregate: str, args) -> dict:
    peers, attackers = CONFIGS[name]
    algo, extra = base_flags(args.H)
    warm = te.pretrain(args.seed, te.WARM_STEPS)
    extra = [*extra, "--seed", str(args.seed), "--progress-every", "10",
             "--dead-after", str(args.dead_after), "--set", f"init={warm}"]
    if aggregate != "mean":  # runs stay valid on a peerlearn without the flag
        extra += ["--aggregate", aggregate]

    def program(i: int) -> list[str]:
        if i in attackers:
            return [sys.executable, str(ATTACKER), *attackers[i],
                    "--attack-seed", str(args.seed + i)]
        return [sys.executable, "-m", "peerlearn.cli.app"]

    at_start = version()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log = args.log_dir / f"{name}-{aggregate}-seed{args.seed}-{args.steps}.log"
    t0 = time.monotonic()
    summary, fired, board = demo_logged(log, args.timeout, algo, peers, args.steps, extra,
                                        program)
    reports = summary.pop("peers_report")
    honest = [i for i in range(peers) if i not in attackers]
    losses = [reports[i].get("val_loss") for i in honest]
    algo_metrics = [r.get("algorithm", {}) for r in reports]
    return {
        "config": name, "aggregate": aggregate, "seed": args.seed, "steps": args.steps,
        "H": int(extra[extra.index("--H") + 1]), "dead_after": args.dead_after,
        "peers": peers,
        "attackers": sorted(attackers), "attack": next(iter(attackers.values()), None),
        "extra": extra, "wall_s": round(time.monotonic() - t0, 1),
        "timed_out": fired.is_set(),
        "val_loss": max(losses) if None not in losses else None,
        "val_loss_per_peer": summary["val_loss_per_peer"],
        "bytes_sent_per_peer": summary["bytes_sent_per_peer"],
        "honest_bytes_sent": max((summary["bytes_sent_per_peer"][i] or 0) for i in honest),
        "outer_steps_per_peer": [a.get("outer_steps") for a in algo_metrics],
        "outer_skipped_per_peer": [a.get("outer_skipped") for a in algo_metrics],
        "state_replaced_per_peer": [a.get("state_replaced") for a in algo_metrics],
        "hash_mismatches_honest": te.hash_mismatches([reports[i] for i in honest]),
        "hash_mismatches_all": te.hash_mismatches(reports),
        "refused_rounds": sorted(board.poisoned), "rows_left_out": sorted(board.left_out),
        "error_lines": board.errors, "peerlearn": at_start,
        "peerlearn_at_end": version(),
        "peer_errors": {i: r["error"] for i, r in enumerate(reports) if r.get("error")},
        "curve": reports[0].get("curve", []), "log": str(log),
    }


def run(args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread a peer, as the demo sets
    te.OUT.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else DEFAULT
    for name in names:
        if (name, args.aggregate, args.seed, args.steps) in done_keys():
            continue
        try:
            row = run_one(name, args.aggregate, args)
        except SystemExit as e:  # run_demo: a peer did not start
            print(f"{name} / {args.aggregate}: {e}", file=sys.stderr, flush=True)
            continue
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        loss = f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "none"
        print(f"{name} / {args.aggregate}: val {loss} sent/peer "
              f"{row['honest_bytes_sent'] / 1e6:.1f} MB outer steps "
              f"{row['outer_steps_per_peer']} refused rounds {row['refused_rounds']} "
              f"{row['wall_s']:.0f} s{' TIMED OUT' if row['timed_out'] else ''}", flush=True)


def rounds(row: dict) -> str:
    """Outer steps the honest peers took part in (a range if they differ)."""
    got = {s for i, s in enumerate(row["outer_steps_per_peer"]) if i not in row["attackers"]}
    got.discard(None)
    text = "?" if not got else str(min(got)) if len(got) == 1 else f"{min(got)}-{max(got)}"
    return f"{text} / {row['steps'] // row['H']}"


def attacker_rounds(row: dict) -> str:
    got = [row["outer_steps_per_peer"][i] for i in row["attackers"]]
    return "/".join(str(s) for s in got) if got else "-"


def report(args) -> None:
    rows = read_rows() if RESULTS.exists() else []
    steps = args.steps or max((r["steps"] for r in rows), default=0)
    rows = [r for r in rows if r["steps"] == steps]
    # The clean mean run of the same swarm size (7 peers see more data than 5).
    ref = {r["peers"]: r["val_loss"] for r in rows
           if not r["attackers"] and r["aggregate"] == "mean"}
    order = {n: k for k, n in enumerate(CONFIGS)}
    rows.sort(key=lambda r: (order.get(r["config"], 99), r["aggregate"] != "mean",
                             r["aggregate"]))
    first = rows[0] if rows else {}
    lines = [f"{steps} inner steps per peer, H {first.get('H', '?')}, dead-after "
             f"{first.get('dead_after', '?')} s, seed "
             f"{', '.join(sorted({str(r['seed']) for r in rows}))}", "",
             "| config | peers (attackers) | aggregate | val loss | vs clean mean, same peers | "
             "MB sent / peer (max honest) | outer steps: honest | attacker | refused rounds "
             "| NaN rows left out | parity | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = r["val_loss"]
        base = ref.get(r["peers"])
        rel = f"{(loss / base - 1) * 100:+.1f} %" if loss is not None and base else "-"
        parity = "ok" if r["hash_mismatches_honest"] == 0 else \
            f"MISMATCH ({r['hash_mismatches_honest']})"
        note = " (timed out)" if r.get("timed_out") else ""
        lines.append(
            f"| {r['config']} | {r['peers']} ({len(r['attackers'])}) | {r['aggregate']} | "
            f"{f'{loss:.4f}' if loss is not None else 'none'} | {rel} | "
            f"{r['honest_bytes_sent'] / 1e6:.1f} | {rounds(r)} | {attacker_rounds(r)} | "
            f"{len(r['refused_rounds'])} | {len(r.get('rows_left_out', []))} | {parity} | "
            f"{r['wall_s']:.0f}{note} |")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=250, help="inner steps per peer")
    r.add_argument("--H", type=int, default=None, help=f"default: {BASE}'s")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--aggregate", default="mean",
                   help="mean | centered-clip | trimmed-mean | median (peerlearn run's flag)")
    # 5 peers on 2 cores drift apart by more than the default 3 s a round
    # waits for stragglers: rounds then ran with 1-3 peers and the rest lost
    # their work (the probe: outer steps 2, 3, 4, 2, 4 of 4).
    r.add_argument("--dead-after", type=float, default=20.0,
                   help="peerlearn run's flag; also how long a round waits for stragglers")
    r.add_argument("--only", default="", help=f"comma-separated of {', '.join(CONFIGS)}")
    r.add_argument("--timeout", type=float, default=1200.0, help="seconds before a run is "
                   "interrupted")
    r.add_argument("--log-dir", type=Path, default=Path("/tmp/peerlearn-byzantine"))
    r.set_defaults(func=run)
    t = sub.add_parser("report")
    t.add_argument("--steps", type=int, default=0, help="default: the largest in the file")
    t.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
