"""Prometheus metrics of one gateway, in a registry of its own (no globals)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics"]


class Metrics:
    """Sessions, messages, slow closes, mutations and HTTP latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge(
            "balancesim_sessions", "Connected WebSocket sessions", ["role"], registry=self.registry
        )
        self.messages = Counter(
            "balancesim_messages_sent", "WebSocket messages sent", ["type"], registry=self.registry
        )
        self.slow_closed = Counter(
            "balancesim_sessions_closed_slow", "Sessions closed with 4008 for not keeping up",
            registry=self.registry,
        )
        self.mutations = Counter(
            "balancesim_mutations", "Committed mutations", ["type"], registry=self.registry
        )
        self.http_latency = Histogram(
            "balancesim_http_request_seconds", "HTTP request latency", ["method", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

    def watch(self, engine: object) -> None:
        """In cluster mode, what the gateway's remote engine counts: calls in flight to
        the shards, answers that never came (504), gaps in the shards' event batches, and
        reconnects to Redis. Read when scraped; an embedded engine has none of these."""
        for name, help_text, attribute in (
            ("balancesim_cluster_calls_in_flight", "Calls sent to shards and not yet answered", "calls_in_flight"),
            ("balancesim_cluster_timeouts", "Calls answered 504: no outcome learnt in time", "timeouts"),
            ("balancesim_cluster_event_gaps", "Lost or repeated event batches seen", "gaps"),
            ("balancesim_cluster_redis_reconnects", "Reconnects of this gateway's Redis readers", "redis_reconnects"),
        ):
            if hasattr(engine, attribute):
                gauge = Gauge(name, help_text, registry=self.registry)
                gauge.set_function(lambda attribute=attribute: float(getattr(engine, attribute)))
        if hasattr(engine, "calls_in_flight_by_shard"):
            self.registry.register(_RemoteCounts(engine))

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


class _RemoteCounts(Collector):
    """A cluster gateway's calls, read from its remote engine when scraped (true counters,
    beside the older gauges above, whose names stay)."""

    def __init__(self, engine: object) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        for name, help_text, attribute in (
            ("balancesim_cluster_calls", "Calls handed towards a shard", "calls"),
            ("balancesim_cluster_calls_refused", "Calls answered 503 before anything was sent: the shard known "
             "down, too many in flight, or Redis unreachable", "refused"),
            ("balancesim_cluster_redis_messages_lost", "Calls Redis may not have taken (a failed XADD)",
             "messages_lost"),
        ):
            yield CounterMetricFamily(name, help_text, value=getattr(engine, attribute))
        by_shard = GaugeMetricFamily("balancesim_cluster_shard_calls_in_flight",
                                     "Calls sent to a shard and not yet answered, per shard", labels=["shard"])
        for shard, count in enumerate(getattr(engine, "calls_in_flight_by_shard")):
            by_shard.add_metric([str(shard)], count)
        yield by_shard
