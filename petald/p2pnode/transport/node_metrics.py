"""A node's metrics for Prometheus (``GET /metrics`` on the local API), in a registry of the
node's own: two nodes in one process (tests, a server beside its API's client) never mix, and
nothing lands in prometheus_client's global default registry.

Here because both roles count into it (server/ and client/ never import each other, and both may
import transport/). Counters and histograms are updated where the event happens; gauges that
mirror state (live sessions, KV pages, DHT records) read it at scrape time (``watch``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Step latency, seconds: a decode step on a fast LAN is milliseconds, a prefill or a WAN hop seconds.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        # The server role.
        self.sessions = Counter("petald_server_sessions", "Inference sessions opened on this server",
                                registry=registry)
        self.sessions_live = Gauge("petald_server_sessions_live", "Inference sessions open on this server now",
                                   registry=registry)
        self.steps = Counter("petald_server_steps", "Steps this server computed", registry=registry)
        self.step_seconds = Histogram("petald_server_step_seconds", "From a step's arrival to its answer",
                                      buckets=STEP_BUCKETS, registry=registry)
        self.refusals = Counter("petald_server_refusals", "Requests this server refused, by reason (error code)",
                                ["reason"], registry=registry)
        self.kv_pages = Gauge("petald_kv_pages", "KV-cache pages of this server: total, and reserved by its "
                                                 "sessions", ["state"], registry=registry)
        # Both roles: what crossed the wire on petald's sessions.
        self.wire_bytes = Counter("petald_wire_bytes", "Bytes of inference session frames, in and out",
                                  ["direction"], registry=registry)
        # The client role.
        self.client_sessions = Counter("petald_client_sessions", "Inference sessions this client opened",
                                       registry=registry)
        self.client_step_seconds = Histogram("petald_client_step_seconds", "A step through the whole route, "
                                             "as the client waited for it", buckets=STEP_BUCKETS, registry=registry)
        self.tokens_generated = Counter("petald_tokens_generated", "Tokens this client generated",
                                        registry=registry)
        self.failovers = Counter("petald_client_failovers", "Servers replaced in this client's sessions",
                                 registry=registry)
        # The swarm.
        self.dht_records = Gauge("petald_dht_records", "DHT records this node stores", registry=registry)

    def count_wire(self, received: int, sent: int) -> None:
        self.wire_bytes.labels("in").inc(received)
        self.wire_bytes.labels("out").inc(sent)

    @staticmethod
    def watch(gauge: Gauge, read: Callable[[], float]) -> None:
        """``gauge`` reads ``read()`` at each scrape (the last object watched is the one read)."""
        gauge.set_function(read)
