"""`peerlearn run`, `peerlearn swarm` and `peerlearn status`: thin launchers."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

SECRET_ENV = "PEERLEARN_SECRET"
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


def read_secret(secret_file: str | None) -> bytes:
    """The swarm secret from a file (surrounding whitespace stripped), else from
    $PEERLEARN_SECRET. A missing, unreadable or weak secret exits with one line
    saying why (the rule: peerlearn.transport.swarm_secret)."""
    from peerlearn.transport.swarm_secret import WeakSecretError, check_secret

    if secret_file:
        try:
            check_secret_file_mode(secret_file)
            secret = Path(secret_file).read_bytes().strip()
        except OSError as e:
            raise SystemExit(f"cannot read the secret file {secret_file}: {e.strerror}") from None
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if not secret:
        raise SystemExit(f"a swarm secret is needed: --secret-file or ${SECRET_ENV} "
                         "(make one with `peerlearn secret new`)")
    try:
        return check_secret(secret)
    except WeakSecretError as e:
        raise SystemExit(f"refusing a weak secret: {e}") from None


def check_secret_file_mode(secret_file: str) -> None:
    """Refuses, in one line, a secret file other users can read or write, as
    ssh refuses such a private key: whoever reads it is a member. A file owned
    by root may also be group-readable when we are not root (a Kubernetes
    Secret volume with fsGroup is root:fsGroup 0440; PostgreSQL's rule for its
    key files). Anything but a regular file (a pipe from <(...)) is not judged."""
    st = os.stat(secret_file)
    if not stat.S_ISREG(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    allowed = 0o040 if st.st_uid == 0 and os.getuid() != 0 else 0
    if mode & 0o077 & ~allowed:
        who = "other users" if mode & 0o007 else "its group"
        raise SystemExit(f"peerlearn: the secret file {secret_file} can be read or written by "
                         f"{who} (mode {mode:04o}), and whoever reads it is a member of the "
                         f"swarm: chmod 600 {shlex.quote(secret_file)}")


def read_credentials(secret_file: str | None,
                     allowlist_file: str | None) -> tuple[bytes | None, list[bytes] | None]:
    """(secret, allowlist): an allowlist file alone means an allowlist swarm (no
    secret); otherwise the secret is required (file, else $PEERLEARN_SECRET)."""
    keys = read_allowlist(allowlist_file) if allowlist_file else None
    if keys and not secret_file and not os.environ.get(SECRET_ENV):
        return None, keys
    return read_secret(secret_file), keys


def read_allowlist(path: str) -> list[bytes]:
    """Ed25519 public keys, hex, one per line ('#' starts a comment)."""
    keys = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise SystemExit(f"{path}:{n}: expected a 64-hex-digit Ed25519 public key")
        keys.append(key)
    if not keys:
        raise SystemExit(f"{path}: the allowlist is empty")
    return keys


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise SystemExit(f"peerlearn: expected HOST:PORT with a port of 0..65535, got {addr!r}")
    return host, int(port)


def resolve_advertise(listen: str, advertise: str | None, join: str | None) -> str | None:
    """What the other peers are told to reach us at (PeerConfig.advertise).
    --advertise if given; else, when --listen binds every interface, the
    address the route to the --join target leaves from; else None (the
    listen address). An unspecified address to advertise exits with one line."""
    from peerlearn.swarm.config import split_host_port, unspecified
    from peerlearn.transport.control import split_target
    from peerlearn.wire.control import DIAL_BACK

    host, _ = split_addr(listen)
    if advertise == DIAL_BACK:  # reached only over the connections it opens
        if join is None:
            raise SystemExit("peerlearn: --advertise dial-back needs --join: a peer nobody "
                             "can reach cannot found a swarm")
        return advertise
    if advertise:
        try:
            ahost, aport = split_host_port(advertise)
        except ValueError:
            aport = -1
        if aport is not None and not 0 < aport <= 65535:
            raise SystemExit(f"peerlearn: --advertise wants HOST or HOST:PORT with a port of "
                             f"1..65535, got {advertise!r}")
        if unspecified(ahost):
            raise SystemExit(f"peerlearn: --advertise {advertise} names no machine: give the "
                             "address the other peers reach this one at")
        return advertise
    if not unspecified(host):
        return None
    if join is None:
        raise SystemExit(f"peerlearn: --listen {listen} binds every interface but names none to "
                         "the other peers: add --advertise HOST[:PORT] (the address they reach)")
    jhost, jport = split_addr(split_target(join)[1])
    try:
        return local_address_towards(jhost, jport)
    except OSError as e:
        raise SystemExit(f"peerlearn: no route to --join {join}: {e.strerror or e}") from None


def loopback(control: str) -> bool:
    """Whether HOST:PORT names this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    from peerlearn.swarm.config import split_host_port

    host = split_host_port(control)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
             hole_punch: bool = True) -> None:
    """One peer running the built-in synthetic task through the Python API,
    exactly as a training loop would: wait for the swarm's state, contribute,
    let the round apply the mean, repeat. SIGINT/SIGTERM leave gracefully at
    any moment, joining included. A join that times out, or a daemon that dies
    (after writing its checkpoint), exits 1 with one line on stderr."""
    from peerlearn.swarm.api import Peer
    from peerlearn.swarm.errors import PeerClosed, StateReplaced
    from peerlearn.swarm.config import PeerConfig
    from peerlearn.swarm.rounds import Timeouts
    from peerlearn.swarm.synthetic import SyntheticWorkload

    host, port = split_addr(listen)
    cfg = PeerConfig(Path(data_dir), secret, host=host, control_port=port, data_port=data_port,
                     join=join, codec=codec, allowlist=allowlist, join_timeout=join_timeout,
                     timeouts=Timeouts.for_dead_after(dead_after), aggregate=aggregate,
                     advertise=resolve_advertise(listen, advertise, join),
                     relay_port=relay, relay_via=relay_via, hole_punch=hole_punch)
    work = SyntheticWorkload(numel=numel, compute_s=compute_s)
    lock_data_dir(data_dir)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    peer = Peer(cfg, work.initial_state)
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


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine that the route to host:port leaves from:
    what a peer there can reach us at. (A UDP connect sends nothing.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host.strip("[]"), port))
        addr = s.getsockname()[0]
    # Bracketed, so "HOST:PORT" built from it stays one address (PeerConfig.advertised).
    return f"[{addr}]" if ":" in addr else addr


