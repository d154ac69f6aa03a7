"""Prometheus metrics of one peer daemon, and of the training loop beside it.

The daemon knows nothing of Prometheus. At each scrape the collector asks the
daemon's event loop for a snapshot of its counters (`snapshot`, run on the
loop, which owns them) and serves that copy; if the loop does not answer
within SNAPSHOT_TIMEOUT_S (busy, or shutting down) the previous one is served.
Bytes on the wire come from the transports' own thread-safe counters, the
training figures from peerlearn.telemetry (set by the training loop, and by a
user's loop through that module's API).

Names follow the usual conventions: one `peerlearn_` prefix, base units,
counters ending in `_total`, no per-peer labels, bounded label values. The
endpoint also serves prometheus_client's process metrics (`process_*`: CPU,
resident memory, open and max fds, start time; Linux) and `python_info`.
docs/operations.md lists every metric.

The endpoint is plain, unauthenticated HTTP, and deployments in containers
bind it on every interface (a scraper in another container must reach it): it
serves at most MAX_CONNECTIONS connections at once (one thread each; the rest
are closed at once), each read waits at most READ_TIMEOUT_S and a whole
request at most REQUEST_DEADLINE_S, so idle or dribbling connections cannot
pile up threads and descriptors in the peer (prometheus_client's own server
has neither bound). Both are counted in
`peerlearn_refused_total{reason="metrics_connection"}`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

from peerlearn import buildinfo, telemetry
from peerlearn.buildinfo import codec_name
from peerlearn.transport.traffic import CONTROL, WIRE

# The metrics port every deployment file uses; `peerlearn run`'s default.
DEFAULT_PORT = 9400
SNAPSHOT_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 16
READ_TIMEOUT_S = 5.0
REQUEST_DEADLINE_S = 10.0
# The label values of peerlearn_wire_bytes_total, each served from start-up
# (at 0 until bytes move): a counter that appears only with its first byte
# has no rate over its first scrapes, and a dashboard shows "no data" where 0
# is the truth. Traffic classes: peerlearn.swarm.datalinks.traffic_of, "other"
# for a link no owner classed (transport.link.Link.traffic; every link's
# greeting), and the control plane's messages (transport.traffic.CONTROL).
DIRECTIONS = ("sent", "received")
TRAFFIC = ("round", "state", "gossip", "other", CONTROL)
SWIM_STATES = ("alive", "suspect", "dead", "left")  # wire.swim.STATE_NAMES (no torch here)


def snapshot(d) -> dict:
    """On the daemon's loop: a copy of everything the metrics show."""
    now = time.monotonic()
    listener = d.links.listener
    return {
        "step": d.state.step if d.state is not None else 0,
        "members": len(d.core.members),
        "live_peers": sum(d.core.alive(p, now) for p in d.core.known),
        "is_coordinator": float(d.core.is_coordinator(now)),
        "seconds_since_applied": now - d.last_applied_at,
        "quorum_needed": d.core.quorum_needed,
        "quorum_held": d.core.quorum_held,
        "voters_unreachable": len(d.core.unreachable_voters(now)),
        "control_sockets": d.plane.dealers,
        "control_connections_incoming": d.plane.inbound.held,
        "data_links_incoming": d.links.incoming_links,
        "refused": {
            "status_rate": d.status_refused,
            "state_request": d.transfers.refused,
            "nonfinite_round": d.nonfinite_rounds,
            "nonfinite_contribution": d.refused_contributions,
            "bad_state": d.bad_states,
            "unbacked_state": d.core.unbacked_states,
            "poisoner_excluded": d.core.exclusions,
            "staller_excluded": d.core.stall_exclusions,
            "leader_deposed": d.core.depositions,
            "unknown_peer": d.core.refused_unknown,
            "gossip_poisoned": d.stats.gossip_poisoned,
            "data_admission": listener.refused,
            "data_handshake_deadline": listener.deadlines,
            "data_accept_error": listener.accept_errors,
            "data_link_limit": d.links.refused_links,
            "data_link_evicted": d.links.evicted_links,
            "data_link_reclaimed": d.links.reclaimed_links,
            "control_socket_evicted": d.plane.evicted_dealers,
            "control_socket_refused": d.plane.refused_dealers,
            "control_connection_limit": d.plane.inbound.refused,
            "control_connection_evicted": d.plane.inbound.evicted,
            "relay_refused": d.relay.refused if d.relay is not None else 0,
            "loop_error": d.loop_errors,
        },
        # Rejected control messages, by where they were dropped: undecodable
        # or invalid (the plane), refused by the protocol (the core: stale
        # epoch, not a member, ...), or a handler that failed on them.
        "rejected": {"invalid": d.plane.rejected_messages, "protocol": d.core.rejected,
                     "handler_error": d.handler_errors, "swim_off": d.swim_dropped},
        # SWIM beside the heartbeats (swarm/swim_driver.py): 0s when it is off.
        "swim_members": {k: (d.swim.states().get(k, 0) if d.swim is not None else 0)
                         for k in SWIM_STATES},
        "swim_messages": {"sent": sum(d.swim.sent.values()) if d.swim is not None else 0,
                          "received": sum(d.swim.received.values()) if d.swim is not None
                          else 0},
        "retries": dict(d.stats.retries),
        "counters": {
            "rounds_applied": d.rounds_applied,
            "rounds_aborted": d.rounds_aborted,
            "state_syncs": d.syncs,
            "state_sync_failures": d.sync_failures,
            "parity_mismatches": d.parity_mismatches,
            "gossip_exchanges": d.stats.gossips,
            "gossip_failures": d.stats.gossip_failures,
            "checkpoints": d.stats.checkpoints,
            "checkpoint_failures": d.stats.checkpoint_failures,
            "control_refused_connections": d.plane.refused_connections,
            "control_dropped_sends": d.plane.dropped_sends,
            "data_refused_connections": d.links.listener.rejected + d.links.bad_greetings,
            "relayed_bytes": d.relay.relayed_bytes if d.relay is not None else 0,
            "relay_rendezvous": d.relay.rendezvous if d.relay is not None else 0,
            "control_forwarded": d.plane.forwarded,
            "punched_links": d.links.punched_links,
            "punch_failures": d.links.punch_failures,
            "relayed_links": d.links.relayed_links,
        },
        "durations": d.stats.durations.copy(),
        "checkpoint_seconds": d.stats.checkpoint_seconds.copy(),
        "loop_lag": d.stats.loop_lag.copy(),
        "loop_lag_max_seconds": d.stats.loop_lag_max,
    }


