"""A peer's own training progress across a restart (peerlearn.algorithms.progress):
its inner optimizer, learning-rate schedule and data position come back; a
file of another run, or a broken one, is refused with the reason and never
stops the run. And peers given no shard read streams of their own."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from peerlearn.algorithms import progress, training
from peerlearn.swarm.api import Peer
from peerlearn.swarm.config import PeerConfig
from peerlearn.swarm.rounds import Timeouts
from peerlearn.tasks import load
from peerlearn.tasks.base import warmup_cosine

SECRET = b"progress-test-secret-0123456789"
FAST = Timeouts(heartbeat_every=0.1, dead_after=3.0, gather=1.0, ack=1.0)
TINY = dict(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=8, corpus_bytes=400_000)
RUN = {"algo": "diloco", "steps": 40}


def trained(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = warmup_cosine(opt, 5, 40)
    for _ in range(steps):
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_the_optimizer_and_schedule_come_back_exactly(tmp_path):
    path = tmp_path / progress.PROGRESS_FILE
    _, opt, sched = trained(7)
    progress.save(path, RUN, step=7, tokens=700, optimizer=opt, scheduler=sched)
    _, opt2, sched2 = trained(0)
    assert progress.load(path, RUN, optimizer=opt2, scheduler=sched2) == (7, 700)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, entry in a["state"].items():
        for k, v in entry.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)
    assert sched2.last_epoch == 7 and sched2.get_last_lr() == sched.get_last_lr()


def test_another_run_or_a_broken_file_is_refused_and_changes_nothing(tmp_path, caplog):
    path = tmp_path / progress.PROGRESS_FILE
    _, opt, sched = trained(3)
    progress.save(path, RUN, step=3, tokens=30, optimizer=opt, scheduler=sched)
    _, fresh, fresh_sched = trained(0)
    before = fresh.state_dict()
    with caplog.at_level(logging.WARNING):
        assert progress.load(path, {**RUN, "steps": 41}, optimizer=fresh,
                             scheduler=fresh_sched) is None
        assert "another run" in caplog.text
        assert progress.load(path, RUN, optimizer=fresh, scheduler=None) is None
        assert "another learning-rate schedule" in caplog.text
        path.write_bytes(path.read_bytes()[:100])  # torn
        assert progress.load(path, RUN, optimizer=fresh, scheduler=fresh_sched) is None
    assert fresh.state_dict() == before and fresh_sched.last_epoch == 0


@pytest.fixture
def founder(tmp_path):
    task = load(None, **TINY)
    hp = training.Hyper(H=2)
    peer = Peer(PeerConfig(tmp_path / "p0", SECRET, timeouts=FAST),
                lambda: training.initial_state("diloco", task.model, hp)).start()
    yield peer, hp
    peer.close()


def recording(task, drawn: list):
    """task.batches, recording each batch it yields."""
    inner = task.batches

    def batches(rank, world, seed):
        for b in inner(rank, world, seed):
            drawn.append(b[0].clone())
            yield b
    return dataclasses.replace(task, batches=batches)


def test_a_restarted_run_resumes_its_progress_and_data_position(founder, caplog):
    peer, hp = founder
    first: list = []
    task = recording(load(None, **TINY), first)
    done = training.train(peer, task, "diloco", hp, steps=8, rank=None,
                          stop=lambda: len(first) >= 5)
    assert done["inner_steps"] == 5 and len(first) == 5
    again: list = []
    task2 = recording(load(None, **TINY), again)
    with caplog.at_level(logging.INFO, logger="peerlearn.algorithms.progress"):
        done = training.train(peer, task2, "diloco", hp, steps=8, rank=None)
    assert "resumed training progress" in caplog.text and "inner step 5" in caplog.text
    assert done["inner_steps"] == 8
    # The same stream, from where it stopped: 5 batches skipped, 3 trained on.
    assert len(again) == 8 and all(torch.equal(a, b) for a, b in zip(first, again))


def test_peers_without_a_shard_read_streams_of_their_own():
    class P:
        def __init__(self, pid):
            self.id = pid
    task = load(None, **TINY)
    firsts = []
    for pid in ("a" * 32, "b" * 32):
        rank, world, seed, name = training.data_stream(P(pid), None, 1, 0)
        assert (rank, world) == (0, 1) and name == f"own:{pid}"
        firsts.append(next(task.batches(rank, world, seed))[0])
    assert not torch.equal(*firsts)
    # The same identity reads the same stream (a restart goes on with it).
    assert training.data_stream(P("a" * 32), None, 1, 0) == \
        training.data_stream(P("a" * 32), None, 1, 0)
    assert training.data_stream(P("a" * 32), 1, 4, 0)[3] == "shard:1/4"
