"""A real swarm under churn on one machine (issue 19): N `peerlearn run`
processes on loopback (the synthetic workload), kills, restarts and joins on
a schedule, then the verdict from every peer's own log.

    python cmd/swarm_churn.py --peers 32 --duration 600 --json

What it reports (JSON):
  * parity: every step that any peer applied, with the state hash each one
    logged for it; a step with two hashes is a violation;
  * gaps: the longest time with no round applied anywhere in the swarm, and
    the longest at a peer that lived through the whole run;
  * cost: each peer process's CPU (user + system, from /proc) over the run
    and over a quiet minute (no kill, join or restart in it: the idle cost of
    membership and rounds, since the synthetic workload sleeps for its
    compute), and its resident memory;
  * with --swim (every peer also runs SWIM beside its heartbeats,
    swarm/swim_driver.py): for each kill, how long after it each peer that
    lived through it logged the victim suspect and dead in SWIM, from the
    peers' own debug lines (and how many never did before its restart).

Churn: every `--kill-every` seconds one random live peer is SIGKILLed (the
founder too) and restarted `--restart-after` seconds later from its data
directory, joining through a random live peer; every `--join-every` seconds
a new peer joins. The first `--quiet-s` seconds after the swarm formed are
left alone (the quiet window).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APPLIED = re.compile(r"step (\d+) applied \(round \d+\) state ([0-9a-f]{16})")
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return None


class Swarm:
    def __init__(self, work: Path, args):
        self.work, self.args = work, args
        self.secret = work / "secret"
        fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(24).hex() + "\n")
        self.procs: dict[str, subprocess.Popen] = {}
        self.port: dict[str, int] = {}
        self.events: list[tuple[float, str, str]] = []
        self.cpu: dict[str, float] = {}  # CPU seconds of ended processes, per name
        self.killed_at: list[tuple[float, str]] = []  # (wall time, name)

    def start(self, name: str, join: str | None) -> None:
        if name not in self.port:
            self.port[name] = self.args.base_port + len(self.port)
        argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                "--listen", f"127.0.0.1:{self.port[name]}", "--data-dir",
                str(self.work / name), "--numel", str(self.args.numel), "--compute-s",
                str(self.args.compute_s), "--metrics", "off", "--secret-file", str(self.secret),
                "--log-level", "debug", "--log-format", "json"]  # debug: "step N applied" lines
        if self.args.swim:
            argv.append("--swim")
        if join:
            argv += ["--join", join]
        log = open(self.work / f"{name}.log", "a")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.events.append((time.monotonic(), "start", name))

    def live(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.port[name]}"

    def kill(self, name: str) -> None:
        p = self.procs[name]
        used = cpu_seconds(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.cpu[name] = self.cpu.get(name, 0.0) + (used or 0.0)
        self.events.append((time.monotonic(), "kill", name))
        self.killed_at.append((time.time(), name))

    def close(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is None:
                used = cpu_seconds(p.pid)
                self.cpu[name] = self.cpu.get(name, 0.0) + (used or 0.0)
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def applied(work: Path, names) -> dict[str, list[tuple[float, int, str]]]:
    """name -> [(log time, step, state hash)] from its JSON log lines."""
    out: dict[str, list] = {}
    for name in names:
        rows = []
        for line in (work / f"{name}.log").read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            m = APPLIED.search(str(rec.get("message", "")))
            if m:
                rows.append((_seconds(rec.get("time", "")), int(m[1]), m[2]))
        out[name] = rows
    return out


def peer_id(work: Path, name: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from peerlearn.state.identity import Identity
    return Identity.load_or_create(work / name).peer_id


def swim_detection(work: Path, names, killed_at, restart_after: float) -> list[dict]:
    """Per kill: seconds from the SIGKILL until each other peer's SWIM logged
    the victim suspect, and dead (debug lines of swim_driver.py), within the
    victim's downtime; a peer that logged nothing in it counts as missed."""
    lines = {}
    for name in names:
        rows = []
        for line in (work / f"{name}.log").read_text(errors="replace").splitlines():
            if line.startswith("{") and "swim: " in line:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                rows.append((_seconds(rec.get("time", "")), str(rec.get("message", ""))))
        lines[name] = rows
    out = []
    for at, victim in killed_at:
        short = peer_id(work, victim)[:8]
        seen: dict[str, dict[str, float]] = {}
        for name, rows in lines.items():
            if name == victim:
                continue
            for t, msg in rows:
                if at <= t <= at + restart_after and f"swim: {short} is " in msg:
                    state = msg.split(f"swim: {short} is ", 1)[1].split(" ", 1)[0]
                    seen.setdefault(name, {}).setdefault(state, t - at)
        dead = sorted(v["dead"] for v in seen.values() if "dead" in v)
        suspect = sorted(v["suspect"] for v in seen.values() if "suspect" in v)
        out.append({"victim": victim, "peers_that_saw_it_dead": len(dead),
                    "dead_s_median": statistics.median(dead) if dead else None,
                    "dead_s_max": max(dead) if dead else None,
                    "suspect_s_median": statistics.median(suspect) if suspect else None,
                    "first_suspect_s": suspect[0] if suspect else None})
    return out


