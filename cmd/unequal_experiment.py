"""Peers of unequal speed (issue 18): DiLoCo with 4 loopback peers from the
warm start (the "diloco-H50-warm" config of cmd/train_experiments.py: outer
lr 1.0, momentum 0.9), one of them FACTOR x slower (cmd/slow_peer.py pads
its steps with sleep), under today's rule (an outer step every H = 50 inner
steps; a round waits at most `gather` after its first Ready, 3 s with
--dead-after 3, and a peer not ready by then is left out: its work is
thrown away when the swarm's state replaces its own) and under the
wall-clock budget (`--outer-every-s T`: an outer step every T seconds of
training, each peer running as many inner steps as fit, pseudo-gradients
weighted by tokens).

    python cmd/unequal_experiment.py run --steps 400                  # the sweep below
    python cmd/unequal_experiment.py run --steps 400 --only slow-budget --outer-every-s 20
    python cmd/unequal_experiment.py report --steps 400               # markdown table

Runs (N = --steps):
  fast-H50      4 fast peers, N inner steps each, H 50 (the reference)
  slow-H50      3 fast + 1 slow, H 50 (today's rule)
  slow-budget   3 fast + 1 slow, --outer-every-s T
  fast-budget   4 fast, N steps each, --outer-every-s T
  slow-H50-spin, slow-budget-spin   the same two with the slow peer padding
                by spinning instead of sleeping (slow_peer.py --pad spin): it
                is then FACTOR x slower than the fast peers, not ~3.8x
The default sweep runs all six, the reference first (T comes from it).

Equal tokens: the swarm trains 4N batches in every run. Where one peer is
FACTOR x slower, the fast peers run n_f = round(4N F / (3F + 1)) steps and
the slow one 4N - 3 n_f (N 400, F 3: 480 and 160), so all four end at about
the same wall-clock time and the swarm has trained on as many tokens as the
reference. The fast peers always run all their steps; the slow one stops
when the first fast peer leaves (slow_peer.py --stop-below 4), so that it
never trains on, and applies rounds, alone. It ends short of its steps when
it is slower than FACTOR x the fast peers (sleeping hands its core to them,
slow_peer.py); where the fast peers wait for it at every round (today's
rule) it finishes first and they run their last steps as three.

The report also gives the tokens that reached the agreed model (the rounds
each peer's work applied in; cmd/slow_peer.py counts them): work thrown away
(today's rule) or trained after a peer's last round (the tail; with a
wall-clock budget the last window is cut off) is not in it.

T (--outer-every-s): given, or 50 x the median seconds of compute a fast
peer's inner step took in this seed's fast-H50 row (the time 50 fast inner
steps take), so outer steps come about as often as in the reference.

Every peer runs through cmd/slow_peer.py (FACTOR 1: no padding, only the
token tally). peerlearn is imported from a snapshot of one commit
(--commit, default HEAD: `git archive` into /tmp/peerlearn-tree-COMMIT, the
built _native module copied in) rather than the working tree, so edits made
to the tree during a sweep do not change it; --live imports the working
tree. Rows go to docs/experiments/unequal.jsonl, one per (config, seed,
steps); a row already there is skipped. The peers' log lines go to --log-dir.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import byzantine_experiment as bz  # noqa: E402
import slow_peer  # noqa: E402
import train_experiments as te  # noqa: E402

RESULTS = te.OUT / "unequal.jsonl"
SLOW = 3  # the slow peer's index (0 founds the swarm)
PEERS = 4
# name -> (a slow peer?, wall-clock budget?, how the slow peer pads)
CONFIGS = {
    "fast-H50": (False, False, None),
    "slow-H50": (True, False, "sleep"),
    "slow-budget": (True, True, "sleep"),
    "fast-budget": (False, True, None),
    "slow-H50-spin": (True, False, "spin"),
    "slow-budget-spin": (True, True, "spin"),
}
DEFAULT = ["fast-H50", "slow-budget", "slow-H50", "fast-budget", "slow-budget-spin",
           "slow-H50-spin"]


def split_steps(steps: int, factor: float) -> tuple[int, int]:
    """(fast, slow) inner steps: 3 fast + 1 slow train 4 x steps batches and
    end together."""
    fast = round(PEERS * steps * factor / ((PEERS - 1) * factor + 1))
    return fast, PEERS * steps - (PEERS - 1) * fast


def snapshot(commit: str) -> tuple[Path, str]:
    """peerlearn/ of `commit`, with the installed _native module: a tree
    slow_peer.use_tree can import."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = Path(f"/tmp/peerlearn-tree-{sha}")
    if not (tree / "peerlearn" / "__init__.py").exists():
        tmp = tree.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "peerlearn"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        native = glob.glob(str(REPO / ".venv/lib/python*/site-packages/peerlearn/_native*.so"))
        if len(native) != 1:
            raise SystemExit(f"want one built _native module, found {native}")
        shutil.copy(native[0], tmp / "peerlearn")
        tmp.rename(tree)
    return tree, sha


