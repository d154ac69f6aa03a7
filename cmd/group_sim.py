"""Group rounds (Moshpit-style) beside today's global round, simulated (issue 19;
docs/swarm.md, "Group rounds (Moshpit-style), simulated", has the tables).

    python cmd/group_sim.py --json          # N = 16, 64, 256, 1024 and the notebook rows

Per N, four designs under one model and one churn process:

* today: one global round of every synced peer, as scale_sim's formula for
  a steady round (a fast Commit, the ring, Done, Apply: `extrapolate`'s
  round_s), all or nothing: it applies only if no participant is killed
  while it runs. A peer's next round starts 0.5 RTT + compute after.
* groups, abort: peerlearn/swarm/moshpit.py's rounds on a grid of `--dims`
  axes with room for N x `--headroom` members; every group runs the direct
  all-reduce (two one-way delays plus 2(G-1)/G x state / bandwidth). A
  member dead but still in the view makes its group fail after one RTT (a
  refused connection); a kill while the group's transfer runs fails that
  group only.
* groups, exclude: the same, but a group first exchanges 8-byte hellos
  (one one-way delay; one RTT when someone is missing) and runs among the
  members that answered, as the authors' simulation leaves failed peers out
  of their group. This hello is modelled only: nothing builds it yet.
* groups, settled: exclude, and every view change takes effect, in every
  view at once, SWIM's longest measured time for a joiner to be known by
  all after it is made (changes would carry the round they take effect in;
  swim.py's do not). The views never disagree.

Modelled, not measured: the network (one-way RTT/2, no jitter or loss; each
peer's access link the bottleneck at `--bandwidth-mbit`, full duplex);
rounds in lockstep (every group of round r starts when the slowest of round
r - 1 ended, plus `--compute-s`); churn as Poisson kills of a random live
peer and joins of a new one, each `--churn-per-min` x N a minute; a joiner
copies the value of a member already in the views when it enters them (its
state sync); a view that outgrows the grid gets a new one, taken by every
member at once (`regrids`). The membership is
SWIM's, taken from its own simulation (docs/experiments/swim-scale.jsonl,
medians at this N): a killed peer stays in every view until some member
confirms it dead (first confirmation) and in some views until all do; a
joiner is in some views until all know it. Views disagree only in those
windows; the model computes the groups of two views, with every pending
change and with none, and a group applies only if it is the same group in
both (pessimistic: as if both views were held by members for the whole
window). Measured, by running the model: round latencies, the groups and
peers whose round applied, the rounds until the live peers' values are
within 1e-9 of their mean (mean squared distance over its value at the
trial's start; values start N(0, 1), the metric of the Moshpit paper's
notebook), and payload messages and bytes per peer per round (not counted:
framing, CURVE and TCP headers; SWIM's own traffic is reported beside,
from its file).

`--notebook` rows: the authors' averaging setting (yandex-research/
moshpit-sgd, averaging_experiments: N peers on a 32 x 32 grid, values
N(0, 1), each peer failing each round with probability p, rounds until the
values' variance is below 1e-9, mean of 10 runs, at most 50) through
moshpit.py: "exclude" leaves a failed peer out of its group (their model),
"abort" fails its whole group (this runtime's all-or-nothing all-reduce).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peerlearn.swarm import moshpit as mp  # noqa: E402

TARGET = 1e-9
HELLO_BYTES = 8  # a round number, as gossip's header
NOTEBOOK = [(512, 0.0), (512, 0.01), (768, 0.005), (900, 0.0), (900, 0.005), (900, 0.01)]


def scale_sim():
    spec = importlib.util.spec_from_file_location("scale_sim", ROOT / "cmd" / "scale_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def swim_times(path: Path, n: int) -> dict:
    """SWIM's measured medians at N (cmd/scale_sim.py --membership swim)."""
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["peers"] == n:
            m = row["measured"]
            return {"first_confirmation_s": m["dead_peer_held_dead_by_all_s"]
                    ["first_confirmation_median"],
                    "held_dead_by_all_s": m["dead_peer_held_dead_by_all_s"]["median"],
                    "joiner_known_by_all_s": m["joiner_known_by_all_s"]["median"],
                    "joiner_known_by_all_max_s": m["joiner_known_by_all_s"]["max"],
                    "membership_bytes_per_s_per_peer": m["membership_bytes_per_s_per_peer"]
                    ["mean"], "source": f"{path.name}, peers {n}"}
    raise SystemExit(f"{path}: no row for {n} peers (run scale_sim --membership swim)")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def spread(values) -> float:
    xs = list(values)
    m = math.fsum(xs) / len(xs)
    return math.fsum((x - m) ** 2 for x in xs) / len(xs)


