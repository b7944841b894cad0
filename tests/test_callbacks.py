"""Plain callbacks on the default path: how many worker-thread hops they cost.

A plain ``produce`` / ``process_replies`` / ``consume`` runs in a worker
thread (a blocking callback must never stall other sessions), and each hop
costs a thread hand-off and a wake-up of trio. The sender runs
``process_replies`` of one object and ``produce`` of the next in one hop;
the receiver runs ``consume`` and ``consumed_cb`` in one.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    Site,
    open_site,
)
from fedstream._engine._callbacks import CallbackRunner

_ids = itertools.count()


@asynccontextmanager
async def _pair(**options: Any) -> AsyncIterator[tuple[Site, Site]]:
    url = f"memory://callbacks-{next(_ids)}"
    async with (
        open_site("rx", listen=url, **options) as rx,
        open_site("tx", connect=[url], **options) as tx,
    ):
        await rx.wait_for_peers(["tx"])
        yield rx, tx


class _Log:
    def __init__(self) -> None:
        #: ``(callback name, thread id)`` in call order.
        self.calls: list[tuple[str, int]] = []

    def __call__(self, name: str) -> None:
        self.calls.append((name, threading.get_ident()))


class _Producer(ObjectProducer):
    def __init__(self, log: _Log, count: int, end_at: int | None = None) -> None:
        self.log, self.count, self.end_at, self.sent = log, count, end_at, 0

    def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        self.log("produce")
        if self.sent == self.count:
            return None
        self.sent += 1
        return Shareable(n=self.sent - 1), 10.0

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.log("process_replies")
        if self.end_at is not None and self.sent - 1 == self.end_at:
            return "enough"
        return None


class _Consumer(ObjectConsumer):
    def __init__(self, log: _Log) -> None:
        self.log = log

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.log("consume")
        return True, None


class _Factory(ConsumerFactory):
    def __init__(self, log: _Log) -> None:
        self.log = log

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _Consumer(self.log)


def _count_hops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every worker-thread hop any site makes from now on."""
    hops = [0]
    real = CallbackRunner._in_thread

    async def counting(self: CallbackRunner, call: Any, grace: float) -> Any:
        hops[0] += 1
        return await real(self, call, grace)

    monkeypatch.setattr(CallbackRunner, "_in_thread", counting)
    return hops


async def test_sender_runs_process_replies_and_next_produce_in_one_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """N objects: one hop for the first produce, then one per object for
    its process_replies together with the next produce (the last one
    returning None)."""
    hops = _count_hops(monkeypatch)
    tx_log, rx_log = _Log(), _Log()
    with trio.fail_after(10):
        async with _pair() as (rx, tx):
            rx.register_stream_processing("c", "t", _Factory(rx_log))
            before = hops[0]
            rc, _ = await tx.stream_objects("c", "t", {}, ["rx"], _Producer(tx_log, 5), None)
            sender_and_receiver = hops[0] - before
    assert rc == ReturnCode.OK
    names = [name for name, _ in tx_log.calls]
    assert names == ["produce"] + ["process_replies", "produce"] * 5
    # Each process_replies and the produce after it ran in the same thread hop.
    for index in range(1, len(tx_log.calls), 2):
        assert tx_log.calls[index][1] == tx_log.calls[index + 1][1]
    # Sender: 1 + 5 hops. Receiver: get_consumer + one per consume.
    assert [name for name, _ in rx_log.calls] == ["consume"] * 5
    assert sender_and_receiver == (1 + 5) + (1 + 5)


async def test_process_replies_ending_the_stream_is_not_followed_by_produce() -> None:
    log = _Log()
    with trio.fail_after(10):
        async with _pair() as (rx, tx):
            rx.register_stream_processing("c", "t", _Factory(_Log()))
            rc, result = await tx.stream_objects(
                "c", "t", {}, ["rx"], _Producer(log, 5, end_at=2), None
            )
    assert (rc, result) == (ReturnCode.OK, "enough")
    assert [name for name, _ in log.calls] == ["produce"] + ["process_replies", "produce"] * 2 + [
        "process_replies"
    ]


