"""Everything a peer sends is counted (transport.traffic.WIRE): control
messages and state transfers beside the collectives, on both sides of the
wire, a failed transfer's bytes included; metrics and training reports show
each kind and the total."""

from __future__ import annotations

import asyncio
import time

import torch

from peerlearn.algorithms.training import bytes_report, traffic_bytes
from peerlearn.state.shared import SharedState
from peerlearn.swarm.api import Peer
from peerlearn.swarm.peer import PeerConfig
from peerlearn.transport.control import ControlPlane
from peerlearn.transport.link import StreamError
from peerlearn.transport.traffic import CONTROL, WIRE
from peerlearn.wire import control as m
from test_api import FAST, SECRET
from test_control_plane import beat, ident, raw_dealer
from test_stream import Pair, in_thread

N = 300_000  # 1.2 MB of fp32: the state transfer dwarfs its frame headers


def grown(before: dict) -> dict:
    after = WIRE.snapshot()
    return {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}


def test_a_control_message_is_counted_as_its_frame_on_both_sides(tmp_path):
    """Sender's key and message, as handed to zmq and taken from it; an
    invalid frame that reached us counts as received too."""
    async def main():
        a, b = ident(tmp_path, "a"), ident(tmp_path, "b")
        pa = ControlPlane(a, "127.0.0.1", 0, secret=SECRET)
        pb = ControlPlane(b, "127.0.0.1", 0, secret=SECRET)
        d = None
        try:
            before = WIRE.snapshot()
            pa.send(f"127.0.0.1:{pb.port}", beat(a))
            assert grown(before)[("sent", CONTROL)] == 32 + len(m.encode(beat(a)))
            await asyncio.wait_for(pb.recv(), 5)
            assert grown(before)[("received", CONTROL)] == 32 + len(m.encode(beat(a)))
            # Garbage from a holder of the secret is dropped, and still counted.
            d = raw_dealer(pb.ctx, a, pb.port, SECRET)
            before = WIRE.snapshot()
            await d.send(b"\x01" * 100)
            reading = asyncio.ensure_future(pb.recv())  # drops it, then waits on
            deadline = time.monotonic() + 5
            while pb.rejected_messages < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            reading.cancel()
            assert pb.rejected_messages == 1
            assert grown(before)[("received", CONTROL)] == 100
        finally:
            if d is not None:
                d.close(linger=0)
            pa.close()
            pb.close()

    asyncio.run(main())


def test_a_failed_transfer_counts_the_bytes_that_went_out():
    """A receiver expecting another op fails at the first frame header and
    cuts the link; the sender's bytes up to the cut are counted, not dropped."""
    p = Pair()
    try:
        before = WIRE.snapshot()
        x = torch.zeros(16 << 20)  # 64 MB: more than the sockets' buffers hold
        r = in_thread(p.server.recv_into, torch.empty_like(x), op_id=2)
        try:
            p.client.send(x, op_id=1, timeout=10)
        except StreamError:
            pass
        try:
            r.result()
        except StreamError:
            pass
        moved = grown(before)
        traffic = p.client._root.traffic
        assert moved[("received", traffic)] >= 40  # one frame header
        assert moved[("received", traffic)] < moved[("sent", traffic)] < x.numel() * 4
    finally:
        p.close()


def initial() -> SharedState:
    st = SharedState(0)
    st.register("w", torch.zeros(N))
    st.register("m", torch.zeros(3, 7, dtype=torch.bfloat16))
    return st


def test_a_joiners_sync_and_the_control_plane_are_counted_on_both_sides(tmp_path):
    """One process, two peers: the donor's state bytes sent equal the
    joiner's received, the state's size plus a few frame headers; control
    bytes sent by the two reach the other in full; the metrics and a
    training report show them."""
    from peerlearn.cli.metrics import PeerCollector

    state_bytes = sum(t.numel() * t.element_size() for t in initial().tensors.values())
    founder = Peer(PeerConfig(tmp_path / "p0", SECRET, timeouts=FAST), initial).start()
    joiner = None
    try:
        before, since = WIRE.snapshot(), traffic_bytes()
        joiner = Peer(PeerConfig(tmp_path / "p1", SECRET, timeouts=FAST,
                                 join=founder.control_address), initial).start(timeout=20)
        joiner.sync_state(timeout=20)
        assert joiner.daemon.syncs >= 1  # a joiner always fetches the swarm's state
        deadline = time.monotonic() + 5
        # The donor counts its push once the last send returns: maybe just after.
        while (grown(before).get(("sent", "state"), 0) < grown(before)[("received", "state")]
               and time.monotonic() < deadline):
            time.sleep(0.02)
        moved = grown(before)
        served, fetched = moved[("sent", "state")], moved[("received", "state")]
        syncs, failed = joiner.daemon.syncs, joiner.daemon.sync_failures
        # Each sync moves the whole state, a 40-byte header per frame on top;
        # a fetch given up (none, unless this machine is very slow) moves part.
        assert syncs * state_bytes <= fetched <= (syncs + failed) * (state_bytes * 1.01 + 1024)
        if failed == 0:
            assert served == fetched
        else:  # a donor may have pushed more than the joiner read before giving up
            assert served >= syncs * state_bytes

        # Whatever either peer sent the other has received a moment later.
        sent_before = WIRE.snapshot()[("sent", CONTROL)]
        time.sleep(1.0)  # loopback, idle loops: every message arrives well within
        received = WIRE.snapshot()[("received", CONTROL)]
        sent_after = WIRE.snapshot()[("sent", CONTROL)]
        start_sent = before.get(("sent", CONTROL), 0)
        start_received = before.get(("received", CONTROL), 0)
        assert sent_before - start_sent > 0
        assert sent_before - start_sent <= received - start_received <= sent_after - start_sent

        samples = {(s.labels["direction"], s.labels["traffic"]): s.value
                   for fam in PeerCollector(founder.daemon).collect()
                   if fam.name == "peerlearn_wire_bytes" for s in fam.samples}
        assert samples[("sent", CONTROL)] >= sent_after
        assert samples[("received", "state")] >= fetched

        report = bytes_report(since)
        assert report["bytes_sent_state"] >= served and report["bytes_received_state"] >= fetched
        assert report["bytes_sent_control"] > 0 and report["bytes_received_control"] > 0
        for d in ("sent", "received"):
            assert report[f"bytes_{d}"] == sum(report[f"bytes_{d}_{k}"]
                                               for k in ("collective", "state", "control"))
    finally:
        if joiner is not None:
            joiner.close()
        founder.close()
