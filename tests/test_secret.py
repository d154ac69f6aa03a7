"""Swarm secrets: weak ones are refused everywhere, `peerlearn secret new` makes good ones."""

import os
import secrets
import stat
import subprocess
import sys

import pytest

from peerlearn.swarm.config import PeerConfig
from peerlearn.transport import keys
from peerlearn.transport.swarm_secret import WeakSecretError, check_secret, new_secret

WEAK = [
    b"short-secret",  # under 16 bytes
    b"s" * 16,  # one symbol
    b"passwordpassword1234",  # 20 lowercase+digits: 103 bits
    b"0123456789abcdef" * 2,  # 32 hex, but one block repeated
    b"0" * 31 + b"123456789",  # one symbol is most of it
    b"ab" * 40,
    b"0123456789" * 3 + b"01234",  # 35 digits: 116 bits
    b"\x00" * 32,
    b"x" * 2000,  # over the length limit
]
STRONG = [
    secrets.token_hex(16).encode(),  # 128 bits, the shortest hex accepted
    secrets.token_urlsafe(16).encode(),  # 22 base64url characters
    secrets.token_bytes(16),
    secrets.token_urlsafe(32).encode(),
    b"swarm-test-secret-0123456789",  # 28 base64url symbols: the tests' own
]


@pytest.mark.parametrize("weak", WEAK)
def test_weak_secrets_are_refused_by_the_library(weak, tmp_path):
    with pytest.raises(WeakSecretError) as e:
        check_secret(weak)
    assert "\n" not in str(e.value) and weak.decode("latin-1") not in str(e.value)
    with pytest.raises(WeakSecretError):
        PeerConfig(tmp_path, weak)
    with pytest.raises(WeakSecretError):
        keys.data_secret(weak)
    with pytest.raises(WeakSecretError):
        keys.swarm_server_keypair(weak)


@pytest.mark.parametrize("strong", STRONG)
def test_strong_secrets_are_accepted(strong, tmp_path):
    assert check_secret(strong) == strong
    assert PeerConfig(tmp_path, bytearray(strong)).secret == strong


def test_generated_secrets_are_never_refused():
    # The pattern rule must not reject what a CSPRNG produces: what `peerlearn
    # secret new` and the launchers make (token_urlsafe(32)), and sizes at
    # which even the smallest alphabet the characters could fall in keeps
    # 128 bits. At exactly 16 bytes the rule judges a token by the characters
    # it holds: token_urlsafe(16) gave 22 lowercase letters and digits (114
    # bits by that alphabet) in a CI run, (36/64)^22, about 3e-6 a token, and
    # token_hex(16) all digits would be 106 bits.
    for _ in range(2000):
        check_secret(new_secret().encode())
        check_secret(secrets.token_hex(20).encode())  # 40 digits at worst: 133 bits
        check_secret(secrets.token_urlsafe(24).encode())  # 32 symbols: 150 bits if all [a-z]
        check_secret(secrets.token_bytes(16))


def peerlearn(*args, env=None):
    return subprocess.run([sys.executable, "-m", "peerlearn.cli.app", *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("weak", ["hunter2hunter2hunter2", "s" * 16, "short"])
def test_cli_refuses_a_weak_secret_with_one_line(weak, tmp_path):
    env = {"PEERLEARN_SECRET": weak}
    r = peerlearn("run", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0", env=env)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "secret" in lines[0], r.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was created
    f = tmp_path / "secret"
    f.write_text(weak + "\n")
    r = peerlearn("status", "127.0.0.1:1", "--secret-file", str(f))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_secret_new_prints_an_accepted_256_bit_secret():
    r = peerlearn("secret", "new")
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip()
    assert len(printed) == 43  # 256 bits of base64url
    assert check_secret(printed.encode())
    assert peerlearn("secret", "new").stdout.strip() != printed


def test_secret_new_writes_a_0600_file_the_cli_accepts(tmp_path):
    from peerlearn.cli.daemon import read_secret

    out = tmp_path / "swarm.secret"
    r = peerlearn("secret", "new", "--out", str(out))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first = out.read_bytes()
    assert read_secret(str(out)) == first.strip() and len(first.strip()) == 43
    # An existing secret file is a swarm's credential: not replaced without --force.
    r = peerlearn("secret", "new", "--out", str(out))
    assert r.returncode != 0 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == first
    assert peerlearn("secret", "new", "--out", str(out), "--force").returncode == 0
    assert out.read_bytes() != first and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["swarm.secret"]  # no temporary left