class Swarm:
    """Who is live, who each view holds, and every peer's value (a float
    standing in for its state). Churn times come from their own generator,
    so every design sees the same kill and join times."""

    def __init__(self, n: int, times: dict, rng: random.Random, sync_s: float,
                 settle_s: float | None = None):
        self.rng, self.times, self.sync_s, self.settle_s = rng, times, sync_s, settle_s
        self.value: dict[str, float] = {}
        self.joined: dict[str, float] = {}  # id -> in views from; synced from
        self.killed: dict[str, float] = {}
        self.next_id = 0
        for _ in range(n):
            self.value[self._new(-1e9)] = 0.0

    def _new(self, t: float) -> str:
        pid = f"{self.next_id:032x}"
        self.next_id += 1
        self.joined[pid] = t
        return pid

    def kill(self, t: float) -> str:
        victim = self.rng.choice(sorted(self.value))
        del self.value[victim]
        self.killed[victim] = t
        return victim

    def join(self, t: float) -> None:
        settled = sorted(self.settled(t))
        donor = self.rng.choice(settled) if settled else None
        self.value[self._new(t)] = self.value[donor] if donor else 0.0

    def settled(self, t: float) -> set[str]:
        """Live, synced and known by every member."""
        k = self.times["joiner_known_by_all_s"]
        return {p for p in self.value if self.joined[p] + max(k, self.sync_s) <= t}

    def views(self, t: float) -> tuple[set[str], set[str]]:
        """(with every pending change, with none): members no view has yet
        dropped, plus the pending joiners and the dead some views dropped."""
        first, every = self.times["first_confirmation_s"], self.times["held_dead_by_all_s"]
        if self.settle_s is not None:  # every change takes effect settle_s after it is made
            d = self.settle_s
            view = {p for p in self.value if self.joined[p] + d <= t}
            view |= {p for p, k in self.killed.items() if t < k + first + d}
            return view, view
        stale = {p for p, k in self.killed.items() if t < k + first}
        pending_dead = {p for p, k in self.killed.items() if k + first <= t < k + every}
        settled = self.settled(t)
        joining = set(self.value) - settled
        out = settled | stale
        return out | joining | pending_dead, out


class Churn:
    """Kills and joins as two Poisson processes, each rate x N0 a minute."""

    def __init__(self, n: int, per_min: float, seed: int, end: float):
        rng = random.Random(seed)
        self.events = []
        for kind in ("kill", "join"):
            t, rate = 0.0, per_min * n / 60
            while rate > 0:
                t += rng.expovariate(rate)
                if t > end:
                    break
                self.events.append((t, kind))
        self.events.sort(reverse=True)

    def until(self, t: float):
        while self.events and self.events[-1][0] <= t:
            yield self.events.pop()


class Trials:
    """Rounds until the live values' spread is below TARGET x its value at
    the trial's start; a new trial (fresh N(0, 1) values) starts after each."""

    def __init__(self, rng: random.Random, cap: int):
        self.rng, self.cap, self.rounds, self.start = rng, cap, [], None
        self.done = 0

    def begin(self, swarm: Swarm, members) -> None:
        if self.start is None:
            for p in swarm.value:
                swarm.value[p] = self.rng.gauss(0.0, 1.0)
            self.start, self.done = self.spread(swarm, members), 0

    @staticmethod
    def spread(swarm: Swarm, members) -> float:
        return spread(swarm.value[m] for m in members if m in swarm.value)

    def end_round(self, swarm: Swarm, members) -> None:
        """members: the round's participants (a joiner not yet in the
        views, averaged with nobody, is not yet the swarm's)."""
        self.done += 1
        if self.spread(swarm, members) < TARGET * self.start or self.done >= self.cap:
            self.rounds.append(self.done)
            self.start = None

    def report(self) -> dict:
        return {"trials": len(self.rounds), "median": pct(self.rounds, 0.5),
                "p95": pct(self.rounds, 0.95), "max": max(self.rounds, default=None),
                "capped_at": self.cap, "capped": sum(r >= self.cap for r in self.rounds)}


def bandwidth_s(g: int, args) -> float:
    return 2 * (g - 1) / g * 8 * args.state_mb * 1e6 / (args.bandwidth_mbit * 1e6)