def read_rows() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def use_results(path: Path | None) -> None:
    global RESULTS
    if path is not None:
        RESULTS = path


def budget_from_reference(seed: int, steps: int) -> float | None:
    """50 x the median compute seconds of an inner step in fast-H50."""
    for r in read_rows():
        if (r["config"], r["seed"], r["steps"]) == ("fast-H50", seed, steps):
            per_step = [c / n for c, n in zip(r["compute_s_per_peer"], r["inner_steps_per_peer"])
                        if c and n]
            return round(50 * statistics.median(per_step), 2)
    return None


def run_one(name: str, args, tree: Path | None, sha: str) -> dict:
    slow, budget, pad = CONFIGS[name]
    factors = [1.0] * PEERS
    fast_steps, slow_steps = args.steps, args.steps
    if slow:
        factors[SLOW] = args.factor
        fast_steps, slow_steps = split_steps(args.steps, args.factor)
    algo, extra = bz.base_flags(None)
    H = int(extra[extra.index("--H") + 1])
    warm = te.pretrain(args.seed, te.WARM_STEPS)
    extra = [*extra, "--seed", str(args.seed), "--progress-every", "10",
             "--dead-after", str(args.dead_after), "--set", f"init={warm}"]
    every = None
    if budget:
        every = args.outer_every_s or budget_from_reference(args.seed, args.steps)
        if every is None:
            raise SystemExit(f"{name}: no --outer-every-s and no fast-H50 row to derive it from")
        extra += ["--outer-every-s", str(every)]

    def program(i: int) -> list[str]:
        argv = [sys.executable, str(HERE / "slow_peer.py"), "--factor", str(factors[i])]
        if factors[i] > 1:  # it ends when the first fast peer does (module docstring)
            argv += ["--pad", pad, "--stop-below", str(PEERS)]
        if tree is not None:
            argv += ["--tree", str(tree)]
        if i == SLOW and slow_steps != fast_steps:
            argv += ["--steps", str(slow_steps)]
        return argv

    args.log_dir.mkdir(parents=True, exist_ok=True)
    log = args.log_dir / f"{name}-seed{args.seed}-{args.steps}.log"
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    summary, fired, board = bz.demo_logged(log, args.timeout, algo, PEERS, fast_steps, extra,
                                           program)
    reports = summary.pop("peers_report")
    algo_metrics = [r.get("algorithm", {}) for r in reports]
    tally = [r.get("unequal", {}) for r in reports]
    shared = [a.get("shared_step") for a in algo_metrics]
    last = max(range(PEERS), key=lambda i: shared[i] if shared[i] is not None else -1)
    return {
        "config": name, "seed": args.seed, "steps": args.steps,
        "factors": factors, "slow_peer": SLOW if slow else None, "pad": pad,
        "steps_per_peer": [slow_steps if i == SLOW else fast_steps for i in range(PEERS)],
        "H": None if budget else H, "outer_every_s": every, "dead_after": args.dead_after,
        "extra": extra, "wall_s": round(time.monotonic() - t0, 1), "timed_out": fired.is_set(),
        "load_at_start": round(load0, 2), "load_at_end": round(os.getloadavg()[0], 2),
        # The final agreed state: of the peer that applied the most rounds
        # (one that ended earlier left before the last rounds).
        "val_loss": reports[last].get("val_loss"),
        "val_loss_per_peer": summary["val_loss_per_peer"],
        "tokens_per_peer": [r.get("tokens") for r in reports],
        "tokens": sum(r.get("tokens") or 0 for r in reports),
        "applied_tokens_per_peer": [t.get("applied_tokens") for t in tally],
        "dropped_tokens_per_peer": [t.get("dropped_tokens") for t in tally],
        "dropped_steps_per_peer": [t.get("dropped_steps") for t in tally],
        "tail_tokens_per_peer": [t.get("tail_tokens") for t in tally],
        "padded_s_per_peer": [t.get("padded_s") for t in tally],
        "stopped_early_per_peer": [t.get("stopped_early") for t in tally],
        "inner_steps_per_peer": [r.get("inner_steps") for r in reports],
        "compute_s_per_peer": [r.get("compute_s") for r in reports],
        "peer_wall_s_per_peer": [r.get("wall_s") for r in reports],
        "compute_utilisation_per_peer": summary["compute_utilisation_per_peer"],
        "outer_overhead_s_per_peer": summary["outer_overhead_s_per_peer"],
        "outer_steps_per_peer": [a.get("outer_steps") for a in algo_metrics],
        "outer_skipped_per_peer": [a.get("outer_skipped") for a in algo_metrics],
        "state_replaced_per_peer": [a.get("state_replaced") for a in algo_metrics],
        "shared_step_per_peer": shared,
        "bytes_sent_per_peer": summary["bytes_sent_per_peer"],
        "bytes_sent_collective_per_peer": summary["bytes_sent_collective_per_peer"],
        "bytes_sent_state_per_peer": summary["bytes_sent_state_per_peer"],
        "bytes_sent_control_per_peer": summary["bytes_sent_control_per_peer"],
        "hash_mismatches": te.hash_mismatches(reports),
        "error_lines": board.errors,
        "peerlearn": {"commit": sha, "tree": str(tree)} if tree is not None else bz.version(),
        "peer_errors": {i: r["error"] for i, r in enumerate(reports) if r.get("error")},
        "curve": reports[0].get("curve", []), "log": str(log),
    }


