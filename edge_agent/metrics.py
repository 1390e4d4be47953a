"""The agent's Prometheus metrics, in a registry of its own (names prefixed `edge_agent_`).

A leaf: it imports nothing of the package; components update the metrics, or are read through
the small protocol below at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Counters and gauges the components update; /metrics exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.readings_taken = Counter(
            "edge_agent_readings_taken",
            "Readings the batcher accepted from the sources (sealed next, within batch.max_delay).",
            registry=r,
        )
        self.readings_sealed = Counter(
            "edge_agent_readings_sealed", "Readings sealed into the buffer.", registry=r
        )
        self.batches_sealed = Counter(
            "edge_agent_batches_sealed", "Batches sealed into the buffer.", registry=r
        )
        self.readings_evicted = Counter(
            "edge_agent_readings_evicted",
            "Unsent readings dropped by retention or as undeliverable.",
            registry=r,
        )
        self.store_errors = Counter("edge_agent_store_errors", "Failed buffer writes.", registry=r)
        self.store_disk_full = Gauge(
            "edge_agent_store_disk_full",
            "1 while the buffer's disk is full (it keeps its size and evicts its oldest).",
            registry=r,
        )
        self.store_quarantined = Counter(
            "edge_agent_store_quarantined",
            "Buffer files found bad at start and moved aside (a new epoch began).",
            registry=r,
        )
        self.sources_held_back = Gauge(
            "edge_agent_sources_held_back_seconds",
            "How long sources have been waiting for the buffer to take readings; 0 when not.",
            registry=r,
        )
        self.buffer_readings = Gauge(
            "edge_agent_buffer_readings",
            "Readings in the buffer, not yet acknowledged.",
            registry=r,
        )
        self.buffer_bytes = Gauge(
            "edge_agent_buffer_bytes", "Bytes of sealed batches in the buffer.", registry=r
        )
        self.buffer_oldest_age = Gauge(
            "edge_agent_buffer_oldest_age_seconds", "Age of the oldest buffered batch.", registry=r
        )
        self.clock_steps = Counter(
            "edge_agent_clock_steps",
            "Steps of the wall clock detected (ages and retention are not affected).",
            registry=r,
        )
        self.clock_synced = Gauge(
            "edge_agent_clock_synced",
            "1 while the kernel says the wall clock is synchronised (adjtimex).",
            registry=r,
        )
        self.drain_rate = Gauge(
            "edge_agent_drain_readings_per_second",
            "Readings acknowledged per second over the recent window (10 s).",
            registry=r,
        )
        self.drain_net_rate = Gauge(
            "edge_agent_drain_net_readings_per_second",
            "How fast the buffer shrinks, readings per second (negative while it grows).",
            registry=r,
        )
        self.drain_eta = Gauge(
            "edge_agent_drain_eta_seconds",
            "Estimated seconds until the buffer is empty; NaN while it is not draining.",
            registry=r,
        )
        self.batches_sent = Counter(
            "edge_agent_batches_sent", "Batches acknowledged by the broker.", registry=r
        )
        self.readings_sent = Counter(
            "edge_agent_readings_sent", "Readings acknowledged by the broker.", registry=r
        )
        self.publish_rejected = Counter(
            "edge_agent_publish_rejected",
            "Publishes the broker refused (reason code >= 0x80).",
            registry=r,
        )
        self.batches_undeliverable = Counter(
            "edge_agent_batches_undeliverable",
            "Batches evicted because the broker will not take them (declared, with a reason).",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "edge_agent_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.hwm_published = Counter(
            "edge_agent_hwm_published",
            "Signed high-water marks the broker acknowledged.",
            registry=r,
        )
        self.catalogues_published = Counter(
            "edge_agent_catalogues_published",
            "Point catalogues the broker acknowledged (each one once per connection that sent a"
            " batch referencing it).",
            registry=r,
        )
        self.mqtt_connects = Counter(
            "edge_agent_mqtt_connects", "Successful broker connections.", registry=r
        )
        self.acks_accepted = Counter(
            "edge_agent_consumer_acks_accepted",
            "Consumer acknowledgements accepted (mqtt.ack: end_to_end).",
            registry=r,
        )
        self.acks_refused = Counter(
            "edge_agent_consumer_acks_refused",
            "Consumer acknowledgements refused, by reason (malformed, unknown_key, ...).",
            ["reason"],
            registry=r,
        )
        self.batches_consumer_acked = Counter(
            "edge_agent_batches_consumer_acked",
            "Batches deleted because a consumer acknowledged them.",
            registry=r,
        )
        self.batches_resent = Counter(
            "edge_agent_batches_resent",
            "Batches sent again because no consumer acknowledged them within mqtt.ack_timeout.",
            registry=r,
        )
        self.unacked_batches = Gauge(
            "edge_agent_unacked_batches",
            "Batches PUBACKed by the broker, not yet acknowledged by a consumer.",
            registry=r,
        )
        self.unacked_oldest_age = Gauge(
            "edge_agent_unacked_oldest_age_seconds",
            "Age of the oldest PUBACK not yet followed by a consumer's acknowledgement.",
            registry=r,
        )
        self.mqtt_stalled = Gauge(
            "edge_agent_mqtt_stalled",
            "1 while PUBACKs are overdue mqtt.ack_stall or more on a connection that is up.",
            registry=r,
        )
        self.mqtt_stalls = Counter(
            "edge_agent_mqtt_stalls",
            "Times PUBACKs became overdue mqtt.ack_stall (a frozen broker or a dead link).",
            registry=r,
        )
        self.ack_latency = Histogram(
            "edge_agent_ack_latency_seconds",
            "From sealing a batch to its PUBACK.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600),
            registry=r,
        )


class SourceCounts(Protocol):
    """What the per-source series read of a source's state (`sources.base.SourceState` is one)."""

    @property
    def up(self) -> bool: ...

    @property
    def readings(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def counts(self) -> Mapping[str, int]: ...


class SourceCollector(Collector):
    """Per-source series, read from each source's own state at scrape time."""

    def __init__(self, states: Mapping[str, SourceCounts]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "edge_agent_source_up", "1 while the source is answering.", labels=["source"]
        )
        readings = CounterMetricFamily(
            "edge_agent_source_readings", "Readings produced by the source.", labels=["source"]
        )
        errors = CounterMetricFamily(
            "edge_agent_source_errors",
            "Failed reads or connections of the source.",
            labels=["source"],
        )
        events = CounterMetricFamily(
            "edge_agent_source_events",
            "Protocol events per source and kind (Modbus: requests, timeout, exception, ...).",
            labels=["source", "kind"],
        )
        for name, state in self._states.items():
            up.add_metric([name], 1 if state.up else 0)
            readings.add_metric([name], state.readings)
            errors.add_metric([name], state.errors)
            for kind, count in sorted(state.counts.items()):
                events.add_metric([name, kind], count)
        yield from (up, readings, errors, events)


class AuditCollector(Collector):
    """`edge_agent_audit_events_total{category,outcome}`, read from the audit counts at scrape."""

    def __init__(self, counts: Mapping[tuple[str, str], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "edge_agent_audit_events",
            "Audit events (docs/security.md) by category and outcome.",
            labels=["category", "outcome"],
        )
        for (category, outcome), count in sorted(self._counts.items()):
            events.add_metric([category, outcome], count)
        yield events