def moves(members, grid: mp.Grid, seed: int, tries: int = 20) -> dict:
    """How many other members change cells when one member leaves (linear
    probing: those hashed after it whose probing passed its cell)."""
    rng = random.Random(seed)
    cells = mp.place(members, grid, seed)
    moved = []
    for gone in rng.sample(sorted(members), min(tries, len(members))):
        after = mp.place([m for m in members if m != gone], grid, seed)
        moved.append(sum(after[m] != cells[m] for m in after))
    return {"tries": len(moved), "mean": round(statistics.mean(moved), 2), "max": max(moved)}


def choose_grid(n: int, args) -> mp.Grid:
    grid = mp.grid_for(n, args.dims, args.headroom)
    while args.max_side and grid.side > args.max_side:
        grid = mp.grid_for(n, grid.dims + 1, args.headroom)
    return grid


def simulate_groups(n: int, args, times: dict, design: str) -> dict:
    exclude = design in ("exclude", "settled")
    settle_s = times["joiner_known_by_all_max_s"] if design == "settled" else None
    rtt = args.rtt_ms / 1000
    one_way, sync_s = rtt / 2, rtt + bandwidth_s(2, args) / 2
    grid, regrids = choose_grid(n, args), 0
    first_grid = grid
    swarm = Swarm(n, times, random.Random(args.seed), sync_s, settle_s)
    churn = Churn(n, args.churn_per_min, args.seed + 1, args.sim_s)
    trials = Trials(random.Random(args.seed + 2), args.trial_cap)
    lat, beside_bw, round_s, group_sizes, causes = [], [], [], [], {}
    groups_n = groups_ok = peers_n = peers_ok = 0
    cache: dict[frozenset, dict] = {}
    seen: set[str] = set()
    t, r = 0.0, 0
    while t < args.sim_s:
        for when, kind in churn.until(t):
            swarm.kill(when) if kind == "kill" else swarm.join(when)
        counting = t >= args.warmup_s
        v_in, v_out = swarm.views(t)
        # A joiner's state sync is modelled when it enters the views, from a
        # member already in them: a copy made when it joined would be stale.
        for m in v_in - seen:
            if m in swarm.value and seen:
                swarm.value[m] = swarm.value[swarm.rng.choice(sorted(
                    p for p in seen & v_out if p in swarm.value))]
        seen |= v_in
        if counting:
            trials.begin(swarm, v_in)
        if len(v_in) > grid.cells:
            # Outgrown: a new grid, taken by every member at once (modelled as
            # agreed; nothing builds it), which moves every member.
            grid, regrids = choose_grid(len(v_in), args), regrids + 1
            cache.clear()
        if len(cache) > 64:
            cache.clear()
        cells = [cache.setdefault(frozenset(v), mp.place(v, grid, args.seed))
                 for v in (v_in, v_out)]
        out_group = {m: g for g in mp.groups(cells[1], grid, r) for m in g}
        running = []  # (group, end) of groups whose transfer started
        for g in mp.groups(cells[0], grid, r):
            live = tuple(m for m in g if m in swarm.value)
            if len(g) < 2 or not live:
                continue
            members = live if exclude else g
            theirs = out_group.get(members[0], ())
            if exclude:
                theirs = tuple(m for m in theirs if m in swarm.value)
            agreed = theirs == members
            if exclude:
                start = t + (rtt if len(live) < len(g) else one_way)  # the hellos
                cause = None if len(live) >= 2 else "alone"
            else:
                start, cause = t, None if len(live) == len(g) else "dead_in_view"
            cause = cause or (None if agreed else "views_disagree")
            # A failed start ends after one RTT: a refused or closed connection.
            running.append((live, [swarm.value[m] for m in live], start + rtt if cause else
                            start + 2 * one_way + bandwidth_s(len(live), args), cause))
        end = max((e for _, _, e, _ in running), default=t)
        # Kills while the round runs: a victim inside a running transfer aborts it.
        dead_at: dict[str, float] = {}
        for when, kind in churn.until(end):
            if kind == "kill":
                dead_at[swarm.kill(when)] = when
            else:
                swarm.join(when)
        for live, values, e, cause in running:
            if cause is None and any(m in dead_at and dead_at[m] < e for m in live):
                cause = "killed_in_transfer"
            if cause is None:
                mean = mp.group_mean(values)
                for m in live:
                    if m in swarm.value:  # not killed after its group ended
                        swarm.value[m] = mean
            if not counting:
                continue
            groups_n += 1
            peers_n += len(live)
            if cause:
                causes[cause] = causes.get(cause, 0) + 1
            else:
                groups_ok += 1
                peers_ok += len(live)
                lat.append(e - t)
                beside_bw.append(e - t - bandwidth_s(len(live), args))
                group_sizes.append(len(live))
        if counting:
            round_s.append(end - t)
            trials.end_round(swarm, v_in)
        t, r = end + args.compute_s, r + 1
    g_mean = statistics.mean(group_sizes) if group_sizes else 0
    data_b = 4 * (g_mean - 1) / g_mean * args.state_mb * 1e6 if g_mean else 0
    return {
        "design": f"groups, {design}", "settle_s": settle_s,
        "grid": [first_grid.side] * (first_grid.dims - 1) + [first_grid.last],
        "cells": first_grid.cells, "regrids": regrids, "cells_at_end": grid.cells,
        "others_moved_when_one_leaves": moves(list(swarm.joined)[:n], first_grid, args.seed),
        "rounds": len(round_s), "kills": len(swarm.killed), "joins": swarm.next_id - n,
        "group_round_s": {"median": round(pct(lat, 0.5), 3), "p95": round(pct(lat, 0.95), 3)},
        "group_round_rtts": {"median": round(pct(lat, 0.5) / rtt, 2),
                             "p95": round(pct(lat, 0.95) / rtt, 2)},
        "lockstep_round_s_median": round(pct(round_s, 0.5), 3),
        "pass_of_d_rounds_s_median": round(grid.dims * pct(lat, 0.5), 3),
        "pass_of_d_rounds_rtts_beside_bandwidth": round(grid.dims * pct(beside_bw, 0.5) / rtt, 2),
        "goal_rtts_2log2n": round(2 * math.log2(n), 1),
        "group_rounds_applied": round(groups_ok / groups_n, 4),
        "peer_rounds_applied": round(peers_ok / peers_n, 4),
        "group_rounds_counted": groups_n, "failures_by_cause": causes,
        "mean_group_size": round(g_mean, 2),
        "rounds_to_1e-9": trials.report(),
        "per_peer_per_applied_round": {
            "messages_in_out": round(4 * (g_mean - 1) + (2 * (g_mean - 1) if exclude else 0), 1),
            "payload_bytes_in_out": round(data_b + (2 * (g_mean - 1) * HELLO_BYTES
                                                    if exclude else 0))},
    }


