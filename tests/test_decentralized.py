"""The gossip algorithms (NoLoCo, gossip averaging with and without variance
correction, the single merge) against their identities and invariants.

Replicas run in one thread over tests/fake_swarm.py, extended here with a
gossip exchange that pairs with the real `gossip.groups_for` and averages as
`swarm.gossip.exchange` does (zeros, then each member in the group's order,
then one division)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peerlearn.algorithms.decentral import (
    MERGE_COUNT,
    MERGED,
    GossipLoop,
    config_tensor,
    independent_init,
)
from peerlearn.algorithms.diloco import DiLoCo
from peerlearn.algorithms.gossip import GossipAveraging, corrected_names, variance_correct
from peerlearn.algorithms.noloco import NoLoCo, noloco_update
from peerlearn.algorithms.outer import HeavyBall, Nesterov
from peerlearn.algorithms.training import Hyper, gossip_config
from peerlearn.state import checkpoint
from peerlearn.swarm.api import flatten
from peerlearn.swarm.errors import GossipFailed
from peerlearn.swarm.gossip import (
    MAX_CATCHUP, MAX_ROUND, group_of, groups_for, next_round)
from tests.fake_swarm import FakePeer, FakeSwarm, Lockstep

torch.set_num_threads(1)


class GossipPeer(FakePeer):
    def live_members(self) -> list[str]:
        return sorted(p.id for p in self.swarm.peers if p.index not in self.swarm.down)

    def gossip(self, tensors, *, round_, seed=0, group_size=2, codec=None, block_size=64,
               timeout=30.0, grouping="random"):
        flat, unflatten = flatten(tensors)
        group = group_of(self.id, groups_for(grouping, self.live_members(), round_, seed,
                                             group_size))
        if round_ in self.swarm.failing:
            raise GossipFailed(f"round {round_} fails (test)")
        subs = self.swarm.exchanges.setdefault((round_, group), {})
        subs[self.id] = flat.clone()
        if len(subs) < len(group):
            self.swarm.waiting(self, round_)
        assert len(subs) == len(group), f"deadlock: group {group} of round {round_} incomplete"
        self.swarm.groups.setdefault(round_, set()).add(group)
        out = torch.zeros_like(flat)
        for p in group:
            out.add_(subs[p])
        return unflatten(out.div_(len(group)))


class GossipSwarm(FakeSwarm):
    def __init__(self, m: int, initial_state):
        super().__init__(m, initial_state)
        self.peers = [GossipPeer(self, i, p.state) for i, p in enumerate(self.peers)]
        self.exchanges: dict = {}
        self.groups: dict[int, set] = {}
        self.failing: set[int] = set()  # gossip rounds that fail everywhere
        self.down: set[int] = set()  # peers the others see as dead


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))


def batch(i: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * i + t)
    return torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)


def replicas(m: int, swarm_of, make_algo, seed: int = 0):
    """m replicas of tiny(seed), each with inner Adam and an algorithm over a
    fake swarm; returns (swarm, models, algos, tick)."""
    base = tiny(seed)
    swarm = swarm_of(base)
    models = [tiny(seed) for _ in range(m)]
    opts = [torch.optim.Adam(mod.parameters(), lr=0.05) for mod in models]
    algos = [make_algo(swarm.peers[i], models[i], opts[i]) for i in range(m)]

    def tick(i: int, t: int) -> None:
        x, y = batch(i, t)
        opts[i].zero_grad()
        nn.functional.mse_loss(models[i](x), y).backward()
        opts[i].step()
        algos[i].step()

    return swarm, models, algos, tick


def noloco_cfg(**kw) -> dict:
    return gossip_config("noloco", Hyper(**kw))


# --------------------------------------------------------------------------- NoLoCo


def noloco_and_diloco(m: int, H: int, outer, *, gamma: float):
    """m replicas trained 4 outer steps twice from one init: NoLoCo with every
    peer in one group, with the momentum and lr of `outer` (Nesterov or
    HeavyBall, which picks NoLoCo's rule), and DiLoCo with `outer`. Returns
    (NoLoCo's swarm, its models, its algorithms, DiLoCo's models)."""
    nesterov = isinstance(outer, Nesterov)
    cfg = noloco_cfg(H=H, group=m, noloco_momentum=outer.momentum, outer_lr=outer.lr,
                     gamma=gamma, noloco_nesterov=nesterov)
    sw_n, mod_n, alg_n, tick_n = replicas(
        m, lambda base: GossipSwarm(m, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: NoLoCo(p, mod, opt, H=H, config=cfg, group=m, outer_lr=outer.lr,
                                   momentum=outer.momentum, gamma=gamma, nesterov=nesterov))
    sw_d, mod_d, _, tick_d = replicas(
        m, lambda base: FakeSwarm(m, DiLoCo.initial_state(base, outer)),
        lambda p, mod, opt: DiLoCo(p, mod, opt, H=H, outer=outer))
    Lockstep(sw_n, tick_n).run(4 * H)
    Lockstep(sw_d, tick_d).run(4 * H)
    return sw_n, mod_n, alg_n, mod_d


@pytest.mark.parametrize("m", [2, 4])
def test_noloco_with_one_group_of_everyone_is_heavy_ball_diloco(m):
    """Every φ is equal and every peer averages with all: the pull term is
    zero and NoLoCo is DiLoCo with HeavyBall(β, α). Both means are the same
    additions in the same order (peer 0..m-1), so the pseudo-gradients agree
    bitwise; the mean of m equal φ is φ exactly for m = 2 (φ + φ = 2φ) and
    within a rounding for m = 4 ((φ + φ + φ) may round), so m = 2 is bitwise
    and m = 4 within float tolerance."""
    H, alpha, beta, gamma = 3, 0.5, 0.7, 0.7
    sw_n, mod_n, alg_n, mod_d = noloco_and_diloco(
        m, H, HeavyBall(beta, alpha), gamma=gamma)
    assert all(len(sw_n.groups[r]) == 1 for r in range(4))  # one group of everyone
    assert all(a.exchanges == 4 and a.failures == 0 for a in alg_n)
    for i in range(m):
        for (name, a), b in zip(mod_n[i].named_parameters(), mod_d[i].parameters()):
            if m == 2:
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(mod_n[i][0].weight, tiny(0)[0].weight)  # it trained


def test_nesterov_noloco_with_one_group_of_everyone_is_nesterov_diloco():
    """The Nesterov variant with everyone in one group is DiLoCo's outer step
    (Nesterov(β, α)), in other floating-point ops (m holds −β·buf): equal
    within float tolerance, step after step."""
    m, H, alpha, beta = 2, 3, 0.9, 1.0
    assert noloco_cfg(noloco_nesterov=True)["nesterov"] is True
    assert "nesterov" not in noloco_cfg()
    _, mod_n, _, mod_d = noloco_and_diloco(m, H, Nesterov(beta, alpha), gamma=0.7)
    for i in range(m):
        for (name, a), b in zip(mod_n[i].named_parameters(), mod_d[i].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # and not heavy-ball: the same run with the heavy-ball rule ends elsewhere
    _, mod_h, _, _ = noloco_and_diloco(m, H, HeavyBall(beta, alpha), gamma=0.7)
    assert not torch.allclose(mod_h[0][0].weight, mod_n[0][0].weight, atol=1e-4)


def test_noloco_update_rule_pulls_toward_the_group_mean():
    phi = {"w": torch.tensor([1.0, -3.0])}
    m = {"w": torch.tensor([0.5, 0.0])}
    mean_phi = {"w": torch.tensor([0.0, 1.0])}
    mean_delta = {"w": torch.tensor([2.0, -1.0])}
    noloco_update(phi, m, mean_phi, mean_delta, alpha=0.5, beta=0.25, gamma=0.5)
    # m = 0.5·m − 0.25·mean_Δ − 0.5·(φ − mean_φ); φ = φ + m
    want_m = torch.tensor([0.25 - 0.5 - 0.5, 0.0 + 0.25 + 2.0])
    assert torch.equal(m["w"], want_m)
    assert torch.equal(phi["w"], torch.tensor([1.0, -3.0]) + want_m)


def test_noloco_failed_exchange_is_a_local_step_counted_and_training_goes_on():
    m, H = 2, 2
    cfg = noloco_cfg(H=H)
    sw, models, algos, tick = replicas(
        m, lambda base: GossipSwarm(m, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: NoLoCo(p, mod, opt, H=H, config=cfg))
    sw.failing.add(1)  # the second outer step's exchange fails at both
    Lockstep(sw, tick).run(3 * H)
    for a in algos:
        assert (a.outer_steps, a.exchanges, a.failures, a.round) == (3, 2, 1, 3)
    # The failed step used each replica's own Δ: their slow weights now differ.
    assert not torch.equal(algos[0].phi["0.weight"], algos[1].phi["0.weight"])
    # A peer alone in its view takes a group-of-one step, counted apart.
    sw.down.add(1)
    tick(0, 3 * H)
    tick(0, 3 * H + 1)
    assert algos[0].alone == 1 and algos[0].failures == 1


def noloco_at_round(round_: int) -> NoLoCo:
    """One NoLoCo replica of a pair (H = 1), at gossip round round_."""
    cfg = noloco_cfg(H=1)
    _, _, algos, _ = replicas(
        2, lambda base: GossipSwarm(2, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: NoLoCo(p, mod, opt, H=1, config=cfg))
    algos[0].round = round_
    return algos[0]


def test_a_partner_at_a_later_round_makes_the_peer_catch_up():
    algo = noloco_at_round(3)

    def behind(*_a, **_k):
        raise GossipFailed("partner ahead", rounds={"peer1": 10})

    algo.peer.gossip = behind
    assert algo.exchange({"x": torch.zeros(2)}) is None
    assert algo.round == 10  # where the partner waits (rounds 4..9 skipped)
    assert algo.caught_up == 6 and algo.failures == 1
    # A partner behind us never moves us back.
    algo.peer.gossip = lambda *a, **k: (_ for _ in ()).throw(GossipFailed("x", {"peer1": 2}))
    algo.exchange({"x": torch.zeros(2)})
    assert algo.round == 11 and algo.caught_up == 6
    # A header claiming the end of the round space (broken or hostile) is not
    # followed: the next exchange would be refused, and training would end.
    algo.peer.gossip = lambda *a, **k: (_ for _ in ()).throw(
        GossipFailed("x", {"peer1": MAX_ROUND}))
    algo.exchange({"x": torch.zeros(2)})
    assert algo.round == 12 and algo.caught_up == 6
    assert next_round(5, [5 + MAX_CATCHUP]) == 5 + MAX_CATCHUP
    assert next_round(5, [6 + MAX_CATCHUP]) == 6


def test_a_partner_waiting_ahead_is_met_in_the_same_outer_step():
    algo = noloco_at_round(3)
    calls = []

    def gossip(tensors, *, round_, **_k):
        calls.append(round_)
        if round_ < 10:
            raise GossipFailed("partner ahead", rounds={"peer1": 10}, ahead=True)
        return tensors

    algo.peer.gossip = gossip
    assert algo.exchange({"x": torch.zeros(2)}) is not None
    assert calls == [3, 10] and algo.round == 11
    assert algo.exchanges == 1 and algo.failures == 0 and algo.caught_up == 6


def test_a_partner_claiming_ever_later_rounds_gets_a_bounded_number_of_attempts():
    """Each attempt sends the whole tensor: a member answering every one with
    a later round must not make us send it for the whole gossip timeout."""
    from peerlearn.algorithms.decentral import MEET_ATTEMPTS

    algo = noloco_at_round(3)
    calls = []

    def gossip(tensors, *, round_, **_k):
        calls.append(round_)
        raise GossipFailed("ahead", rounds={"peer1": round_ + 5}, ahead=True)

    algo.peer.gossip = gossip
    assert algo.exchange({"x": torch.zeros(2)}) is None
    assert calls == [3, 8, 13][:MEET_ATTEMPTS] and algo.failures == 1


@given(lo=st.integers(0, 10**6), gap=st.integers(1, MAX_CATCHUP))
def test_the_one_behind_goes_to_the_round_where_the_one_ahead_waits(lo, gap):
    """The one ahead reads past the other's earlier attempt and waits at its
    own round; the one behind heard that round, and next_round is it."""
    hi = lo + gap
    assert next_round(lo, [hi]) == hi
    assert next_round(hi, []) == hi + 1  # a failure of its own: the next round


def test_a_restarted_noloco_peer_resumes_its_own_progress_byte_for_byte(tmp_path):
    m, H = 2, 2
    cfg = noloco_cfg(H=H)
    paths = [tmp_path / f"p{i}.ckpt" for i in range(m)]
    sw, models, algos, tick = replicas(
        m, lambda base: GossipSwarm(m, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: NoLoCo(p, mod, opt, H=H, config=cfg, local_path=paths[p.index]))
    Lockstep(sw, tick).run(3 * H)
    sw.failing.add(algos[0].round)  # one failed exchange: peer 0's phi is its own
    Lockstep(sw, tick).run(H)
    old = algos[0]
    assert old.failures == 1 and paths[0].stat().st_mode & 0o777 == 0o600
    # Peer 0 restarts: a fresh model (the swarm's initial params) and algorithm.
    fresh = tiny(0)
    new = NoLoCo(sw.peers[0], fresh, torch.optim.Adam(fresh.parameters()), H=H, config=cfg,
                 local_path=paths[0])
    assert new.resumed
    assert (new.round, new.inner_steps, new.outer_steps) == (old.round, 4 * H, 4)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, dict(models[0].named_parameters())[n])
        assert torch.equal(new.phi[n], old.phi[n]) and torch.equal(new.m[n], old.m[n])
    # It goes on exactly as the one it replaced would have.
    assert not torch.equal(new.m["0.weight"], torch.zeros_like(new.m["0.weight"]))


def test_a_local_checkpoint_of_another_run_or_from_before_a_merge_is_not_resumed(tmp_path,
                                                                                   caplog):
    cfg = noloco_cfg(H=1)
    path = tmp_path / "own.ckpt"
    sw, models, algos, tick = replicas(
        2, lambda base: GossipSwarm(2, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: NoLoCo(p, mod, opt, H=1, config=cfg,
                                   local_path=path if p.index == 0 else None))
    Lockstep(sw, tick).run(2)
    assert path.exists()

    def restart(config, p=path):
        fresh = tiny(0)
        return NoLoCo(sw.peers[0], fresh, torch.optim.Adam(fresh.parameters()), H=1,
                      config=config, local_path=p)

    assert restart(cfg).resumed
    other = noloco_cfg(H=1, gamma=0.5)
    sw.peers[0].state.tensors["gossip/config"] = config_tensor(other)
    assert not restart(other).resumed and "other settings" in caplog.text
    sw.peers[0].state.tensors["gossip/config"] = config_tensor(cfg)
    # A torn or hostile file is set aside with its reason, never fatal.
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(path.read_bytes()[:-7])
    assert not restart(cfg, bad).resumed and "not resuming" in caplog.text
    # A well-formed file whose counters make no sense (a round past the round
    # space would end training at the first exchange) is set aside too.
    odd = checkpoint.load(path)
    odd.tensors["#counters"][1] = MAX_ROUND + 1
    checkpoint.save(odd, bad)
    assert not restart(cfg, bad).resumed and "out of range" in caplog.text
    # The swarm merged after the file was written: the merge wins.
    sw.peers[0].state.tensors[MERGE_COUNT].fill_(1)
    again = restart(cfg)
    assert not again.resumed and "merged since" in caplog.text
    merged = {n: sw.peers[0].state.tensors[MERGED + n] for n in again.names}
    assert all(torch.equal(again.phi[n], merged[n]) for n in again.names)


def test_admission_rounds_that_take_nobody_in_back_off():
    """A peer that heartbeats as a synced joiner and never contributes: the
    members' admission rounds apply without it, and each one that took
    nobody in doubles the wait before the next (bounded), so it cannot make
    the swarm hold a round every second for ever."""
    cfg = noloco_cfg(H=1)
    sw, _, algos, _ = replicas(
        2, lambda base: GossipSwarm(2, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: NoLoCo(p, mod, opt, H=1, config=cfg))
    algo = algos[0]

    class Done:
        def done(self):
            return True

        def result(self, timeout=None):
            return {}

    submitted = []
    algo.peer.joiners_waiting = lambda: True
    algo.peer.all_reduce_async = lambda t, **k: submitted.append(t) or Done()
    waits = []
    for _ in range(10):
        algo._admit_at = 0.0  # the next check is due
        algo.admit()  # submits
        algo.admit()  # collects it: the view did not grow
        waits.append(algo._admit_every)
    assert len(submitted) == 10 and algo.admissions == 10
    assert waits[:4] == [2.0, 4.0, 8.0, 16.0] and waits[-1] == 64.0
    # A round that took someone in resets the wait.
    algo.peer.members = lambda: ["a", "b", "c", "d"]
    algo._admit_view = 2
    algo._admission = Done()
    algo.admit()
    assert algo._admit_every == 1.0


def test_a_peer_with_other_settings_refuses_the_swarm_state():
    base = tiny()
    sw = GossipSwarm(1, GossipLoop.initial_state(base, noloco_cfg(H=5)))
    opt = torch.optim.SGD(base.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the swarm runs"):
        NoLoCo(sw.peers[0], base, opt, H=5, config=noloco_cfg(H=5, gamma=0.0))
    with pytest.raises(ValueError, match="fp32 merged/"):
        NoLoCo(sw.peers[0], nn.Linear(3, 3), opt, H=5, config=noloco_cfg(H=5))


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("algo", ["noloco", "gossip"])
def test_single_merge_is_the_exact_mean_and_byte_identical(algo):
    """Independent initialisations, sparse gossip, then one agreed all-reduce
    (W = 11ᵀ/m): every peer holds the exact mean of the replicas' parameters,
    in its model and in the shared state."""
    m, H = 4, 2
    cfg = gossip_config(algo, Hyper(H=H, merge_at=-1, independent_init=True))
    cls = NoLoCo if algo == "noloco" else GossipAveraging
    sw, models, algos, tick = replicas(
        m, lambda base: GossipSwarm(m, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: cls(p, mod, opt, H=H, config=cfg, merge_at=-1,
                                init_seed=100 + int(p.id[4:])))
    assert not torch.equal(models[0][0].weight, models[1][0].weight)  # independent
    Lockstep(sw, tick).run(3 * H)
    before = [{n: p.detach().clone() for n, p in mod.named_parameters()} for mod in models]
    Lockstep(sw, lambda i, t: algos[i].finish()).run(1)
    for n, _ in models[0].named_parameters():
        acc = before[0][n].clone()
        for b in before[1:]:
            acc += b[n]
        mean = acc / m
        for i in range(m):
            assert torch.equal(dict(models[i].named_parameters())[n], mean), n
            assert torch.equal(sw.peers[i].state.tensors[MERGED + n], mean)
    assert len({p.state.state_hash() for p in sw.peers}) == 1
    assert all(int(p.state.tensors[MERGE_COUNT]) == 1 for p in sw.peers)
    assert all(a.merges == 1 and a.merge_failures == 0 for a in algos)


def test_independent_init_keeps_each_tensors_values_and_decorrelates_peers():
    a, b = tiny(), tiny()
    ref = {n: p.detach().clone() for n, p in a.named_parameters()}
    independent_init(dict(a.named_parameters()), 1)
    independent_init(dict(b.named_parameters()), 2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.detach().reshape(-1).sort().values, ref[n].reshape(-1).sort().values)
        if ref[n].unique().numel() > 8:  # a drawn tensor, not a constant one
            assert not torch.equal(pa, pb)
            corr = torch.corrcoef(torch.stack([pa.detach().reshape(-1), pb.detach().reshape(-1)]))
            assert abs(float(corr[0, 1])) < 0.8


# --------------------------------------------------------------------------- gossip and VC


@settings(max_examples=200, deadline=None)
@given(shape=st.sampled_from([(2,), (7,), (16, 9), (3, 4, 5)]),
       scale=st.floats(1e-3, 1e3), shift=st.floats(-10, 10),
       target=st.floats(1e-6, 1e4), seed=st.integers(0, 2**31 - 1))
def test_variance_correction_reaches_the_target_and_keeps_the_mean(shape, scale, shift, target,
                                                                    seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift
    if float(x.double().var()) < 1e-9 * scale * scale:
        return  # (nearly) constant: nothing to rescale, covered below
    out = variance_correct(x, target)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # Exact in fp64; the one rounding to fp32 moves each entry by at most
    # 2^-24·|entry|, i.e. the deviations by that over σ (relative).
    rounding = 4 * 2**-24 * float(out.abs().max()) / math.sqrt(target)
    assert math.isclose(float(out.double().var()), target, rel_tol=1e-6 + rounding)
    spread = max(abs(shift), scale, math.sqrt(target))
    assert abs(float(out.double().mean()) - float(x.double().mean())) <= 1e-5 * spread
    assert torch.equal(variance_correct(x, target), out)  # a pure function


def test_variance_correction_leaves_what_it_cannot_rescale():
    assert torch.equal(variance_correct(torch.tensor([3.0]), 5.0), torch.tensor([3.0]))
    assert torch.equal(variance_correct(torch.full((4,), 2.0), 5.0), torch.full((4,), 2.0))
    x = torch.randn(10)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert torch.equal(variance_correct(x, bad), x)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_averaging_independent_layers_vanishes_the_variance_and_vc_restores_it(n):
    """The spec's E5(a): n independent Xavier layers averaged keep ~1/n of the
    variance; corrected, the target (the mean of their variances)."""
    g = torch.Generator().manual_seed(n)
    layers = [nn.init.xavier_uniform_(torch.empty(256, 128), generator=g) for _ in range(n)]
    target = sum(float(w.var()) for w in layers) / n
    avg = torch.stack(layers).mean(0)
    assert abs(float(avg.var()) / target - 1 / n) < 0.15 / n
    assert math.isclose(float(variance_correct(avg, target).double().var()), target, rel_tol=1e-6)
    # Shared init, small drift: the correction is near a no-op.
    drift = [layers[0] + 1e-4 * torch.randn(256, 128, generator=g) for _ in range(n)]
    d_avg = torch.stack(drift).mean(0)
    d_target = sum(float(w.var()) for w in drift) / n
    scale = float(variance_correct(d_avg, d_target).std() / d_avg.std())
    assert abs(scale - 1) < 1e-2


def test_correction_skips_norm_layers_and_one_element_tensors():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    assert corrected_names(model) == {"0.weight", "0.bias", "3.weight"}  # 3.bias: one element


@pytest.mark.parametrize("vc", [False, True])
def test_gossip_pairs_end_byte_identical_and_vc_restores_the_variance(vc):
    m, H = 4, 2
    algo = "gossip-vc" if vc else "gossip"
    cfg = gossip_config(algo, Hyper(H=H, independent_init=True))
    sw, models, algos, tick = replicas(
        m, lambda base: GossipSwarm(m, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: GossipAveraging(p, mod, opt, H=H, config=cfg, vc=vc,
                                            init_seed=7 + int(p.id[4:])))
    ratios = []

    def after(t: int) -> None:
        if (t + 1) % H:
            return
        groups = sw.groups[(t + 1) // H - 1]
        for group in groups:
            a, b = (int(q[4:]) for q in group)
            assert torch.equal(models[a][0].weight, models[b][0].weight)
        ratios.append(float(models[0][0].weight.detach().var()))

    var0 = float(models[0][0].weight.detach().var())
    Lockstep(sw, tick).run(3 * H, after)
    assert all(a.exchanges == 3 and a.distances for a in algos)
    # Uncorrected, averaging independent replicas shrinks the variance; corrected it stays.
    if vc:
        assert all(0.5 < r / var0 < 2.0 for r in ratios), ratios
    else:
        assert ratios[0] / var0 < 0.75, ratios


def test_gossip_on_the_grid_brings_independent_replicas_to_one_model_in_log2_m_outer_steps():
    """8 replicas from 8 initialisations, inner lr 0 (the exchanges alone move
    the parameters), groups of 2 on the grid (a 2 x 2 x 2 cube): after 3
    outer steps every replica holds the same bits, the mean of the 8
    initialisations; after 2 they are still apart."""
    m, H = 8, 2
    cfg = gossip_config("gossip", Hyper(H=H, independent_init=True, grouping="grid"))
    sw, models, algos, _ = replicas(
        m, lambda base: GossipSwarm(m, GossipLoop.initial_state(base, cfg)),
        lambda p, mod, opt: GossipAveraging(p, mod, opt, H=H, config=cfg,
                                            grouping="grid", init_seed=7 + int(p.id[4:])))
    start = torch.stack([mod[0].weight.detach().clone() for mod in models])

    def tick(i: int, t: int) -> None:
        algos[i].step()

    seen = []
    Lockstep(sw, tick).run(3 * H, lambda t: seen.append(
        len({mod[0].weight.detach().numpy().tobytes() for mod in models})) if (t + 1) % H == 0
        else None)
    assert all(a.exchanges == 3 for a in algos)
    assert seen[1] > 1 and seen[2] == 1, seen
    torch.testing.assert_close(models[0][0].weight.detach(), start.mean(0), rtol=1e-5, atol=1e-6)
