"""One peer process as `peerlearn run` starts it: its data directory taken,
the swarm joined (or a refusal or signal reported in one line), the join
command announced, metrics served, and the synthetic workload's loop
(cli.train runs a real task's). The rest of the command line's helpers:
credentials.py, addresses.py, status_query.py, local_swarm.py."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import signal
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from peerlearn.cli.addresses import loopback, resolve_advertise, split_addr
from peerlearn.cli.credentials import SECRET_ENV
from peerlearn.cli.signals import StopOnSignal

# Moved out of this module, still imported from it (tests, bench/statesize.py).
from peerlearn.cli.addresses import local_address_towards  # noqa: F401
from peerlearn.cli.credentials import read_allowlist, read_credentials, read_secret  # noqa: F401
from peerlearn.cli.credentials import write_secret_file  # noqa: F401
from peerlearn.cli.status_query import query_status  # noqa: F401

LOCK_FILE = "peer.lock"
_held_locks: list[int] = []  # descriptors whose flock lasts as long as the process


def lock_data_dir(data_dir: str | Path) -> None:
    """Takes `data_dir` for this process: two peers on one directory would share
    an identity (and checkpoints), and the swarm would see one peer twice. The
    second exits at once with one line; the lock (flock on data_dir/peer.lock,
    holding the pid) goes with the process, a crash included."""
    path = Path(data_dir)
    try:
        existed = path.is_dir()
        # It holds the identity key and the model: others have no business in it.
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if existed:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o022:
                logging.getLogger("peerlearn.run").warning(
                    "the data dir %s is writable by other users (mode %04o): they could "
                    "replace its identity or checkpoints; chmod 700 %s", path, mode,
                    shlex.quote(str(path)))
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except (FileExistsError, NotADirectoryError):
        raise SystemExit(f"peerlearn: cannot use --data-dir {data_dir}: it exists and is not "
                         "a directory") from None
    except OSError as e:
        raise SystemExit(f"peerlearn: cannot use --data-dir {data_dir}: "
                         f"{e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SystemExit(f"peerlearn: cannot lock --data-dir {data_dir}: "
                             f"{e.strerror or e}") from None
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise SystemExit(f"peerlearn: another peer{pid} is running with --data-dir {data_dir}: "
                         "each peer needs its own data directory (its identity and "
                         "checkpoints live there)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks.append(fd)


class JoinWatch:
    """What Peer.start waits on besides the swarm (its `cancel`): a signal's
    stop event, or the join target refusing every control handshake (a wrong
    secret), which then `refused` says in words. Read from the caller's thread:
    the control plane's `refused` is plain reads."""

    def __init__(self, stop: threading.Event, peer, join: str | None):
        from peerlearn.transport.control import split_target

        self.stop, self.peer = stop, peer
        self.target = split_target(join) if join else None
        self.refused: str | None = None

    def is_set(self) -> bool:
        if self.stop.is_set():
            return True
        daemon = self.peer.daemon
        if self.target is not None and daemon is not None and self.refused is None:
            self.refused = daemon.plane.refused(self.target[1], to=self.target[0])
        return self.refused is not None


def start_peer(peer, stop: threading.Event, join: str | None, signals: list[int]) -> None:
    """peer.start(), ending the process with one line where it cannot: the
    join target refused our handshakes (exit 1), a signal came first (see
    stopped_while_joining), the peer could not start or join in time (exit 1)."""
    from peerlearn.swarm.errors import PeerClosed, PeerStartError

    watch = JoinWatch(stop, peer, join)
    if join:
        limit = peer.cfg.join_timeout
        logging.getLogger("peerlearn.run").info(
            "joining the swarm at %s%s", join, f" (giving up after {limit:g} s)" if limit else "")
    try:
        peer.start(cancel=watch)
    except (PeerClosed, PeerStartError) as e:
        if watch.refused is not None:
            raise SystemExit(f"peerlearn: {join} {watch.refused}") from None
        if signals or isinstance(e, PeerClosed):
            stopped_while_joining(join, signals)  # nothing to leave
        raise SystemExit(f"peerlearn: {e}") from None


