"""`peerlearn bench wanround` at a tiny size over a short emulated path: every
field there, with a sane value (rounds measured, a round no shorter than the
path's round trip, stages that add up to the round). Nothing about how fast
is asserted (2 shared cores). Needs root and network namespaces; about 35 s."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peerlearn.bench.wanround import STAGES
from peerlearn.netsim import netns_available

ok, why = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]


def test_bench_wanround_reports_rounds_stages_and_baseline(tmp_path):
    r = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "bench", "wanround",
                        "--wan", "10,100", "--numel", "4096", "--rounds", "2", "--slot-s", "0.5",
                        "--baseline-repeat", "2", "--no-slow-start-after-idle", "--nodelay",
                        "--logs", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["peers"] == 4 and out["bytes"] == 4096 * 4
    rtt = out["rtt_probe_ms"]["median"] / 1e3
    assert 0.009 < rtt < 0.1, out["rtt_probe_ms"]
    for mode in ("warm", "after_idle", "warm_nodelay", "after_idle_nodelay"):
        ring = out["baseline_ring"][mode]
        assert len(ring["all_runs_s"]) == 2 and ring["median_s"] >= rtt
        assert len(ring["steps_s"]) == 2 * (4 - 1)
    assert out["peer_exit_codes"] == [0, 0, 0, 0], out["log_problems"]
    for window in ("default", "experiment_no_slow_start_after_idle", "experiment_tcp_nodelay"):
        res = out[window]
        assert res["rounds"] == 2 and res["rounds_unparsed"] == 0, res
        e2e = res["end_to_end_s"]
        assert e2e["min"] >= rtt, (e2e, rtt)
        assert res["end_to_end_rtts"] >= 1
        assert set(res["stages_median_s"]) == set(STAGES)
        assert all(v >= 0 for v in res["stages_median_s"].values())
        # the ring's 2(N-1) steps, or the direct all-reduce's 2
        assert len(res["ring"]["steps_s"]) == (6 if res["ring"]["algo"] == ["ring"] else 2)
        assert res["ring"]["new_links_in_window"] == 0  # links stay open between rounds
        assert res["collective_s_daemon_metric"] > 0
        for ratio in ("end_to_end_over_ring_warm", "end_to_end_over_ring_after_idle"):
            assert res[ratio] > 0
        assert isinstance(res["stages_absent"], list)
        # A round that repeats the last one has no Propose/Ack (a fast Commit):
        # where one went through them, they took a round trip at least.
        if "propose_ack" not in res["stages_absent"]:
            assert res["stages_median_s"]["propose_ack"] >= rtt
        assert res["messages_sent_per_round"] and \
            all(v >= 0 for v in res["messages_sent_per_round"].values())
        tcp = res["tcp_at_first_send"]
        assert tcp["connections_sampled"] > 0 and tcp["cwnd_segments"]["min"] > 0
    assert (tmp_path / "p0.events").exists() and (tmp_path / "p0.log").exists()
