"""What a peer reads and writes on its own machine (issue 16's smaller cases):
the secret is never printed and never read from a file others can read, the
data dir is private, and a checkpoint that is not a regular file, or holds
NaN, is refused with its reason instead of hanging, crashing or resuming."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from peerlearn.state import checkpoint
from peerlearn.state.checkpoint import CheckpointError
from peerlearn.state.shared import SharedState

SECRET = "local-files-secret-0123456789abcdef"


def peerlearn(*args, env=None, timeout=120):
    base = {k: v for k, v in os.environ.items() if k != "PEERLEARN_SECRET"}
    return subprocess.run([sys.executable, "-m", "peerlearn.cli.app", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(base, **(env or {})))


# ------------------------------------------------------------ the secret

@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_secret_file_others_can_read_is_refused_in_one_line(tmp_path, mode):
    f = tmp_path / "swarm.secret"
    f.write_text(SECRET + "\n")
    f.chmod(mode)
    r = peerlearn("status", "127.0.0.1:1", "--secret-file", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert f"chmod 600 {f}" in line and f"{mode:04o}" in line, line
    from peerlearn.cli.daemon import read_secret

    f.chmod(0o600)
    assert read_secret(str(f)) == SECRET.encode()


def test_a_root_owned_group_readable_secret_is_accepted_when_not_root(tmp_path, monkeypatch):
    """A Kubernetes Secret volume with fsGroup is root:fsGroup 0440."""
    from peerlearn.cli import daemon

    f = tmp_path / "secret"
    f.write_text(SECRET)
    f.chmod(0o440)
    real = os.stat

    def as_root_owned(path, *a, **kw):
        st = real(path, *a, **kw)
        if str(path) != str(f):
            return st
        fields = list(st)
        fields[stat.ST_UID] = 0
        return os.stat_result(fields)
    monkeypatch.setattr(daemon.os, "stat", as_root_owned)
    monkeypatch.setattr(daemon.os, "getuid", lambda: 10001)
    assert daemon.read_secret(str(f)) == SECRET.encode()
    f.chmod(0o444)  # world-readable: never
    with pytest.raises(SystemExit, match="chmod 600"):
        daemon.read_secret(str(f))
    monkeypatch.setattr(daemon.os, "getuid", lambda: 0)  # root reads its own 0440: no
    f.chmod(0o440)
    with pytest.raises(SystemExit, match="chmod 600"):
        daemon.read_secret(str(f))


def test_peerlearn_swarm_never_prints_its_secret(tmp_path):
    """It printed PEERLEARN_SECRET=<the secret> on its first line; now the
    path of a 0600 file in its own directory, gone with it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(
        [sys.executable, "-m", "peerlearn.cli.app", "swarm", "--peers", "1", "--duration", "15",
         "--base-port", str(port), "--compute-s", "0.1", "--numel", "1000", "--progress",
         "plain"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "PEERLEARN_SECRET"})
    first = p.stderr.readline()
    m = re.search(r"--secret-file (\S+)\)?$", first.strip().rstrip("`"))
    assert m, first
    path = m.group(1).rstrip("`")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    secret = open(path).read().strip()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    assert mode == 0o600
    assert secret not in first + out + err
    assert f"--secret-file {path}" in err  # the peer's join command names the file too
    assert not os.path.exists(path)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and rows[0]["step"] >= 1  # the status query read the file


# ------------------------------------------------------------ the data dir

def test_a_new_data_dir_is_private_and_a_writable_one_is_warned_about(tmp_path, caplog):
    from peerlearn.cli import daemon

    code = ("import sys; from peerlearn.cli.daemon import lock_data_dir; "
            "lock_data_dir(sys.argv[1])")
    new = tmp_path / "a" / "data"
    subprocess.run([sys.executable, "-c", code, str(new)], check=True, timeout=60)
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with caplog.at_level(logging.WARNING):
        daemon.lock_data_dir(shared)
    assert f"chmod 700 {shared}" in caplog.text and "0777" in caplog.text
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # an operator's choice, not changed