def simulate_today(n: int, args, times: dict) -> dict:
    ss = scale_sim()
    ext = ss.extrapolate(n, ss.parse(["--rtt-ms", str(args.rtt_ms), "--state-mb",
                                      str(args.state_mb), "--bandwidth-mbit",
                                      str(args.bandwidth_mbit), "--compute-s",
                                      str(args.compute_s), "--churn-per-min",
                                      str(args.churn_per_min)]))
    rtt, dur = args.rtt_ms / 1000, ext["round_s"]
    entry = 2 * rtt + bandwidth_s(2, args) / 2  # Join, Welcome and the state
    swarm = Swarm(n, times, random.Random(args.seed), entry)
    churn = Churn(n, args.churn_per_min, args.seed + 1, args.sim_s)
    trials = Trials(random.Random(args.seed + 2), args.trial_cap)
    rounds = applied = 0
    t = 0.0
    while t < args.sim_s:
        for when, kind in churn.until(t):
            swarm.kill(when) if kind == "kill" else swarm.join(when)
        counting = t >= args.warmup_s
        ready = sorted(p for p in swarm.value if swarm.joined[p] + entry <= t)
        if counting:
            trials.begin(swarm, ready)
        killed = set()
        for when, kind in churn.until(t + dur):
            killed.add(swarm.kill(when)) if kind == "kill" else swarm.join(when)
        ok = not killed.intersection(ready)
        if ok:
            mean = mp.group_mean([swarm.value[p] for p in ready])
            for p in ready:
                if p in swarm.value:
                    swarm.value[p] = mean
        if counting:
            rounds, applied = rounds + 1, applied + ok
            trials.end_round(swarm, ready)
        t += dur + 0.5 * rtt + args.compute_s
    size = ext["wire_bytes"]
    k = ext["commit_copies_per_member_and_round"]
    ring_b = 4 * (n - 1) / n * args.state_mb * 1e6
    control_b = 2 * (n - 1) * (size["Ready"] + size["Done"]) + k * size["Commit"] + size["Apply"]
    return {
        "design": "today (global round, ring)", "rounds": rounds,
        "kills": len(swarm.killed), "joins": swarm.next_id - n,
        "round_s": dur, "round_rtts": round(dur / rtt, 1),
        "rounds_applied": round(applied / rounds, 4) if rounds else None,
        "rounds_applied_formula": ext["applied_fraction"],
        "rounds_to_1e-9": trials.report(),
        "per_peer_per_round": {"messages_in_out": 4 * (n - 1) + 4 * (n - 1) + k + 1,
                               "payload_bytes_in_out": round(ring_b + control_b),
                               "of_which_control_bytes": control_b},
    }


