"""A running peer daemon under hostile input: every bad thing is refused and
counted in its Prometheus metrics, and the peer keeps training."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import msgpack
import zmq

from peerlearn.state.identity import Identity
from peerlearn.transport import keys
from peerlearn.transport.control import ControlPlane
from peerlearn.wire import control as m

SECRET = "hostile-test-secret-0123456789"


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    # Labelled series (e.g. rejected messages by reason) are summed under their name.
    out: dict[str, float] = {}
    for k, v in re.findall(r"^(peerlearn_\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M):
        out[k] = out.get(k, 0.0) + float(v)
    return out


def wait_for(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.1)
    return False


def test_hostile_input_is_refused_counted_and_survived(tmp_path):
    env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
         "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "peer"), "--numel", "10000", "--compute-s", "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "peer.log", "w"), text=True)
    try:
        hello = json.loads(proc.stdout.readline())
        mport = hello["metrics_port"]
        chost, cport = hello["control"].rsplit(":", 1)
        dhost, dport = hello["data"].rsplit(":", 1)
        assert wait_for(lambda: scrape(mport).get("peerlearn_step", 0) >= 2)
        base = scrape(mport)

        # 1. A stranger without the secret: the CURVE handshake fails.
        async def stranger():
            p = ControlPlane(Identity.load_or_create(tmp_path / "s"), "127.0.0.1", 0,
                             secret=b"not-the-secret-not-the-secret!!")
            p.send(hello["control"], m.Leave())
            await asyncio.sleep(1.0)
            p.close()
        asyncio.run(stranger())

        # 2. A member-in-good-standing's key, but hostile frames.
        me = Identity.load_or_create(tmp_path / "m")
        pub, sec = keys.curve_keypair_from_ed25519(me.private_key)
        ctx = zmq.Context()
        d = ctx.socket(zmq.DEALER)
        d.curve_serverkey = keys.swarm_server_keypair(SECRET.encode())[0]
        d.curve_publickey, d.curve_secretkey, d.linger = pub, sec, 0
        d.connect(f"tcp://{chost}:{cport}")
        good = msgpack.packb({"t": "heartbeat"})
        hostile = [
            [me.public_raw + b"\xc1garbage"],  # not msgpack
            [me.public_raw + good[:-1]],  # truncated / wrong fields
            [me.public_raw + b"\x00" * (m.MAX_MESSAGE_BYTES + 100)],  # oversized
            [me.public_raw + good, b"second frame"],  # wrong frame count
            [Identity.load_or_create(tmp_path / "v").public_raw + good],  # impersonation
        ]
        for frames in hostile:
            d.send_multipart(frames)

        # 3. The data plane: raw garbage and a handshake with the wrong secret.
        with socket.create_connection((dhost, int(dport))) as s:
            s.sendall(b"\x16\x03\x01 definitely not peerlearn" * 4)
            s.settimeout(5)
            try:  # closed on us without a word (a reset when our bytes were unread)
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass

        def counted():
            now = scrape(mport)
            return (now["peerlearn_control_refused_connections_total"]
                    >= base["peerlearn_control_refused_connections_total"] + 1
                    and now["peerlearn_control_rejected_messages_total"]
                    >= base["peerlearn_control_rejected_messages_total"] + len(hostile)
                    and now["peerlearn_data_refused_connections_total"]
                    >= base["peerlearn_data_refused_connections_total"] + 1)
        assert wait_for(counted), (base, scrape(mport))
        d.close()
        ctx.term()

        # 4. And it goes on training.
        step = scrape(mport)["peerlearn_step"]
        assert wait_for(lambda: scrape(mport)["peerlearn_step"] >= step + 3)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert proc.returncode == 0


def scrape_labelled(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {k: float(v) for k, v in
            re.findall(rf'^{name}{{reason="(\w+)"}} ([0-9.e+-]+)$', text, re.M)}


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    """A process's RSS every 10 ms, on a thread: `peak(since, until)` is the
    largest sample in that span of time.monotonic()."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.samples.append((time.monotonic(), rss_bytes(self.pid)))
            except (OSError, AssertionError):  # the process is gone
                return

    def peak(self, since: float, until: float) -> int:
        span = [rss for t, rss in list(self.samples) if since <= t <= until]
        assert len(span) >= 20, f"{len(span)} RSS samples: the sampler was starved"
        return max(span)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_member_flooding_status_and_state_requests_is_bounded(tmp_path):
    """A secret holder sends 1300 StatusRequests (each naming its own reply
    address) and 48 StateRequests for a 16 MiB state: replies are rate
    limited, state is served once per requester from one snapshot, the rest is
    refused and counted, and the peer keeps training with bounded sockets and memory."""
    # Large blocks always mmapped and unmapped on free: RSS then tracks live
    # memory, not what glibc's adaptive threshold keeps in its heap (which made
    # the same run measure +50 MiB here and +120 MiB on CI).
    env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1",
               MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    proc = subprocess.Popen(
        [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
         "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "peer"), "--numel", str(4 << 20), "--compute-s", "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "peer.log", "w"), text=True)
    rss = None
    try:
        hello = json.loads(proc.stdout.readline())
        mport = hello["metrics_port"]
        # Memory is compared peak to peak, each peak over at least 10 applied
        # rounds (so over a checkpoint too: one every 10 steps). The peer's RSS
        # swings within every round with its buffers for the 16 MiB state
        # (measured 272..350 MiB). The old check took the largest RSS of one
        # quiet second against one sample after the flood: a second without
        # a round's peak (a loaded machine runs fewer rounds) against a sample
        # at a peak measures ~+78 MiB before the flood kept anything, close to
        # the bound it then failed once under load.
        def applied_more(n: int) -> None:
            step = scrape(mport)["peerlearn_step"]
            assert wait_for(lambda: scrape(mport)["peerlearn_step"] >= step + n, 60), \
                f"fewer than {n} rounds in 60 s"

        # Past warm-up (allocator arenas, first checkpoint).
        assert wait_for(lambda: scrape(mport).get("peerlearn_step", 0) >= 30, 30)
        rss = RssSampler(proc.pid)
        t0 = time.monotonic()
        applied_more(10)
        t1 = time.monotonic()
        rss_before = rss.peak(t0, t1)
        fds_before = len(os.listdir(f"/proc/{proc.pid}/fd"))

        # 1300 sent; at most the burst (10) and 5/s for the few seconds the flood takes pass.
        def counted() -> bool:
            r = scrape_labelled(mport, "peerlearn_refused_total")
            return r["status_rate"] >= 1200 - 5 * 30 and r["state_request"] >= 40

        async def flood():
            p = ControlPlane(Identity.load_or_create(tmp_path / "m"), "127.0.0.1", 0,
                             secret=SECRET.encode())
            me = m.PeerInfo(p.peer_id, f"127.0.0.1:{p.port}", "127.0.0.1:9")

            # The sender's queue holds 1000 messages (its high-water mark):
            # on a loaded machine the peer drains it slower than a burst
            # fills it, and the rest were dropped here, never reaching the
            # peer (CI: 989 counted, no state request). Each message is
            # offered until the queue takes it, so the peer sees them all.
            async def deliver(msg) -> None:
                while True:
                    dropped = p.dropped_sends
                    p.send(hello["control"], msg)
                    if p.dropped_sends == dropped:
                        return
                    await asyncio.sleep(0.01)

            await deliver(m.Join(me))
            for i in range(1300):
                await deliver(m.StatusRequest(f"127.0.0.{1 + i % 200}:{1000 + i}"))
            for i in range(48):
                await deliver(m.StateRequest(0, b"\0" * 8, 0, 1, i))
            # The socket closes without linger: it stays open until the peer
            # counted the flood (it may still be working through it).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not await asyncio.to_thread(counted):
                await asyncio.sleep(0.2)
            p.close()
        asyncio.run(flood())

        refused = scrape_labelled(mport, "peerlearn_refused_total")
        assert refused["status_rate"] >= 1200 - 5 * 30, refused
        assert refused["state_request"] >= 40, refused
        # Sockets: the few rate-limited replies linger 2 s each, then close.
        assert wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) < fds_before + 40, 10)
        # It goes on training; the peak over the flood and 10 rounds after it.
        applied_more(10)
        grown = rss.peak(t1, time.monotonic()) - rss_before
        # Memory: not one state copy per request (48 x 16 MiB = 768 MiB before
        # the fix). What may stay: at most one snapshot per running push plus
        # the newest, 5 x 16 MiB; one requester gets one push at a time, so
        # 2 x 16 MiB here. Measured on 2 cores, idle and beside 3 or 8 busy
        # loops (load 1.2 to 8.8, 1.6 to 5.8 rounds/s): +2 to +19 MiB in 5 runs,
        # one snapshot. The bound, 6 states, leaves 64 MiB above those 2 for
        # rounds and checkpoints that overlap otherwise, and fails as soon as
        # 6 more copies of the state are held at once (the bug held up to 48).
        assert grown < 96 << 20, f"grew {grown / (1 << 20):.0f} MiB"
        assert proc.poll() is None
    finally:
        if rss is not None:
            rss.close()
        proc.terminate()
        proc.wait(timeout=15)
    assert proc.returncode == 0


