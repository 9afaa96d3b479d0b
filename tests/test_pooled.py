"""Pooled actors: pykka actors whose turns share a small dispatcher."""

from __future__ import annotations

import queue
from typing import Any

import pykka
import pytest

from balancesim.actors import Reply
from balancesim.actors._pooled import Dispatcher, PooledActor

TIMEOUT_S = 5


class Recorder(PooledActor):
    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher=dispatcher)
        self.seen: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        self.seen.append(message)
        return list(self.seen)


@pytest.fixture
def dispatcher():
    pool = Dispatcher(2, turn_budget=4)
    yield pool
    pool.shutdown()


@pytest.fixture
def recorder(dispatcher):
    ref = Recorder.start(dispatcher)
    yield ref
    if ref.is_alive():
        ref.stop()


def test_messages_are_handled_in_order_across_turns(recorder):
    for i in range(50):
        recorder.tell(i)
    assert recorder.ask("last", timeout=TIMEOUT_S) == [*range(50), "last"]


def test_a_sealed_inbox_refuses_offers_but_still_takes_the_stop(recorder):
    assert recorder.actor_inbox.offer("before")
    recorder.actor_inbox.seal()
    assert not recorder.actor_inbox.offer("after")
    assert recorder.stop(timeout=TIMEOUT_S)
    assert not recorder.is_alive()


def test_an_ask_to_a_pooled_actor_returns_a_reply_with_callbacks(recorder):
    future = recorder.ask("x", block=False)
    assert isinstance(future, Reply)
    called = Reply()
    future.add_done_callback(lambda done: called.set(done.get(timeout=0)))
    assert called.get(timeout=TIMEOUT_S) == ["x"]


def test_a_reply_times_out_re_raises_and_refuses_a_second_set():
    reply = Reply()
    with pytest.raises(pykka.Timeout):
        reply.get(timeout=0.01)
    reply.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        reply.get(timeout=TIMEOUT_S)
    with pytest.raises(queue.Full):  # as pykka's own futures refuse a second value
        reply.set(1)


def test_a_mapped_reply_gets_the_mapped_value():
    reply = Reply()
    doubled = reply.map(lambda value: value * 2)
    reply.set(21)
    assert doubled.get(timeout=TIMEOUT_S) == 42