def _seconds(stamp: str) -> float:
    """A log line's UTC time (2026-12-07T10:01:02.345Z) in epoch seconds."""
    import calendar
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=32)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--kill-every", type=float, default=60.0)
    p.add_argument("--restart-after", type=float, default=10.0)
    p.add_argument("--join-every", type=float, default=90.0)
    p.add_argument("--quiet-s", type=float, default=60.0)
    p.add_argument("--settle-s", type=float, default=10.0,
                   help="the quiet window's CPU is counted from this long after the last start "
                        "(32 peers starting at once take about a minute of both cores)")
    p.add_argument("--numel", type=int, default=65536)
    p.add_argument("--compute-s", type=float, default=1.0)
    p.add_argument("--base-port", type=int, default=7600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swim", action="store_true",
                   help="every peer also runs SWIM beside its heartbeats (peerlearn run --swim)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="peerlearn-churn-"))
    sw = Swarm(work, args)
    samples: list[dict] = []
    try:
        sw.start("p00", None)
        time.sleep(2)
        for i in range(1, args.peers):
            sw.start(f"p{i:02d}", sw.addr("p00"))
            time.sleep(0.3)  # a joining stampede is not what is measured
        formed = time.monotonic()
        quiet_end = formed + args.quiet_s
        end = formed + args.duration
        next_kill, next_join = quiet_end, quiet_end + args.join_every / 2
        restarts: list[tuple[float, str]] = []
        joined = args.peers
        cpu_at_quiet_start = cpu_at_quiet_end = None
        while time.monotonic() < end:
            now = time.monotonic()
            if cpu_at_quiet_start is None and now >= formed + args.settle_s:
                cpu_at_quiet_start = (now, {n: cpu_seconds(sw.procs[n].pid) for n in sw.live()})
            if cpu_at_quiet_end is None and now >= quiet_end:
                cpu_at_quiet_end = (now, {n: cpu_seconds(sw.procs[n].pid) for n in sw.live()})
            if now >= next_kill:
                victim = rng.choice(sw.live())
                sw.kill(victim)
                restarts.append((now + args.restart_after, victim))
                next_kill += args.kill_every
            for due, name in [r for r in restarts if r[0] <= now]:
                restarts.remove((due, name))
                sw.start(name, sw.addr(rng.choice(sw.live())))
            if now >= next_join:
                name = f"p{joined:02d}"
                joined += 1
                sw.start(name, sw.addr(rng.choice(sw.live())))
                next_join += args.join_every
            samples.append({"t": now - formed, "rss": {n: rss_bytes(sw.procs[n].pid)
                                                      for n in sw.live()}})
            time.sleep(5)
    finally:
        sw.close()
    names = sorted(sw.procs)
    logs = applied(work, names)
    hashes: dict[int, set[str]] = {}
    for rows in logs.values():
        for _, step, h in rows:
            hashes.setdefault(step, set()).add(h)
    violations = {s: sorted(h) for s, h in hashes.items() if len(h) > 1}
    times = sorted(t for rows in logs.values() for t, _, _ in rows)
    in_run = [t for t in times if t >= times[0]] if times else []
    swarm_gap = max((b - a for a, b in zip(in_run, in_run[1:])), default=None)
    killed = {n for _, kind, n in sw.events if kind == "kill"}
    survivors = [n for n in names if n not in killed and n in [f"p{i:02d}" for i in
                                                                 range(args.peers)]]
    survivor_gaps = {}
    for n in survivors:
        ts = [t for t, _, _ in logs[n]]
        survivor_gaps[n] = max((b - a for a, b in zip(ts, ts[1:])), default=None)
    quiet_cpu = None
    if cpu_at_quiet_start and cpu_at_quiet_end:
        (t0, c0), (t1, c1) = cpu_at_quiet_start, cpu_at_quiet_end
        per = [(c1[n] - c0[n]) / (t1 - t0) for n in c0 if c1.get(n) is not None and c0[n]
               is not None]
        quiet_cpu = {"window_s": t1 - t0, "peers": len(per),
                     "per_peer_core_fraction_median": statistics.median(per),
                     "per_peer_core_fraction_max": max(per),
                     "all_peers_cores": sum(per)}
    rss = [v for s in samples for v in s["rss"].values() if v]
    report = {
        "peers": args.peers, "duration_s": args.duration, "numel": args.numel,
        "compute_s": args.compute_s, "cores": os.cpu_count(),
        "kills": sum(k == "kill" for _, k, _ in sw.events),
        "starts": sum(k == "start" for _, k, _ in sw.events),
        "steps_applied": max(hashes, default=0),
        "parity_violations": violations,
        "longest_gap_swarm_s": swarm_gap,
        "longest_gap_at_a_survivor_s": max((g for g in survivor_gaps.values() if g), default=None),
        "quiet_cpu": quiet_cpu,
        "rss_mb_median": statistics.median(rss) / 2**20 if rss else None,
        "rss_mb_max": max(rss) / 2**20 if rss else None,
        "logs": str(work),
    }
    if args.swim:
        report["swim"] = {"detections": swim_detection(work, names, sw.killed_at,
                                                       args.restart_after)}
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
