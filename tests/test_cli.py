"""The command line: entry points exist and benchmarks print parseable JSON."""

import os
import json
import subprocess
import sys

import pytest


def flat(text: str) -> str:
    """What a message says, whatever the terminal's width. Click's errors may be
    drawn by rich in a box wrapped to $COLUMNS (80 off a terminal, a long
    pytest tmp path included): a phrase can be split over lines, between the
    box's borders. Borders out, whitespace runs to one space."""
    import re

    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def test_flat_joins_a_phrase_rich_wrapped_in_a_box():
    boxed = ("╭─ Error ──────────────╮\n│ /tmp/x.toml is not   │\n"
             "│ valid TOML: line 1   │\n╰──────────────────────╯\n")
    assert "is not valid TOML: line 1" in flat(boxed)
    assert flat("a  one\nline\t message") == "a one line message"


def peerlearn(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "peerlearn.cli.app", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_version():
    r = peerlearn("--version")
    assert r.returncode == 0 and r.stdout.startswith("peerlearn ")


def test_bench_stream_prints_json_with_its_baseline():
    r = peerlearn("bench", "stream", "--conns", "1,2", "--mbytes", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    lo = out["loopback"]
    assert lo["raw_socket_gbit_s"] > 0
    assert set(lo["striped"]) == {"1", "2"}
    assert all(v["gbit_s"] > 0 for v in lo["striped"].values())


def test_codec_help_lists_exactly_the_known_names():
    import re

    from peerlearn.cli.shared_options import CODEC_HELP as _CODEC_HELP
    from peerlearn.wire.codecs import CODEC_NAMES, codec_from_name

    listed = re.findall(r"[\w-]+", _CODEC_HELP.split(":", 1)[1])
    assert sorted(listed) == sorted(CODEC_NAMES)
    with pytest.raises(ValueError, match="int8"):
        codec_from_name("int9")


def test_allowlist_file_is_parsed_strictly(tmp_path):
    from peerlearn.cli.daemon import read_allowlist

    good = tmp_path / "allow"
    good.write_text("# swarm members\n" + "ab" * 32 + "  # peer a\n\n" + "CD" * 32 + "\n")
    assert read_allowlist(str(good)) == [b"\xab" * 32, b"\xcd" * 32]
    for text in ("ab" * 31, "zz" * 32, "# only a comment\n"):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(SystemExit):
            read_allowlist(str(bad))


def test_bench_allreduce_times_each_codec_and_gloo_in_one_run():
    r = peerlearn("bench", "allreduce", "--peers", "2", "--numel", "100000", "--codec",
                  "none,int8", "--repeat", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["ours"]) == {"none", "int8"}
    assert all(v["seconds"] > 0 and len(v["all_runs_s"]) == 1 for v in out["ours"].values())
    assert out["gloo"]["seconds"] > 0
    assert set(out["speedup_vs_gloo"]) == {"none", "int8"} and set(out["codec_speedup"]) == {"int8"}


def test_credentials_are_an_allowlist_or_a_secret(tmp_path, monkeypatch):
    from peerlearn.cli.daemon import SECRET_ENV, read_credentials

    allow = tmp_path / "allow"
    allow.write_text("ab" * 32 + "\n")
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert read_credentials(None, str(allow)) == (None, [b"\xab" * 32])
    with pytest.raises(SystemExit):  # neither: refused, not an open swarm
        read_credentials(None, None)
    secret = "cli-credentials-test-secret-0123"
    monkeypatch.setenv(SECRET_ENV, secret)
    assert read_credentials(None, str(allow)) == (secret.encode(), [b"\xab" * 32])
    assert read_credentials(None, None) == (secret.encode(), None)


def _held_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_ordinary_mistakes_give_one_line_and_no_traceback(tmp_path):
    """A user's mistake names the problem in a line and exits non-zero; a
    traceback or a silent fallback (a port over 65535 bound another port) is a bug.
    (Permission denied is not among the cases: tests run as root here.)"""
    import os
    held, port = _held_port()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    env = dict(os.environ, PEERLEARN_SECRET="kq3W9zP0xV7mB2nR5tY8uC1eD4fG6hJ-aSdLq0Zx9Vb")
    cases = {
        "control port in use": (["--listen", f"127.0.0.1:{port}"], "in use"),
        "data port in use": (["--data-port", str(port)], "in use"),
        "metrics port in use": (["--metrics", f"127.0.0.1:{port}"], "in use"),
        "data dir is a file": (["--data-dir", str(afile)], "exists"),
        "data dir cannot be made": (["--data-dir", "/proc/no/such"], "No such file"),
        "unknown codec": (["--codec", "nope"], "unknown codec"),
        "missing secret file": (["--secret-file", str(tmp_path / "none")], "secret file"),
        "port out of range": (["--listen", "127.0.0.1:99999"], "0..65535"),
        "not HOST:PORT": (["--listen", "nonsense"], "HOST:PORT"),
    }
    try:
        for name, (args, says) in cases.items():
            argv = [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                    "--data-dir", str(tmp_path / name.replace(" ", "-")), *args]
            out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
            assert out.returncode != 0, name
            # Plain and rich tracebacks both name source files.
            assert "Traceback" not in out.stderr and ".py:" not in out.stderr, \
                (name, out.stderr[-1500:])
            assert says in flat(out.stderr), (name, out.stderr[-1500:])
    finally:
        held.close()


def test_streaming_settings_that_cannot_run_are_refused_before_starting(tmp_path):
    import os
    env = dict(os.environ, PEERLEARN_SECRET="kq3W9zP0xV7mB2nR5tY8uC1eD4fG6hJ-aSdLq0Zx9Vb")
    for args, says in ((["--H", "50", "--P", "4"], "multiple of P"),
                       (["--H", "8", "--P", "4", "--tau", "2"], "tau")):
        out = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "run", "--algo",
                              "streaming", "--data-dir", str(tmp_path / "p"), *args],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 1 and says in flat(out.stderr) and ".py:" not in out.stderr, \
            out.stderr
        assert not (tmp_path / "p").exists()  # refused before the peer started


SECRET = "kq3W9zP0xV7mB2nR5tY8uC1eD4fG6hJ-aSdLq0Zx9Vb"


def _env(**extra):
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERLEARN_")}
    return dict(env, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1", **extra)


def test_settings_come_from_flags_then_environment_then_file_then_defaults(tmp_path):
    """The value that wins shows in the one-line error a bad --listen gives
    (split before anything starts); then a peer starts from a file alone."""
    conf = tmp_path / "peer.toml"
    conf.write_text('listen = "from-file"\n[run]\nalgo = "synthetic"\n[status]\njson = true\n')

    def said(*args, **env) -> str:
        out = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "run",
                              "--data-dir", str(tmp_path / "d"), *args],
                             capture_output=True, text=True, env=_env(**env), timeout=60)
        assert out.returncode != 0 and ".py:" not in out.stderr, out.stderr
        return flat(out.stderr)

    assert "'from-flag'" in said("--config", str(conf), "--listen", "from-flag",
                                 PEERLEARN_LISTEN="from-env")
    assert "'from-env'" in said("--config", str(conf), PEERLEARN_LISTEN="from-env")
    assert "'from-file'" in said("--config", str(conf))
    assert "'from-file'" in said(PEERLEARN_CONFIG=str(conf))  # the file named by the environment
    # Mistakes in the file are one line too.
    bad = tmp_path / "bad.toml"
    bad.write_text('lisen = "x"\n')
    assert "no setting 'lisen'" in said("--config", str(bad))
    bad.write_text('listen = \n')
    assert "not valid TOML" in said("--config", str(bad))
    # A whole peer from the file (types converted: ints, floats, off).
    conf.write_text(f'listen = "127.0.0.1:0"\nmetrics = "off"\ndata-dir = "{tmp_path / "p"}"\n'
                    '[run]\nalgo = "synthetic"\nnumel = 1000\ncompute_s = 0.1\n')
    p = subprocess.Popen([sys.executable, "-m", "peerlearn.cli.app", "run", "--config", str(conf)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        hello = json.loads(p.stdout.readline())
        assert hello["control"].startswith("127.0.0.1:") and hello["metrics_port"] is None
        assert "--numel 1000" in hello["join_command"]
        assert (tmp_path / "p").is_dir()
    finally:
        p.terminate()
        p.wait(20)


def test_help_names_each_options_environment_variable():
    out = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "run", "--help"],
                         capture_output=True, text=True, timeout=60,
                         env=_env(COLUMNS="250", NO_COLOR="1", TERM="dumb"))
    import re
    flags = set(re.findall(r"(?<![\w-])--([a-z][\w-]*)", out.stdout)) - {"help"}
    for flag in flags - {"config"}:
        assert f"PEERLEARN_{flag.upper().replace('-', '_')}" in out.stdout, flag
    assert "PEERLEARN_CONFIG" in out.stdout and \
        "flags > PEERLEARN_* environment" in flat(out.stdout)


