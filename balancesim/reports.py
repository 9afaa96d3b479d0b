"""Read-only reports over a ledger file: verify, history, audit.

They open the file themselves (a server may be running on it) and never write.
A cluster's shard files are ledger files too: ``verify`` also checks, given the
shard's ``ShardIds``, that every id there names that shard, and ``audit`` merges
several files (``balancesim.cluster`` runs them over a data directory).
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import sqlite_utils

from balancesim.actors import ASSETS
from balancesim.views import transaction_view
from balancesim.actors._ledger import _TX_COLUMNS, connect, posted_from_row, snapshot
from balancesim.errors import UnknownUser
from balancesim.money import format_amount

if TYPE_CHECKING:
    from balancesim.cluster import ShardIds

__all__ = ["VerifyReport", "verify", "history", "audit"]


@dataclass
class VerifyReport:
    """What ``verify`` found: ``ok`` when ``problems`` is empty."""

    accounts: int = 0
    entries: int = 0
    trades: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self, limit: int = 50) -> str:
        """A readable report."""
        head = f"{self.accounts} accounts, {self.entries} entries, {self.trades} trades checked"
        if self.ok:
            return f"ledger OK: {head}"
        lines = [f"ledger BROKEN: {len(self.problems)} problem(s); {head}"]
        lines += [f"  - {problem}" for problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  … and {len(self.problems) - limit} more")
        return "\n".join(lines)


@contextlib.contextmanager
def _snapshot(path: str) -> Iterator[sqlite_utils.Database]:
    """The ledger inside one read transaction: a server may be committing meanwhile,
    and reads from different moments would disagree with each other."""
    db = connect(path)
    try:
        if "transactions" not in db.table_names():
            raise FileNotFoundError(f"{path} is not a balancesim ledger")
        with snapshot(db):
            yield db
    finally:
        db.close()


def verify(path: str, *, shard: ShardIds | None = None) -> VerifyReport:
    """Recompute every balance from the entries and check every invariant.

    Checks: versions run 1, 2, 3 … per account with no gap; each entry's
    ``balance_after`` is the running sum of its asset and never below zero; the
    stored balances and versions equal the recomputed ones; every spot order has
    both legs; every trade has its stake and exactly the settlement its status says.
    Transaction ids only need to be unique: a shard's skip by the number of shards.
    With ``shard``: every account's id and username name that shard, and every
    transaction id is that shard's.
    """
    report = VerifyReport()
    with _snapshot(path) as db:
        users = {row[0]: row[1] for row in db.execute("SELECT user_id, version FROM users")}
        if shard is not None:
            report.problems.extend(_placement_problems(db, shard))
        stored = defaultdict(dict)
        for user_id, asset, amount in db.execute("SELECT user_id, asset, amount FROM balances"):
            stored[user_id][asset] = amount
        report.accounts = len(users)
        running: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(ASSETS, 0))
        last_version: dict[int, int] = defaultdict(int)
        legs: dict[str, list[str]] = defaultdict(list)
        by_trade: dict[str, list[tuple[str, int]]] = defaultdict(list)
        problems = report.problems
        for (tx_id, user_id, asset, amount, after, type_, metadata, version) in db.execute(
            "SELECT transaction_id, user_id, asset, amount, balance_after, type, metadata, version "
            "FROM transactions ORDER BY user_id, version"
        ):
            report.entries += 1
            where = f"account {user_id} v{version} (transaction {tx_id})"
            if user_id not in users:
                problems.append(f"{where}: no such user")
            if version != last_version[user_id] + 1:
                problems.append(f"{where}: version gap, expected v{last_version[user_id] + 1}")
            last_version[user_id] = version
            running[user_id][asset] = running[user_id].get(asset, 0) + amount
            if running[user_id][asset] != after:
                problems.append(
                    f"{where}: balance_after {format_amount(after)} {asset} but the entries sum to "
                    f"{format_amount(running[user_id][asset])}"
                )
            if after < 0:
                problems.append(f"{where}: {asset} balance below zero ({format_amount(after)})")
            meta = json.loads(metadata)
            if type_ in ("spot_buy", "spot_sell"):
                legs[meta.get("order_id", f"?{tx_id}")].append(asset)
            if type_.startswith("option_"):
                by_trade[meta.get("trade_id", f"?{tx_id}")].append((type_, amount))
        for user_id, version in users.items():
            if version != last_version[user_id]:
                problems.append(
                    f"account {user_id}: stored version {version} but entries end at v{last_version[user_id]}"
                )
            for asset in ASSETS:
                have, want = stored[user_id].get(asset, 0), running[user_id].get(asset, 0)
                if have != want:
                    problems.append(
                        f"account {user_id}: stored {asset} balance {format_amount(have)} but the "
                        f"entries sum to {format_amount(want)}"
                    )
        for order_id, assets in legs.items():
            if len(assets) != 2 or "USDT" not in assets:
                problems.append(f"spot order {order_id}: has legs {assets}, expected USDT and one asset")
        expected_entry = {"won": "option_payout", "draw": "option_refund"}
        for trade_id, amount, status, payout in db.execute(
            "SELECT trade_id, amount, status, payout FROM trades"
        ):
            report.trades += 1
            entries = by_trade.pop(trade_id, [])
            want = [("option_stake", -amount)]
            if status in expected_entry:
                want.append((expected_entry[status], payout))
            if sorted(entries) != sorted(want):
                problems.append(f"trade {trade_id} ({status}): entries {entries}, expected {want}")
        for trade_id, entries in by_trade.items():
            problems.append(f"trade {trade_id}: entries {entries} but no such trade")
    return report


def _placement_problems(db: sqlite_utils.Database, shard: ShardIds) -> Iterator[str]:
    """Ids in shard ``shard.index``'s file that do not name it (the placement's invariants)."""
    from balancesim.cluster import partition_of_username, split_transaction_id

    placement, index = shard.placement, shard.index
    for user_id, username in db.execute("SELECT user_id, username FROM users ORDER BY user_id"):
        partition = user_id % placement.partitions
        if partition != partition_of_username(username, placement.partitions):
            yield f"account {user_id} ({username!r}): its id is in partition {partition}, its username is not"
        elif placement.table[partition] != index:
            yield f"account {user_id}: partition {partition} is shard {placement.table[partition]}'s, not this one's"
    for (tx_id,) in db.execute("SELECT transaction_id FROM transactions ORDER BY transaction_id"):
        owner = split_transaction_id(tx_id)[0] if 0 < tx_id < 2**53 else None
        if owner != index:
            yield f"transaction {tx_id}: not an id of shard {index}"


def history(path: str, user: str) -> list[dict[str, Any]]:
    """An account's entries, oldest first; ``user`` is a user id or a username."""
    with _snapshot(path) as db:
        column = "user_id" if user.isdigit() else "username"
        row = db.execute(f"SELECT user_id FROM users WHERE {column} = ?", (user,)).fetchone()
        if row is None:
            raise UnknownUser(f"no user {user!r}")
        rows = db.execute(
            f"SELECT {_TX_COLUMNS} FROM transactions WHERE user_id = ? ORDER BY version", (row[0],)
        ).fetchall()
    return [transaction_view(posted_from_row(r)) for r in rows]


