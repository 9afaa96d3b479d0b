"""PROTOCOL.md's mutations by name: the one table that maps an operation to a client call.

The scenario worlds, ``load`` and ``chaos`` all say what to do as ``(name,
args)`` and run it with ``perform(client, name, args)``. A client is anything
with ``balancesim.client.Client``'s methods: the HTTP client itself, or the
in-process ``EngineClient`` below, which calls an embedded engine directly.
Each answer is PROTOCOL.md's success body (``{"transaction": …}``, ``{"trade":
…}``, ``{"order": …}``, ``{"user_id", "mode"}``).

``args`` keys: ``to`` (the target account of an admin operation), ``amount``,
``asset``, ``description``, ``mode``, ``trade``, ``outcome``, ``symbol``,
``direction``, ``duration``, ``side``, ``quantity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from balancesim.actors import Reply, as_asyncio
from balancesim.engine import Engine
from balancesim.vocabulary import ACCOUNT_ASSET

__all__ = ["Operation", "OPERATIONS", "perform", "transactions_of", "EngineClient"]


@dataclass(frozen=True)
class Operation:
    """One mutation of PROTOCOL.md.

    Attributes:
        name: as scenarios, ``load --mix`` and reports name it.
        permission: its row in ``balancesim.vocabulary.MAY``.
        admin: done by an admin to the account ``args["to"]``; otherwise by a
            user to its own account.
        call: ``call(client, args, **kw)`` → the success body.
    """

    name: str
    permission: str
    admin: bool
    call: Callable[..., Awaitable[dict[str, Any]]]


async def _money(kind: str, c: Any, a: dict[str, Any], **kw: Any) -> dict[str, Any]:
    method = getattr(c, kind)
    return {"transaction": await method(a["to"], a["amount"], a.get("asset", ACCOUNT_ASSET),
                                        a.get("description", ""), **kw)}


async def _control(c: Any, a: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return await c.set_control(a["to"], a["mode"], **kw)


async def _force(c: Any, a: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"trade": await c.force(a["trade"], a["outcome"], **kw)}


async def _option(c: Any, a: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"trade": await c.open_option(a["symbol"], a["direction"], a["amount"], a["duration"], **kw)}


async def _spot(c: Any, a: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"order": await c.spot(a["symbol"], a["side"], a["quantity"], **kw)}


OPERATIONS: dict[str, Operation] = {
    op.name: op for op in (
        Operation("deposit", "deposit", True, lambda c, a, **kw: _money("deposit", c, a, **kw)),
        Operation("withdraw", "withdraw", True, lambda c, a, **kw: _money("withdraw", c, a, **kw)),
        Operation("adjust", "adjust", True, lambda c, a, **kw: _money("adjust", c, a, **kw)),
        Operation("control", "control", True, _control),
        Operation("force", "force", True, _force),
        Operation("option", "option", False, _option),
        Operation("spot", "spot", False, _spot),
    )
}


async def perform(client: Any, name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Do operation ``name`` as ``client``; its success body. ``kw`` go to the client
    (``key=`` an Idempotency-Key, ``timing=`` for the HTTP client)."""
    return await OPERATIONS[name].call(client, args, **kw)


def transactions_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``Transaction``s a success body carries (none for a trade or a control change)."""
    if "transaction" in body:
        return [body["transaction"]]
    if "order" in body:
        return list(body["order"]["transactions"])
    return []


class EngineClient:
    """``Client``'s mutation methods on an embedded engine, as one principal.

    Replies are awaited without blocking the loop; a refusal raises the engine's
    ``BalancesimError`` (``code`` and ``message``, like ``ApiError``). It does
    not check permissions: the caller applies ``MAY`` as the gateway does.
    """

    def __init__(self, engine: Engine, user_id: int) -> None:
        self.engine, self.user_id = engine, user_id

    async def deposit(self, user_id: int, amount: str, asset: str = ACCOUNT_ASSET, description: str = "",
                      *, key: str | None = None) -> dict:
        return (await _answer(self.engine.deposit(user_id, amount, asset, description, initiated_by=self.user_id,
                                                  idempotency_key=key)))["transaction"]

    async def withdraw(self, user_id: int, amount: str, asset: str = ACCOUNT_ASSET, description: str = "",
                       *, key: str | None = None) -> dict:
        return (await _answer(self.engine.withdraw(user_id, amount, asset, description, initiated_by=self.user_id,
                                                   idempotency_key=key)))["transaction"]

    async def adjust(self, user_id: int, amount: str, asset: str = ACCOUNT_ASSET, description: str = "",
                     *, key: str | None = None) -> dict:
        return (await _answer(self.engine.adjust(user_id, amount, asset, description, initiated_by=self.user_id,
                                                 idempotency_key=key)))["transaction"]

    async def set_control(self, user_id: int, mode: str, *, key: str | None = None) -> dict:
        return await _answer(self.engine.set_control_mode(user_id, mode, self.user_id, idempotency_key=key))

    async def force(self, trade_id: str, outcome: str, *, key: str | None = None) -> dict:
        return (await _answer(self.engine.force_option(trade_id, outcome, self.user_id,
                                                       idempotency_key=key)))["trade"]

    async def open_option(self, symbol: str, direction: str, amount: str, duration: int,
                          *, key: str | None = None) -> dict:
        return (await _answer(self.engine.open_option(self.user_id, symbol, direction, amount, duration,
                                                      idempotency_key=key)))["trade"]

    async def spot(self, symbol: str, side: str, quantity: str, *, key: str | None = None) -> dict:
        return (await _answer(self.engine.spot_order(self.user_id, symbol, side, quantity,
                                                     idempotency_key=key)))["order"]


async def _answer(reply: Reply) -> dict[str, Any]:
    return await as_asyncio(reply)
