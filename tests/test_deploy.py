"""Operator files (deploy/, Dockerfile): each is checked by the tool that reads
it where that tool is installed (promtool, docker-compose, hadolint,
systemd-analyze; `.ci/run` installs them), and the dashboard and alert rules
are checked against the metrics a real running swarm exports.

Dashboard rule: a figure every peer reports about the swarm (a round applied,
the view, the step, the quorum) is taken once, as a max/min over peers; summing
it over peers multiplies it by the number of peers (the old "rounds applied per
minute" panel showed 115.6/min for 59 real rounds with two peers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # the `test` extra installs PyYAML

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana/peerlearn-swarm.json"
SECRET = "deploy-test-secret-0123456789abcdef"


def tool(name: str) -> str | None:
    """A tool on PATH or beside this interpreter (the venv's scripts)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# ---------------------------------------------------------------- a real swarm

def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Two `peerlearn run --algo synthetic` peers that have applied rounds over
    a data link; yields the metrics text each one serves."""
    tmp = tmp_path_factory.mktemp("swarm")
    env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1")
    procs, ports = [], []
    try:
        join: list[str] = []
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                 "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                 "--data-dir", str(tmp / f"p{i}"), "--numel", "10000", "--compute-s", "0.1",
                 *join],
                env=env, stdout=subprocess.PIPE, stderr=open(tmp / f"p{i}.log", "w"), text=True))
            hello = json.loads(procs[-1].stdout.readline())
            ports.append(hello["metrics_port"])
            join = ["--join", hello["control"]]

        def ready(text: str) -> bool:
            s = _samples(text)
            step = [v for n, _, v in s if n == "peerlearn_step"]
            sent = [v for n, lab, v in s if n == "peerlearn_wire_bytes_total"
                    and lab.get("direction") == "sent" and lab.get("traffic") == "round"]
            return bool(step and step[0] >= 3 and sent and sent[0] > 0)

        deadline = time.monotonic() + 90
        while True:
            texts = [_scrape(p) for p in ports]
            if all(ready(t) for t in texts):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "\n".join((tmp / f"p{i}.log").read_text()[-2000:] for i in range(2))
                pytest.fail(f"the 2-peer swarm applied no rounds in 90 s:\n{logs}")
            time.sleep(0.5)
        yield texts
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def exported(texts: list[str]) -> dict[str, list[dict[str, str]]]:
    """Metric name -> the label sets it was served with (all peers)."""
    out: dict[str, list[dict[str, str]]] = {}
    for t in texts:
        for name, labels, _ in _samples(t):
            out.setdefault(name, []).append(labels)
    return out


def test_metrics_endpoint_serves_peer_and_process_metrics(swarm):
    names = exported(swarm)
    assert {"peerlearn_build_info", "peerlearn_step", "peerlearn_rounds_applied_total",
            "peerlearn_seconds_since_applied", "peerlearn_quorum_needed",
            "peerlearn_quorum_held", "peerlearn_wire_bytes_total"} <= names.keys()
    if sys.platform == "linux":  # prometheus_client's process collector reads /proc
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total",
                "process_open_fds", "process_max_fds",
                "process_start_time_seconds"} <= names.keys()


def test_promtool_check_metrics_is_clean(swarm):
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    for text in swarm:
        r = run([promtool, "check", "metrics"], input=text)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
            r.stdout + r.stderr


# ---------------------------------------------------------------- PromQL checks

# Reported by every peer about the swarm: the same round, view, step or
# quorum counted once per peer. Never sum these over peers.
SWARM_WIDE = {
    "peerlearn_rounds_applied_total", "peerlearn_rounds_aborted_total",
    "peerlearn_collective_seconds_sum", "peerlearn_collective_seconds_count",
    "peerlearn_step", "peerlearn_members", "peerlearn_live_peers",
    "peerlearn_quorum_needed", "peerlearn_quorum_held", "peerlearn_seconds_since_applied",
    "peerlearn_gossip_exchanges_total", "peerlearn_gossip_failures_total",
}
METRIC = re.compile(r"\b((?:peerlearn|process|python)_\w+|up)\b(?!\s*\()")


def _balanced(expr: str, open_at: int) -> str:
    depth = 0
    for i in range(open_at, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return expr[open_at + 1:i]
    raise ValueError(f"unbalanced parentheses: {expr}")


def swarm_wide_sums(expr: str) -> list[str]:
    """The swarm-wide figures an expression sums over peers."""
    bad = []
    for m in re.finditer(r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(", expr):
        arg = _balanced(expr, m.end() - 1)
        bad += sorted(set(METRIC.findall(arg)) & SWARM_WIDE)
        # A non-finite mean fails the round on every member: that reason is
        # swarm-wide, the others are the refusing peer's own.
        if "peerlearn_refused_total" in arg and 'reason!="nonfinite_round"' not in arg:
            bad.append('peerlearn_refused_total{reason="nonfinite_round"}')
    return bad


def test_the_swarm_wide_sum_check_catches_the_old_panel():
    assert swarm_wide_sums("sum(rate(peerlearn_rounds_applied_total[1m])) * 60") == \
        ["peerlearn_rounds_applied_total"]
    assert swarm_wide_sums("sum by (reason) (rate(peerlearn_refused_total[5m]))")
    assert not swarm_wide_sums("max(rate(peerlearn_rounds_applied_total[1m])) * 60")
    assert not swarm_wide_sums("sum(rate(peerlearn_state_syncs_total[5m]))")
    assert not swarm_wide_sums(
        'sum by (reason) (rate(peerlearn_refused_total{reason!="nonfinite_round"}[5m]))')


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", [dashboard_exprs, rule_exprs], ids=["dashboard", "alerts"])
def test_no_expression_sums_a_swarm_wide_figure(source):
    bad = {title: swarm_wide_sums(e) for title, e in source() if swarm_wide_sums(e)}
    assert not bad, bad


@pytest.mark.parametrize("source", [dashboard_exprs, rule_exprs], ids=["dashboard", "alerts"])
def test_expressions_query_only_what_a_peer_exports(swarm, source):
    names = exported(swarm)
    exprs = [e for _, e in source()]
    used = {n for e in exprs for n in METRIC.findall(e)} - {"up"}  # up: Prometheus's own
    assert used and used <= names.keys(), used - names.keys()
    # Every label value an expression selects on is one a peer serves (job is
    # Prometheus's, from the scrape config).
    for e in exprs:
        for name, sel in re.findall(r"\b(\w+)\{([^}]*)\}", e):
            for label, value in re.findall(r'(\w+)!?="([^"]*)"', sel):
                if label == "job":
                    continue
                assert any(lab.get(label) == value for lab in names.get(name, [])), \
                    f"{name}{{{label}={value!r}}} in {e!r}: no such series"


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Rounds applied and aborted (per minute)", "Seconds since a round was applied",
                   "Quorum: needed and held", "Bytes on the wire, swarm total by traffic",
                   "Resident memory", "Refused or bounded input, by reason (per minute)"):
        assert needed in titles
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


# ---------------------------------------------------------------- Prometheus files

def _promtool() -> str:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    return promtool


def test_promtool_check_config_and_rules():
    promtool = _promtool()
    r = run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout
    r = run([promtool, "check", "rules", str(DEPLOY / "alerts.yml")])
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_alert_rules_fire_as_their_unit_tests_say():
    r = run([_promtool(), "test", "rules", str(DEPLOY / "alerts.test.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    names = {a for a, _ in rule_exprs()}
    assert {"PeerlearnPeerDown", "PeerlearnSwarmStalled", "PeerlearnParityMismatches"} <= names
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "alerts.test.yml").read_text()))
    assert names <= tested, names - tested