def test_a_member_forging_welcomes_and_heartbeats_changes_nothing(tmp_path):
    """A secret holder sends an unsolicited Welcome naming itself the whole
    swarm at epoch 2^64-1, and heartbeats claiming every round aborted: the
    peer keeps its view, counts the rejection, and goes on applying rounds."""
    env = dict(os.environ, PEERLEARN_SECRET=SECRET, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "peerlearn.cli.app", "run", "--algo", "synthetic",
         "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "peer"), "--numel", "10000",
         "--compute-s", "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "peer.log", "w"), text=True)
    u64 = (1 << 64) - 1
    try:
        hello = json.loads(proc.stdout.readline())
        mport = hello["metrics_port"]
        assert wait_for(lambda: scrape(mport).get("peerlearn_step", 0) >= 3, 30)
        base = scrape(mport)

        async def forge():
            p = ControlPlane(Identity.load_or_create(tmp_path / "m"), "127.0.0.1", 0,
                             secret=SECRET.encode())
            me = m.PeerInfo(p.peer_id, f"127.0.0.1:{p.port}", "127.0.0.1:9")
            p.send(hello["control"], m.Welcome(u64, 1_000_000, (me,)))
            for _ in range(30):
                p.send(hello["control"], m.Heartbeat(u64, u64, u64, 1_000_000, b"\x13" * 8,
                                                     True, me))
                await asyncio.sleep(0.1)
            p.close()
        asyncio.run(forge())

        now = scrape(mport)
        assert now["peerlearn_members"] == 1 and now["peerlearn_is_coordinator"] == 1
        # (a taken Welcome would make the forger the view and its coordinator)
        assert now["peerlearn_control_rejected_messages_total"] >= \
            base["peerlearn_control_rejected_messages_total"] + 1
        assert now["peerlearn_rounds_aborted_total"] == base["peerlearn_rounds_aborted_total"]
        assert now["peerlearn_state_syncs_total"] == base["peerlearn_state_syncs_total"]
        assert wait_for(lambda: scrape(mport)["peerlearn_step"] >= now["peerlearn_step"] + 3, 20)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert proc.returncode == 0
