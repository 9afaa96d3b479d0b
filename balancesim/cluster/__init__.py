"""Cluster mode: shards and gateways over Redis (see PROTOCOL.md, "Cluster mode")."""

from balancesim.cluster._redis_server import RedisNotFound, RedisServer

__all__ = ["RedisNotFound", "RedisServer"]
