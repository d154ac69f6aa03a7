"""Network-namespace plumbing for the WAN emulator (Linux, root only).

Namespaces are named (``ip netns``) so users can reach them with ``ip netns exec``;
their names start with ``NAME_PREFIX`` followed by the creating process id, which
lets a later emulator remove the ones a killed process left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import shutil
import signal
import struct
import subprocess
import time

NAME_PREFIX = "plwan"
NETNS_DIR = "/run/netns"

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # Python 3.11 has no os.setns; setns(2) moves only the calling thread.
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(netns: str):
    """Run the body with the calling thread in ``netns``; always switches back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
    finally:
        os.close(home)


def ip(*args: str, stdin: str | None = None) -> str:
    """Run ``ip ARGS``; raises with ip's own message on failure."""
    res = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def create(netns: str) -> None:
    ip("netns", "add", netns)


def open_tun(netns: str, ifname: str) -> int:
    """Create TUN device ``ifname`` inside ``netns`` and return its fd.

    The device is not persistent: it disappears when the last copy of the fd is
    closed, so a forwarder that dies takes its devices with it.
    """
    ifr = struct.pack("16sH22x", ifname.encode(), _IFF_TUN | _IFF_NO_PI)
    # The device lands in the namespace the fd was opened in, not the one current
    # at TUNSETIFF, so both happen inside.
    with inside(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
    return fd


def configure(netns: str, ifname: str, cidr: str, mtu: int, txqueuelen: int,
              default_route: bool = False) -> None:
    # addrgenmode none keeps IPv6 link-local chatter (router and neighbour
    # solicitations) off the emulated path; only IPv4 is forwarded anyway.
    ip("-n", netns, "-batch", "-", stdin="\n".join([
        "link set lo up",
        f"link set {ifname} addrgenmode none",
        f"link set {ifname} mtu {mtu} txqueuelen {txqueuelen} up",
        f"addr add {cidr} dev {ifname}",
        *([f"route add default dev {ifname}"] if default_route else []),
    ]) + "\n")


def pids(netns: str) -> list[int]:
    try:
        return [int(p) for p in ip("netns", "pids", netns).split()]
    except RuntimeError:
        return []


def kill_all(netns: str, grace_s: float = 1.0) -> None:
    """End every process still inside ``netns``: SIGTERM, then SIGKILL after grace."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        left = pids(netns)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                return
            sig = signal.SIGKILL
        time.sleep(0.02)


def delete(netns: str) -> None:
    with contextlib.suppress(RuntimeError):
        ip("netns", "del", netns)


def sweep_stale() -> list[str]:
    """Delete emulator namespaces whose creating process no longer exists."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_DIR):
            if not name.startswith(NAME_PREFIX):
                continue
            pid_part = name[len(NAME_PREFIX):].split("-", 1)[0]
            if not pid_part.isdigit() or os.path.exists(f"/proc/{pid_part}"):
                continue
            kill_all(name, grace_s=0.2)
            delete(name)
            removed.append(name)
    return removed


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """Whether this process can build an emulated WAN, and if not, why not."""
    if not os.path.exists("/proc/thread-self/ns/net"):
        return False, "not Linux with network namespaces"
    if os.geteuid() != 0:
        return False, "needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' command not found"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as e:
        return False, f"/dev/net/tun unusable: {e.strerror}"
    try:
        _libc().setns  # noqa: B018 - probing for the symbol
    except AttributeError:
        return False, "libc has no setns()"
    probe = f"{NAME_PREFIX}{os.getpid()}-probe"
    try:
        create(probe)
        os.close(open_tun(probe, "probe0"))
    except (RuntimeError, OSError) as e:
        return False, f"cannot create a namespace with a TUN device: {e}"
    finally:
        delete(probe)
    return True, "ok"
