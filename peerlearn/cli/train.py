"""`peerlearn run --algo NAME` (one peer trains a task) and `peerlearn demo`
(N local peer processes train it together, then a summary)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from peerlearn.cli.addresses import resolve_advertise, split_addr
from peerlearn.cli.credentials import SECRET_ENV
from peerlearn.cli.daemon import announce, lock_data_dir, serve_metrics, start_peer
from peerlearn.cli.local_swarm import interrupt_on_sigterm
from peerlearn.cli.signals import StopOnSignal


def parse_shard(spec: str) -> tuple[int | None, int]:
    """RANK/WORLD, or "auto": (None, 1), a stream of this peer's own."""
    if spec == "auto":
        return None, 1
    try:
        rank, world = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SystemExit(f"--shard wants RANK/WORLD, not {spec!r}") from None
    if not 0 <= rank < world:
        raise SystemExit(f"--shard {spec}: need 0 <= RANK < WORLD")
    return rank, world


def check_schedule(task, steps: int) -> None:
    """The task's learning-rate schedule must accept `steps` (the built-in
    one's warmup needs 2 at least): checked before the peer starts, as a usage
    error naming the fewest steps it takes, instead of a traceback after joining."""
    import torch
    import typer

    if task.schedule is None:
        return

    def refuses(n: int) -> str | None:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        try:
            task.schedule(probe, n)
        except ValueError as e:
            return str(e) or type(e).__name__
        return None

    why = refuses(steps)
    if why is None:
        return
    fewest = next((n for n in range(steps + 1, steps + 10_000) if refuses(n) is None), None)
    need = f"; it takes {fewest} or more" if fewest is not None else ""
    raise typer.BadParameter(f"{steps} is too few for the learning-rate schedule of task "
                             f"{task.name} ({why}){need}", param_hint="--steps")


def run_training(listen: str, join: str | None, data_dir: str, secret: bytes | None, *,
                 algo: str, task_spec: str | None, task_args: dict, hyper, steps: int,
                 shard: str, seed: int, codec: int | None, data_port: int, dead_after: float,
                 aggregate: str = "mean",
                 metrics: str | None, allowlist: list[bytes] | None,
                 join_timeout: float | None, progress_every: int, wait_peers: int = 0,
                 advertise: str | None = None,
                 join_cmd=lambda peer_id, control: "",
                 relay: int | None = None, relay_via: str | None = None,
                 hole_punch: bool = True, swim: bool = False) -> None:
    """One peer trains `task_spec` with `algo` for `steps` inner steps, logging
    progress lines (logger peerlearn.train, INFO) and, at the end, printing
    one JSON report on stdout.
    SIGINT/SIGTERM end the run early (the report still comes)."""
    import torch

    from peerlearn.algorithms import training
    from peerlearn.swarm.actions import Timeouts
    from peerlearn.swarm.api import Peer
    from peerlearn.swarm.config import PeerConfig
    from peerlearn.tasks import TaskError, load

    torch.manual_seed(seed)
    try:
        hyper.check(algo)
    except ValueError as e:
        raise SystemExit(f"peerlearn: {e}") from None
    try:
        task = load(task_spec, **task_args)
    except TaskError as e:
        raise SystemExit(f"peerlearn: {e}") from None
    check_schedule(task, steps)
    rank, world = parse_shard(shard)
    host, port = split_addr(listen)
    cfg = PeerConfig(Path(data_dir), secret, host=host, control_port=port, data_port=data_port,
                     join=join, codec=codec, allowlist=allowlist, join_timeout=join_timeout,
                     timeouts=Timeouts.for_dead_after(dead_after), aggregate=aggregate,
                     advertise=resolve_advertise(listen, advertise, join),
                     relay_port=relay, relay_via=relay_via, hole_punch=hole_punch, swim=swim)
    lock_data_dir(data_dir)
    stop = threading.Event()
    traffic_from = training.traffic_bytes()  # the report counts joining and its sync too
    peer = Peer(cfg, lambda: training.initial_state(algo, task.model, hyper))
    # A run blocked in an outer step (say, its partners left) ends at once:
    # that step is skipped, the report still comes.
    with StopOnSignal(stop, then=(peer.interrupt,)) as on_signal:
        _train_peer(peer, task, algo, hyper, stop, on_signal.signals, join=join, metrics=metrics,
                    join_cmd=join_cmd, steps=steps, rank=rank, world=world, shard=shard,
                    seed=seed, progress_every=progress_every, wait_peers=wait_peers,
                    traffic_from=traffic_from)


