"""Prometheus metrics of a shard, and the small HTTP server that serves a process's ``/metrics``.

A shard has no HTTP server of its own otherwise, so ``MetricsServer`` gives it one
(``balancesim shard --metrics-port``); a gateway that shares its port with others under
``serve --workers`` gets one too, so that each gateway can be scraped on its own. Both
publish the address in their heartbeat, where ``cluster status`` lists it.

The counters live where the work happens (``ShardService``, the engine's ``Ledger``)
and are read when scraped, so a shard pays nothing per command for its metrics; only
the commit histograms are fed per commit, from the ledger's writer thread. The command
stream's backlog is read from Redis at each scrape (``_backlog``), bounded in time.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Awaitable, Callable, Iterator

import redis.asyncio
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler

from balancesim.cluster._backlog import command_backlog

__all__ = ["ShardMetrics", "MetricsServer", "CONTENT_TYPE"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A scrape waits this long for Redis at most: a scrape that hangs on a lost Redis would
# hide every other number; the backlog gauges then keep their last values and
# ``balancesim_shard_redis_up`` says 0.
_BACKLOG_TIMEOUT_S = 1.0


class _Counted(Collector):
    """What ``ShardService`` and the ledger count, read at each scrape."""

    def __init__(self, service: Any, operations: frozenset[str]) -> None:
        self.service = service
        self.operations = operations

    def collect(self) -> Iterator[Metric]:
        service, ledger = self.service, self.service.engine.ledger
        answered = CounterMetricFamily(
            "balancesim_shard_commands", "Commands answered, by operation and outcome (ok, or the refusal's "
            "error code: storage_unavailable, unavailable for an expired deadline, insufficient_funds …)",
            labels=["op", "outcome"])
        by_label: dict[tuple[str, str], int] = {}
        for (op, outcome), count in list(service.answered.items()):
            key = (op if op in self.operations else "other", outcome)  # a label set bounded by our own table
            by_label[key] = by_label.get(key, 0) + count
        for (op, outcome), count in sorted(by_label.items()):
            answered.add_metric([op, outcome], count)
        yield answered
        yield GaugeMetricFamily("balancesim_shard_calls_in_flight",
                                "Commands read from the stream and not yet answered", value=service.calls_in_flight)
        for name, help_text, value in (
            ("balancesim_shard_expired", "Commands refused because their deadline passed before COMMIT "
             "(their gateway answered, or will answer, 504)", ledger.expired),
            ("balancesim_shard_commits", "Group commits written", ledger.commits),
            ("balancesim_shard_committed_submissions", "Decisions committed, over all group commits",
             ledger.committed_submissions),
            ("balancesim_shard_commit_failures", "Group commits that could not be written (a full disk …): "
             "their commands were answered storage_unavailable", ledger.failed_commits),
            ("balancesim_shard_event_batches_published", "Event batches published (one per commit with events, "
             "plus revocations), this process's epoch", service.seq),
            ("balancesim_shard_events_published", "Events published in those batches", service.events_published),
            ("balancesim_shard_redis_reconnects", "Reconnects of this shard's Redis readers (or streams found lost)",
             service.redis_reconnects),
            ("balancesim_shard_redis_messages_lost", "Answers and event batches Redis may not have taken",
             service.messages_lost),
            ("balancesim_shard_forged_calls", "Calls dropped because their seal did not verify", service.forged),
        ):
            yield CounterMetricFamily(name, help_text, value=value)


class ShardMetrics:
    """One shard's metrics, in a registry of its own (no globals).

    Args:
        service: the started ``ShardService`` (its engine's ledger is observed too).
        redis_url: the fabric, where the command stream's backlog is read.
    """

    def __init__(self, service: Any, redis_url: str) -> None:
        from balancesim.cluster._service import SHARD_OPERATIONS

        self.service = service
        self.index = service.index
        self.registry = CollectorRegistry()
        self.registry.register(_Counted(service, frozenset(SHARD_OPERATIONS)))
        info = Gauge("balancesim_shard_info", "This shard: its index and its epoch (one per process life)",
                     ["shard", "epoch"], registry=self.registry)
        info.labels(str(service.index), service.epoch).set(1)
        self.commit_size = Histogram(
            "balancesim_shard_commit_batch_size", "Decisions per group commit", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000))
        self.commit_latency = Histogram(
            "balancesim_shard_commit_seconds", "Time to write and fsync one group commit", registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        service.engine.ledger.on_batch = self._committed
        self.redis_up = Gauge("balancesim_shard_redis_up", "Whether the last scrape could read the backlog "
                              "from Redis", registry=self.registry)
        self.waiting = Gauge("balancesim_shard_commands_waiting", "Commands in the stream the shard has not "
                             "read yet (the consumer group's lag; -1 when Redis cannot count them)",
                             registry=self.registry)
        self.pending = Gauge("balancesim_shard_commands_pending", "Commands read and not yet acknowledged "
                             "(the consumer group's pending list)", registry=self.registry)
        self.oldest_age = Gauge("balancesim_shard_oldest_command_age_seconds", "How long the oldest unhandled "
                                "command has waited (0 when none)", registry=self.registry)
        self._client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=_BACKLOG_TIMEOUT_S,
                                                    socket_connect_timeout=_BACKLOG_TIMEOUT_S)

    def _committed(self, submissions: int, seconds: float) -> None:
        self.commit_size.observe(submissions)
        self.commit_latency.observe(seconds)

    async def scrape(self) -> bytes:
        """Read the backlog from Redis (bounded), then the Prometheus text format."""
        try:
            async with asyncio.timeout(_BACKLOG_TIMEOUT_S):
                backlog = await command_backlog(self._client, self.index)
        except (OSError, TimeoutError, redis.exceptions.RedisError) as error:  # type: ignore[attr-defined]
            log.debug("metrics: cannot read shard %s's backlog: %s", self.index, error)
            self.redis_up.set(0)
        else:
            self.redis_up.set(1)
            self.waiting.set(-1 if backlog.waiting is None else backlog.waiting)
            self.pending.set(backlog.pending)
            self.oldest_age.set(backlog.oldest_age_s or 0.0)
        return generate_latest(self.registry)

    async def aclose(self) -> None:
        """Stop observing the ledger; close the Redis connection."""
        if self.service.engine.ledger.on_batch == self._committed:
            self.service.engine.ledger.on_batch = None
        await self._client.aclose()


class _MetricsHandler(RequestHandler):
    def initialize(self, scrape: Callable[[], Awaitable[bytes]]) -> None:
        self.scrape = scrape

    async def get(self) -> None:
        body = await self.scrape()
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(body)


class MetricsServer:
    """``GET /metrics`` on its own port, on the running loop.

    Args:
        scrape: makes the Prometheus text for each scrape.
        sockets: bound listening sockets (``balancesim.gateway._server.listen``), so that a
            busy port is refused before the process starts anything else.
        host: the address they are bound on, for ``address``.
    """

    def __init__(self, scrape: Callable[[], Awaitable[bytes]], sockets: list[socket.socket], host: str) -> None:
        self._server = HTTPServer(Application([(r"/metrics", _MetricsHandler, {"scrape": scrape})]))
        self._server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        # A wildcard address is no address to scrape: name the machine instead.
        shown = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
        self.address = f"http://{_bracketed(shown)}:{port}/metrics"
        """Where to scrape, as published in the heartbeat."""

    def stop(self) -> None:
        """Stop listening."""
        self._server.stop()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
