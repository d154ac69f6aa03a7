"""Gossip training over real peers on loopback: a dead partner never blocks,
rounds that disagree meet again, and `peerlearn demo` runs every gossip
algorithm with the same report (and byte-identical parameters after a
final merge)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from peerlearn.algorithms.decentral import GossipLoop
from peerlearn.algorithms.noloco import NoLoCo
from peerlearn.algorithms.training import Hyper, gossip_config, local_checkpoint_path
from peerlearn.swarm.api import Peer
from peerlearn.swarm.errors import GossipFailed
from peerlearn.swarm.gossip import next_round
from peerlearn.swarm.peer import PeerConfig
from peerlearn.swarm.rounds import Timeouts
from tests.test_api import run_all, wait_joiners_reported
from tests.test_training import TINY

SECRET = b"decentral-test-secret-0123456789"
FAST = Timeouts(heartbeat_every=0.1, dead_after=2.0, gather=2.0, ack=2.0)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


@pytest.fixture
def peers(tmp_path):
    started: list[Peer] = []
    cfg = gossip_config("noloco", Hyper(H=2))

    def make(n: int) -> list[Peer]:
        first = Peer(PeerConfig(tmp_path / "p0", SECRET, timeouts=FAST),
                     lambda: GossipLoop.initial_state(model(), cfg)).start()
        started.append(first)
        for i in range(1, n):
            started.append(Peer(PeerConfig(tmp_path / f"p{i}", SECRET, timeouts=FAST,
                                           join=first.control_address)).start(timeout=20))
        for p in started:
            p.sync_state(timeout=20)
        wait_joiners_reported(first, started[1:])
        # One round of everyone puts them all in the view (a demo's start barrier).
        run_all(started, lambda i, p: p.wait_for_peers(n, timeout=30))
        return started

    yield make, cfg
    for p in started:
        p.close()


def trainer(peer: Peer, cfg: dict, rank: int, local_path=None):
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    algo = NoLoCo(peer, net, opt, H=2, config=cfg, gossip_timeout=3.0, local_path=local_path)
    g = torch.Generator().manual_seed(rank)

    def steps(n: int) -> None:
        for _ in range(n):
            x = torch.randn(16, 8, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(net(x), x.sum(1, keepdim=True)).backward()
            opt.step()
            algo.step()

    return algo, steps


def test_a_dead_partner_never_blocks_and_the_failure_is_counted(peers):
    make, cfg = peers
    a, b = make(2)
    (algo_a, steps_a), (algo_b, steps_b) = trainer(a, cfg, 0), trainer(b, cfg, 1)
    run_all([a, b], lambda i, p: (steps_a, steps_b)[i](6))  # 3 outer steps together
    assert algo_a.exchanges == algo_b.exchanges == 3
    b.close()  # the partner is gone, before anyone noticed
    t0 = time.monotonic()
    steps_a(10)  # 5 outer steps alone
    took = time.monotonic() - t0
    assert algo_a.inner_steps == 16 and algo_a.outer_steps == 8
    assert algo_a.failures + algo_a.alone == 5 and algo_a.alone >= 1
    assert a.daemon.stats.gossip_failures == algo_a.failures
    # At most one exchange waited out its timeout; then the partner was dead.
    assert took < 3.0 * max(1, algo_a.failures) + 5, took


def test_a_restarted_peer_resumes_its_own_progress_and_pairs_again(peers, tmp_path):
    make, cfg = peers
    a, b = make(2)
    own = [tmp_path / f"p{i}" / local_checkpoint_path(p).name for i, p in enumerate((a, b))]
    (algo_a, steps_a), (algo_b, steps_b) = trainer(a, cfg, 0, own[0]), trainer(b, cfg, 1, own[1])
    run_all([a, b], lambda i, p: (steps_a, steps_b)[i](6))
    assert algo_a.exchanges == algo_b.exchanges == 3
    phi_b = {n: t.clone() for n, t in algo_b.phi.items()}
    b.close()
    b = Peer(PeerConfig(tmp_path / "p1", SECRET, timeouts=FAST,
                        join=a.control_address)).start(timeout=20)
    try:
        b.sync_state(timeout=20)
        algo_b2, steps_b2 = trainer(b, cfg, 1, own[1])
        assert algo_b2.resumed and algo_b2.outer_steps == 3
        assert all(torch.equal(algo_b2.phi[n], phi_b[n]) for n in phi_b)
        # It left with Ctrl-C (close), so the view shrank to a alone: it comes
        # back through an admission round (training drives it) before it pairs.
        deadline = time.monotonic() + 30
        while b.id not in a.members() and time.monotonic() < deadline:
            run_all([a, b], lambda i, p: (steps_a, steps_b2)[i](2))
        assert b.id in a.members(), "not admitted again"
        run_all([a, b], lambda i, p: (steps_a, steps_b2)[i](8))
        assert algo_b2.exchanges >= 1 and algo_a.exchanges >= 4, (algo_a.metrics(),
                                                                   algo_b2.metrics())
    finally:
        b.close()


def test_a_peer_joining_a_gossip_run_enters_the_view_and_is_paired(peers, tmp_path):
    """No round of its own would ever take a joiner in: the members see it
    waiting, hold one empty round between them, and pair it from then on,
    all while they train."""
    make, cfg = peers
    a, b = make(2)
    c = Peer(PeerConfig(tmp_path / "p2", SECRET, timeouts=FAST,
                        join=a.control_address)).start(timeout=20)
    try:
        c.sync_state(timeout=20)
        algos, steppers = zip(*(trainer(p, cfg, i) for i, p in enumerate((a, b, c))))
        assert c.id not in a.members()
        deadline = time.monotonic() + 60

        def train(i, p):
            while time.monotonic() < deadline and not (
                    algos[2].exchanges >= 3 and all(x.admissions for x in algos)):
                steppers[i](2)
                time.sleep(0.02)  # some compute: the three run side by side

        run_all([a, b, c], train)
        assert all(set(p.members()) == {a.id, b.id, c.id} for p in (a, b, c))
        assert all(x.admissions >= 1 for x in algos), [x.metrics() for x in algos]
        assert algos[2].exchanges >= 3, algos[2].metrics()
    finally:
        c.close()


def test_gossip_rounds_that_disagree_meet_at_the_later_one_at_once(peers):
    make, _ = peers
    a, b = make(2)
    x = {0: torch.zeros(1000), 1: torch.ones(1000)}
    rounds = {0: 9, 1: 4}  # two sides of a healed partition, at different rounds
    heard = {}

    def gossip(i, p):
        try:
            return p.gossip(x[i], round_=rounds[i], timeout=8)
        except GossipFailed as e:
            # The one behind hears where the other waits and goes there now.
            heard[i] = (e.ahead, dict(e.rounds))
            return p.gossip(x[i], round_=next_round(rounds[i], e.rounds.values()), timeout=8)

    t0 = time.monotonic()
    out = run_all([a, b], gossip)
    took = time.monotonic() - t0
    assert heard == {1: (True, {a.id: 9})}  # a read past b's round-4 attempt
    assert torch.equal(out[0], torch.full((1000,), 0.5)) and torch.equal(out[0], out[1])
    assert took < 4.0, took  # not the 8 s timeout
    assert a.daemon.stats.gossip_failures == 0


def demo(algo: str, peers: int, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "peerlearn.cli.app", "demo", "--algo", algo, "--peers", str(peers),
         "--steps", "16", "--H", "4", "--gossip-timeout", "10", "--json", "--warmup", "0",
         "--no-reference", *extra, *TINY],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("algo", ["noloco", "gossip-vc"])
def test_demo_runs_a_gossip_algorithm_and_a_final_merge_agrees(algo):
    reports = demo(algo, 3, "--independent-init", "--merge-at", "end")["peers_report"]
    assert all("val_loss" in r for r in reports), reports
    losses = [r["val_loss"] for r in reports]
    assert all(math.isfinite(v) and v < math.log(256) for v in losses), losses
    assert len(set(losses)) == 1, losses  # after the merge: one model everywhere
    for r in reports:
        m = r["algorithm"]
        assert m["outer_steps"] == 4 and m["exchanges"] + m["exchange_failures"] + m["alone"] == 4
        assert m["exchanges"] >= 1 and m["merges"] == 1 and m["merge_participants"] == 3
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
    first = reports[0]["state_hashes"]  # parity of what is agreed: config, step, merge
    for r in reports[1:]:
        common = first.keys() & r["state_hashes"].keys()
        assert len(common) >= 2 and all(first[k] == r["state_hashes"][k] for k in common)


def test_demo_gossip_without_a_merge_keeps_each_peers_own_model():
    reports = demo("gossip", 4, "--independent-init")["peers_report"]
    m = [r["algorithm"] for r in reports]
    assert all(x["merges"] == 0 and x["exchanges"] >= 1 for x in m), m
    assert len({r["val_loss"] for r in reports}) > 1  # per-peer params differ by design
    hashes = [r["state_hashes"] for r in reports]
    assert all(h == hashes[0] for h in hashes)  # nothing agreed changed: one hash
