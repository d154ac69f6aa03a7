"""`peerlearn swarm`: a throwaway swarm of synthetic peers on loopback, each
its own `peerlearn run` process, their rounds shown as they go. Its SIGTERM
handling is the demo launcher's too (train.run_demo)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from peerlearn.cli.credentials import SECRET_ENV, write_secret_file
from peerlearn.cli.status_query import query_status


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