async def test_receiver_runs_consume_and_consumed_cb_in_one_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hops = _count_hops(monkeypatch)
    log = _Log()

    def consumed(
        result: tuple[bool, Any], stream_ctx: dict[str, Any], fl_ctx: FLContext, **kwargs: Any
    ) -> None:
        log("consumed_cb")
        assert result == (True, None)  # FLARE's convention: consume's result first
        assert kwargs == {"tag": 7}

    class AsyncProducer(ObjectProducer):
        sent = 0

        async def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
            if self.sent == 4:
                return None
            self.sent += 1
            return Shareable(), 10.0

        async def process_replies(self, *args: Any) -> Any:
            return None

    with trio.fail_after(10):
        async with _pair() as (rx, tx):
            rx.register_stream_processing("c", "t", _Factory(log), consumed_cb=consumed, tag=7)
            before = hops[0]
            rc, _ = await tx.stream_objects("c", "t", {}, ["rx"], AsyncProducer(), None)
            receiver = hops[0] - before
    assert rc == ReturnCode.OK
    assert [name for name, _ in log.calls] == ["consume", "consumed_cb"] * 4
    for index in range(0, len(log.calls), 2):
        assert log.calls[index][1] == log.calls[index + 1][1]
    assert receiver == 1 + 4  # get_consumer, then one hop per object


async def test_async_consumed_cb_after_plain_consume_still_runs_once_per_object() -> None:
    log = _Log()

    async def consumed(
        result: tuple[bool, Any], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> None:
        log("consumed_cb")

    with trio.fail_after(10):
        async with _pair() as (rx, tx):
            rx.register_stream_processing("c", "t", _Factory(log), consumed_cb=consumed)
            rc, _ = await tx.stream_objects("c", "t", {}, ["rx"], _Producer(_Log(), 3), None)
    assert rc == ReturnCode.OK
    assert [name for name, _ in log.calls] == ["consume", "consumed_cb"] * 3


async def test_plain_callbacks_returning_awaitables_are_refused_in_one_hop_too() -> None:
    """A plain callback run in a thread may not return an awaitable (trio
    refuses one from a single callback): chained in one hop, the same."""
    log = _Log()

    class Producer(_Producer):
        def process_replies(self, *args: Any) -> Any:
            async def later() -> None:
                pass  # pragma: no cover

            return later()

    with trio.fail_after(10):
        async with _pair() as (rx, tx):
            rx.register_stream_processing("c", "t", _Factory(log))
            with pytest.raises(TypeError, match="returned an awaitable"):
                await tx.stream_objects("c", "t", {}, ["rx"], Producer(_Log(), 2), None)


async def test_a_call_that_returns_normally_wakes_trio_at_most_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hop's result reaches trio through one run_sync_soon at most; a
    cancelled caller still waits (within its grace) for the call to return."""
    runner = CallbackRunner(grace=5.0)
    assert await runner(lambda: 5) == 5  # the worker thread exists
    sent = [0]
    token = trio.lowlevel.current_trio_token()
    real = type(token).run_sync_soon

    def counting(self: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
        sent[0] += 1
        real(self, fn, *args, **kwargs)

    monkeypatch.setattr(type(token), "run_sync_soon", counting)
    for _ in range(20):
        assert await runner(lambda: 5) == 5
    assert sent[0] <= 20

    # Cancelled while the call runs: the caller waits for its return.
    release = threading.Event()
    waited = [0.0]

    async def cancelled_call() -> None:
        start = trio.current_time()
        with trio.move_on_after(0.1):
            await runner(release.wait)
        waited[0] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_call)
        await trio.sleep(0.3)
        release.set()
    assert 0.3 <= waited[0] < 4.0
    await runner.aclose()


async def test_pipelined_sender_chains_process_replies_and_produce_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Window 3, 6 objects: 3 hops fill the window, then each process_replies
    carries the next produce (4 hops, the last produce returning None), then
    the 2 process_replies left alone: 9 on the sender, 1 + 6 on the receiver."""
    hops = _count_hops(monkeypatch)
    log = _Log()
    with trio.fail_after(10):
        async with _pair() as (rx, tx):
            rx.register_stream_processing("c", "t", _Factory(_Log()))
            before = hops[0]
            rc, _ = await tx.stream_objects(
                "c", "t", {}, ["rx"], _Producer(log, 6), None, max_in_flight=3
            )
            total = hops[0] - before
    assert rc == ReturnCode.OK
    names = [name for name, _ in log.calls]
    assert names.count("produce") == 7
    assert names.count("process_replies") == 6
    assert total == 9 + 7
