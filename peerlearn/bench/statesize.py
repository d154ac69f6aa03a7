"""`peerlearn bench statesize`: the peer daemon at real model sizes (issue 17).

Per state size (default 64 MiB, 512 MiB, 2 GiB; K, M, G binary), in turn:
1. the ring bound: `peerlearn.bench.allreduce.run`, the plain ring all-reduce
   of as many fp32 elements among 3 processes on loopback, with the daemon's
   connections and lanes (PeerConfig.n_conns, ring_lanes), no daemon;
2. 3 `peerlearn run --algo synthetic` peers on loopback, each sampled every
   second on its metrics endpoint for --duration s once all three are in one
   view and have applied a round together: seconds per applied round less
   --compute-s against the ring bound; how late each daemon's 50 ms tick woke
   (peerlearn_loop_lag_*) and what its counters say happened when its longest
   stall grew; peak RSS (VmHWM) over the state size; checkpoint write time
   (every PeerConfig.checkpoint_every = 10 rounds, which no flag sets); what a
   healthy run keeps at 0 (aborted rounds, view changes, evictions);
3. a 4th peer with --join: seconds until it holds the swarm's state (its
   verified syncs) and until it applies a round with the others; how many
   donor pushes an apply cut (push_cuts: each one's next push is from a
   copy of the state, the one time a donor holds one).

The synthetic state is one fp32 tensor of size / 4 elements (the size is the
whole state's). Each round a peer makes one more such tensor, its
contribution, on its training thread: `update_s` times that here, alone.

Out of memory, with no swap, the kernel kills: every peer is killed once
MemAvailable falls below --mem-floor GiB, and the output says so beside what
was measured until then (peak RSS included). Run: `peerlearn bench statesize
--sizes 64M,512M,2G --duration 300` (JSON on stdout, progress on stderr).
"""

from __future__ import annotations

import calendar
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from pathlib import Path

from peerlearn.bench.allreduce import _free_port
from peerlearn.bench.allreduce import run as ring_run

PEERS = 3
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
SAMPLE_S = 1.0
CHECKPOINT_EVERY = 10  # PeerConfig.checkpoint_every: no `peerlearn run` flag sets it
# Our name -> a Prometheus sample's, its labels included.
FIELDS = dict(
    members="peerlearn_members", applied="peerlearn_rounds_applied_total",
    aborted="peerlearn_rounds_aborted_total", lag_max="peerlearn_loop_lag_max_seconds",
    ticks="peerlearn_loop_lag_seconds_count",
    ticks_le_100ms="peerlearn_loop_lag_seconds_bucket{le=0.1}",
    checkpoints="peerlearn_checkpoints_total", ckpt_sum="peerlearn_checkpoint_seconds_sum",
    ckpt_count="peerlearn_checkpoint_seconds_count", syncs="peerlearn_state_syncs_total",
    sync_failures="peerlearn_state_sync_failures_total",
    parity="peerlearn_parity_mismatches_total",
    sync_sum="peerlearn_collective_seconds_sum{operation=state_sync}",
    sync_count="peerlearn_collective_seconds_count{operation=state_sync}",
    ar_sum="peerlearn_collective_seconds_sum{operation=all_reduce}",
    ar_count="peerlearn_collective_seconds_count{operation=all_reduce}")
VIEW, ABORTED = re.compile(r"view (\d+): (\d+) members"), re.compile(r"round (\d+) aborted")


class Stopped(Exception):
    """Out of memory, a peer exited, or a phase never ended: the size ends there."""