def notebook(n: int, p: float, exclude: bool, runs: int = 10, cap: int = 50) -> dict:
    """The authors' averaging_experiments loop (utils.run_iterative_averaging)
    with moshpit.py's grid: iterations from 1, the axis iteration mod 2."""
    grid = mp.Grid(32, 2)
    got = {1e-9: [], 1e-4: []}
    glob = []
    for seed in range(runs):
        rng = random.Random(seed)
        members = [f"{i:032x}" for i in range(n)]
        cells = mp.place(members, grid, seed)
        vals = {m: rng.gauss(0.0, 1.0) for m in members}
        first = {}
        for it in range(1, cap + 1):
            failed = {m for m in members if rng.random() < p}
            if exclude:
                present = {m: c for m, c in cells.items() if m not in failed}
                new, _ = mp.run_round({m: vals[m] for m in present}, present, grid, it)
                vals.update(new)
            else:
                vals, _ = mp.run_round(vals, cells, grid, it, failed)
            if not failed:
                first.setdefault("global", it)
            for target in got:
                if spread(vals.values()) < target:
                    first.setdefault(target, it)
            if TARGET in first and "global" in first:
                break
        for target in got:
            got[target].append(first.get(target, cap))
        glob.append(first.get("global", cap))
    return {"notebook": True, "peers": n, "p": p, "grid": [32, 32], "runs": runs, "cap": cap,
            "semantics": "exclude" if exclude else "abort",
            "rounds_to_1e-9": statistics.mean(got[1e-9]),
            "rounds_to_1e-4": statistics.mean(got[1e-4]),
            "global_all_reduce_rounds": statistics.mean(glob)}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="16,64,256,1024")
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--state-mb", type=float, default=1.0)
    ap.add_argument("--bandwidth-mbit", type=float, default=100.0)
    ap.add_argument("--churn-per-min", type=float, default=0.01,
                    help="fraction of N killed, and joining, per minute")
    ap.add_argument("--compute-s", type=float, default=1.0,
                    help="each peer's compute between two rounds (scale_sim's default)")
    ap.add_argument("--dims", type=int, default=2, help="grid axes d")
    ap.add_argument("--max-side", type=int, default=0,
                    help="more axes until groups are at most this (8: direct.py's "
                    "DIRECT_MAX_WORLD, above which the daemon takes the ring)")
    ap.add_argument("--headroom", type=float, default=1.05,
                    help="cells per member at the start: room for joiners")
    ap.add_argument("--sim-s", type=float, default=1800.0, help="simulated seconds per design")
    ap.add_argument("--warmup-s", type=float, default=60.0,
                    help="not counted: the views' pending changes build up")
    ap.add_argument("--trial-cap", type=int, default=200, help="rounds at most per trial")
    ap.add_argument("--swim", type=Path, default=ROOT / "docs/experiments/swim-scale.jsonl")
    ap.add_argument("--designs", default="today,abort,exclude,settled")
    ap.add_argument("--notebook", choices=("yes", "no", "only"), default="yes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object a line (the default)")
    args = ap.parse_args(argv)
    args.ns = [int(x) for x in args.peers.split(",") if x]
    args.design_list = args.designs.split(",")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    started = time.monotonic()
    if args.notebook != "only":
        for n in args.ns:
            times = swim_times(args.swim, n)
            row = {"peers": n, "rtt_ms": args.rtt_ms, "state_mb": args.state_mb,
                   "bandwidth_mbit": args.bandwidth_mbit, "churn_per_min": args.churn_per_min,
                   "compute_s": args.compute_s, "sim_s": args.sim_s, "warmup_s": args.warmup_s,
                   "seed": args.seed, "swim": times, "designs": []}
            for d in args.design_list:
                row["designs"].append(simulate_today(n, args, times) if d == "today" else
                                      simulate_groups(n, args, times, d))
            row["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(row), flush=True)
    if args.notebook != "no":
        for n, p in NOTEBOOK:
            for exclude in (True, False):
                print(json.dumps(notebook(n, p, exclude)), flush=True)


if __name__ == "__main__":
    main()
