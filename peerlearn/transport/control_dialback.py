"""Answering peers that cannot be dialled (a mixin of ControlPlane, control.py).

A peer behind NAT advertises m.DIAL_BACK: it greets each DEALER it opens with
a DialBack (a nonce, again every dialback.HELLO_EVERY_S), and is answered on
that connection through our ROUTER, each message signed for its nonce
(dialback.py). Two such peers reach each other through a member both can
reach, which passes the signed message on (at most FORWARD_PER_S per sender).
A dial-back peer reads its DEALERs as well as its ROUTER (`_recv_any`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio

from peerlearn.state.identity import peer_id_of
from peerlearn.transport import dialback
from peerlearn.transport.traffic import CONTROL, WIRE
from peerlearn.wire import control as m
from peerlearn.wire import messages

log = logging.getLogger("peerlearn.transport.control")

MAX_FRAME = 32 + m.MAX_MESSAGE_BYTES  # the sender's Ed25519 key, then the message
FORWARDED_EXTRA = dialback.FORWARD_OVERHEAD  # a message passed on carries its origin's proof
FORWARD_PER_S = 200.0  # messages one member may have us pass on, per second


class DialBackAnswering:
    """Mixed into ControlPlane, whose attributes these methods use."""

    def _hello(self, d: zmq.asyncio.Socket) -> None:
        """On a dial-back peer's DEALER: DialBack first, then at least every
        HELLO_EVERY_S (the far end may have restarted and lost our route)."""
        entry = self._nonce_of.setdefault(d, [dialback.new_nonce(), -1e18])
        now = time.monotonic()
        if now - entry[1] >= dialback.HELLO_EVERY_S:
            entry[1] = now
            self._send_on(d, self._pub + m.encode(m.DialBack(entry[0])))

    def _send_back(self, to: str | None, msg) -> None:
        """To a dial-back peer, on the connection it asked to be answered on,
        signed for it; dropped (counted) when it never asked."""
        route = self._routes.get(to)
        body = messages.encode(msg)
        if route is None:
            via = self.forward_via(to) if to is not None else None
            if via is None:
                self.dropped_sends += 1
                return
            # Neither of us can dial the other: through a member both reach.
            d = self._dealer(via, self._server_pub)
            if d is None:
                self.dropped_sends += 1
                return
            if self.dial_back:
                self._hello(d)
            self._send_on(d, self._pub + dialback.forward_payload(
                self.identity.private_key, to, body))
            return
        self._route_frame(route, body)

    def _route_frame(self, route: tuple[bytes, bytes], body: bytes) -> None:
        routing_id, nonce = route
        frame = self._pub + dialback.sign(self.identity.private_key, nonce, body) + body
        try:
            self._router.send_multipart([routing_id, frame], flags=zmq.NOBLOCK, copy=True)
            WIRE.add("sent", CONTROL, len(frame))
        except zmq.ZMQError:  # EHOSTUNREACH: that connection is gone; Again: full
            self.dropped_sends += 1

    def _pass_on(self, sender: str, frame: bytes) -> None:
        """A member that cannot dial `to` asks us to pass a signed message on
        over to's dial-back route; FORWARD_PER_S per sender (burst twice that)."""
        now = time.monotonic()
        budget = self._forward_budget.setdefault(sender, [2.0 * FORWARD_PER_S, now])
        budget[0] = min(2.0 * FORWARD_PER_S, budget[0] + (now - budget[1]) * FORWARD_PER_S)
        budget[1] = now
        if len(self._forward_budget) > dialback.MAX_ROUTES:
            self._forward_budget.pop(next(iter(self._forward_budget)))
        to, inner = dialback.passed_on(frame[:32], frame[32:])
        route = self._routes.get(to)
        if route is None or budget[0] < 1.0:
            self.dropped_sends += 1
            return
        budget[0] -= 1.0
        self.forwarded += 1
        self._route_frame(route, inner)

    async def _recv_any(self):
        """(None, ROUTER frames), or (sender, message) from one of our
        DEALERs (signed for its nonce), or None (nothing valid this time)."""
        poller = zmq.asyncio.Poller()
        poller.register(self._router, zmq.POLLIN)
        for d in self._nonce_of:
            poller.register(d, zmq.POLLIN)
        try:
            ready = dict(await poller.poll(timeout=200))
        except zmq.ZMQError:  # a DEALER closed meanwhile: poll again
            return None
        if self._router in ready:
            return None, await self._router.recv_multipart(copy=False)
        for d in ready:
            entry = self._nonce_of.get(d)
            if entry is None or d.closed:
                continue
            try:
                frame = d.recv(flags=zmq.NOBLOCK, copy=True)
                if isinstance(frame, asyncio.Future):
                    frame = await frame
            except zmq.ZMQError:
                continue
            WIRE.add("received", CONTROL, len(frame))
            head = 32 + dialback.SIG_BYTES
            if not head < len(frame) <= MAX_FRAME + dialback.SIG_BYTES + FORWARDED_EXTRA:
                self.rejected_messages += 1
                continue
            pub, sig, body = frame[:32], frame[32:head], frame[head:]
            try:
                if not dialback.verified(pub, sig, entry[0], body):
                    raise m.MessageError("not signed by its sender for this connection")
                if body[:4] == dialback.FORWARD:  # passed on by that member
                    pub, body = dialback.received(self.peer_id, body)
                return peer_id_of(pub), messages.decode(body)
            except (m.MessageError, ValueError) as e:
                self.rejected_messages += 1
                log.debug("dropped a control message sent back: %s", e)
        return None
