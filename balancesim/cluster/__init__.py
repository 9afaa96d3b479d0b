"""Cluster mode: shards and gateways over Redis (see PROTOCOL.md, "Cluster mode")."""

from balancesim.cluster._backoff import Backoff
from balancesim.cluster._redis_server import RedisNotFound, RedisServer
from balancesim.cluster._streams import (
    Consumer,
    Entry,
    Handler,
    NotSent,
    Producer,
    Tail,
    Unknown,
)

__all__ = [
    "Backoff",
    "Consumer",
    "Entry",
    "Handler",
    "NotSent",
    "Producer",
    "RedisNotFound",
    "RedisServer",
    "Tail",
    "Unknown",
]