def test_metrics_default_port_is_the_deployment_files_port():
    from peerlearn.cli import app, metrics

    assert app.DEFAULT_METRICS_PORT == metrics.DEFAULT_PORT == 9400


def _start(args, **env):
    p = subprocess.Popen([sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
                          "--numel", "1000", "--compute-s", "0.1", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return p, json.loads(line)


def test_advertise_is_what_other_peers_are_told_and_status_watch_refreshes(tmp_path):
    """Bound on 0.0.0.0: the founder advertises --advertise, a joiner the
    address its route to the founder leaves from; nobody is told 0.0.0.0.
    The founder prints the command that joins it; `status --watch` refreshes."""
    founder, hello = _start(["--listen", "0.0.0.0:0", "--advertise", "127.0.0.1",
                             "--data-dir", str(tmp_path / "a"), "--metrics", "off"])
    joiner = None
    try:
        port = hello["control"].rsplit(":", 1)[1]
        assert hello["control"] == f"127.0.0.1:{port}"
        assert hello["data"].startswith("127.0.0.1:")
        assert f"--join 127.0.0.1:{port} " in hello["join_command"]
        assert SECRET not in hello["join_command"] and SECRET not in founder.stderr.readline()
        joiner, jhello = _start(["--listen", "0.0.0.0:0", "--join", hello["control"],
                                 "--data-dir", str(tmp_path / "b"), "--metrics", "off"])
        assert jhello["control"].startswith("127.0.0.1:")
        watch = subprocess.Popen([sys.executable, "-m", "peerlearn.cli.app", "status",
                                  hello["control"], "--watch", "0.5"],
                                 stdout=subprocess.PIPE, text=True, env=_env())
        import signal
        import time
        time.sleep(6)
        watch.send_signal(signal.SIGINT)
        out, _ = watch.communicate(timeout=20)
        assert watch.returncode == 0
        tables = [t for t in out.split("peers\n") if t.strip()]
        assert len(tables) >= 3, out
        last = tables[-1].splitlines()
        assert len(last) == 2 and all("0.0.0.0" not in r and "127.0.0.1:" in r for r in last), out
    finally:
        for p in (founder, joiner):
            if p is not None:
                p.terminate()
                p.wait(20)


def test_unreachable_advertise_addresses_are_refused_in_one_line(tmp_path):
    for args, says in ((["--listen", "0.0.0.0:0"], "--advertise"),
                       (["--advertise", "0.0.0.0:7400"], "names no machine"),
                       (["--advertise", "[::]"], "names no machine"),
                       (["--advertise", "host:99999"], "1..65535")):
        out = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "run", "--algo",
                              "synthetic", "--data-dir", str(tmp_path / "d"), *args],
                             capture_output=True, text=True, env=_env(), timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and says in lines[0], (args, out.stderr)
        assert not (tmp_path / "d").exists()


def test_log_levels_json_lines_and_the_view_line_only_on_change(tmp_path):
    """--log-format json: every line one object with its level; -q keeps
    info off; a swarm of two applying many rounds logs its view twice at most."""
    a, hello = _start(["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "a"),
                       "--metrics", "off", "--log-format", "json"])
    b, _ = _start(["--listen", "127.0.0.1:0", "--join", hello["control"], "-q",
                   "--data-dir", str(tmp_path / "b"), "--metrics", "off"])
    import time
    time.sleep(8)
    for p in (a, b):
        p.terminate()
        p.wait(20)
    records = [json.loads(line) for line in a.stderr.read().splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    steps = [r["step"] for r in records if r["logger"] == "peerlearn.synthetic"]
    views = [r for r in records if " view " in r["message"]]
    assert len(steps) >= 10 and 1 <= len(views) <= 3, (len(steps), views)
    assert any("join_command" in r for r in records)
    quiet = b.stderr.read()
    assert " INFO " not in quiet and "contributed" not in quiet, quiet[-500:]


def test_swarm_lines_are_whole_and_prefixed_and_its_directory_goes(tmp_path):
    """`peerlearn swarm`: every line of its output names the peer it comes
    from, and its data directory is gone at the end: after --duration and
    after Ctrl-C."""
    import re
    import signal
    import socket
    import time

    def port_pair() -> int:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port < 65000:
                return port

    out = subprocess.run([sys.executable, "-m", "peerlearn.cli.app", "swarm", "--peers", "3",
                          "--duration", "10", "--base-port", str(port_pair()), "--compute-s",
                          "0.2", "--numel", "2000", "--progress", "plain"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert all(re.match(r"\[(peer[0-2]|swarm)\] \S", ln) for ln in lines), \
        [ln for ln in lines if not re.match(r"\[(peer[0-2]|swarm)\] \S", ln)]
    # Every peer spoke; rounds ran (a loaded machine may admit the last joiner late).
    assert {ln.split("]")[0] for ln in lines} >= {"[peer0", "[peer1", "[peer2", "[swarm"}
    assert len({ln.split("]")[0] for ln in lines if " step " in ln}) >= 2, out.stderr[-2000:]
    work = re.search(r"data in (\S+)", out.stderr).group(1)
    assert not os.path.exists(work)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3

    p = subprocess.Popen([sys.executable, "-m", "peerlearn.cli.app", "swarm", "--peers", "2",
                          "--base-port", str(port_pair()), "--compute-s", "0.2", "--numel",
                          "2000", "--progress", "plain"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    first = p.stderr.readline()
    work = re.search(r"data in (\S+)", first).group(1)
    deadline = time.monotonic() + 60
    while not any(os.scandir(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert not os.path.exists(work)


def test_a_training_loop_reports_and_adds_its_own_metrics_on_the_peers_endpoint(tmp_path):
    """peerlearn.telemetry: what a user's loop records and registers is served
    by the peer's metrics endpoint beside the daemon's figures."""
    import urllib.request

    from peerlearn import telemetry
    from peerlearn.cli import metrics
    from peerlearn.swarm.api import Peer
    from peerlearn.swarm.config import PeerConfig

    with pytest.raises(ValueError):
        telemetry.gauge("peerlearn_mine", "reserved prefix")
    grad = telemetry.gauge("cli_test_grad_norm", "L2 norm of the last gradient.")
    peer = Peer(PeerConfig(tmp_path / "p", SECRET.encode())).start()
    port, stop = metrics.serve(peer.daemon, "127.0.0.1", 0)
    try:
        grad.set(1.5)
        telemetry.record_training(algo="mine", inner_step=7, loss=2.25, tokens=100,
                                  learning_rates={"inner": 0.01})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        stop()
        peer.close()
    for line in ("cli_test_grad_norm 1.5", "peerlearn_train_loss 2.25",
                 "peerlearn_train_inner_step 7.0", "peerlearn_train_tokens_total 100.0",
                 'peerlearn_train_learning_rate{optimizer="inner"} 0.01', "peerlearn_members 1.0"):
        assert line in text, line


def test_the_join_command_of_a_gossip_run_carries_its_settings(tmp_path):
    """A gossip run's peers refuse a swarm with other settings: the printed
    command must carry every one that the founder was given."""
    from tests.test_training import TINY

    p = subprocess.Popen([sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "noloco",
                          "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "a"),
                          "--metrics", "off", "--steps", "100000", "--group", "3",
                          "--gamma", "0.25", "--merge-at", "end", "--independent-init",
                          "--noloco-nesterov", *TINY],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        cmd = json.loads(line)["join_command"]
        for setting in ("--algo noloco", "--group 3", "--gamma 0.25", "--merge-at end",
                        "--independent-init", "--noloco-nesterov", "--set n_embd=32"):
            assert setting in cmd, cmd
    finally:
        p.terminate()
        p.wait(30)


def test_the_derived_advertise_address_is_one_host_even_for_ipv6():
    from peerlearn.cli.daemon import local_address_towards

    assert local_address_towards("127.0.0.1", 9) == "127.0.0.1"
    try:
        v6 = local_address_towards("::1", 9)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert v6 == "[::1]"  # bracketed: "HOST:PORT" built from it stays unambiguous
