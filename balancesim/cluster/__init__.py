"""Cluster mode: shards and gateways over Redis (see docs/protocol.md, "Cluster mode").

The parts so far: ``_placement`` (pure) says which shard an account lives on and
records that in every shard file; ``_wire`` (pure) seals every command, event and
reply with an HMAC under the cluster's secret, and opens only what verifies;
``_redis_server`` runs a private ``redis-server`` that forgets on restart, and
``_streams`` is the Streams fabric over it (coalescing producer, consumer group,
tail), which never hides a failure. ``_shard`` numbers a shard's accounts and
entries by the placement (``ShardIds``, given to the ``Engine``) and locks its file;
``_data_dir`` runs ``users create`` and the ``ledger`` reports over a data directory.
``_health`` caches which shards beat (for ``/readyz``), ``_watchdog`` makes a child die
with its parent, and ``_supervisor`` is ``serve --workers``: Redis, shards and gateways
under one parent. ``_backlog`` reads how far behind a shard is from its command stream
alone, and ``_metrics`` is a shard's Prometheus metrics and the small server that gives
a shard (or a gateway sharing its port) its own ``/metrics``.
``_hosts`` builds three hosts from network namespaces on this machine
and runs a cluster across them (for the tests and ``chaos --cluster --hosts``), with a
host's cable to pull and plug back.
"""

from balancesim.cluster._backoff import Backoff
from balancesim.cluster._redis_server import RedisNotFound, RedisServer
from balancesim.cluster._streams import Consumer, Entry, Handler, NotSent, Producer, Tail, Unknown

from balancesim.cluster._placement import (
    HASH_SCHEME,
    MAX_ID,
    MAX_SHARDS,
    PARTITIONS,
    Placement,
    PlacementError,
    ShardRecord,
    check,
    partition_of_username,
    placement_of_data_dir,
    record,
    recorded,
    shard_file,
    shard_of_user_id,
    shard_of_username,
    split_transaction_id,
    split_user_id,
    transaction_id_for,
    user_id_for,
)
from balancesim.cluster._data_dir import (
    DataDir,
    ShardVerified,
    audit_data_dir,
    create_user_in_data_dir,
    history_in_data_dir,
    make_data_dir,
    open_data_dir,
    verify_data_dir,
    verify_data_dir_as_one,
)
from balancesim.cluster._shard import ShardFileInUse, ShardIds, ShardLock, lock_shard_file
from balancesim.cluster._health import STALE_AFTER_S, ShardHealth
from balancesim.cluster._backlog import Backlog, command_backlog
from balancesim.cluster._metrics import MetricsServer, ShardMetrics
from balancesim.cluster._supervisor import REDIS_URL_FILE, SuperviseOptions, read_redis_url, supervise
from balancesim.cluster._watchdog import watch_parent
from balancesim.cluster._hosts import HostsCluster, HostsUnavailable, Lan, hosts_unavailable, in_netns
from balancesim.cluster._wire import (
    MIN_SECRET_CHARS,
    SECRET_ENV,
    SECRET_FILE,
    Forged,
    Secret,
    SecretError,
    load_secret,
    open_sealed,
    seal,
)

__all__ = [
    "Backoff", "Consumer", "Entry", "Handler", "NotSent", "Producer", "RedisNotFound", "RedisServer",
    "Tail", "Unknown",
    "HASH_SCHEME", "MAX_ID", "MAX_SHARDS", "MIN_SECRET_CHARS", "PARTITIONS", "SECRET_ENV",
    "SECRET_FILE", "Forged", "Placement", "PlacementError", "Secret", "SecretError",
    "ShardRecord", "check", "partition_of_username", "placement_of_data_dir", "record",
    "recorded", "shard_file", "shard_of_user_id", "shard_of_username", "split_transaction_id",
    "split_user_id", "transaction_id_for", "user_id_for", "load_secret", "open_sealed", "seal",
    "ShardFileInUse", "ShardIds", "ShardLock", "lock_shard_file",
    "DataDir", "ShardVerified", "audit_data_dir", "create_user_in_data_dir", "history_in_data_dir",
    "make_data_dir", "open_data_dir", "verify_data_dir", "verify_data_dir_as_one",
    "STALE_AFTER_S", "ShardHealth", "REDIS_URL_FILE", "SuperviseOptions", "read_redis_url", "supervise",
    "watch_parent", "Backlog", "command_backlog", "MetricsServer", "ShardMetrics",
    "HostsCluster", "HostsUnavailable", "Lan", "hosts_unavailable", "in_netns",
]
