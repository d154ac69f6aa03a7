"""Operator files: the dashboard only plots metrics a peer really exports."""

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from peerlearn.cli.metrics import PeerCollector
from peerlearn.swarm.peer import PeerConfig, PeerDaemon
from peerlearn.swarm.synthetic import SyntheticWorkload

ROOT = Path(__file__).resolve().parent.parent


def exported_names(tmp_path) -> set[str]:
    daemon = PeerDaemon(PeerConfig(tmp_path, b"deploy-test-secret-0123"),
                        SyntheticWorkload(16).initial_state)
    try:
        reg = CollectorRegistry()
        reg.register(PeerCollector(daemon))
        text = generate_latest(reg).decode()
    finally:
        daemon.plane.close()
        daemon.links.close()
    return set(re.findall(r"^(peerlearn_\w+?)(?:\{| )", text, re.M))


def test_dashboard_queries_only_exported_metrics(tmp_path):
    dash = json.loads((ROOT / "deploy/grafana/peerlearn-swarm.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"peerlearn_\w+", e)}
    exported = exported_names(tmp_path)
    assert used and used <= exported, used - exported
    assert {"peerlearn_build_info", "peerlearn_step", "peerlearn_rounds_applied_total"} <= exported
