"""A swarm's credentials as a peer's command line reads them: the secret (a
file, else $PEERLEARN_SECRET), refused in one line when missing, weak or
readable by others; an allowlist swarm's key file; a new secret file."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

SECRET_ENV = "PEERLEARN_SECRET"


def read_secret(secret_file: str | None) -> bytes:
    """The swarm secret from a file (surrounding whitespace stripped), else from
    $PEERLEARN_SECRET. A missing, unreadable or weak secret exits with one line
    saying why (the rule: peerlearn.transport.swarm_secret)."""
    from peerlearn.transport.swarm_secret import WeakSecretError, check_secret

    if secret_file:
        try:
            check_secret_file_mode(secret_file)
            secret = Path(secret_file).read_bytes().strip()
        except OSError as e:
            raise SystemExit(f"cannot read the secret file {secret_file}: {e.strerror}") from None
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if not secret:
        raise SystemExit(f"a swarm secret is needed: --secret-file or ${SECRET_ENV} "
                         "(make one with `peerlearn secret new`)")
    try:
        return check_secret(secret)
    except WeakSecretError as e:
        raise SystemExit(f"refusing a weak secret: {e}") from None


def check_secret_file_mode(secret_file: str) -> None:
    """Refuses, in one line, a secret file other users can read or write, as
    ssh refuses such a private key: whoever reads it is a member. A file owned
    by root may also be group-readable when we are not root (a Kubernetes
    Secret volume with fsGroup is root:fsGroup 0440; PostgreSQL's rule for its
    key files). Anything but a regular file (a pipe from <(...)) is not judged."""
    st = os.stat(secret_file)
    if not stat.S_ISREG(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    allowed = 0o040 if st.st_uid == 0 and os.getuid() != 0 else 0
    if mode & 0o077 & ~allowed:
        who = "other users" if mode & 0o007 else "its group"
        raise SystemExit(f"peerlearn: the secret file {secret_file} can be read or written by "
                         f"{who} (mode {mode:04o}), and whoever reads it is a member of the "
                         f"swarm: chmod 600 {shlex.quote(secret_file)}")


def read_credentials(secret_file: str | None,
                     allowlist_file: str | None) -> tuple[bytes | None, list[bytes] | None]:
    """(secret, allowlist): an allowlist file alone means an allowlist swarm (no
    secret); otherwise the secret is required (file, else $PEERLEARN_SECRET)."""
    keys = read_allowlist(allowlist_file) if allowlist_file else None
    if keys and not secret_file and not os.environ.get(SECRET_ENV):
        return None, keys
    return read_secret(secret_file), keys


def read_allowlist(path: str) -> list[bytes]:
    """Ed25519 public keys, hex, one per line ('#' starts a comment)."""
    keys = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise SystemExit(f"{path}:{n}: expected a 64-hex-digit Ed25519 public key")
        keys.append(key)
    if not keys:
        raise SystemExit(f"{path}: the allowlist is empty")
    return keys


def write_secret_file(path: Path, secret: str) -> Path:
    """A new file holding secret, mode 0600 from its creation (never readable
    by others, not even for a moment); an existing file is never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path
