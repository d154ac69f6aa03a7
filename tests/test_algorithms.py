"""The DiLoCo family against golden values, identities and the swarm's invariants.

All replicas run in one thread over tests/fake_swarm.py (no sockets)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peerlearn.algorithms.async_diloco import AsyncDiLoCo, EagerDiLoCo
from peerlearn.algorithms.ddp import DDP
from peerlearn.algorithms.diloco import OUTER, DiLoCo
from peerlearn.algorithms.outer import SGD, HeavyBall, Nesterov
from peerlearn.algorithms.streaming import StreamingDiLoCo, find_blocks, fragments_of
from tests.fake_swarm import FakeSwarm, Lockstep

torch.set_num_threads(1)

# --------------------------------------------------------------------------- outer optimizers


@pytest.mark.parametrize("lr,mu", [(0.7, 0.9), (0.4, 0.95), (1.0, 0.0)])
def test_nesterov_is_torch_sgd_bitwise(lr, mu):
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (3, 5), "b": (7,), "c": ()}
    ref = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    ours = {n: t.clone() for n, t in ref.items()}
    params = [nn.Parameter(ref[n].clone()) for n in sorted(shapes)]
    opt = torch.optim.SGD(params, lr=lr, momentum=mu, nesterov=mu > 0, dampening=0)
    outer = Nesterov(lr, mu)
    state = outer.init_state(ours)
    for _ in range(6):
        grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        for p, n in zip(params, sorted(shapes)):
            p.grad = grads[n].clone()
        opt.step()
        outer.step(ours, grads, state)
        for p, n in zip(params, sorted(shapes)):
            assert torch.equal(p.detach(), ours[n]), n
            if mu > 0:
                assert torch.equal(opt.state[p]["momentum_buffer"], state[f"momentum/{n}"])
    assert int(state["step"]) == 6


def test_sgd_and_heavy_ball_rules():
    theta = {"w": torch.tensor([1.0, 2.0])}
    sgd = SGD(0.5)
    st = sgd.init_state(theta)
    sgd.step(theta, {"w": torch.tensor([2.0, 4.0])}, st)
    assert theta["w"].tolist() == [0.0, 0.0] and int(st["step"]) == 1
    # m = μm − ηΔ; θ = θ + m   (NoLoCo's "Nesterov")
    hb = HeavyBall(0.5, 0.5)
    theta = {"w": torch.tensor([0.0])}
    st = hb.init_state(theta)
    hb.step(theta, {"w": torch.tensor([1.0])}, st)  # m = -0.5, θ = -0.5
    hb.step(theta, {"w": torch.tensor([1.0])}, st)  # m = -0.25 - 0.5 = -0.75, θ = -1.25
    assert st["momentum/w"].tolist() == [-0.75] and theta["w"].tolist() == [-1.25]


# --------------------------------------------------------------------------- helpers


class Scalars(nn.Module):
    """Scalar weights w0, w1 starting at 1 (torchft's regression fixtures)."""

    def __init__(self, n: int = 2):
        super().__init__()
        for i in range(n):
            self.register_parameter(f"w{i}", nn.Parameter(torch.tensor(1.0)))


class Tiny(nn.Module):
    def __init__(self, seed: int = 0, blocks: int = 4, d: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)


def batch(i: int, t: int):
    g = torch.Generator().manual_seed(1000 * i + t)
    x = torch.randn(8, 3, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def train_tick(model, opt):
    def grad_step(i, t):
        x, y = batch(i, t)
        opt[i].zero_grad()
        nn.functional.mse_loss(model[i](x), y).backward()
    return grad_step


def replicas(m: int, make, seed=0):
    base = make(seed)
    return [copy.deepcopy(base) for _ in range(m)]


def hashes(swarm: FakeSwarm) -> list[bytes]:
    return [p.state.state_hash() for p in swarm.peers]


# --------------------------------------------------------------------------- golden fixtures

E = ...  # "…" in the sheet: one or more values left out


def matches(seq: list[float], pattern: list) -> bool:
    """seq matches the sheet's pattern: values in order, each E standing for
    one or more values, anchored at both ends."""
    if not pattern:
        return not seq
    if pattern[0] is E:
        return any(matches(seq[k:], pattern[1:]) for k in range(1, len(seq) + 1))
    return bool(seq) and seq[0] == pattern[0] and matches(seq[1:], pattern[1:])


# Spec sheet §3.4 (torchft diloco_regression_test fixtures): weights after inner
# steps 0..15 for fragment 0 and fragment 1, per (delay, alpha); copied as printed.
GOLDEN = {
    (0, 0.0): ([1, -1, -3, -11, -13, -15, -17, -19, -21, -35, E, -45, -59],
               [1, -1, -3, -5, -7, -9, -23, E, -33, -47, E, -53]),
    (0, 0.5): ([E, -3, -8, E, -18, -24.5, E, -34.5, -40.25],
               [E, -9, -17, E, -27, -32, E, -38]),
    (0, 1.0): ([1, -1, E, -29], [1, -1, E, -29]),
    (1, 0.0): ([E, -3, -7, E, -17, -27, E, -37, -47],
               [E, -9, -19, E, -29, -39, E, -45]),
    (1, 0.5): ([E, -6, E, -21.5, E, -35.75],
               [E, -15, E, -29, E]),
}


def run_golden(delay: int, alpha: float) -> list[list[list[float]]]:
    """2 replicas, scalar weights at 1, constant grad 2, inner SGD lr 1, outer
    plain SGD lr 2, sync_every 6, 2 fragments. Returns [replica][fragment][step]."""
    models = [Scalars(), Scalars()]
    frags = [["w0"], ["w1"]]
    swarm = FakeSwarm(2, lambda: StreamingDiLoCo.initial_state(models[0], outer=SGD(2.0),
                                                                fragments=frags))
    opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
    algos = [StreamingDiLoCo(swarm.peers[i], models[i], opts[i], H=6, tau=delay, alpha=alpha,
                             outer=SGD(2.0), fragments=frags) for i in range(2)]
    seqs = [[[1.0], [1.0]] for _ in range(2)]

    def tick(i, t):
        for p in models[i].parameters():
            p.grad = torch.tensor(2.0)
        opts[i].step()
        algos[i].step()
        seqs[i][0].append(models[i].w0.item())
        seqs[i][1].append(models[i].w1.item())

    Lockstep(swarm, tick).run(15, after=lambda t: _assert_parity(swarm))
    return seqs


def _assert_parity(swarm):
    h = hashes(swarm)
    assert all(x == h[0] for x in h), "shared states differ"


@pytest.mark.parametrize("delay,alpha", sorted(GOLDEN))
def test_streaming_matches_torchft_golden_fixtures(delay, alpha):
    seqs = run_golden(delay, alpha)
    assert seqs[0] == seqs[1]  # both replicas see the same weights
    for frag in (0, 1):
        assert len(seqs[0][frag]) == 16
        assert matches(seqs[0][frag], GOLDEN[delay, alpha][frag]), (frag, seqs[0][frag])


def test_golden_full_sequence_delay0_alpha0():
    """The (0, 0) row written out in full (the rule of §3.2 by hand: every
    sync, Δ = 6 or 12 and the outer step subtracts 2·Δ)."""
    seqs = run_golden(0, 0.0)
    assert seqs[0][0] == [1, -1, -3, -11, -13, -15, -17, -19, -21, -35, -37, -39, -41, -43,
                          -45, -59]
    assert seqs[0][1] == [1, -1, -3, -5, -7, -9, -23, -25, -27, -29, -31, -33, -47, -49,
                          -51, -53]


def test_matcher_rejects_wrong_sequences():
    assert matches([1, 2, 3, 4], [1, E, 4])
    assert not matches([1, 4], [1, E, 4])
    assert not matches([1, 2, 3, 5], [1, E, 4])


# --------------------------------------------------------------------------- DiLoCo identities


def make_diloco(m: int, H: int, outer, *, lr=0.05, weighted=False, seed=0):
    models = replicas(m, lambda s: Tiny(s), seed)
    swarm = FakeSwarm(m, lambda: DiLoCo.initial_state(models[0], outer))
    opts = [torch.optim.SGD(x.parameters(), lr=lr) for x in models]
    algos = [DiLoCo(swarm.peers[i], models[i], opts[i], H=H, outer=outer, weighted=weighted)
             for i in range(m)]
    return models, swarm, opts, algos


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def outer_of(peer) -> dict[str, torch.Tensor]:
    return {n[len(OUTER):]: t.clone() for n, t in peer.state.tensors.items()
            if n.startswith(OUTER)}


@pytest.mark.parametrize("weighted", [False, True])
def test_outer_sgd_lr1_gives_the_mean_of_the_replicas(weighted):
    m, H = 3, 3
    models, swarm, opts, algos = make_diloco(m, H, SGD(1.0), weighted=weighted)
    tokens = [1.0, 2.0, 5.0]  # per inner step; weighted: the mean is Σ w_i θ_i / Σ w_i
    before = {}

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        if (t + 1) % H == 0:
            before[i] = params_of(models[i])
        algos[i].step(tokens=tokens[i])

    Lockstep(swarm, tick).run(H)
    w = tokens if weighted else [1.0] * m
    for n, got in outer_of(swarm.peers[0]).items():
        want = sum(w[i] * before[i][n] for i in range(m)) / sum(w)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    for i in range(m):  # θ_i ← θ(t): every replica restarts from the new outer params
        assert all(torch.equal(p, outer_of(swarm.peers[i])[n])
                   for n, p in params_of(models[i]).items())
    assert [a.outer_steps for a in algos] == [1] * m and algos[0].outer_step == 1


def test_diloco_h1_with_inner_sgd_is_data_parallel():
    m, steps, lr = 2, 5, 0.1
    models, swarm, opts, algos = make_diloco(m, 1, SGD(1.0), lr=lr)

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        algos[i].step()

    Lockstep(swarm, tick).run(steps)

    ddp_models = replicas(m, lambda s: Tiny(s))
    from peerlearn.state.shared import SharedState
    ddp_swarm = FakeSwarm(m, SharedState)
    ddp_opts = [torch.optim.SGD(x.parameters(), lr=lr) for x in ddp_models]
    ddps = [DDP(ddp_swarm.peers[i], ddp_models[i]) for i in range(m)]

    def ddp_tick(i, t):
        train_tick(ddp_models, ddp_opts)(i, t)
        ddps[i].step()
        ddp_opts[i].step()

    Lockstep(ddp_swarm, ddp_tick).run(steps)
    for i in range(m):
        a, b = params_of(models[i]), params_of(ddp_models[i])
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    # DDP replicas stay bit-identical (identical means, deterministic SGD).
    assert all(torch.equal(x, y) for x, y in zip(ddp_models[0].parameters(),
                                                 ddp_models[1].parameters()))
    assert ddp_swarm.peers[0].step == steps


def test_streaming_with_one_fragment_and_no_overlap_is_diloco():
    m, H, ticks = 2, 3, 10
    outer = Nesterov(0.7, 0.9)
    models, swarm, opts, algos = make_diloco(m, H, outer)
    s_models = replicas(m, lambda s: Tiny(s))
    s_swarm = FakeSwarm(m, lambda: StreamingDiLoCo.initial_state(s_models[0], 1, outer))
    s_opts = [torch.optim.SGD(x.parameters(), lr=0.05) for x in s_models]
    s_algos = [StreamingDiLoCo(s_swarm.peers[i], s_models[i], s_opts[i], H=H, P=1, tau=0,
                               alpha=0.0, outer=outer) for i in range(m)]

    def tick(models, opts, algos):
        def run(i, t):
            train_tick(models, opts)(i, t)
            opts[i].step()
            algos[i].step()
        return run

    Lockstep(swarm, tick(models, opts, algos)).run(ticks)
    Lockstep(s_swarm, tick(s_models, s_opts, s_algos)).run(ticks)
    for i in range(m):
        assert all(torch.equal(a, b) for a, b in zip(models[i].parameters(),
                                                     s_models[i].parameters()))
    assert algos[0].outer_steps == s_algos[0].outer_steps == ticks // H


# --------------------------------------------------------------------------- shared-state parity


def test_every_outer_step_leaves_byte_identical_shared_states():
    m, H = 3, 4
    models, swarm, opts, algos = make_diloco(m, H, Nesterov(0.7, 0.9))

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        algos[i].step()

    Lockstep(swarm, tick).run(4 * H, after=lambda t: _assert_parity(swarm))
    assert len(swarm.history) == 4
    assert all(len(set(h)) == 1 for h in swarm.history)
    # The momentum buffers are part of the shared state, hence of its hash.
    assert "outer_opt/momentum/head.weight" in swarm.peers[0].state.tensors
    assert swarm.peers[0].state.step == 4 and algos[0].outer_step == 4


@pytest.mark.parametrize("replace", [False, True])
def test_streaming_fragments_keep_parity_and_merge_in_turn(replace):
    m, H, P = 2, 4, 2
    models = replicas(m, lambda s: Tiny(s))
    outer = Nesterov(0.4, 0.9)
    swarm = FakeSwarm(m, lambda: StreamingDiLoCo.initial_state(models[0], P, outer))
    opts = [torch.optim.AdamW(x.parameters(), lr=1e-2) for x in models]
    algos = [StreamingDiLoCo(swarm.peers[i], models[i], opts[i], H=H, P=P, tau=1, alpha=0.5,
                             outer=outer) for i in range(m)]
    if replace:  # replica 1 loses round 3 to a state transfer, then trains on
        swarm.replace_state(1, 3)

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        algos[i].step()

    Lockstep(swarm, tick).run(4 * H, after=lambda t: _assert_parity(swarm))
    st = swarm.peers[0].state.tensors
    if replace:
        assert algos[1].replaced == 1
        # Reloaded from the shared outer params, which every replica agrees on.
        return
    # per = H/P = 2: sends at local steps 1, 3, .., 15, merges at 2, 4, .., 16.
    assert int(st["streaming/syncs"]) == 8
    assert [int(st["outer_opt/0/step"]), int(st["outer_opt/1/step"])] == [4, 4]
    assert algos[0].outer_steps == 8


def test_fragments_of_puts_embeddings_first_and_head_last():
    model = Tiny(blocks=4)
    strided = fragments_of(model, 2, "strided")
    assert strided == [["embed.weight", "embed.bias", "blocks.0.weight", "blocks.0.bias",
                        "blocks.2.weight", "blocks.2.bias"],
                       ["blocks.1.weight", "blocks.1.bias", "blocks.3.weight", "blocks.3.bias",
                        "head.weight", "head.bias"]]
    sequential = fragments_of(model, 2, "sequential")
    assert sequential[0][2:] == ["blocks.0.weight", "blocks.0.bias",
                                 "blocks.1.weight", "blocks.1.bias"]
    assert sequential[1][-2:] == ["head.weight", "head.bias"]
    assert find_blocks(model)[0] == "blocks"
    # No ModuleList: the parameter list itself is split.
    assert fragments_of(Scalars(3), 2) == [["w0", "w2"], ["w1"]]
    assert fragments_of(Scalars(3), 2, "sequential") == [["w0", "w1"], ["w2"]]
    with pytest.raises(ValueError):
        StreamingDiLoCo.initial_state(model, fragments=[["embed.weight"]])


# --------------------------------------------------------------------------- faults


def test_state_replaced_inside_step_reloads_the_model_from_the_outer_state():
    m, H = 2, 2
    models, swarm, opts, algos = make_diloco(m, H, Nesterov(0.7, 0.9))
    # Replica 1's shared state diverged (a bad write, say): the swarm replaces
    # it during round 1, and its contribution fails with StateReplaced.
    swarm.peers[1].state.tensors["outer/head.bias"].add_(1.0)
    swarm.replace_state(1, 1)
    seen = {}

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        took = algos[i].step()  # never raises for the fault
        if i == 1 and t == 2 * H - 1:
            seen["took"] = took
            seen["model"] = params_of(models[1])
            seen["outer"] = outer_of(swarm.peers[1])

    def parity_once_replaced(t):
        if t >= 2 * H - 1:
            _assert_parity(swarm)

    Lockstep(swarm, tick).run(4 * H, after=parity_once_replaced)
    assert seen["took"] is False and algos[1].replaced == 1
    assert all(torch.equal(seen["model"][n], seen["outer"][n]) for n in seen["model"])
    assert algos[0].outer_steps == 4 and algos[1].outer_steps == 3


def test_collective_timeout_skips_the_outer_step_and_trains_on():
    m, H = 2, 2
    models, swarm, opts, algos = make_diloco(m, H, SGD(1.0))
    swarm.fail_round(0)
    snap = {}

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        if t == H - 1:
            snap[i] = params_of(models[i])
        algos[i].step()
        if t == H - 1:  # skipped: the replica keeps its own parameters
            assert all(torch.equal(p, snap[i][n]) for n, p in params_of(models[i]).items())

    Lockstep(swarm, tick).run(2 * H, after=lambda t: _assert_parity(swarm))
    assert [a.skipped for a in algos] == [1, 1] and [a.outer_steps for a in algos] == [1, 1]
    assert swarm.peers[0].state.step == 1 and algos[0].metrics()["outer_skipped"] == 1


# --------------------------------------------------------------------------- async and eager


def run_scalar(cls, ticks: int, m: int = 2, H: int = 3):
    """Scalar weight at 1, constant grad 2, inner SGD lr 1, outer plain SGD lr 2."""
    models = [Scalars(1) for _ in range(m)]
    swarm = FakeSwarm(m, lambda: cls.initial_state(models[0], SGD(2.0)))
    opts = [torch.optim.SGD(x.parameters(), lr=1.0) for x in models]
    algos = [cls(swarm.peers[i], models[i], opts[i], H=H, outer=SGD(2.0)) for i in range(m)]
    seq = [[1.0] for _ in range(m)]

    def tick(i, t):
        models[i].w0.grad = torch.tensor(2.0)
        opts[i].step()
        algos[i].step()
        seq[i].append(models[i].w0.item())

    Lockstep(swarm, tick).run(ticks, after=lambda t: _assert_parity(swarm))
    assert seq[0] == seq[1]
    return seq[0], swarm, algos


def test_async_diloco_applies_the_outer_step_one_round_late():
    # Phase 0: 1 → −5, Δ(0) = 6, nothing to apply yet: restart from 1.
    # Phase 1: 1 → −5, Δ(1) = 1 − (−5) = 6 (against θ_start = 1), round 0
    #   landed: θ = 1 − 2·6 = −11. Phase 2: −11 → −17, round 1 landed: −23.
    seq, swarm, algos = run_scalar(AsyncDiLoCo, 9)
    assert seq == [1, -1, -3, 1, -1, -3, -11, -13, -15, -23]
    assert algos[0].outer_steps == 2  # round 2 is in flight
    assert swarm.peers[0].state.tensors["outer/w0"].item() == -35  # ... and applied in the fake


def test_eager_diloco_counts_its_own_gradient_early():
    # Phase 0: Δ(0) = 6, eager Δ̂ = 6/2 = 3: θ_m = 1 − 6 = −5.
    # Phase 1: −5 → −11, Δ(1) = 6, Δ̂ = Δ̄(0) + (6 − 6)/2 = 6: θ_m = −17; then −29.
    seq, swarm, algos = run_scalar(EagerDiLoCo, 9)
    assert seq == [1, -1, -3, -5, -7, -9, -17, -19, -21, -29]
    # The shared consensus follows the delayed means: 1 − 2·6·3 = −35.
    assert swarm.peers[0].state.tensors["outer/w0"].item() == -35


@pytest.mark.parametrize("cls", [EagerDiLoCo])
def test_eager_with_one_replica_is_diloco(cls):
    H, ticks, outer = 3, 12, Nesterov(0.7, 0.9)
    models, swarm, opts, algos = make_diloco(1, H, outer)
    e_models = replicas(1, lambda s: Tiny(s))
    e_swarm = FakeSwarm(1, lambda: cls.initial_state(e_models[0], outer))
    e_opts = [torch.optim.SGD(x.parameters(), lr=0.05) for x in e_models]
    e_algos = [cls(e_swarm.peers[0], e_models[0], e_opts[0], H=H, outer=outer)]

    def tick(models, opts, algos):
        def run(i, t):
            train_tick(models, opts)(i, t)
            opts[i].step()
            algos[i].step()
        return run

    Lockstep(swarm, tick(models, opts, algos)).run(ticks)
    Lockstep(e_swarm, tick(e_models, e_opts, e_algos)).run(ticks)
    for a, b in zip(models[0].parameters(), e_models[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [AsyncDiLoCo, EagerDiLoCo])
def test_async_variants_keep_the_shared_state_in_parity(cls):
    m, H = 3, 2
    models = replicas(m, lambda s: Tiny(s))
    outer = Nesterov(0.7, 0.9)
    swarm = FakeSwarm(m, lambda: cls.initial_state(models[0], outer))
    opts = [torch.optim.AdamW(x.parameters(), lr=1e-2) for x in models]
    algos = [cls(swarm.peers[i], models[i], opts[i], H=H, outer=outer) for i in range(m)]
    swarm.replace_state(2, 2)

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        algos[i].step()

    Lockstep(swarm, tick).run(5 * H, after=lambda t: _assert_parity(swarm))
    assert all(len(set(h)) == 1 for h in swarm.history)
    assert algos[2].replaced == 1 and algos[0].replaced == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_diloco_on_a_cuda_model_copies_outer_params_to_the_device():
    m, H = 2, 2
    models = [x.cuda() for x in replicas(m, lambda s: Tiny(s))]
    outer = Nesterov(0.7, 0.9)
    swarm = FakeSwarm(m, lambda: DiLoCo.initial_state(models[0], outer))
    opts = [torch.optim.SGD(x.parameters(), lr=0.05) for x in models]
    algos = [DiLoCo(swarm.peers[i], models[i], opts[i], H=H, outer=outer) for i in range(m)]

    def tick(i, t):
        x, y = batch(i, t)
        opts[i].zero_grad()
        nn.functional.mse_loss(models[i](x.cuda()), y.cuda()).backward()
        opts[i].step()
        algos[i].step()

    Lockstep(swarm, tick).run(2 * H, after=lambda t: _assert_parity(swarm))
    for n, p in models[1].named_parameters():
        assert p.is_cuda and torch.equal(p.cpu(), swarm.peers[1].state.tensors[OUTER + n])


@pytest.mark.parametrize("losses", [1, 2])
def test_a_peer_that_loses_its_work_round_after_round_says_why(losses, caplog):
    m, H = 2, 2
    models = replicas(m, lambda s: Tiny(s))
    outer = Nesterov(0.7, 0.9)
    swarm = FakeSwarm(m, lambda: DiLoCo.initial_state(models[0], outer))
    opts = [torch.optim.AdamW(x.parameters(), lr=1e-2) for x in models]
    algos = [DiLoCo(swarm.peers[i], models[i], opts[i], H=H, outer=outer) for i in range(m)]
    for k in range(2, 2 + losses):  # replica 1 loses rounds in a row to state transfers
        swarm.replace_state(1, k)

    def tick(i, t):
        train_tick(models, opts)(i, t)
        opts[i].step()
        algos[i].step()

    with caplog.at_level("WARNING", logger="peerlearn.algorithms.diloco"):
        Lockstep(swarm, tick).run(6 * H, after=lambda t: _assert_parity(swarm))
    assert algos[1].replaced == losses
    lines = [r.getMessage() for r in caplog.records if "local work lost" in r.getMessage()]
    # One loss is ordinary (a restart, a repair); two in a row are explained, once.
    assert len(lines) == (losses >= 2)
    if lines:
        assert lines[0].startswith("2 outer steps of local work lost in a row")


# --------------------------------------------------------------------------- wall-clock budget


def test_diloco_on_a_wall_clock_budget_waits_for_nobody_and_weighs_by_tokens(monkeypatch):
    """every_s: each replica runs as many inner steps as fit in the budget,
    so one 3x slower than the others submits at the same moment (no idle
    replica, no work lost), and the outer step is the token-weighted mean:
    the slow replica's pseudo-gradient counts for the fewer tokens it holds.
    Time is each replica's own simulated clock."""
    from peerlearn.algorithms import diloco as diloco_mod

    m, budget = 3, 1.0
    step_s = [0.125, 0.125, 0.375]  # replica 2 is 3x slower (binary-exact seconds)
    clock = {"now": [0.0] * m, "cur": 0}
    monkeypatch.setattr(diloco_mod.time, "monotonic", lambda: clock["now"][clock["cur"]])
    outer = SGD(1.0)
    models = replicas(m, lambda s: Tiny(s), 0)
    swarm = FakeSwarm(m, lambda: DiLoCo.initial_state(models[0], outer))
    opts = [torch.optim.SGD(x.parameters(), lr=0.05) for x in models]
    algos = []
    for i in range(m):
        clock["cur"] = i
        algos.append(DiLoCo(swarm.peers[i], models[i], opts[i], H=1000, outer=outer,
                            every_s=budget))
    steps, before, tokens = [0] * m, {}, [0.0] * m
    grad = train_tick(models, opts)

    def tick(i):
        prev, clock["cur"] = clock["cur"], i
        clock["now"][i] += step_s[i]
        grad(i, steps[i])
        opts[i].step()
        steps[i] += 1
        tokens[i] += 7.0  # tokens per inner step, the same batch size everywhere
        if algos[i]._due():
            before[i] = (params_of(models[i]), tokens[i])
            tokens[i] = 0.0
        algos[i].step(tokens=7.0)
        clock["cur"] = prev

    def on_wait(peer):  # a replica waits on the round: the others train until they submit
        k = peer.submitted - 1
        for j in range(m):
            while swarm.peers[j].submitted <= k:
                tick(j)
    swarm.on_wait = on_wait
    while algos[0].outer_steps < 1:
        tick(0)
    # Every replica submitted when its own second of training ran out.
    assert steps == [8, 8, 3]
    assert all(a.outer_steps == 1 for a in algos)
    w = [before[i][1] for i in range(m)]
    assert w == [56.0, 56.0, 21.0]
    for n, got in outer_of(swarm.peers[0]).items():
        want = sum(w[i] * before[i][0][n] for i in range(m)) / sum(w)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