_COUNTER_DOCS = {
    "rounds_applied": "Rounds whose result this peer applied.",
    "rounds_aborted": "Rounds this peer took part in that were aborted.",
    "state_syncs": "Shared states fetched from donors and verified.",
    "state_sync_failures": "State fetches that failed or did not verify.",
    "parity_mismatches": "Times this peer's state differed from the swarm's.",
    "gossip_exchanges": "Gossip exchanges completed.",
    "gossip_failures": "Gossip exchanges that failed (partner gone, timeout).",
    "checkpoints": "Checkpoints written.",
    "checkpoint_failures": "Checkpoint writes that failed.",
    "control_refused_connections": "Control connections refused (no secret, not allowlisted).",
    "control_dropped_sends": "Control messages dropped at a full queue.",
    "data_refused_connections": "Data-plane connections refused (handshake, greeting).",
    "relayed_bytes": "Bytes this peer's relay copied between peers that cannot dial each other.",
    "control_forwarded": "Control messages passed on between peers that cannot dial each other.",
    "relay_rendezvous": "Connections this peer's relay introduced for a hole punch (pairs).",
    "punched_links": "Links with another dial-back peer punched through both NATs.",
    "punch_failures": "Hole punches with another dial-back peer that failed (then relayed).",
    "relayed_links": "Links with another dial-back peer spliced by a relay.",
}


def _labelled(family, name: str, doc: str, label: str, values: dict):
    fam = family(name, doc, labels=[label])
    for value, n in values.items():
        fam.add_metric([value], n)
    return fam


def _histogram(name: str, doc: str, durations, label: str | None) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=[label] if label else None)
    bounds = [repr(float(b)) for b in durations.buckets] + ["+Inf"]
    for op, counts in durations.counts.items():
        cumulative, total = [], 0
        for bound, n in zip(bounds, counts):
            total += n
            cumulative.append((bound, total))
        fam.add_metric([op] if label else [], cumulative, sum_value=durations.sums[op])
    return fam


