"""One log line per committed mutation (INFO) and per refused request (WARNING).

Each line names the operation, the account, the amount, the account's version and
the latency. Nothing else of a request is logged: never a body, a header or a
query string, so tokens and passwords cannot reach the log. Example::

    INFO balancesim.ops: deposit committed account=3 amount=250.5 USDT version=2 latency=4.1ms
    WARNING balancesim.ops: POST /api/admin/withdrawals refused 409 insufficient_funds
        account=3 amount='5000' by=1 latency=1.2ms: …
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from balancesim import errors

__all__ = ["committed", "refused", "log"]

log = logging.getLogger("balancesim.ops")
# Fields of a refused request's body that may be logged; everything else (passwords) never is.
_SAFE = ("user_id", "amount", "quantity")


def committed(kind: str, result: dict[str, Any], started: float) -> None:
    """A mutation of ``kind`` answered 2xx with ``result``, ``started`` by ``time.perf_counter()``."""
    if not log.isEnabledFor(logging.INFO):
        return
    account, amount, version, extra = _describe(result)
    log.info("%s committed account=%s amount=%s version=%s%s latency=%.1fms",
             kind, account, amount, version, extra, _ms(started))


def refused(method: str, path: str, error: errors.BalancesimError, started: float,
            caller: int | None, body: bytes) -> None:
    """A request answered with PROTOCOL.md's error; ``path`` carries no query string."""
    if not log.isEnabledFor(logging.WARNING):
        return
    fields = _safe_fields(body)
    log.warning("%s %s refused %d %s account=%s amount=%s by=%s latency=%.1fms: %s",
                method, path, error.status, error.code, fields.get("user_id", "-"),
                fields.get("amount", fields.get("quantity", "-")), "-" if caller is None else caller,
                _ms(started), _clip(error.message, 200))


def _describe(result: dict[str, Any]) -> tuple[Any, str, Any, str]:
    """account, amount, version and any extra ``key=value``s of a mutation's answer."""
    if "transaction" in result:
        tx = result["transaction"]
        return tx["user_id"], f"{tx['amount']} {tx['asset']}", tx["version"], ""
    if "trade" in result:
        trade = result["trade"]
        # A trade's id is T<user_id>-<version of its stake>.
        version = trade["trade_id"].rsplit("-", 1)[-1] if trade["status"] == "open" and not trade.get("forced_outcome") else "-"
        extra = f" trade={trade['trade_id']}" + (f" forced={trade['forced_outcome']}" if trade.get("forced_outcome") else "")
        return trade["user_id"], f"{trade['amount']} USDT", version, extra
    if "order" in result:
        order = result["order"]
        legs = order["transactions"]
        return (legs[0]["user_id"], f"{order['quantity']} {order['symbol']} {order['side']}",
                max(leg["version"] for leg in legs), f" order={order['order_id']} total={order['total']}")
    if "mode" in result:
        return result["user_id"], "-", "-", f" mode={result['mode']}"
    return result.get("user_id", "-"), "-", "-", f" role={result['role']}" if "role" in result else ""


def _safe_fields(body: bytes) -> dict[str, str]:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: _clip(repr(data[key]) if isinstance(data[key], str) else str(data[key]), 40)
            for key in _SAFE if key in data and isinstance(data[key], (str, int, float))}


def _clip(text: str, limit: int) -> str:
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ms(started: float) -> float:
    return 1000 * (time.perf_counter() - started)
