"""Prometheus metrics of one peer daemon.

Read at scrape time from the daemon's own counters (the daemon knows nothing
of Prometheus), into a registry of its own, served on 127.0.0.1 by default.
Names follow the usual conventions: one `peerlearn_` prefix, base units,
counters ending in `_total`, no per-peer labels. The endpoint also serves
prometheus_client's standard process metrics (`process_*`: CPU, resident
memory, open and max fds, start time; Linux only) and `python_info`.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)

from peerlearn import __version__


class PeerCollector:
    def __init__(self, daemon):
        self.d = daemon

    def collect(self):
        import time

        d = self.d
        now = time.monotonic()
        yield InfoMetricFamily("peerlearn_build", "Version of this peer.",
                               value={"version": __version__})
        yield GaugeMetricFamily("peerlearn_step", "Shared-state step this peer holds.",
                                value=d.state.step if d.state is not None else 0)
        yield GaugeMetricFamily("peerlearn_members", "Members of the last applied view.",
                                value=len(d.core.members))
        yield GaugeMetricFamily("peerlearn_live_peers", "Known peers heard from recently.",
                                value=sum(d.core.alive(p, now) for p in list(d.core.known)))
        yield GaugeMetricFamily("peerlearn_is_coordinator", "1 if this peer coordinates rounds.",
                                value=float(d.core.is_coordinator(now)))
        # Stall visibility: a swarm that stops applying rounds shows it here
        # (and the coordinator logs why).
        yield GaugeMetricFamily("peerlearn_seconds_since_applied",
                                "Seconds since this peer last applied a round or synced.",
                                value=now - d.last_applied_at)
        yield GaugeMetricFamily("peerlearn_quorum_needed",
                                "Members a round needs: a strict majority of the view.",
                                value=d.core.quorum_needed)
        yield GaugeMetricFamily("peerlearn_quorum_held",
                                "Live members ready on the newest state (coordinator's view).",
                                value=d.core.quorum_held)
        refused = CounterMetricFamily(
            "peerlearn_refused", "Input refused or bounded, by reason (a fixed set).",
            labels=["reason"])
        listener = d.links.listener
        for reason, value in (
                ("status_rate", d.status_refused),
                ("state_request", d.transfers.refused),
                ("nonfinite_round", d.nonfinite_rounds),
                ("data_admission", listener.refused),
                ("data_handshake_deadline", listener.deadlines),
                ("data_accept_error", listener.accept_errors),
                ("data_link_limit", d.links.refused_links),
                ("loop_error", d.loop_errors)):
            refused.add_metric([reason], value)
        yield refused
        from peerlearn.transport.link import WIRE

        wire = CounterMetricFamily("peerlearn_wire_bytes",
                                   "Bytes moved over data links (frames and payload).",
                                   labels=["direction", "traffic"])
        for (direction, traffic), n in sorted(WIRE.snapshot().items()):
            wire.add_metric([direction, traffic], n)
        yield wire
        counters = [
            ("peerlearn_rounds_applied", "Rounds whose result this peer applied.",
             d.rounds_applied),
            ("peerlearn_rounds_aborted", "Rounds this peer took part in that were aborted.",
             d.rounds_aborted),
            ("peerlearn_state_syncs", "Shared states fetched from donors and verified.", d.syncs),
            ("peerlearn_state_sync_failures", "State fetches that failed or did not verify.",
             d.sync_failures),
            ("peerlearn_parity_mismatches", "Times this peer's state differed from the swarm's.",
             d.parity_mismatches),
            ("peerlearn_gossip_exchanges", "Gossip exchanges completed.", d.gossips),
            ("peerlearn_gossip_failures", "Gossip exchanges that failed (partner gone, timeout).",
             d.gossip_failures),
            ("peerlearn_control_rejected_messages", "Control messages dropped as invalid.",
             d.plane.rejected_messages + d.core.rejected + d.handler_errors),
            ("peerlearn_control_refused_connections",
             "Control connections refused (no secret, not allowlisted).",
             d.plane.refused_connections),
            ("peerlearn_control_dropped_sends", "Control messages dropped at a full queue.",
             d.plane.dropped_sends),
            ("peerlearn_data_refused_connections",
             "Data-plane connections refused (handshake, greeting).",
             d.links.listener.rejected + d.links.bad_greetings),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        yield SummaryMetricFamily("peerlearn_collective_seconds", "Time of each collective.",
                                  count_value=d.collectives, sum_value=d.collective_seconds)


def serve(daemon, host: str = "127.0.0.1", port: int = 0):
    """Starts the metrics endpoint on its own thread; returns (port, stop).

    The collector reads the daemon's counters from that thread: plain ints
    and snapshots of dicts, never anything the loop holds a lock for.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PeerCollector(daemon))
    # A registry of our own does not get the default collectors: add the
    # process ones (memory, CPU, fds, start time) an operator alerts on.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return server.server_address[1], stop
