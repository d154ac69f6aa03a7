"""cmd/scale_sim.py at small N: what it measures is there, and agrees with
today's design (N^2 heartbeats, detection within dead_after, steady rounds
of 1.5 RTTs plus the ring)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "scale_sim", Path(__file__).resolve().parent.parent / "cmd" / "scale_sim.py")
scale_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_sim)

ARGS = ["--rtt-ms", "100", "--churn-per-min", "0.01", "--sim-seconds", "20", "--seed", "3"]


def run(n: int, *extra: str) -> dict:
    args = scale_sim.parse(ARGS + ["--peers", str(n), *extra])
    return scale_sim.simulate(n, args, 20.0)


@pytest.fixture(scope="module")
def small():
    return {n: run(n) for n in (8, 16)}


def test_membership_traffic_grows_as_all_to_all(small):
    a, b = (small[n]["measured"]["membership_bytes_per_s_per_peer"] for n in (8, 16))
    assert a["heartbeat"] > 0 and a["round"] > 0
    # Every peer beats to every other: per-peer heartbeat bytes go as N - 1.
    assert 1.9 < b["heartbeat"] / a["heartbeat"] < 2.4  # 15/7 = 2.14
    for n in (8, 16):
        got = small[n]["measured"]["membership_bytes_per_s_per_peer"]["heartbeat"]
        assert got == pytest.approx(small[n]["extrapolated"]["heartbeat_bytes_per_s_per_peer"],
                                    rel=0.1)
    assert small[16]["measured"]["busiest_is_coordinator"]


def test_round_traffic_formula_matches_the_cores(small):
    """The formula the 1,024-peer row rests on, against what the cores sent."""
    for n in (8, 16):
        e = small[n]["extrapolated"]
        mean = ((n - 1) * e["round_bytes_per_s_per_member"] +
                e["round_bytes_per_s_coordinator"]) / n
        got = small[n]["measured"]["membership_bytes_per_s_per_peer"]["round"]
        assert got == pytest.approx(mean, rel=0.25)
        assert small[n]["measured"]["busiest_peer_msgs_per_s"] == \
            pytest.approx(e["busiest_msgs_per_s"], rel=0.2)


def test_killed_peer_is_detected_within_dead_after(small):
    for n in (8, 16):
        d = small[n]["measured"]["dead_peer_detection"]
        t = small[n]["timeouts"]
        assert d["undetected_at_end"] == 0
        # Silent for dead_after since its last beat (up to one period
        # before the kill), seen one tick after.
        assert t["dead_after"] - t["heartbeat_every"] <= d["all_live_peers_hold_it_dead_s"] \
            <= t["dead_after"] + 0.1


def test_rounds_apply_at_the_modelled_latency(small):
    for n in (8, 16):
        got = small[n]["measured"]
        assert got["rounds_applied"] >= 4 and got["applied_fraction"] == 1.0
        assert got["joiners_entered"] == 1  # the probe joiner took part in a round
        # A steady round: a fast Commit, Done, Apply (1.5 RTTs) around the
        # ring, with the probe joiner (once it entered) or without it; the
        # round it enters by adds Propose and Ack (2.5).
        sim = scale_sim.ScaleSim(2, scale_sim.r.Timeouts(), 0.1, 1e6, 1e8, 1.0)
        model = [0.15 + sim.ring_time(n), 0.15 + sim.ring_time(n + 1),
                 0.25 + sim.ring_time(n + 1)]
        assert min(abs(got["round_latency_s_median"] - x) for x in model) < 0.06


def test_the_real_decoder_changes_nothing():
    plain, decoded = run(8)["measured"], run(8, "--decode")["measured"]
    for d in (plain, decoded):
        del d["wall_s"], d["sim_cpu_s_per_peer_per_s"]
    assert plain == decoded


# ---------------------------------------------------------------- SWIM


def run_swim(n: int, *extra: str, seconds: float = 120.0) -> dict:
    args = scale_sim.parse(["--membership", "swim", "--peers", str(n), "--seed", "3",
                            "--churn-per-min", "0.05", *extra])
    return scale_sim.simulate_swim(n, args, seconds)


@pytest.fixture(scope="module")
def swim_small():
    return {n: run_swim(n) for n in (16, 64)}


def test_swim_messages_per_peer_do_not_grow_with_n(swim_small):
    for n in (16, 64):
        got = swim_small[n]["measured"]
        assert got["kills"] >= 1 and got["joins"] >= 1
        # A Ping out and its Ack in, a Ping in and the Ack out: ~4 a second.
        assert 3.8 <= got["mean_peer_msgs_per_s"] <= 4.5
        assert got["busiest_peer_msgs_per_s"] <= 8
        assert got["membership_bytes_per_s_per_peer"]["max"] < 5000
        assert got["false_dead"] == 0
    a, b = (swim_small[n]["measured"]["membership_bytes_per_s_per_peer"]["mean"]
            for n in (16, 64))
    assert b < 4 * a  # x4 the peers (and the churn with them): far from x4 the bytes


def test_swim_kills_are_confirmed_everywhere_within_the_bound(swim_small):
    for n in (16, 64):
        got = swim_small[n]["measured"]["dead_peer_held_dead_by_all_s"]
        cfg = swim_small[n]["swim"]
        assert got["undetected"] == 0 and got["kills_measured"] >= 1
        assert cfg["suspicion_s"][0] <= got["median"] <= cfg["detection_bound_s"]
        assert got["max"] < cfg["suspicion_s"][1]  # the shortened timeout, in practice
        joined = swim_small[n]["measured"]["joiner_known_by_all_s"]
        assert joined["not_known_by_all"] == 0 and joined["max"] < 15


def test_swim_the_real_decoder_changes_nothing():
    plain, decoded = (run_swim(16, *x, seconds=40.0)["measured"] for x in ((), ("--decode",)))
    for d in (plain, decoded):
        del d["wall_s"]
    assert plain == decoded
