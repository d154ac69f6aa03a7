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
cannot hold the swarm's rounds up), each reading the live tensors on a loan
from the keeper while its bytes are sent (an apply waits for it, briefly:
keeper.py), or, for a requester whose loan an apply cut, the keeper's
snapshot (one copy per state, dropped after its last push); pulls run on
the loop's default executor into fresh tensors, hashed and checked finite
on the state thread, installed only after the whole state matches its
hash. The loop reads no tensor bytes here.

What a requester can make a donor spend is bounded: it is served only while
its heartbeats show it behind us, one push at a time per requester,
MAX_PUSHES at once in all; a loan held too long is cut by our next apply,
and all pushes from a copy share one snapshot.
"""

from __future__ import annotations

from peerlearn.errors import PeerlearnError

import asyncio
import time
import logging
import secrets
from peerlearn.swarm.priority import bulk_executor

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
ROUND_WAIT_S = OFFER_TIMEOUT_S / 2  # a push waits this long for our round to end
CUT_REMEMBERED_S = 60.0  # a requester whose loan was cut gets copies this long


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
        self.pool = bulk_executor(MAX_PUSHES, "state-push")
        self.pushes: dict[str, asyncio.Task] = {}  # requester -> its push
        self.push_transfer: dict[str, int] = {}  # requester -> its push's transfer number
        self._refused_by: dict[str, float] = {}  # donor -> until when it is asked last
        self._cut: dict[str, float] = {}  # requester -> until when it is served a copy
        self.cut_pushes = 0  # pushes an apply cut
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
        """One requester's share of the state. Its bytes are read from the
        live tensors on a loan (keeper.py: no copy; an apply waits for the
        loan, LEND_WAIT_S at most, then cuts it); a requester whose last loan
        was cut gets a copy instead (the keeper's snapshot, shared by every
        push of that state): its push outlasts the gap between our applies,
        and would be cut again. A donor that has moved past the requested
        step offers what it holds now: a joiner chasing a swarm whose rounds
        are shorter than a state transfer would otherwise always arrive one
        step late."""
        d = self.d
        try:
            now = time.monotonic()
            self._cut = {x: t for x, t in self._cut.items() if t > now}
            copy = requester in self._cut
            if not copy and d.round_task is not None:
                # Our round's apply would cut a loan taken now: begin after it.
                await asyncio.wait({d.round_task}, timeout=ROUND_WAIT_S)
            if copy:
                snap = await d.keeper.snapshot(req.step)
                if snap is None:  # our one copy is older than it asks: not now
                    self.refused += 1
                    d.plane.send(peer.control, m.StateRefused(req.step, req.state_hash),
                                 to=peer.id)
                    return
                step, digest, manifest, tensors = snap
            else:
                step, digest, manifest = await d.keeper.peek()
            try:
                d.plane.send(peer.control, m.StateOffer(step, digest, req.part, req.parts,
                                                        req.transfer, manifest), to=peer.id)
                share = [(i, e[0]) for i, e in enumerate(manifest) if i % req.parts == req.part]
                cut = await d.loop.run_in_executor(
                    self.pool, self._send, requester, peer, req.transfer, share,
                    tensors if copy else (step, digest))
            finally:
                if copy:
                    d.keeper.release_snapshot()
            if cut:
                self.cut_pushes += 1
                self._cut[requester] = time.monotonic() + CUT_REMEMBERED_S
                log.info("%s state push to %s cut by an apply; its next push is from a copy",
                         d.id[:8], requester[:8])
            else:
                self._cut.pop(requester, None)
        except Exception as e:  # noqa: BLE001 - a push is a task of the daemon's group:
            # whatever a requester's push runs into ends the push, never the peer.
            log.info("%s state push to %s failed: %s: %s", d.id[:8], requester[:8],
                     type(e).__name__, e)
        finally:
            self.pushes.pop(requester, None)
            self.push_transfer.pop(requester, None)

    def _send(self, requester: str, peer: m.PeerInfo, transfer: int,
              share: list[tuple[int, str]], source) -> bool:
        """On a push thread: the share's tensors, from a copy (source: name ->
        tensor) or on a loan of the live state at source = (step, hash).
        True if an apply cut the loan (or the state moved on before it)."""
        d = self.d
        link = d.links.outgoing(requester, peer.data, timeout=d.cfg.step_timeout,
                                channel=CHANNEL_STATE)
        loan = None
        if isinstance(source, tuple) and share:
            loan = d.keeper.lend(*source, cut=lambda: d.links.abort(requester, CHANNEL_STATE))
            if loan is None:  # an apply ran since the offer: fail the transfer, not the hash
                d.links.abort(requester, CHANNEL_STATE)
                return True
            source = loan.tensors
        try:
            for i, name in share:
                t = source[name]
                if t.numel():
                    link.send(t.view(-1).view(torch.uint8), transfer_op(transfer, i),
                              timeout=d.cfg.step_timeout)
        except Exception:
            if loan is not None and loan.was_cut:
                return True
            raise
        finally:
            if loan is not None:
                loan.end()  # an apply waiting for it goes on now
        return False

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
        state, tensors = SharedState(0), []
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

            pulls = [d.loop.run_in_executor(None, pull, i, x) for i, x in enumerate(donors)]
            await asyncio.wait(pulls, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((f.exception() for f in pulls if f.done() and f.exception()), None)
            if failed is not None:
                # The other pulls end before the fetch does: left running, they
                # held this state's tensors (and wrote into them) while the
                # next fetch allocated another.
                for x in donors:
                    d.links.abort(x, CHANNEL_STATE)
                await asyncio.gather(*pulls, return_exceptions=True)
                raise SyncFailed(f"transfer failed: {failed}") from failed
            digest, bad = await d.keeper.verify(state)  # read on the state thread
            if digest != first.state_hash:
                raise BadState("fetched state does not match its hash")
            if bad is not None:
                raise BadState(f"fetched state is not finite ({bad} holds NaN or inf)")
            return state
        except BaseException as e:
            if isinstance(e, SyncFailed):
                for x in donors:
                    d.links.abort(x, CHANNEL_STATE)
            # A failed fetch's tensors go now, whoever still holds this frame:
            # the exception's traceback does, and through the pulls' futures
            # it can sit in reference cycles that only a full collection
            # frees. (Joiners re-fetching 1 GB grew 0.5 GiB a fetch until
            # something freed it all at once; which references held it was
            # not traced.)
            state.tensors.clear()
            tensors.clear()
            raise
        finally:
            self._offers = {}

    def close(self) -> None:
        """Joins the push threads (their links are closed by the daemon first)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