def query_status(target: str, secret: bytes | None, timeout: float = 5.0, *,
                 data_dir: str | None = None, allowlist: list[bytes] | None = None) -> list[dict]:
    """The target's status rows. A secret swarm answers anyone holding the
    secret (a throwaway identity asks); an allowlist swarm only an identity on
    its allowlist: pass the data_dir holding one (read, never created)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peerlearn.state.identity import KEY_FILE, Identity
    from peerlearn.transport.control import ControlPlane
    from peerlearn.wire import control as m

    if secret:
        identity = Identity(Ed25519PrivateKey.generate())
    elif data_dir is None or not (Path(data_dir) / KEY_FILE).exists():
        raise SystemExit("an allowlist swarm answers only a listed identity: "
                         "give --data-dir of a peer on the allowlist")
    else:
        identity = Identity.load_or_create(data_dir)

    from peerlearn.transport.control import split_target

    peer, target = split_target(target)
    if not secret and peer is None:
        raise SystemExit("an allowlist swarm is queried as PEER_ID@HOST:PORT")
    host, port = split_addr(target)
    # The answer comes to reply_to: it must be an address the target can reach.
    here = local_address_towards(host, port)

    async def ask() -> list[dict]:
        plane = ControlPlane(identity, here, 0, secret=secret, allowlist=allowlist)
        try:
            plane.send(target, m.StatusRequest(f"{here}:{plane.port}"), to=peer)
            while True:
                _, msg = await asyncio.wait_for(plane.recv(), timeout)
                if isinstance(msg, m.StatusReply):
                    break
        finally:
            plane.close()
        keys = ("id", "control", "data", "role", "step", "state_hash", "alive")
        return [dict(zip(keys, (*row[:5], row[5].hex(), row[6]))) for row in msg.peers]

    try:
        return asyncio.run(ask())
    except TimeoutError:
        raise SystemExit(f"no status answer from {target} within {timeout} s") from None


def write_secret_file(path: Path, secret: str) -> Path:
    """A new file holding secret, mode 0600 from its creation (never readable
    by others, not even for a moment); an existing file is never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a launcher as Ctrl-C does: its `finally` stops the
    children and removes its temporary directory."""
    def handler(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def run_swarm(n: int, duration: float | None, base_port: int, numel: int, compute_s: float,
              codec: str, *, progress: str = "auto", log_flags: list[str] | None = None) -> None:
    """Starts n peers on loopback (the first founds, the rest join it) and
    shows their rounds (peerlearn.cli.output); stops them and removes their
    data directory at the end, after --duration or at Ctrl-C / SIGTERM."""
    from peerlearn.cli import output

    mode = output.choose(progress)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    interrupt_on_sigterm()
    work = tempfile.mkdtemp(prefix="peerlearn-swarm-")  # 0700
    # The secret is never printed (terminals and logs are read by more people
    # than the swarm's members): a throwaway swarm's own goes to a 0600 file
    # in its directory, removed with it; one from the environment stays there.
    secret_args: list[str] = []
    if os.environ.get(SECRET_ENV):
        secret, own = os.environ[SECRET_ENV], f"${SECRET_ENV} as here"
    else:
        secret = secrets.token_urlsafe(32)
        path = write_secret_file(Path(work) / "secret", secret)
        own, secret_args = f"--secret-file {path}", ["--secret-file", str(path)]
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    founder = f"127.0.0.1:{base_port}"
    board = output.Board(mode, [f"peer{i}" for i in range(n)])
    try:
        board.line("swarm", f"{n} peers on 127.0.0.1:{base_port}..{base_port + n - 1}, data in "
                            f"{work} (removed at the end); `peerlearn status {founder}` with "
                            f"{own}")
        for i in range(n):
            # Metrics off: n peers on one host cannot share the default port.
            argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                    "--listen", f"127.0.0.1:{base_port + i}", "--data-dir", f"{work}/peer{i}",
                    "--numel", str(numel), "--compute-s", str(compute_s), "--codec", codec,
                    "--metrics", "off", *secret_args, *(log_flags or []), "--log-format",
                    "json"]
            if i:
                argv += ["--join", founder]
            p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            procs.append(p)
            t = threading.Thread(target=output.pump, args=(p.stdout, f"peer{i}", board),
                                 kwargs={"other": lambda line: line.startswith('{"peer"')},
                                 name=f"swarm-peer-{i}")
            t.start()
            pumps.append(t)
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        if duration is not None:
            rows = query_status(founder, secret.encode())
            board.close()
            for row in rows:
                print(json.dumps(row), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
        board.close()
        shutil.rmtree(work, ignore_errors=True)