def audit(path: str | Sequence[str]) -> dict[str, Any]:
    """Every settlement not decided by the market, grouped by account.

    ``path`` is a ledger file, or several (a cluster's shard files, whose accounts
    never overlap): their accounts are merged in user id order, and totalled.

    Returns:
        ``{"accounts": [{user_id, username, count, stakes, payouts, by_decider,
        control_changes, trades}], "count", "stakes", "payouts"}`` with amounts
        as decimal strings.
    """
    names: dict[int, str] = {}
    changes = defaultdict(list)
    rows = []
    for one in [path] if isinstance(path, str) else path:
        with _snapshot(one) as db:
            names.update(db.execute("SELECT user_id, username FROM users").fetchall())
            for user_id, mode, set_by, ts in db.execute(
                "SELECT user_id, mode, set_by, ts FROM control_changes ORDER BY id"
            ):
                changes[user_id].append({"mode": mode, "set_by": set_by, "ts": ts})
            rows += db.execute(
                "SELECT trade_id, user_id, symbol, direction, amount, status, decided_by, settled_at, payout "
                "FROM trades WHERE status != 'open' AND decided_by != 'market' ORDER BY user_id, settled_at"
            ).fetchall()
    if not isinstance(path, str):
        rows.sort(key=lambda row: row[1])  # stable: each account's settlements stay in time order
    accounts: dict[int, dict[str, Any]] = {}
    totals = {"count": 0, "stakes": 0, "payouts": 0}
    for trade_id, user_id, symbol, direction, amount, status, decided_by, settled_at, payout in rows:
        acct = accounts.setdefault(user_id, {
            "user_id": user_id, "username": names.get(user_id), "count": 0, "stakes": 0,
            "payouts": 0, "by_decider": defaultdict(int), "control_changes": changes.get(user_id, []),
            "trades": [],
        })
        for bucket in (acct, totals):
            bucket["count"] += 1
            bucket["stakes"] += amount
            bucket["payouts"] += payout or 0
        acct["by_decider"][decided_by] += 1
        acct["trades"].append({
            "trade_id": trade_id, "symbol": symbol, "direction": direction,
            "amount": format_amount(amount), "status": status, "decided_by": decided_by,
            "settled_at": settled_at, "payout": format_amount(payout or 0),
        })
    for acct in accounts.values():
        acct["stakes"], acct["payouts"] = format_amount(acct["stakes"]), format_amount(acct["payouts"])
        acct["by_decider"] = dict(acct["by_decider"])
    return {
        "accounts": list(accounts.values()),
        "count": totals["count"],
        "stakes": format_amount(totals["stakes"]),
        "payouts": format_amount(totals["payouts"]),
    }