class PeerCollector:
    def __init__(self, daemon):
        self.d = daemon
        self.last: dict | None = None
        self.build = buildinfo.info(daemon.cfg.codec)
        self.server: _BoundedServer | None = None  # the endpoint serving this, once started

    def _snapshot(self) -> dict | None:
        fut: Future = Future()

        def take() -> None:
            try:
                fut.set_result(snapshot(self.d))
            except BaseException as e:  # noqa: BLE001 - handed to the scraping thread
                fut.set_exception(e)

        loop = self.d.loop
        try:
            loop.call_soon_threadsafe(take)
            self.last = fut.result(SNAPSHOT_TIMEOUT_S)
        except (AttributeError, RuntimeError, FutureTimeout):
            pass  # no loop, a closed one, or a busy one: serve what we had
        return self.last

    def collect(self):
        yield InfoMetricFamily("peerlearn_build", "What this peer runs.", value=self.build)
        # Neither needs the daemon's loop: served even while it does not answer.
        yield from self._wire()
        yield from self._disk()
        s = self._snapshot()
        if s is None:
            return
        s = {**s, "refused": {**s["refused"], "metrics_connection":
                              self.server.refused if self.server is not None else 0}}
        for name, doc in (
                ("step", "Shared-state step this peer holds."),
                ("members", "Members of the last applied view."),
                ("live_peers", "Known peers heard from recently."),
                ("is_coordinator", "1 if this peer coordinates rounds."),
                ("seconds_since_applied",
                 "Seconds since this peer last applied a round or synced."),
                ("quorum_needed", "Members a round needs: a strict majority of the view's "
                                  "voting members (those that did not leave it)."),
                ("quorum_held", "Live members ready on the newest state (coordinator's view)."),
                ("voters_unreachable", "Voting members unreachable, when too many for a "
                                       "quorum (else 0): no round applies until they return."),
                ("control_sockets", "Outgoing control sockets open (view members' and an LRU "
                                    "of others)."),
                ("control_connections_incoming",
                 "Incoming control connections held (bounded per address, prefix and in all)."),
                ("data_links_incoming", "Incoming data links filed (bounded per identity and "
                                        "by the identity's standing).")):
            yield GaugeMetricFamily(f"peerlearn_{name}", doc, value=s[name])
        for name, doc, label, values in (
                ("refused", "Input refused or bounded, by reason (a fixed set).", "reason",
                 s["refused"]),
                ("control_rejected_messages",
                 "Control messages dropped, by where (invalid, protocol, handler_error).",
                 "reason", s["rejected"]),
                ("round_retries",
                 "Times this peer's contribution went into another round, by reason.",
                 "reason", s["retries"])):
            yield _labelled(CounterMetricFamily, f"peerlearn_{name}", doc, label, values)
        for name, value in s["counters"].items():
            yield CounterMetricFamily(f"peerlearn_{name}", _COUNTER_DOCS[name], value=value)
        yield _histogram("peerlearn_collective_seconds",
                         "Wall time of each collective, by operation.", s["durations"],
                         "operation")
        yield _histogram("peerlearn_checkpoint_seconds", "Time to write a checkpoint.",
                         s["checkpoint_seconds"], None)
        yield _histogram("peerlearn_loop_lag_seconds",
                         "How late the daemon's 50 ms tick woke: time the event loop spent "
                         "on other work (heartbeats wait as long).", s["loop_lag"], None)
        yield GaugeMetricFamily("peerlearn_loop_lag_max_seconds",
                                "The longest loop lag since the peer started.",
                                value=s["loop_lag_max_seconds"])
        yield _labelled(GaugeMetricFamily, "peerlearn_swim_members",
                        "Members SWIM holds in each state (--swim; 0 when off).", "state",
                        s["swim_members"])
        yield _labelled(CounterMetricFamily, "peerlearn_swim_messages",
                        "SWIM messages sent and received (--swim).", "direction",
                        s["swim_messages"])

    def _disk(self):
        from peerlearn.swarm.peer import CHECKPOINT_FILE

        try:  # the file's age: also right for one written before this process started
            mtime = os.stat(self.d.cfg.data_dir / CHECKPOINT_FILE).st_mtime
        except OSError:
            # No checkpoint yet (a new peer's first checkpoint_every rounds):
            # no age to report, and no made-up one (0 would read as "just
            # written", the process's age as a checkpoint it never wrote).
            return
        yield GaugeMetricFamily("peerlearn_checkpoint_age_seconds",
                                "Seconds since the checkpoint on disk was written.",
                                value=max(0.0, time.time() - mtime))

    def _wire(self):
        wire = CounterMetricFamily("peerlearn_wire_bytes",
                                   "Bytes this peer moved: data links' frames and payload by "
                                   "traffic class, and control messages (traffic control).",
                                   labels=["direction", "traffic"])
        moved = {(d, t): 0 for d in DIRECTIONS for t in TRAFFIC}
        moved.update(WIRE.snapshot())
        for (direction, traffic), n in sorted(moved.items()):
            wire.add_metric([direction, traffic], n)
        yield wire
        by_codec = CounterMetricFamily(
            "peerlearn_wire_bytes_by_codec",
            "Bytes this peer moved, by direction, traffic and the codec they were "
            "packed with (the sender's; a receiver reads it from the frames).",
            labels=["direction", "traffic", "codec"])
        # From start-up: raw bytes and this peer's codec, in every direction and
        # traffic class (control messages: raw only, nothing packs them); other
        # codecs (a peer's that packs otherwise) as they come.
        moved = {(d, t, codec_name(c)): 0 for d in DIRECTIONS for t in TRAFFIC
                 for c in {None, self.d.cfg.codec} if t != CONTROL or c is None}
        for (direction, traffic, codec), n in WIRE.by_codec().items():
            key = (direction, traffic, codec_name(codec))
            moved[key] = moved.get(key, 0) + n
        for labels, n in sorted(moved.items()):
            by_codec.add_metric(list(labels), n)
        yield by_codec