def parse_sizes(spec: str) -> list[int]:
    """"64M,512M,2G" -> bytes, each a whole number of fp32 elements."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", part, re.IGNORECASE)
        n = int(m[1]) * UNITS[m[2].upper()] if m else 0
        if n < 4 * PEERS or n % 4:
            raise ValueError(f"a size is bytes (K, M, G: binary), a multiple of 4, at least "
                             f"{4 * PEERS}: not {part!r}")
        out.append(n)
    return out


def _say(text: str) -> None:
    print(f"[statesize] {text}", file=sys.stderr, flush=True)


def _proc_kib(path: str, key: str) -> int:
    """A "Key: N kB" line of a /proc file, in bytes (0 once the process is gone)."""
    try:
        with open(path) as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))
    except (OSError, StopIteration):
        return 0


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    flat = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            flat[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    out = {k: flat.get(v, 0.0) for k, v in FIELDS.items()}
    out["retries"] = sum(v for k, v in flat.items() if k.startswith("peerlearn_round_retries"))
    return out


class _Peer:
    """A `peerlearn run` process; its stdout (the first line says where its
    metrics are) and stderr (JSON log lines) go to files in `work`."""

    def __init__(self, name: str, argv: list[str], work: Path):
        self.name, self.port, self.log, self.out = name, None, work / f"{name}.log", \
            work / f"{name}.out"
        self.launched, self.launched_wall, self.hwm = time.monotonic(), time.time(), 0
        with open(self.out, "w") as out, open(self.log, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def peak(self) -> None:
        self.hwm = max(self.hwm, _proc_kib(f"/proc/{self.proc.pid}/status", "VmHWM"))

    def sample(self) -> dict | None:
        self.peak()  # also before the peer is in the swarm: a large one grows meanwhile
        if self.port is None:
            first = self.out.read_text().split("\n", 1)
            if len(first) < 2:  # printed once the peer is in the swarm
                return None
            self.port = json.loads(first[0])["metrics_port"]
        try:
            return _scrape(self.port)
        except OSError:
            return None


class _MemGuard(threading.Thread):
    """Kills every peer once MemAvailable is below `floor`; every 0.2 s, on its
    own thread: a scrape may wait seconds on a busy daemon, an allocation not."""

    def __init__(self, peers: list[_Peer], floor: int):
        super().__init__(name="statesize-memguard", daemon=True)
        self.peers, self.floor, self.tripped, self.done = peers, floor, None, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            avail = _proc_kib("/proc/meminfo", "MemAvailable")
            if avail < self.floor:
                self.tripped = avail
                for p in list(self.peers):
                    p.peak()
                    p.proc.kill()
                return


def _base_rss() -> int:
    """VmHWM of a process importing what a synthetic peer imports: its RSS less any state."""
    code = ("import torch, peerlearn.cli.app, peerlearn.cli.daemon, peerlearn.cli.metrics, "
            "peerlearn.swarm.api, peerlearn.swarm.peer; "
            "print(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[1]) * 1024


def _log(peer: _Peer, until: float) -> dict:
    """From a peer's JSON log up to wall time `until` (the shutdown's lines
    apart): its views (time, members), when it began joining, synced and first
    contributed, its warnings and errors."""
    out: dict = {"views": [], "synced": [], "aborted": set(), "problems": [], "other_lines": 0,
                 "push_cuts": 0}
    for line in peer.log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            at = calendar.timegm(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S")) \
                + int(rec["time"][20:23]) / 1000
        except (ValueError, KeyError, TypeError):
            out["other_lines"] += 1  # a traceback, or a line from before logging was set up
            continue
        if at > until:
            break
        msg = rec.get("message", "")
        if m := VIEW.search(msg):
            out["views"].append((at, int(m[1]), int(m[2])))  # time, epoch, members
        if m := ABORTED.search(msg):
            out["aborted"].add(int(m[1]))
        if " synced to step " in msg:
            out["synced"].append(at)
        if "cut by an apply" in msg:  # its next push to that joiner is from a copy
            out["push_cuts"] += 1
        for key, prefix in (("joining", "joining the swarm"), ("contributed", "contributed to")):
            if msg.startswith(prefix):
                out.setdefault(key, at)
        if rec.get("level") in ("warning", "error"):
            out["problems"].append(f"{rec['level']}: {msg[:200]}")
    return out


def _lag_rises(rows: list[tuple[dict, dict]], t0: float) -> list[dict]:
    """Where a peer's longest stall grew: seconds from the window's start, the
    phase, and what its counters say happened in that interval (a checkpoint
    is counted once written: that interval or the next)."""
    out = []
    for i in range(1, len(rows)):
        a, (s1, b) = rows[i - 1][1], rows[i]
        if b["lag_max"] <= a["lag_max"] or b["lag_max"] < 0.01:
            continue
        nxt = rows[i + 1][1] if i + 1 < len(rows) else b
        what = [w for w, key, after in (("checkpoint", "checkpoints", nxt),
                                        ("state_sync", "syncs", b), ("round", "applied", b))
                if after[key] > a[key]]
        out.append({"at_s": round(s1["t"] - t0, 1), "phase": s1["phase"],
                    "lag_max_s": round(b["lag_max"], 3), "with": what})
    return out


def _delta(a: dict, b: dict, key: str) -> float:
    return sum(b[n][key] - a[n][key] for n in a)  # over the peers sampled in a


class _Size:
    """One state size: ring bound, 3 peers, a joiner. `res` fills as it goes,
    so what was measured before a Stopped stays in the output."""

    def __init__(self, nbytes: int, compute_s: float, floor: int, res: dict):
        from peerlearn.cli.daemon import write_secret_file

        self.nbytes, self.numel, self.gib = nbytes, nbytes // 4, nbytes / 2**30
        self.compute_s, self.res = compute_s, res
        self.work = Path(tempfile.mkdtemp(prefix="peerlearn-statesize-"))
        self.secret = write_secret_file(self.work / "secret", secrets.token_urlsafe(32))
        self.founder = f"127.0.0.1:{_free_port()}"
        self.peers: list[_Peer] = []
        self.guard = _MemGuard(self.peers, floor)
        self.samples: list[dict] = []
        self.window: tuple[dict, dict] | None = None

    def launch(self, name: str, join: bool) -> None:
        argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                "--numel", str(self.numel), "--compute-s", str(self.compute_s),
                "--listen", "127.0.0.1:0" if join else self.founder,
                "--data-dir", str(self.work / name), "--metrics", "127.0.0.1:0",
                "--secret-file", str(self.secret), "--log-format", "json",
                *(["--join", self.founder] if join else [])]
        self.peers.append(_Peer(name, argv, self.work))

    def watch(self, seconds: float, phase: str, until) -> dict:
        """Samples every peer each SAMPLE_S until `until(row)`; Stopped when
        the guard tripped, a peer exited, or `seconds` passed."""
        end = time.monotonic() + seconds
        while True:
            t = time.monotonic()
            row = {"t": t, "wall": time.time(), "phase": phase,
                   "peers": {p.name: p.sample() for p in self.peers}}
            self.samples.append(row)
            if self.guard.tripped is not None:
                raise Stopped(f"MemAvailable fell to {self.guard.tripped / 2**30:.1f} GiB in "
                              f"the {phase} phase: every peer killed")
            if dead := [p.name for p in self.peers if p.proc.poll() is not None]:
                raise Stopped(f"{', '.join(dead)} exited in the {phase} phase (see its log)")
            if until(row):
                return row
            if t >= end:
                raise Stopped(f"the {phase} phase did not end within {seconds:.0f} s")
            time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - t)))

    def ring(self, repeat: int) -> None:
        ring = ring_run(peers=PEERS, numel=self.numel, gloo=False, repeat=repeat,
                        conns=4, lanes=4)["ours"]["none"]  # PeerConfig.n_conns, ring_lanes
        self.res["ring"] = {k: ring[k] for k in ("seconds", "all_runs_s", "bus_gbit_s")}
        from peerlearn.swarm.synthetic import SyntheticWorkload

        work = SyntheticWorkload(numel=self.numel)  # a peer's contribution, made here alone
        self.res["update_s"] = min(timeit.repeat(lambda: work.local_update("x", 1), number=1,
                                                 repeat=2))
        _say(f"{self.nbytes / 2**20:g} MiB: ring bound {ring['seconds']:.3f} s, "
             f"a contribution takes {self.res['update_s']:.3f} s to make")

    def steady(self, duration: float) -> None:
        self.guard.start()
        for i in range(PEERS):  # at once: the joiners retry until the founder is up
            self.launch(f"peer{i}", join=i > 0)
        full: dict[str, float] = {}

        def settled(row: dict) -> bool:
            """All three in one view, and a round applied by each since."""
            for name, r in row["peers"].items():
                if r is None or r["members"] < PEERS:
                    return False
                full.setdefault(name, r["applied"])
            return all(r["applied"] > full[n] for n, r in row["peers"].items())

        first = self.watch(180 + 120 * self.gib, "startup", settled)
        res = self.res
        res["startup_s"] = round(first["t"] - self.peers[0].launched, 1)
        _say(f"{self.nbytes / 2**20:g} MiB: 3 peers steady after {res['startup_s']} s; "
             f"measuring {duration:g} s")
        last = self.watch(duration + 60, "steady", lambda row: row["t"] - first["t"] >= duration)
        self.window = first, last
        a, b, window = first["peers"], last["peers"], last["t"] - first["t"]
        res["window_s"] = round(window, 1)
        res["rounds"] = {n: b[n]["applied"] - a[n]["applied"] for n in a}
        res["healthy"] = {k: _delta(a, b, f) for k, f in (
            ("rounds_aborted", "aborted"), ("round_retries", "retries"),
            ("state_sync_failures", "sync_failures"), ("parity_mismatches", "parity"))}
        res["healthy"]["members_min"] = min(r["members"] for _, r in self.rows("steady"))
        if not res["rounds"]["peer0"]:
            return
        ring = res["ring"]["seconds"]
        res["round_s"] = window / res["rounds"]["peer0"] - self.compute_s
        res["round_vs_ring"] = res["round_s"] / ring
        # The contribution is made on the peer's training thread between
        # rounds: the synthetic workload's cost, not the daemon's.
        res["round_less_update_s"] = res["round_s"] - res["update_s"]
        res["round_less_update_vs_ring"] = res["round_less_update_s"] / ring
        res["all_reduce_s"] = _delta(a, b, "ar_sum") / max(1.0, _delta(a, b, "ar_count"))
        res["all_reduce_vs_ring"] = res["all_reduce_s"] / ring

    def join(self) -> None:
        self.launch("joiner", join=True)

        def joined(row: dict) -> bool:
            r = row["peers"]["joiner"]
            return r is not None and r["syncs"] >= 1 and r["applied"] >= 1

        last = self.watch(120 + 60 * self.gib, "join", joined)
        j, b = last["peers"]["joiner"], self.window[1]["peers"]
        self.res["join"] = {
            "state_sync_s": j["sync_sum"] / max(1.0, j["sync_count"]), "syncs": j["syncs"],
            "sync_failures": j["sync_failures"],
            "rounds_aborted": _delta(b, last["peers"], "aborted")}

    def rows(self, phase: str | None = None, name: str | None = None) -> list:
        return [(s, r) for s in self.samples if phase in (None, s["phase"])
                for n, r in s["peers"].items() if r is not None and name in (None, n)]

    def close(self, logs_dir: str | None) -> None:
        until = time.time()  # views after this are the shutdown's: not counted
        self.guard.done.set()
        for p in self.peers:
            p.proc.send_signal(signal.SIGTERM)
        for p in self.peers:
            try:
                p.proc.wait(timeout=60)  # a large state's last checkpoint takes a while
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        self.summarise(until)
        for p in self.peers if logs_dir else ():
            Path(logs_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(p.log, Path(logs_dir) / f"{self.nbytes // 2**20}M-{p.name}.log")
        shutil.rmtree(self.work, ignore_errors=True)

    def summarise(self, until: float) -> None:
        """Per peer, from every sample and log: stalls, peak RSS, checkpoints, views."""
        res, base = self.res, self.res.get("base_rss_bytes", 0)
        w0, w1 = (self.window[0]["wall"], self.window[1]["wall"]) if self.window else (0, 0)
        t0 = self.window[0]["t"] if self.window else self.peers[0].launched  # of lag_rises
        # A view that lost a member (nobody leaves before close): a peer's view
        # line with fewer members than its one before (once per epoch: every
        # member logs it), or its members gauge dropping (a peer does not log
        # every view): the larger count of the two, in the window and overall.
        res["peers"], views, problems, aborted = {}, set(), [], set()
        shrunk, drops = set(), [0, 0]
        for p in self.peers:
            rows, log, steady = self.rows(name=p.name), _log(p, until), self.rows("steady", p.name)
            shrunk |= {(e, w0 < at <= w1) for (_, _, n0), (at, e, n1)
                       in zip(log["views"], log["views"][1:]) if n1 < n0}
            fell = [s["wall"] for (_, r0), (s, r1) in zip(rows, rows[1:])
                    if r1["members"] < r0["members"]]
            drops = [max(drops[0], sum(w0 < t <= w1 for t in fell)), max(drops[1], len(fell))]
            views |= {e for at, e, _ in log["views"] if w0 < at <= w1}
            aborted |= log["aborted"]
            problems += [f"{p.name} {m}" for m in log["problems"]]
            row = res["peers"][p.name] = {
                "exit_code": p.proc.returncode, "log_problems": len(log["problems"]),
                "push_cuts": log["push_cuts"],
                "log_other_lines": log["other_lines"], "peak_rss_bytes": p.hwm,
                "peak_rss_x_state": round(p.hwm / self.nbytes, 2),
                "peak_rss_above_base_x_state": round((p.hwm - base) / self.nbytes, 2)}
            if not rows:
                continue
            last = rows[-1][1]
            if steady:
                a, b = steady[0][1], steady[-1][1]
                row["loop_lag_max_steady_s"] = b["lag_max"]
                row["ticks_over_100ms_steady"] = (b["ticks"] - b["ticks_le_100ms"]) \
                    - (a["ticks"] - a["ticks_le_100ms"])
            row.update(loop_lag_max_s=last["lag_max"], lag_rises=_lag_rises(rows, t0),
                       checkpoints=last["ckpt_count"], checkpoint_mean_s=last["ckpt_sum"]
                       / last["ckpt_count"] if last["ckpt_count"] else None)
            if p.name == "joiner":
                # From its "joining" line (the interpreter's start-up apart) to
                # its first sync, the last it needed, and its first round.
                start, first_round = log.get("joining", p.launched_wall), log.get("contributed")
                synced = [t - start for t in log["synced"] if t <= (first_round or until)]
                res.setdefault("join", {}).update(
                    process_start_s=start - p.launched_wall,
                    first_sync_s=synced[0] if synced else None,
                    last_sync_s=synced[-1] if synced else None,
                    first_round_s=first_round - start if first_round else None)
        three = [v for n, v in res["peers"].items() if n != "joiner"]
        for key in ("loop_lag_max_s", "peak_rss_x_state", "peak_rss_above_base_x_state",
                    "checkpoint_mean_s"):  # the worst of the three
            res[key] = max((v[key] for v in three if v.get(key) is not None), default=None)
        if "healthy" in res:
            res["healthy"].update(view_changes=len(views), evictions=max(
                drops[0], len({e for e, inside in shrunk if inside})))
        # Start-up and join included (a size that never settled has no
        # window): rounds aborted (distinct ids in the logs), views that lost a member.
        res["whole_run"] = {"rounds_aborted": len(aborted),
                            "push_cuts": sum(v["push_cuts"] for v in res["peers"].values()),
                            "evictions": max(drops[1], len({e for e, _ in shrunk}))}
        res["checkpoint_every_rounds"] = CHECKPOINT_EVERY
        res["log_problems"] = problems[:10]


def run(sizes: list[int], duration: float = 120.0, compute_s: float = 0.5, join: bool = True,
        mem_floor_gib: float = 2.0, ring_repeat: int = 2, logs_dir: str | None = None) -> dict:
    """Every size in turn, smallest first; see the module's docstring."""
    from peerlearn import buildinfo

    floor = int(mem_floor_gib * 2**30)
    out: dict = {"peers": PEERS, "compute_s": compute_s, "duration_s": duration,
                 "revision": buildinfo.revision(), "cores": os.cpu_count(),
                 "mem_total_gib": round(_proc_kib("/proc/meminfo", "MemTotal") / 2**30, 1),
                 "load_avg_at_start": os.getloadavg()[0], "base_rss_bytes": _base_rss(),
                 "state": "one fp32 tensor of bytes/4 elements; a contribution is another",
                 "sizes": {}}
    for nbytes in sorted(sizes):
        label = f"{nbytes / 2**20:g}M"
        res = out["sizes"][label] = {"bytes": nbytes, "numel": nbytes // 4,
                                     "base_rss_bytes": out["base_rss_bytes"]}
        # The ring's 3 processes each hold the tensor and its result, and no
        # guard watches them (the peers' is _MemGuard).
        avail = _proc_kib("/proc/meminfo", "MemAvailable")
        if PEERS * 2 * nbytes + floor > avail:
            res["skipped"] = f"the ring bound alone needs more than MemAvailable {avail} B"
            _say(f"{label}: skipped: {res['skipped']}")
            continue
        size = _Size(nbytes, compute_s, floor, res)
        try:
            size.ring(ring_repeat)
            size.steady(duration)
            if join:
                size.join()
        except Stopped as e:
            res["stopped"] = str(e)
            _say(f"{label}: {e}")
        finally:
            size.close(logs_dir)
    return out
