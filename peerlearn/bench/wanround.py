"""`peerlearn bench wanround`: where a small round's time goes over an emulated WAN (issue 18).

4 peers, each on its own emulated host (peerlearn.netsim: 100 ms RTT, 100
Mbit/s per host by default), run the synthetic workload (`peerlearn run
--algo synthetic --numel 262144 --compute-s 0`: a 1 MiB fp32 state) under
the daemon exactly as shipped. The peer processes are wanround_host.py's
`peer` role: it installs timestamping hooks and then runs the same
`peerlearn run` command line; nothing in the daemon's code paths changes
except that every peer's contribution is handed over at the next multiple
of `slot_s` on the machine's monotonic clock (one clock for every namespace),
so all peers submit at the same instant and the links idle between rounds
as they do while a real swarm computes.

End to end, per round: from the first peer handing its contribution to the
daemon (`Peer.all_reduce`; with slots all of them within a millisecond or
two) to the last participant having applied the result (`apply` done, new
state hashed: what `all_reduce` waits for). Only rounds that all peers took
part in and applied count; the window starts after the first such round.

The hooks and the events they write: wanround_host.py. How a round splits
into stages (adding up to its end-to-end time), and the summaries:
wanround_analysis.py; this module sets up the emulated hosts, starts the
processes and collects what they measured.

In the same invocation, over the same emulated hosts: the RTT probe (UDP
ping-pong, `netsim.measure.rtt`) and the bare ring all-reduce of the same
tensor among the same hosts over already-open links with the daemon's
connections and lanes (no daemon, no control plane): back to back after a
barrier (`warm`), and started at slot boundaries after the same idle as
the daemons' rounds (`after_idle`). Ratios are against both.

EXPERIMENT options, each reported under its own label: `no_slow_start_after_idle`
measures a further window of rounds after `net.ipv4.tcp_slow_start_after_idle=0`
was set in every host's namespace (the same peers, the same links; set back
to 1 after it); `nodelay` a window with TCP_NODELAY set on the round's data
connections (a file per peer is the switch; the bare ring is then timed
with it too, `*_nodelay`: the links leave Nagle's algorithm on); `cc`
sets the congestion control of every data connection (TCP_CONGESTION on
the connecting, sending side; the namespaces inherit the machine's
default, bbr here, and a namespace cannot change its default); `mtu` is
the emulator's (65000 by default, where TCP's windows count 64 KB
segments; 1500 is a real path's).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peerlearn.bench.wanround_analysis import STAGES  # noqa: F401 - tests import it from here
from peerlearn.bench.wanround_analysis import (
    complete_rounds,
    read_events,
    ring_runs,
    round_stages,
    summarise,
)

CONTROL_PORT, DATA_PORT, RING_PORT = 7400, 7401, 29631


def _netns_sysctl(emu, key: str, value: str) -> None:
    for h in emu.hosts:
        subprocess.run(["ip", "netns", "exec", h.netns, "sysctl", "-q", "-w", f"{key}={value}"],
                       check=True, capture_output=True)


def _ring_baseline(emu, numel: int, repeat: int, slot_s: float, cc: str | None, env: dict,
                   work: Path, rtt_s: float, nodelay: bool) -> dict:
    n = len(emu.hosts)
    addrs = ",".join(f"{h.addr}:{RING_PORT}" for h in emu.hosts)
    procs, files = [], [work / f"ring{r}.events" for r in range(n)]
    try:
        for r in range(n):
            argv = [sys.executable, "-m", "peerlearn.bench.wanround_host", "--role", "ring",
                    "--rank", str(r), "--addrs", addrs, "--numel", str(numel),
                    "--repeat", str(repeat), "--slot-s", str(slot_s), "--events", str(files[r]),
                    *(["--cc", cc] if cc else []), *(["--nodelay"] if nodelay else [])]
            with open(work / f"ring{r}.log", "w") as err:
                procs.append(emu.popen(r, argv, env=env, stdout=subprocess.PIPE, stderr=err,
                                       text=True))
        res = []
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=300 + repeat * 4 * (slot_s + 5))
            if p.returncode != 0:
                tail = (work / f"ring{r}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"ring peer {r} failed with exit code {p.returncode}: {tail}")
            res.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return ring_runs([read_events(f) for f in files], res, repeat, rtt_s)


class _Swarm:
    """4 `peerlearn run --algo synthetic` peers with hooks, one per host."""

    def __init__(self, emu, numel: int, slot_s: float, cc: str | None, env: dict, work: Path):
        self.emu, self.work, self.n = emu, work, len(emu.hosts)
        self.files = [work / f"p{i}.events" for i in range(self.n)]
        self.logs = [work / f"p{i}.log" for i in range(self.n)]
        self.procs = []
        founder = f"{emu.hosts[0].addr}:{CONTROL_PORT}"
        for i, h in enumerate(emu.hosts):
            argv = [sys.executable, "-m", "peerlearn.bench.wanround_host", "--role", "peer",
                    "--events", str(self.files[i]), "--slot-s", str(slot_s),
                    *(["--cc", cc] if cc else []), "--",
                    "run", "--algo", "synthetic", "--numel", str(numel), "--compute-s", "0",
                    "--listen", f"{h.addr}:{CONTROL_PORT}", "--data-port", str(DATA_PORT),
                    "--data-dir", str(work / f"p{i}"), "--metrics", "off",
                    "--log-format", "json", "--log-level", "debug",
                    *(["--join", founder] if i else [])]
            with open(self.logs[i], "w") as err, open(work / f"p{i}.out", "w") as out:
                self.procs.append(emu.popen(i, argv, env=env, stdout=out, stderr=err))
            if i == 0:
                time.sleep(1.0)  # the founder first; joiners retry anyway

    def events(self) -> list[list[dict]]:
        return [read_events(f) for f in self.files]

    def wait_rounds(self, after: int, count: int, timeout: float) -> list[int]:
        """Until `count` complete rounds with an id above `after`; returns their ids."""
        deadline = time.monotonic() + timeout
        while True:
            done = [r for r in complete_rounds(self.events(), self.n) if r > after]
            if len(done) >= count:
                return done[:count]
            if dead := [i for i, p in enumerate(self.procs) if p.poll() is not None]:
                raise RuntimeError(f"peer(s) {dead} exited (logs in {self.work})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(done)} of {count} complete rounds in {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def problems(self) -> list[str]:
        out = []
        for i, path in enumerate(self.logs):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("level") in ("warning", "error"):
                    out.append(f"p{i} {rec['level']}: {rec.get('message', '')[:160]}")
        return out


def run(peers: int = 4, numel: int = 262_144, wan: tuple[float, float] = (100.0, 100.0),
        rounds: int = 20, slot_s: float = 2.0, baseline_repeat: int = 10,
        no_slow_start_after_idle: bool = False, nodelay: bool = False, cc: str | None = None,
        mtu: int = 65000, logs_dir: str | None = None, settle_timeout: float = 240.0) -> dict:
    """See the module's docstring."""
    from peerlearn import buildinfo
    from peerlearn.netsim import WanEmulator, measure

    if rounds < 1 or peers < 2 or numel < peers:
        raise ValueError("need rounds >= 1, peers >= 2 and numel >= peers")
    rtt_ms, rate = wan
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PEERLEARN_SECRET=secrets.token_urlsafe(32))
    work = Path(tempfile.mkdtemp(prefix="peerlearn-wanround-"))
    res: dict = {
        "peers": peers, "numel": numel, "bytes": numel * 4, "revision": buildinfo.revision(),
        "path": f"emulated WAN, {rtt_ms:g} ms RTT, {rate:g} Mbit/s per host, MTU {mtu}",
        "slot_s": slot_s, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0],
        "end_to_end": "from the first peer handing its contribution to the daemon to the last "
                      "participant having applied the result; with slot_s > 0 every peer hands "
                      "it over at the same slot boundary",
        "experiment": {"cc": cc, "mtu": mtu, "no_slow_start_after_idle": no_slow_start_after_idle,
                       "nodelay": nodelay}}
    swarm = None
    try:
        with WanEmulator(n_hosts=peers, rtt_ms=rtt_ms, rate_mbit=rate, mtu=mtu) as emu:
            res["host_sysctls"] = emu.sysctls(0)
            probes = [measure.rtt(emu, 0, j, count=20) for j in range(1, peers)]
            rtt_s = statistics.median(s for p in probes for s in p["samples_ms"]) / 1e3
            res["rtt_probe_ms"] = {"median": rtt_s * 1e3,
                                   "min": min(p["min_ms"] for p in probes),
                                   "max": max(p["max_ms"] for p in probes)}
            res["ring_lower_bound_s"] = 2 * (peers - 1) / peers * numel * 4 * 8 / (rate * 1e6) \
                + 2 * (peers - 1) * rtt_s / 2 if rate else None
            base = _ring_baseline(emu, numel, baseline_repeat, slot_s, cc, env, work, rtt_s,
                                  nodelay)
            res["baseline_ring"] = base
            # one lane a connection: a ring step moves a segment's lane share on each
            res["bytes_per_connection_per_ring_step"] = numel * 4 // (peers * base["lanes"])
            swarm = _Swarm(emu, numel, slot_s, cc, env, work)
            settle = swarm.wait_rounds(0, 1, settle_timeout)
            res["settled_on_round"] = settle[0]
            budget = rounds * (max(slot_s, 1.0) + 5) + 60
            windows = {"default": swarm.wait_rounds(settle[0], rounds, budget)}
            experiments = []  # (label, switch on, switch off): one change from default each
            if no_slow_start_after_idle:
                key = "net.ipv4.tcp_slow_start_after_idle"
                experiments.append(("experiment_no_slow_start_after_idle",
                                    lambda: _netns_sysctl(emu, key, "0"),
                                    lambda: _netns_sysctl(emu, key, "1")))
            if nodelay:
                flags = [Path(str(f) + ".nodelay") for f in swarm.files]
                experiments.append(("experiment_tcp_nodelay",
                                    lambda: [f.touch() for f in flags],
                                    lambda: [f.unlink() for f in flags]))
            for label, on, off in experiments:
                on()
                since = max(e["rid"] for evs in swarm.events() for e in evs
                            if e["k"] == "coll_start")
                res[f"{label}_from_round"] = since + 2  # the round in flight may straddle it
                windows[label] = swarm.wait_rounds(since + 1, rounds, budget)
                off()
            swarm.stop()
            res["emulator"] = {k: v for k, v in emu.stats().items() if k != "per_host"}
            events = swarm.events()
            short = {e["id"][:8]: i for i, evs in enumerate(events) for e in evs
                     if e["k"] == "hello"}
            for name, ids in windows.items():
                rows = [x for x in (round_stages(events, short, rid) for rid in ids)
                        if x is not None]
                ring = {k: base[k] for k in ("warm", "after_idle")}
                if name == "experiment_tcp_nodelay":
                    ring = {k: base[f"{k}_nodelay"] for k in ring}
                res[name] = summarise(rows, rtt_s, ring, events, peers, ids)
                res[name]["rounds_unparsed"] = len(ids) - len(rows)
            res["log_problems"] = swarm.problems()[:10]
            res["peer_exit_codes"] = [p.returncode for p in swarm.procs]
    finally:
        if swarm is not None:
            swarm.stop()
        if logs_dir:
            dest = Path(logs_dir)
            dest.mkdir(parents=True, exist_ok=True)
            for f in work.glob("*.events"):
                shutil.copy(f, dest / f.name)
            for f in work.glob("*.log"):
                shutil.copy(f, dest / f.name)
        shutil.rmtree(work, ignore_errors=True)
    return res