class _QuietHandler(WSGIRequestHandler):
    """One request per connection, every read bounded by READ_TIMEOUT_S
    (socketserver applies `timeout` to the socket); nothing logged."""

    timeout = READ_TIMEOUT_S

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS at once, each cut
    off at REQUEST_DEADLINE_S (one watchdog thread for all); refusals and
    cut-offs counted in `refused`."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._started: dict[socket.socket, float] = {}  # requests being served
        self._closed = threading.Event()
        self.refused = 0
        super().__init__(*args, **kwargs)
        threading.Thread(target=self._watchdog, name="metrics-deadlines", daemon=True).start()

    def _refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refuse()
            self.shutdown_request(request)
            return
        with self._lock:
            self._started[request] = time.monotonic()
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self._done(request)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self._lock:
            if self._started.pop(request, None) is None:
                return
        self._slots.release()

    def _watchdog(self) -> None:
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._lock:
                late = [r for r, t in self._started.items() if now - t > REQUEST_DEADLINE_S]
                for r in late:
                    self._started[r] = float("inf")  # cut once
            for r in late:
                self._refuse()
                try:
                    r.shutdown(socket.SHUT_RDWR)  # its thread's read or write fails at once
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        """A read timed out, or the client went away: counted, not printed."""
        self._refuse()

    def server_close(self):
        self._closed.set()
        super().server_close()


def serve(daemon, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
    """Starts the metrics endpoint on its own thread; returns (port, stop).
    stop() shuts the server down and joins its thread."""
    registry = CollectorRegistry(auto_describe=True)
    collector = PeerCollector(daemon)
    registry.register(collector)
    registry.register(_Telemetry())
    # A registry of our own does not get the default collectors: add the
    # process ones (memory, CPU, fds, start time) an operator alerts on.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]

    class Server(_BoundedServer):
        address_family = family

    server = make_server(host.strip("[]"), port, make_wsgi_app(registry), Server,
                         handler_class=_QuietHandler)
    collector.server = server
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return server.server_address[1], stop


class _Telemetry:
    """peerlearn.telemetry's registry (training figures, a user's own metrics)."""

    def collect(self):
        yield from telemetry.REGISTRY.collect()


__all__ = ["DEFAULT_PORT", "DIRECTIONS", "TRAFFIC", "serve", "snapshot"]
