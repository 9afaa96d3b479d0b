"""The account actor: the one door through which an account's balances change."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import pykka

from balancesim import errors
from balancesim.actors._clock import Clock
from balancesim.actors._ledger import Ledger, Submission
from balancesim.actors._messages import Command, Rejected
from balancesim.actors._pooled import Dispatcher, PooledActor
from balancesim.actors._reply import Reply
from balancesim.actors._state import AccountState, apply_all, decide

__all__ = ["AccountActor", "Envelope"]

log = logging.getLogger(__name__)


class Envelope(NamedTuple):
    """What an account actor receives: a command, the reply to complete, an optional
    idempotency ``(caller_id, key, fingerprint)``, and an optional deadline (seconds
    since the epoch, this machine's clock) past which the ledger must not commit it.

    A named tuple: one is made per mutation, and a frozen dataclass builds slower.
    """

    command: Command
    reply: Reply
    idempotency: tuple[int, str, str] | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class _Reload:
    """The ledger failed to commit one of ours: our in-memory state is ahead of it."""


class AccountActor(PooledActor):
    """Decides commands for one account and pipelines the results to the ledger.

    The actor applies a confirmed decision to its state at once and goes on to the
    next command while the ledger commits, so one busy account is not bound to
    one fsync per mutation; the reply waits for the commit. If a commit fails,
    the writer calls ``on_failure`` (its one way back into an actor) and the
    actor reloads its state from the ledger. A successor of a passivated actor
    starts only once ``drained`` says every commit of its predecessor is
    answered, so it never loads a state that is about to change: on stop, the
    actor queues a ledger barrier behind its last submission, and the barrier's
    completion sets ``drained``.

    Args:
        user_id: the account.
        ledger: where decisions are committed and state is loaded from.
        clock: gives each decision its time.
        dispatcher: the pool the actor's turns run on.
        drained: set once this actor has stopped and its in-flight commits are
            answered. (pykka's ``actor_stopped`` is set before ``on_stop`` runs,
            so it cannot tell a successor that the ledger is settled.)
        predecessor: the ``drained`` future of a passivated actor of the same
            account; this one starts after it is set.
    """

    def __init__(
        self,
        user_id: int,
        ledger: Ledger,
        clock: Clock,
        dispatcher: Dispatcher,
        drained: Reply,
        predecessor: Reply | None = None,
    ) -> None:
        super().__init__(dispatcher=dispatcher, start_after=predecessor)
        self.user_id = user_id
        self.ledger = ledger
        self.clock = clock
        self.state: AccountState | None = None
        self._drained = drained
        self._missing = False  # loaded, and there is no such account

    def on_start(self) -> None:
        self._load()

    def on_stop(self) -> None:
        # The ledger's queue is FIFO: the barrier completes after every submission of ours.
        self.ledger.flush().add_done_callback(lambda _: self._drained.set(None))

    def on_receive(self, message: Any) -> None:
        # Every request must be answered: an exception escaping to pykka would
        # stop the actor and strand the replies queued behind it.
        if isinstance(message, _Reload):
            self._load()
            return
        if self.state is None:
            self._load()
        if self.state is None:
            message.reply.set_exception(
                errors.UnknownUser(f"no user {self.user_id}") if self._missing
                else errors.StorageUnavailable("the account could not be loaded")
            )
            return
        try:
            self._handle(message)
        except Exception as error:  # noqa: BLE001 - answered, logged, and the actor lives on
            log.exception("account %s failed on %r", self.user_id, message.command)
            self._load()
            if not message.reply.done():
                message.reply.set_exception(error)

    def _handle(self, message: Envelope) -> None:
        verdict = decide(self.state, message.command, self.clock.now())
        if isinstance(verdict, Rejected):
            message.reply.set_exception(verdict.error)
            return
        self.state = apply_all(self.state, verdict.events)
        self.ledger.append(Submission(
            self.user_id, message.command, verdict.events, message.reply, self._reload_later,
            message.idempotency, message.deadline,
        ))

    def _load(self) -> None:
        """Load the committed state; on a storage error stay unloaded and retry on the next request."""
        self._missing = False
        try:
            self.state = self.ledger.load_account(self.user_id)
        except Exception:  # noqa: BLE001 - storage trouble is reported per request
            log.exception("account %s could not be loaded", self.user_id)
            self.state = None
            return
        self._missing = self.state is None
        self.ledger.reset(self.user_id)

    def _reload_later(self) -> None:
        try:
            self.actor_ref.tell(_Reload())
        except pykka.ActorDeadError:
            pass  # a stopped actor's successor loads from the ledger anyway
