"""`peerlearn bench statesize` at a tiny state: every field there, with a
plausible value. Nothing about timing is asserted (2 shared cores); one
size, 4 MiB, a 3-second window, so the whole run takes some 30 seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peerlearn.bench.statesize import parse_sizes


def test_sizes_are_binary_units_of_whole_fp32_elements():
    assert parse_sizes("64M,512M,2G") == [64 << 20, 512 << 20, 2 << 30]
    assert parse_sizes("4MiB, 16k") == [4 << 20, 16 << 10]
    for bad in ("", "2T", "6", "1.5G", "10"):  # 10 bytes: not whole fp32 elements
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_bench_statesize_reports_every_figure(tmp_path):
    r = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "bench", "statesize",
                        "--sizes", "4M", "--duration", "3", "--compute-s", "0.1",
                        "--logs", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["peers"] == 3 and out["base_rss_bytes"] > 0
    res = out["sizes"]["4M"]
    assert "stopped" not in res and "skipped" not in res, res
    assert res["bytes"] == 4 << 20 and res["numel"] == 1 << 20
    assert res["ring"]["seconds"] > 0 and res["update_s"] > 0
    assert min(res["rounds"].values()) > 0 and set(res["rounds"]) == {"peer0", "peer1", "peer2"}
    for key in ("round_s", "round_vs_ring", "round_less_update_s", "all_reduce_s",
                "all_reduce_vs_ring"):
        assert isinstance(res[key], float), key
    assert res["round_s"] > 0 and res["all_reduce_s"] > 0
    assert set(res["healthy"]) == {"rounds_aborted", "round_retries", "state_sync_failures",
                                   "parity_mismatches", "members_min", "view_changes",
                                   "evictions"}
    assert all(v >= 0 for v in res["healthy"].values())
    assert set(res["whole_run"]) == {"rounds_aborted", "push_cuts", "evictions"}
    assert all(v >= 0 for v in res["whole_run"].values())
    assert res["checkpoint_every_rounds"] == 10
    assert set(res["peers"]) == {"peer0", "peer1", "peer2", "joiner"}
    for name, peer in res["peers"].items():
        assert peer["exit_code"] == 0, (name, res["log_problems"])
        assert peer["push_cuts"] >= 0
        assert peer["loop_lag_max_s"] >= 0 and isinstance(peer["lag_rises"], list)
        assert peer["peak_rss_x_state"] > 1  # the state, and the interpreter around it
        assert peer["peak_rss_bytes"] > peer["peak_rss_above_base_x_state"] * res["bytes"]
        if name != "joiner":
            assert peer["ticks_over_100ms_steady"] >= 0
            assert peer["loop_lag_max_steady_s"] <= peer["loop_lag_max_s"]
    assert res["loop_lag_max_s"] >= 0 and res["peak_rss_x_state"] > 1
    join = res["join"]
    assert join["syncs"] >= 1 and join["state_sync_s"] > 0
    # log times are whole milliseconds: a sync and a round can share one
    assert 0 <= join["first_sync_s"] <= join["last_sync_s"] <= join["first_round_s"]
    assert join["process_start_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "4M-joiner.log", "4M-peer0.log", "4M-peer1.log", "4M-peer2.log"]
