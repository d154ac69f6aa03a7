"""Moving the shared state between peers: serving it as a donor, fetching it.

The round core decides *that* a peer must sync (SyncNeeded) and from whom;
this module does the transfer over the STATE data channel. A requester asks
up to 4 donors (StateRequest, one part each); each answers with the whole
manifest (StateOffer) and pushes its share of the tensors, each as op
`transfer_op(transfer, i)`. `transfer` is the requester's fresh number for
this fetch, so frames of an earlier, abandoned fetch still on a kept link can
never be taken for this one's (they fail the receive instead).

Threads: `StateTransfers` is owned by the daemon's loop. Pushes run on their
own small pool (never the executor that runs rounds: a flood of requests
cannot hold the swarm's rounds up), each reading only the keeper's snapshot
(one copy per state, made on the state thread, dropped after its last push);
pulls run on the loop's default executor into fresh tensors, hashed and
checked finite on the state thread, installed only after the whole state
matches its hash. The loop reads no tensor bytes here.

What a requester can make a donor spend is bounded: it is served only while
its heartbeats show it behind us, one push at a time per requester,
MAX_PUSHES at once in all, and all pushes of a step share one snapshot.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import asyncio
import time
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor

import torch

from peerlearn.state.shared import DTYPES, SharedState
from peerlearn.swarm import rounds as r
from peerlearn.swarm.datalinks import CHANNEL_STATE
from peerlearn.wire import control as m

log = logging.getLogger("peerlearn.peer")

SYNC_OP = 1 << 62
MAX_PUSHES = 4
MAX_DONORS = 4
OFFER_TIMEOUT_S = 10.0
REFUSED_DONOR_S = 5.0  # a donor that refused us is asked last for this long


def transfer_op(transfer: int, index: int) -> int:
    """The data-plane op id of tensor `index` in fetch `transfer`."""
    return SYNC_OP + (transfer << 16) + index  # index < 2^16 (wire: MAX_TENSORS = 4096)


class SyncFailed(PeerlearnError):
    """A fetch could not complete; the core asks again later."""


class BadState(SyncFailed):
    """The state arrived whole and is refused: it does not match the hash it
    was announced with, or it is not finite. Whoever announced it lied."""


class StateTransfers:
    def __init__(self, daemon):
        """daemon: the PeerDaemon whose state, core, plane and links this uses (on its loop)."""
        self.d = daemon
        self.pool = ThreadPoolExecutor(MAX_PUSHES, thread_name_prefix="state-push")
        self.pushes: dict[str, asyncio.Task] = {}  # requester -> its push
        self.push_transfer: dict[str, int] = {}  # requester -> its push's transfer number
        self._refused_by: dict[str, float] = {}  # donor -> until when it is asked last
        self._offers: dict[str, asyncio.Future] = {}
        self._transfer = secrets.randbelow(1 << 32)  # a restart does not reuse numbers
        self.refused = 0  # requests refused (not behind, already served, too many)

    # ------------------------------------------------------------ donor

    def _refusal(self, requester: str, req: m.StateRequest) -> str | None:
        d, keeper = self.d, self.d.keeper
        if keeper.state is None or not d.core.synced or keeper.step < req.step:
            return "no such state here"
        if not 0 <= req.part < req.parts:
            return "bad part"
        if requester in self.pushes:
            if self.push_transfer.get(requester) != req.transfer:
                # The requester gave that fetch up and began another: end
                # the old push now (a dial-back requester may never open
                # the link it waits for) so the next request is served.
                d.links.abort(requester, CHANNEL_STATE)
            return "a push to it is running"
        if len(self.pushes) >= MAX_PUSHES:
            return "too many pushes"
        beat = d.core.beats.get(requester)
        if beat is not None and beat.synced and (beat.step > d.core.step or (
                beat.step, beat.state_hash) == (d.core.step, d.core.state_hash)):
            return "it is not behind us"
        return None

    def serve(self, requester: str, req: m.StateRequest) -> None:
        d = self.d
        peer = d.core.known.get(requester)
        if peer is None:
            self.refused += 1
            return
        why = self._refusal(requester, req)
        if why is not None:
            self.refused += 1
            log.debug("%s refused a state request from %s: %s", d.id[:8], requester[:8], why)
            d.plane.send(peer.control, m.StateRefused(req.step, req.state_hash), to=peer.id)
            return
        self.push_transfer[requester] = req.transfer
        self.pushes[requester] = d.spawn(self._push(requester, peer, req))

    async def _push(self, requester: str, peer: m.PeerInfo, req: m.StateRequest) -> None:
        """One requester's share of the state, from the keeper's snapshot (a
        copy made on the state thread, shared by every push of that state:
        the next rounds may apply while pushes are on the wire). A donor that
        has moved past the requested step offers what it holds now: a joiner
        chasing a swarm whose rounds are shorter than a state transfer would
        otherwise always arrive one step late."""
        d = self.d
        try:
            snap = await d.keeper.snapshot(req.step)
            if snap is None:  # our one copy is older than it asks: not now
                self.refused += 1
                d.plane.send(peer.control, m.StateRefused(req.step, req.state_hash), to=peer.id)
                return
            step, digest, manifest, tensors = snap
            try:
                d.plane.send(peer.control, m.StateOffer(step, digest, req.part, req.parts,
                                                        req.transfer, manifest), to=peer.id)
                share = [(i, tensors[e[0]]) for i, e in enumerate(manifest)
                         if i % req.parts == req.part]

                def push() -> None:
                    link = d.links.outgoing(requester, peer.data, timeout=d.cfg.step_timeout,
                                            channel=CHANNEL_STATE)
                    for i, t in share:
                        if t.numel():
                            link.send(t.view(-1).view(torch.uint8), transfer_op(req.transfer, i),
                                      timeout=d.cfg.step_timeout)

                await d.loop.run_in_executor(self.pool, push)
            finally:
                d.keeper.release_snapshot()
        except Exception as e:  # noqa: BLE001 - a push is a task of the daemon's group:
            # whatever a requester's push runs into ends the push, never the peer.
            log.info("%s state push to %s failed: %s: %s", d.id[:8], requester[:8],
                     type(e).__name__, e)
        finally:
            self.pushes.pop(requester, None)
            self.push_transfer.pop(requester, None)

    # ------------------------------------------------------------ requester

    def on_offer(self, sender: str, msg) -> None:
        fut = self._offers.get(sender)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def fetch(self, need: r.SyncNeeded) -> SharedState:
        """The donors' state (need.step or newer), striped over up to MAX_DONORS
        of them, checked against its hash. Raises SyncFailed; nothing of a
        failed fetch is kept, and its links are aborted so no stale frame
        outlives it."""
        d = self.d
        now = time.monotonic()
        self._refused_by = {x: t for x, t in self._refused_by.items() if t > now}
        # Donors that just refused us are left out while others can serve (a
        # push to us may still be running there), and a dial-back requester
        # leaves out dial-back donors while others can (their pushes go
        # through a relay): one refusal fails the whole fetch.
        def order(x: str) -> tuple[bool, bool]:
            info = d.core.known.get(x)
            return x in self._refused_by, d.cfg.dial_back and (info is None or
                                                               info.data == m.DIAL_BACK)
        ranked = sorted(need.donors, key=order)
        donors = ([x for x in ranked if order(x) == (False, False)] or ranked)[:MAX_DONORS]
        self._transfer = (self._transfer + 1) % (1 << 40)
        transfer = self._transfer
        self._offers = {x: d.loop.create_future() for x in donors}
        try:
            for i, x in enumerate(donors):
                d.plane.send(d.core.known[x].control,
                             m.StateRequest(need.step, need.state_hash, i, len(donors), transfer),
                             to=x)
            try:
                offers = await asyncio.wait_for(asyncio.gather(*self._offers.values()),
                                                OFFER_TIMEOUT_S)
            except TimeoutError:
                raise SyncFailed("no offer from every donor in time") from None
            refused = [x for x, o in zip(donors, offers) if isinstance(o, m.StateRefused)]
            if refused:
                for x in refused:
                    self._refused_by[x] = time.monotonic() + REFUSED_DONOR_S
                raise SyncFailed("a donor refused")
            first = offers[0]
            if any((o.step, o.state_hash, o.tensors, o.transfer) !=
                   (first.step, first.state_hash, first.tensors, transfer) for o in offers):
                raise SyncFailed("donors offered different states (a round ended meanwhile)")
            # Received straight into the final tensors, as raw bytes (the wire
            # carries any dtype that way); nothing is installed before the hash check.
            state = SharedState(first.step)
            for name, dt, shape, _ in first.tensors:
                state.tensors[name] = torch.empty(shape, dtype=DTYPES[dt])
            tensors = list(state.tensors.values())
            # Read on the loop: a dial-back requester opens the links itself.
            addresses = {x: d.core.known[x].data for x in donors if x in d.core.known}

            def pull(part: int, donor: str) -> None:
                for i, t in enumerate(tensors):
                    if i % len(donors) == part and t.numel():
                        d.links.recv_into(donor, t.view(-1).view(torch.uint8),
                                          transfer_op(transfer, i), channel=CHANNEL_STATE,
                                          timeout=d.cfg.step_timeout,
                                          address=addresses.get(donor))

            try:
                await asyncio.gather(*[d.loop.run_in_executor(None, pull, i, x)
                                       for i, x in enumerate(donors)])
            except Exception as e:  # noqa: BLE001 - a stream or timeout error of any kind
                raise SyncFailed(f"transfer failed: {e}") from e
            digest, bad = await d.keeper.verify(state)  # read on the state thread
            if digest != first.state_hash:
                raise BadState("fetched state does not match its hash")
            if bad is not None:
                raise BadState(f"fetched state is not finite ({bad} holds NaN or inf)")
            return state
        except SyncFailed:
            for x in donors:
                d.links.abort(x, CHANNEL_STATE)
            raise
        finally:
            self._offers = {}

    def close(self) -> None:
        """Joins the push threads (their links are closed by the daemon first)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