def _train_peer(peer, task, algo: str, hyper, stop: threading.Event, signals: list[int], *,
                join: str | None, metrics: str | None, join_cmd, steps: int, rank: int,
                world: int, shard: str, seed: int, progress_every: int, wait_peers: int,
                traffic_from) -> None:
    from peerlearn.algorithms import training
    from peerlearn.swarm.errors import CollectiveTimeout, PeerClosed

    start_peer(peer, stop, join, signals)
    metrics_port, stop_metrics = serve_metrics(peer, metrics)
    announce(peer, {"peer": peer.id, "control": peer.control_address,
                    "data": peer.daemon.info.data, "metrics_port": metrics_port,
                    **({"relay": peer.daemon.relay.address[1]} if peer.daemon.relay else {}),
                    "task": task.name, "fingerprint": task.fingerprint},
             join_cmd(peer.id, peer.control_address))
    log = logging.getLogger("peerlearn.train")

    def show(row: dict) -> None:
        log.info("%s step %d loss %.4f tokens/s %.0f swarm step %d", peer.id[:8], row["step"],
                 row["loss"], row["tokens_per_s"], row["swarm_step"], extra={"fields": row})

    report: dict = {}
    try:
        report = training.train(peer, task, algo, hyper, steps=steps, rank=rank, world=world,
                                seed=seed, progress_every=progress_every, progress=show,
                                stop=stop.is_set, wait_peers=wait_peers,
                                traffic_from=traffic_from)
    except PeerClosed:
        pass
    except CollectiveTimeout:
        if not stop.is_set():
            raise
    finally:
        peer.close()
        if stop_metrics is not None:
            stop_metrics()
    report.update({"peer": peer.id, "shard": shard})
    print(json.dumps(report), flush=True)
    if peer.failure is not None:
        raise SystemExit(f"peerlearn: the peer daemon failed: {peer.failure!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def watch_hint(work: Path, secret: str, control: str, metrics_port: int | None) -> str:
    """How to look at the running demo from another terminal: its secret goes
    to a 0600 file in the demo's own directory (removed with it)."""
    path = work / "secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    hint = f"watch it: peerlearn status {control} --secret-file {path}"
    if metrics_port:
        hint += f"; metrics: http://127.0.0.1:{metrics_port}/metrics"
    return hint


def run_demo(algo: str, peers: int, steps: int, task_spec: str | None, extra: list[str],
             wan: tuple[float, float] | None = None, *, progress: str = "auto",
             log_flags: list[str] | None = None, reference: list[str] | None = None,
             program: Callable[[int], list[str]] | None = None) -> dict:
    """Starts `peers` local `peerlearn run` processes (the first founds, the
    rest join it), each on its own shard, and collects their final reports.
    With `reference` (the run flags it adds), one more process beside them
    trains alone (`--algo local`, the whole corpus, on loopback) for the same
    steps: the single-peer loss the summary compares with.
    With `wan` = (rtt_ms, mbit) each peer runs on its own emulated host
    (peerlearn.netsim: network namespaces, a forwarder adding the delay and
    rate limit), so all their traffic crosses that path. Their log lines and
    progress are shown by peerlearn.cli.output (prefixed lines, or a live
    table); their data directory is removed at the end, Ctrl-C included.
    program(i): the command that runs peer i's `run` (default: this Python's
    `-m peerlearn.cli.app`); cmd/byzantine_experiment.py swaps in an attacker."""
    from peerlearn.cli import output

    mode = output.choose(progress)
    interrupt_on_sigterm()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault(SECRET_ENV, secrets.token_urlsafe(32))
    metrics_at = "off" if wan is not None else "127.0.0.1:0"  # namespaces: not reachable here
    # One thread a peer: N peers on a few cores would oversubscribe them.
    env.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="peerlearn-demo-"))
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    reports: dict[int, dict] = {}
    started = time.monotonic()
    names = [f"p{i}" for i in range(peers)] + (["ref"] if reference is not None else [])
    board = output.Board(mode, names)
    with contextlib.ExitStack() as stack:
        stack.callback(board.close)
        if wan is not None:
            from peerlearn.netsim import WanEmulator

            emu = stack.enter_context(WanEmulator(n_hosts=max(peers, 2), rtt_ms=wan[0],
                                                  rate_mbit=wan[1]))
            addrs = [(h.addr, 7400, 7401) for h in emu.hosts]
            launch = emu.popen
        else:
            addrs = [("127.0.0.1", _free_port(), 0) for _ in range(peers)]
            launch = lambda _i, argv, **kw: subprocess.Popen(argv, **kw)  # noqa: E731
        try:
            founder = None
            for i, name in enumerate(names):
                common = ["--data-dir", str(work / name), "--steps", str(steps),
                          *(log_flags or []), "--log-format", "json",
                          *(["--task", task_spec] if task_spec else [])]
                if name == "ref":  # a swarm of one, never in the emulator
                    argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "local",
                            "--listen", f"127.0.0.1:{_free_port()}", "--shard", "0/1",
                            "--metrics", "off", *common, *reference]
                    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
                else:
                    host, port, data_port = addrs[i]
                    prog = program(i) if program else [sys.executable, "-m", "peerlearn.cli.app"]
                    argv = [*prog, "run", "--algo", algo,
                            "--listen", f"{host}:{port}", "--data-port", str(data_port),
                            "--shard", f"{i}/{peers}", "--metrics", metrics_at,
                            "--wait-peers", str(peers), *common, *extra]
                    if founder:
                        argv += ["--join", founder]
                    p = launch(i, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
                procs.append(p)
                # A swarm of one runs no rounds: its stall warnings say nothing.
                quiet = (lambda line: "no round applied" in line) if name == "ref" else None
                t = threading.Thread(target=output.pump, args=(p.stderr, name, board, quiet),
                                     name=f"demo-log-{i}")
                t.start()
                threads.append(t)
                hello = p.stdout.readline()
                if not hello:
                    raise SystemExit(f"peerlearn demo: {name} did not start")
                if founder is None and name != "ref":
                    founder = json.loads(hello)["control"]
                    board.line("demo", watch_hint(work, env[SECRET_ENV], founder,
                                                  json.loads(hello).get("metrics_port")))

                def collect(i=i, p=p):
                    for line in p.stdout:
                        if line.startswith("{"):
                            reports[i] = json.loads(line)
                t = threading.Thread(target=collect, name=f"demo-peer-{i}")
                t.start()
                threads.append(t)
            for p in procs:
                p.wait()
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for t in threads:
                t.join()
            shutil.rmtree(work, ignore_errors=True)
    rows = [reports.get(i, {"error": f"peer {i} exited {procs[i].returncode}"})
            for i in range(min(peers, len(procs)))]
    ok = [r for r in rows if "val_loss" in r]
    summary = {
        "algo": algo, "peers": peers, "steps": steps,
        "wall_s": round(time.monotonic() - started, 1),
        "path": "loopback" if wan is None else f"emulated WAN, {wan[0]:g} ms RTT, "
                                                f"{wan[1]:g} Mbit/s per host",
        "val_loss": max((r["val_loss"] for r in ok), default=None),
        "val_loss_per_peer": [r.get("val_loss") for r in rows],
        "tokens": sum(r["tokens"] for r in ok),
        # Each peer's bytes by kind, then the total: what it moved from its
        # start, joining, state syncs and control messages included.
        "bytes_sent_collective_per_peer": [r.get("bytes_sent_collective") for r in rows],
        "bytes_sent_state_per_peer": [r.get("bytes_sent_state") for r in rows],
        "bytes_sent_control_per_peer": [r.get("bytes_sent_control") for r in rows],
        "bytes_sent_per_peer": [r.get("bytes_sent") for r in rows],
        "bytes_received_collective_per_peer": [r.get("bytes_received_collective") for r in rows],
        "bytes_received_state_per_peer": [r.get("bytes_received_state") for r in rows],
        "bytes_received_control_per_peer": [r.get("bytes_received_control") for r in rows],
        "bytes_received_per_peer": [r.get("bytes_received") for r in rows],
        "compute_utilisation_per_peer": [r.get("compute_utilisation") for r in rows],
        "outer_overhead_s_per_peer": [r.get("outer_overhead_s") for r in rows],
        "loop_lag_max_s_per_peer": [r.get("loop_lag_max_s") for r in rows],
        "peers_report": rows,
    }
    if reference is not None:
        ref = reports.get(peers, {})
        single = ref.get("val_loss")
        summary["single_peer_val_loss"] = single
        summary["vs_single_peer"] = (summary["val_loss"] / single - 1
                                     if single and summary["val_loss"] is not None else None)
        summary["single_peer_report"] = ref or {"error": "the reference did not finish"}
    return summary
