"""Training end to end: `peerlearn demo` runs real peer processes over
loopback with the built-in task (shrunk to train in seconds) for every
algorithm, and the agreed model is the same at every peer."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
        "--set", "block_size=32", "--set", "batch_size=8", "--set", "corpus_bytes=400000"]
# The swarm's own behaviour, without the demo's warm-up and single-peer
# reference (tested on their own below).
BARE = ["--warmup", "0", "--no-reference"]


@pytest.mark.parametrize("algo,peers", [("diloco", 3), ("streaming", 2), ("ddp", 2)])
def test_demo_trains_every_algorithm_to_one_agreed_model(algo, peers):
    """Three peers: a joiner hears only the view's members, so a start
    barrier counting heartbeats never saw the other joiners (4-peer demos hung)."""
    out = subprocess.run(
        [sys.executable, "-m", "peerlearn.cli.app", "demo", "--algo", algo, "--peers", str(peers),
         "--steps", "16", "--H", "4", "--P", "2", "--tau", "1", "--json", *BARE, *TINY],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    reports = summary["peers_report"]
    assert all("val_loss" in r for r in reports), reports
    losses = [r["val_loss"] for r in reports]
    assert all(math.isfinite(v) and v < math.log(256) for v in losses), losses
    # Both evaluate the parameters the swarm agreed on: the same model.
    assert len(reports) == peers and len(set(losses)) == 1, losses
    # Bit parity at every shared step: each peer's hash of the agreed state.
    first = reports[0]["state_hashes"]
    assert len(first) >= 2
    for r in reports[1:]:
        common = first.keys() & r["state_hashes"].keys()
        assert len(common) >= 2 and all(first[k] == r["state_hashes"][k] for k in common)
    assert all(r["inner_steps"] == 16 for r in reports)
    # Bytes are counted on the wire by the transport: each kind, and a total
    # that is their sum (everything a peer moved from its start).
    kinds = ("collective", "state", "control")
    for d in ("sent", "received"):
        assert all(r[f"bytes_{d}"] == sum(r[f"bytes_{d}_{k}"] for k in kinds) for r in reports)
        assert all(r[f"bytes_{d}_collective"] > 0 and r[f"bytes_{d}_control"] > 0
                   for r in reports)
        for k in kinds:
            assert summary[f"bytes_{d}_{k}_per_peer"] == [r[f"bytes_{d}_{k}"] for r in reports]
    # Every joiner fetched the founder's state on joining (DDP agrees on no
    # tensors); the donors served at least what the joiners fetched (counted
    # by separate processes; more when a fetch was given up while a donor's
    # push was on its way).
    if algo != "ddp":
        assert all(r["bytes_received_state"] > 0 for r in reports[1:])
    assert sum(summary["bytes_sent_state_per_peer"]) >= \
        sum(summary["bytes_received_state_per_peer"])
    assert all(0 < r["compute_utilisation"] <= 1 for r in reports)
    if algo == "ddp":
        assert all(r["swarm_step"] >= 16 for r in reports)  # a round every step
    else:
        assert all(r["swarm_step"] >= 2 for r in reports)  # a round every H (or H/P) steps
    if algo == "diloco":
        # Started together, every peer took part in every outer step.
        assert all(r["algorithm"]["outer_steps"] == 4 and r["algorithm"]["state_replaced"] == 0
                   for r in reports), [r["algorithm"] for r in reports]


def test_a_running_demo_says_how_to_watch_it_and_status_and_metrics_show_the_training():
    """The newcomer's path: the demo prints a status command and a metrics
    address; from another terminal both show the peers training."""
    p = subprocess.Popen(
        [sys.executable, "-m", "peerlearn.cli.app", "demo", "--algo", "diloco", "--peers", "2",
         "--steps", "100000", "--H", "4", "--progress", "plain", "--progress-every", "5",
         *BARE, *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    drain = None
    try:
        hint = None
        for line in p.stderr:
            if "watch it: peerlearn status" in line:
                hint = line
                break
        assert hint is not None, "the demo never said how to watch it"
        m = re.search(r"peerlearn status (\S+) --secret-file (\S+); metrics: (\S+)", hint)
        assert m, hint
        control, secret_file, url = m.groups()
        drain = threading.Thread(target=lambda: [None for _ in p.stderr])
        drain.start()
        deadline = time.monotonic() + 120
        loss_seen = False
        while time.monotonic() < deadline and not loss_seen:
            time.sleep(2)
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            step = re.search(r"^peerlearn_train_inner_step (\S+)$", text, re.M)
            loss = re.search(r"^peerlearn_train_loss (\S+)$", text, re.M)
            outer = re.search(r"^peerlearn_train_outer_step (\S+)$", text, re.M)
            loss_seen = bool(step and loss and outer and float(step.group(1)) >= 5
                             and float(outer.group(1)) >= 1
                             and 0 < float(loss.group(1)) < math.log(256) + 1)
        assert loss_seen, text[-2000:]
        out = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "status", control,
                              "--secret-file", secret_file, "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = json.loads(out.stdout)
        assert len(rows) == 2 and max(r["step"] for r in rows) >= 1, rows
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        if drain is not None:
            drain.join()
    assert not os.path.exists(secret_file)  # the demo's directory went with it


def test_the_demo_warms_up_once_and_compares_with_one_peer_alone(tmp_path):
    """Defaults: a short warm-up (cached), every peer and a lone reference peer
    start from it, and the summary prints the reference's loss and the ratio.
    Streaming with its default H (a multiple of --P) starts."""
    env = dict(os.environ, PEERLEARN_CACHE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "peerlearn.cli.app", "demo", "--algo", "streaming", "--peers", "2",
         "--steps", "48", "--warmup", "10", "--progress", "plain", *TINY],
        capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    first = out.stderr.splitlines()[0]
    assert first.startswith("[demo] warm-up:") and "10 steps" in first, out.stderr[:1000]
    assert "H 48" in out.stderr and "one peer alone (--algo local)" in out.stderr
    single = float(re.search(r"^single_peer_val_loss: (\S+)$", out.stdout, re.M).group(1))
    swarm = float(re.search(r"^val_loss: (\S+)$", out.stdout, re.M).group(1))
    assert 0 < single < math.log(256) and 0 < swarm < math.log(256), out.stdout
    line = re.search(r"^streaming, 2 peers: validation loss (\S+), (\S+) % (below|above) one peer "
                     r"alone \((\S+)\)", out.stdout, re.M)
    assert line, out.stdout
    rel = float(line.group(2)) * (-1 if line.group(3) == "below" else 1)
    assert abs(rel - (swarm / single - 1) * 100) < 0.2, out.stdout
    # Each kind of bytes on a line of its own, and the total: their sum.
    sent = {k: json.loads(re.search(rf"^bytes_sent{k}_per_peer: (.+)$", out.stdout, re.M)[1])
            for k in ("_collective", "_state", "_control", "")}
    assert sent[""] == [sum(kinds) for kinds in
                        zip(sent["_collective"], sent["_state"], sent["_control"])], out.stdout
    assert all(n > 0 for n in sent["_control"]) and sent["_state"][0] > 0, out.stdout
    cached = list((tmp_path / "warm").glob("*.pt"))
    assert len(cached) == 1
    # The next demo of the same task and seed starts from the cached model.
    out = subprocess.run(
        [sys.executable, "-m", "peerlearn.cli.app", "demo", "--algo", "diloco", "--peers", "1",
         "--steps", "8", "--H", "4", "--warmup", "10", "--json", *TINY],
        capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["warm_start"]["cached"] and summary["warm_start"]["file"] == str(cached[0])
    assert math.isfinite(summary["single_peer_val_loss"]) and summary["vs_single_peer"] is not None
    assert summary["single_peer_report"]["inner_steps"] == 8


@pytest.mark.parametrize("command", ["demo", "run"])
def test_async_and_eager_are_withdrawn_with_the_reason(command):
    for algo in ("async", "eager"):
        out = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", command, "--algo", algo],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert f"{algo} is withdrawn" in out.stderr and "one peer alone" in out.stderr
        assert "docs/algorithms.md" in out.stderr
