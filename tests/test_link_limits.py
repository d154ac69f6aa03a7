"""What a sender can make a link listener spend: descriptors (EMFILE), handshake
slots held by a slow client, sockets parked by a member. Real sockets on
loopback; 127.0.0.2 plays a second source address (Linux routes 127/8 to lo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from peerlearn.transport.stream import LinkListener, connect_link
from peerlearn.wire import handshake as hs

SECRET = b"test-swarm-secret-0123456789"
OTHER_SOURCE = ("127.0.0.2", 0)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def closed_by_server(sock: socket.socket, timeout=3.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


_EMFILE_CHILD = r"""
import json, os, resource, sys
from peerlearn.transport.stream import LinkListener
# Few descriptors to spare, and a hard limit equal to the soft one so the
# listener's own raise_fd_limit() cannot lift it.
spare = len(os.listdir("/proc/self/fd")) + 24
resource.setrlimit(resource.RLIMIT_NOFILE, (spare, spare))
lst = LinkListener("127.0.0.1", 0, sys.argv[1].encode(), handshake_timeout=1.0)
print(lst.address[1], flush=True)
link = lst.accept_link(timeout=40)
print(json.dumps({"conns": link.n_conns, "accept_errors": lst.accept_errors,
                  "deadlines": lst.deadlines}), flush=True)
"""


def test_the_listener_survives_emfile_and_still_authenticates_a_link():
    child = subprocess.Popen([sys.executable, "-c", _EMFILE_CHILD, SECRET.decode()],
                             stdout=subprocess.PIPE, text=True)
    idle: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        # Far more idle connections than the child has descriptors: its
        # accept() fails with EMFILE until handshake deadlines free some.
        for _ in range(120):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        time.sleep(1.0)
        link = connect_link("127.0.0.1", port, SECRET, 2, timeout=30)
        link.close()
        out, _ = child.communicate(timeout=30)
    finally:
        for s in idle:
            s.close()
        child.kill()
        child.wait()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["conns"] == 2
    assert report["accept_errors"] > 0, "the flood never hit EMFILE: the test proves nothing"
    assert report["deadlines"] > 0


def test_a_dribbling_client_is_dropped_at_the_handshake_deadline():
    with LinkListener("127.0.0.1", 0, SECRET, handshake_timeout=1.5) as lst:
        slow = socket.create_connection(lst.address)
        with slow:
            started = time.monotonic()
            dropped_at = None
            # One byte every 0.5 s: each read is quick, only the whole is slow.
            for _ in range(16):
                try:
                    slow.send(b"P")
                except OSError:
                    dropped_at = time.monotonic() - started
                    break
                if closed_by_server(slow, timeout=0.5):
                    dropped_at = time.monotonic() - started
                    break
            # Meanwhile a real link still gets through.
            link = connect_link(*lst.address, SECRET, 2, timeout=5)
            server = lst.accept_link(timeout=5)
            link.close()
            server.close()
        assert dropped_at is not None and dropped_at < 3.0, f"still connected after {dropped_at}"
        assert lst.deadlines == 1
        assert lst.rejected == 1


def _idle_from_other_source(address, n):
    return [socket.create_connection(address, source_address=OTHER_SOURCE) for _ in range(n)]


def test_handshakes_per_source_are_bounded_and_counted():
    with LinkListener("127.0.0.1", 0, SECRET, handshake_timeout=5, max_per_source=4) as lst:
        idle = _idle_from_other_source(lst.address, 10)
        try:
            assert wait_for(lambda: lst.refused == 6)
            assert sum(closed_by_server(s, timeout=0.2) for s in idle) == 6
            link = connect_link(*lst.address, SECRET, 3, timeout=5)  # another address
            lst.accept_link(timeout=5).close()
            link.close()
        finally:
            for s in idle:
                s.close()
        assert lst.refused == 6


def test_handshakes_in_total_are_bounded():
    with LinkListener("127.0.0.1", 0, SECRET, handshake_timeout=5, max_pending=3) as lst:
        idle = _idle_from_other_source(lst.address, 5)
        try:
            assert wait_for(lambda: lst.refused == 2)
        finally:
            for s in idle:
                s.close()


def _half_link(address) -> socket.socket:
    """An authenticated first connection of a 2-connection link that never completes."""
    s = socket.create_connection(address, source_address=OTHER_SOURCE)
    client = hs.ClientHandshake(SECRET, os.urandom(16), 0, 2)
    s.sendall(client.hello())
    s.sendall(client.on_challenge(_read(s, hs.CHALLENGE_BYTES)))
    return s


def _read(s, n):
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            break
        buf += part
    return buf


def test_a_member_cannot_park_sockets_of_incomplete_links_without_bound():
    with LinkListener("127.0.0.1", 0, SECRET, max_pending_socks_per_source=4) as lst:
        parked = [_half_link(lst.address) for _ in range(6)]
        try:
            accepted = [_read(s, hs.ACCEPT_BYTES)[:4] == hs.ACCEPT_MAGIC for s in parked]
            assert accepted.count(True) == 4
            # The refusal is counted by the handshake thread, just after it closes the socket.
            assert wait_for(lambda: lst.refused == 2)
            link = connect_link(*lst.address, SECRET, 2, timeout=5)
            lst.accept_link(timeout=5).close()
            link.close()
        finally:
            for s in parked:
                s.close()


def test_a_listener_raises_the_soft_descriptor_limit():
    soft = 256
    code = (
        "import resource\n"
        "h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, h))\n"
        "from peerlearn.transport.stream import LinkListener\n"
        f"LinkListener('127.0.0.1', 0, {SECRET!r}).close()\n"
        "s, h2 = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "assert s == h2 == h, (s, h2, h)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