def run(args) -> None:
    use_results(args.results)
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread a peer, as the demo sets
    tree, sha = (None, "live") if args.live else snapshot(args.commit)
    slow_peer.use_tree(None if tree is None else str(tree))
    te.OUT.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else DEFAULT
    for name in names:
        if any((r["config"], r["seed"], r["steps"]) == (name, args.seed, args.steps)
               for r in read_rows()):
            continue
        try:
            row = run_one(name, args, tree, sha)
        except SystemExit as e:
            print(f"{name}: {e}", file=sys.stderr, flush=True)
            continue
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        loss = f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "none"
        util = [round(u, 3) if u is not None else None
                for u in row["compute_utilisation_per_peer"]]
        print(f"{name}: val {loss} util {util} outer steps {row['outer_steps_per_peer']} "
              f"replaced {row['state_replaced_per_peer']} {row['wall_s']:.0f} s"
              f"{' TIMED OUT' if row['timed_out'] else ''}", flush=True)


def slowdown(row: dict) -> float:
    """The slow peer's seconds per inner step over the fast peers' (compute
    time, its padding included)."""
    s = row["slow_peer"]
    per = [c / n for c, n in zip(row["compute_s_per_peer"], row["inner_steps_per_peer"])]
    fast = [p for i, p in enumerate(per) if i != s]
    return per[s] / statistics.mean(fast)


