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