def stopped_while_joining(join: str | None, signals: list[int]) -> None:
    """A signal that arrived before any member let us in: one line, and exit
    130 for Ctrl-C (the shell's convention); 0 for SIGTERM (a supervisor
    stopping the peer is no failure)."""
    sig = signals[0] if signals else signal.SIGINT
    what = f"joining the swarm at {join}" if join else "starting"
    if sig == signal.SIGINT:
        print(f"peerlearn: interrupted while {what}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT)
    print(f"peerlearn: stopped while {what}", file=sys.stderr, flush=True)
    raise SystemExit(0)


def join_command(peer_id: str, control: str, *, secret_swarm: bool, secret_file: str | None,
                 allowlist_file: str | None, settings: list[str]) -> str:
    """The command that joins this peer's swarm: the same credentials and the
    settings every peer must share. The secret itself is never printed (logs
    are read by more people than the swarm's members). A peer advertised on a
    loopback address can only be joined from its own machine: then the
    command is one that runs beside it (its own port, data and metrics)."""
    target = control if secret_swarm else f"{peer_id}@{control}"
    here = ["--listen", "127.0.0.1:0", "--data-dir", "./peerlearn-data-2",
            "--metrics", "127.0.0.1:0"] if loopback(control) else ["--listen", "0.0.0.0:7400"]
    argv = ["peerlearn", "run", "--join", target, *here, *settings]
    if secret_swarm and secret_file:
        argv += ["--secret-file", secret_file]
    if allowlist_file:
        argv += ["--allowlist", allowlist_file]
    prefix = f"{SECRET_ENV}=<this swarm's secret> " if secret_swarm and not secret_file else ""
    return prefix + shlex.join(argv)


def announce(peer, hello: dict, join_cmd: str) -> None:
    """The first stdout line (JSON: addresses taken, for scripts) and, on the
    log, how another machine joins, or, for a peer advertised on loopback,
    that only this machine can and how to open it to others."""
    hello = {**hello, "join_command": join_cmd}
    print(json.dumps(hello), flush=True)
    control = peer.control_address
    if loopback(control):
        port = control.rpartition(":")[2]
        how = (f"serving at {control}, which only this machine can reach (to let other "
               f"machines join: --listen 0.0.0.0:{port} --advertise THIS_MACHINES_ADDRESS); "
               "to join from this machine:")
    else:
        how = f"serving at {control}; to join from another machine:"
    logging.getLogger("peerlearn.run").info(
        "%s %s %s", peer.id[:8], how, join_cmd, extra={"fields": {"join_command": join_cmd}})


def serve_metrics(peer, metrics: str | None) -> tuple[int | None, object]:
    """Serves `peer`'s metrics on `metrics` (HOST:PORT; None: off). A bind
    failure (port in use, address not here) leaves the swarm cleanly, the
    checkpoint written, and ends the process with one line."""
    from peerlearn.cli import metrics as prom

    if not metrics:
        return None, None
    mhost, mport = split_addr(metrics)
    try:
        return prom.serve(peer.daemon, mhost, mport)
    except OSError as e:
        peer.close()
        hint = " (another peer on this host? give each its own --metrics port, or off)" \
            if e.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"peerlearn: cannot serve metrics on {metrics}: "
                         f"{e.strerror or e}{hint}") from None


def run_peer(listen: str, join: str | None, data_dir: str, secret: bytes | None, *, numel: int,
             compute_s: float, codec: int | None, data_port: int, dead_after: float,
             aggregate: str = "mean", metrics: str | None = "127.0.0.1:0",
             allowlist: list[bytes] | None = None,
             join_timeout: float | None = 60.0, advertise: str | None = None,
             join_cmd: Callable[[str, str], str] = lambda i, c: "",
             relay: int | None = None, relay_via: str | None = None,
             hole_punch: bool = True, swim: bool = False) -> None:
    """One peer running the built-in synthetic task through the Python API,
    exactly as a training loop would: wait for the swarm's state, contribute,
    let the round apply the mean, repeat. SIGINT/SIGTERM leave gracefully at
    any moment, joining included. A join that times out, or a daemon that dies
    (after writing its checkpoint), exits 1 with one line on stderr."""
    from peerlearn.swarm.api import Peer
    from peerlearn.swarm.config import PeerConfig
    from peerlearn.swarm.rounds import Timeouts
    from peerlearn.swarm.synthetic import SyntheticWorkload

    host, port = split_addr(listen)
    cfg = PeerConfig(Path(data_dir), secret, host=host, control_port=port, data_port=data_port,
                     join=join, codec=codec, allowlist=allowlist, join_timeout=join_timeout,
                     timeouts=Timeouts.for_dead_after(dead_after), aggregate=aggregate,
                     advertise=resolve_advertise(listen, advertise, join),
                     relay_port=relay, relay_via=relay_via, hole_punch=hole_punch, swim=swim)
    work = SyntheticWorkload(numel=numel, compute_s=compute_s)
    lock_data_dir(data_dir)
    stop = threading.Event()
    with StopOnSignal(stop) as on_signal:
        _run_synthetic(Peer(cfg, work.initial_state), work, stop, on_signal.signals, join,
                       metrics, join_cmd)


def _run_synthetic(peer, work, stop: threading.Event, signals: list[int], join: str | None,
                   metrics: str | None, join_cmd: Callable[[str, str], str]) -> None:
    from peerlearn.swarm.errors import PeerClosed, StateReplaced

    start_peer(peer, stop, join, signals)
    metrics_port, stop_metrics = serve_metrics(peer, metrics)
    announce(peer, {"peer": peer.id, "control": peer.control_address,
                    "data": peer.daemon.info.data, "metrics_port": metrics_port,
                    **({"relay": peer.daemon.relay.address[1]} if peer.daemon.relay else {})},
             join_cmd(peer.id, peer.control_address))
    log = logging.getLogger("peerlearn.synthetic")

    def train() -> None:
        fresh = False  # after a sync, contribute at once (as prime does), not after compute
        while not stop.is_set():
            try:
                step = peer.sync_state()
                if not fresh and stop.wait(work.compute_s):
                    return
                peer.all_reduce(work.local_update(peer.id, step), apply=work.apply, donate=True)
                log.info("contributed to step %d", step + 1, extra={"fields": {"step": step + 1}})
                fresh = False
            except StateReplaced:
                fresh = True
            except PeerClosed:
                return

    trainer = threading.Thread(target=train, name="synthetic-task", daemon=True)
    trainer.start()
    try:
        while not stop.wait(0.2) and trainer.is_alive():
            pass
    finally:
        stop.set()
        peer.close()
        trainer.join(10)
        if stop_metrics is not None:
            stop_metrics()
    if peer.failure is not None:
        raise SystemExit(f"peerlearn: the peer daemon failed: {peer.failure!r} "
                         "(its checkpoint was written)")