def report(args) -> None:
    use_results(args.results)
    rows = read_rows()
    steps = args.steps or max((r["steps"] for r in rows), default=0)
    rows = [r for r in rows if r["steps"] == steps]
    ref = {r["seed"]: r["val_loss"] for r in rows if r["config"] == "fast-H50"}
    order = {n: k for k, n in enumerate(CONFIGS)}
    rows.sort(key=lambda r: (r["seed"], order.get(r["config"], 99)))
    lines = [
        "| run | seed | slow peer: pad, slowdown | rule | inner steps / peer "
        "| tokens trained (M) | in the agreed model (M) | val loss | vs fast-H50 "
        "| compute util. min (per peer) | outer steps | slow peer: outer steps in, "
        "work thrown away | MB sent / peer | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss, base = r["val_loss"], ref.get(r["seed"])
        rel = f"{(loss / base - 1) * 100:+.2f} %" if loss is not None and base else "-"
        rel = "0" if r["config"] == "fast-H50" else rel
        util = r["compute_utilisation_per_peer"]
        utils = "/".join(f"{u * 100:.1f}" if u is not None else "?" for u in util)
        umin = min((u for u in util if u is not None), default=None)
        rule = f"H {r['H']}" if r["H"] else f"every {r['outer_every_s']:g} s"
        stopped = r.get("stopped_early_per_peer") or [False] * PEERS
        star = "\\*"  # markdown: a literal asterisk
        steps_p = "/".join(f"{s}{star if early else ''}"
                           for s, early in zip(r["inner_steps_per_peer"], stopped))
        applied = sum(t or 0 for t in r["applied_tokens_per_peer"])
        outer = max((s for s in r["outer_steps_per_peer"] if s is not None), default=0)
        s = r["slow_peer"]
        if s is None:
            who, slow = "-", "-"
        else:
            who = f"{r.get('pad', 'sleep')}, {slowdown(r):.2f}x"
            dropped, replaced = r["dropped_steps_per_peer"][s] or 0, r["state_replaced_per_peer"][s]
            slow = f"{r['outer_steps_per_peer'][s]}, " + (
                f"{replaced} x: {dropped} steps" if replaced or dropped else "none")
        mb = max(b or 0 for b in r["bytes_sent_per_peer"]) / 1e6
        note = " (timed out)" if r.get("timed_out") else ""
        parity = "" if r["hash_mismatches"] == 0 else f" PARITY x{r['hash_mismatches']}"
        lines.append(
            f"| {r['config']}{note}{parity} | {r['seed']} | {who} | {rule} | {steps_p} | "
            f"{r['tokens'] / 1e6:.2f} | {applied / 1e6:.2f} | "
            f"{f'{loss:.4f}' if loss is not None else 'none'} | {rel} | "
            f"{f'{umin * 100:.1f} %' if umin is not None else '?'} ({utils}) | {outer} | "
            f"{slow} | {mb:.1f} | {r['wall_s']:.0f} |")
    lines += ["", "\\* Stopped early, when a peer that it heard alive left."]
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=400,
                   help="inner steps per peer where all are fast (the token budget / 4)")
    r.add_argument("--factor", type=float, default=3.0, help="the slow peer's slowdown")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--outer-every-s", type=float, default=None,
                   help="the budget runs' T (default: from this seed's fast-H50 row)")
    r.add_argument("--dead-after", type=float, default=3.0,
                   help="peerlearn run's flag; the round's gather is max(2, it)")
    r.add_argument("--only", default="", help=f"comma-separated of {', '.join(CONFIGS)}")
    r.add_argument("--commit", default="HEAD", help="the peerlearn the peers import")
    r.add_argument("--live", action="store_true", help="import the working tree instead")
    r.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before a run is interrupted")
    r.add_argument("--log-dir", type=Path, default=Path("/tmp/peerlearn-unequal"))
    r.add_argument("--results", type=Path, default=None, help=f"default: {RESULTS}")
    r.set_defaults(func=run)
    t = sub.add_parser("report")
    t.add_argument("--steps", type=int, default=0, help="default: the largest in the file")
    t.add_argument("--results", type=Path, default=None, help=f"default: {RESULTS}")
    t.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
