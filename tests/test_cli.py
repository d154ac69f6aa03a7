"""The command line: entry points exist and benchmarks print parseable JSON."""

import json
import subprocess
import sys

import pytest


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

    from peerlearn.cli.app import _CODEC_HELP
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
            assert says in out.stderr, (name, out.stderr[-1500:])
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
        assert out.returncode == 1 and says in out.stderr and ".py:" not in out.stderr, out.stderr
        assert not (tmp_path / "p").exists()  # refused before the peer started