def test_write_atomic_makes_missing_directories_private(tmp_path):
    from peerlearn.state.atomic import write_atomic

    write_atomic(tmp_path / "d" / "f", [b"x"])
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700


# ------------------------------------------------------------ checkpoints

def _load_in_time(path, seconds=5.0):
    box: list = []

    def run():
        try:
            box.append(checkpoint.load(path))
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            box.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"load({path}) hangs"
    return box[0]


def test_a_checkpoint_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    err = _load_in_time(fifo)
    assert isinstance(err, CheckpointError) and "FIFO" in str(err)
    folder = tmp_path / "dir.ckpt"
    folder.mkdir()
    err = _load_in_time(folder)
    assert isinstance(err, CheckpointError) and "directory" in str(err)
    err = _load_in_time("/dev/null")
    assert isinstance(err, CheckpointError) and "device" in str(err)
    # A symlink to a regular file is read as that file.
    real = tmp_path / "real.ckpt"
    state = SharedState(3)
    state.register("w", torch.ones(4))
    checkpoint.save(state, real)
    (tmp_path / "link.ckpt").symlink_to(real)
    assert _load_in_time(tmp_path / "link.ckpt").step == 3


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_peer_starts_beside_a_checkpoint_that_is_not_a_file(tmp_path, kind):
    """A FIFO as state.ckpt used to hang start-up (open() waits for a writer),
    a directory to end it with an uncaught IsADirectoryError."""
    data = tmp_path / "peer"
    data.mkdir(mode=0o700)
    if kind == "fifo":
        os.mkfifo(data / "state.ckpt")
    else:
        (data / "state.ckpt").mkdir()
    log = tmp_path / "peer.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
         "--listen", "127.0.0.1:0", "--metrics", "off", "--data-dir", str(data),
         "--numel", "1000", "--compute-s", "0.05"],
        env=dict(os.environ, PEERLEARN_SECRET=SECRET), stdout=subprocess.PIPE,
        stderr=open(log, "w"), text=True)
    try:
        line = proc.stdout.readline()  # the hello line: it started
        assert line.startswith("{"), log.read_text()[-2000:]
        deadline = time.monotonic() + 30
        while "contributed to step 3" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert "contributed to step 3" in text, text[-2000:]
        assert f"is a {'FIFO' if kind == 'fifo' else 'directory'}, not a checkpoint" in text
    finally:
        proc.terminate()
        code = proc.wait(timeout=20)
    # It stops cleanly too: the checkpoint it cannot write is logged, not fatal.
    assert code == 0, log.read_text()[-2000:]
    assert "daemon failed" not in log.read_text()


def test_a_nan_gossip_checkpoint_is_not_resumed(tmp_path, caplog):
    """decentral.resume used to take a gossip-local.ckpt holding NaN weights
    silently, and the peer gossiped NaN into every merge."""
    from peerlearn.algorithms.noloco import NoLoCo
    from tests.fake_swarm import Lockstep
    from tests.test_decentralized import GossipLoop, GossipSwarm, noloco_cfg, replicas, tiny

    cfg = noloco_cfg(H=1)
    path = tmp_path / "gossip-local.ckpt"
    sw, models, algos, tick = replicas(
        2, lambda base: GossipSwarm(2, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: NoLoCo(p, mod, opt, H=1, config=cfg,
                                   local_path=path if p.index == 0 else None))
    Lockstep(sw, tick).run(2)

    def restart():
        fresh = tiny(0)
        return NoLoCo(sw.peers[0], fresh, torch.optim.Adam(fresh.parameters()), H=1,
                      config=cfg, local_path=path)

    assert restart().resumed
    own = checkpoint.load(path)
    name = next(n for n, t in own.tensors.items() if t.is_floating_point() and t.numel() > 1)
    own.tensors[name].view(-1)[0] = float("nan")
    checkpoint.save(own, path)  # a well-formed file: only its values are wrong
    with caplog.at_level(logging.WARNING):
        again = restart()
    assert not again.resumed
    assert "non-finite" in caplog.text and name in caplog.text
    assert all(bool(torch.isfinite(p).all()) for p in again.params.values())
