"""The public site API end to end: real loopback TCP, plus memory sites on a mock clock.

Every test here drives whole sites through ``fedstream``'s public names only:
``open_site``/``serve_site``, ``register_stream_processing``, ``stream_objects``,
``wait_for_peers``, ``connect`` and ``shutdown_streamer``. TCP tests bind
127.0.0.1 port 0; the memory tests (``memory://``) run on ``autojump_clock``
with async or inline callbacks, because a worker thread would let the mock
clock jump past every timeout. Each test carries its own hang guard.
"""

from __future__ import annotations

import itertools
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

import fedstream
from fedstream import (
    END_RESULT,
    END_RESULTS,
    ConnectionLostError,
    ConsumerFactory,
    FedstreamError,
    FLContext,
    HandshakeError,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    Site,
    SiteClosedError,
    StreamContextKey,
    UnknownTargetError,
    make_reply,
    open_site,
    serve_site,
)
from fedstream._wire import ErrorCode
from tls_certs import deployment

LOOP = "tcp://127.0.0.1:0"
CH = "app"
TOPIC = "weights"
OK = ReturnCode.OK

_memory_ids = itertools.count()


def memory_url() -> str:
    return f"memory://engine-api-{next(_memory_ids)}"


# --------------------------------------------------------------- consumers


class Consumer(ObjectConsumer):
    """Records what it receives; delegates the reply to its factory's hook."""

    def __init__(self, factory: Recorder, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.factory = factory
        self.open_ctx = dict(stream_ctx)
        self.fl_ctx = fl_ctx
        self.items: list[Any] = []
        self.blobs: list[bytes] = []
        self.rc: str | None = None
        self.finalized = 0
        self.returned = False

    def _record(self, shareable: Shareable) -> None:
        self.items.append(shareable.get("i"))
        self.blobs.append(shareable.get("blob", b""))

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self._record(shareable)
        hook = self.factory.on_consume
        return (True, None) if hook is None else hook(self, shareable, stream_ctx, fl_ctx)

    def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.rc = stream_ctx[StreamContextKey.RC]
        self.finalized += 1


class AsyncConsumer(Consumer):
    async def consume(  # type: ignore[override]
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self._record(shareable)
        hook = self.factory.on_consume
        if hook is None:
            return True, None
        return await hook(self, shareable, stream_ctx, fl_ctx)

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:  # type: ignore[override]
        await trio.sleep(0)
        Consumer.finalize(self, stream_ctx, fl_ctx)


class Recorder(ConsumerFactory):
    """A factory that keeps every consumer it made, in order."""

    consumer_class: type[Consumer] = Consumer

    def __init__(self, on_consume: Callable[..., Any] | None = None, tag: str = "") -> None:
        self.on_consume = on_consume
        self.tag = tag
        self.consumers: list[Consumer] = []

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Consumer:
        consumer = self.consumer_class(self, stream_ctx, fl_ctx)
        self.consumers.append(consumer)
        return consumer

    def return_consumer(
        self, consumer: ObjectConsumer, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> None:
        assert isinstance(consumer, Consumer)
        consumer.returned = True

    @property
    def only(self) -> Consumer:
        assert len(self.consumers) == 1, self.consumers
        return self.consumers[0]


class AsyncRecorder(Recorder):
    consumer_class = AsyncConsumer


# --------------------------------------------------------------- producers


class Producer(ObjectProducer):
    """Sends ``count`` objects ``{"i": n, "blob": ...}``; keeps every replies dict."""

    def __init__(
        self,
        count: int = 3,
        *,
        size: int = 0,
        timeout: float = 10.0,
        result_at: int | None = None,
        result: Any = None,
    ) -> None:
        self.count = count
        self.size = size
        self.timeout = timeout
        self.result_at = result_at
        self.result = result
        self.sent = 0
        self.replies: list[dict[str, Shareable]] = []

    def make(self) -> tuple[Shareable | None, float]:
        if self.sent >= self.count:
            return None, self.timeout
        i = self.sent
        self.sent += 1
        return Shareable({"i": i, "blob": bytes([i % 251]) * self.size}), self.timeout

    def judge(self, replies: dict[str, Shareable]) -> Any:
        self.replies.append(dict(replies))
        if self.result_at is not None and len(self.replies) == self.result_at:
            return self.result
        return None

    def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        return self.make()

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return self.judge(replies)

    def rcs(self, target: str) -> list[Any]:
        return [r[target].get_return_code() for r in self.replies]


class AsyncProducer(Producer):
    async def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:  # type: ignore[override]
        await trio.sleep(0)
        return self.make()

    async def process_replies(  # type: ignore[override]
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        await trio.sleep(0)
        return self.judge(replies)


class Boom(Exception):
    """A user error that must come out of the engine as itself."""


# ------------------------------------------------------------------ sites


@asynccontextmanager
async def pair(
    rx_opts: dict[str, Any] | None = None,
    tx_opts: dict[str, Any] | None = None,
    *,
    listen: str = LOOP,
    net: str = "",
) -> AsyncIterator[tuple[Site, Site]]:
    """A receiving site ``rx`` and a sending site ``tx`` that dialed it.

    ``net`` (``"memory"``, ``"tcp"`` or ``"tls"``) picks the transport
    instead of ``listen``; ``"tls"`` gives both sites certificates.
    """
    rx_opts, tx_opts = dict(rx_opts or {}), dict(tx_opts or {})
    if net:
        listen = memory_url() if net == "memory" else f"{net}://127.0.0.1:0"
    if net in ("tls", "wss"):
        rx_opts["tls"], tx_opts["tls"] = deployment().config("rx"), deployment().config("tx")
    async with (
        open_site("rx", listen=listen, **rx_opts) as rx,
        open_site("tx", connect=[rx.address], **tx_opts) as tx,
    ):
        with trio.fail_after(5):
            await rx.wait_for_peers(["tx"])
        yield rx, tx


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ============================================================ basics


async def test_open_site_reports_bound_address_and_peers() -> None:
    with trio.fail_after(10):
        async with open_site("a", listen=LOOP) as a:
            assert a.address is not None
            assert a.address.startswith("tcp://127.0.0.1:")
            assert int(a.address.rsplit(":", 1)[1]) > 0
            assert a.addresses == [a.address]
            assert a.peers == []
            async with open_site("b", connect=[a.address]) as b:
                with pytest.raises(fedstream.FedstreamError, match="not listening"):
                    _ = b.address
                assert b.addresses == []
                assert b.peers == ["a"]
                await a.wait_for_peers(["b"])
                assert a.peers == ["b"]
            await wait_until(lambda: a.peers == [])


@pytest.mark.parametrize("net", ["memory", "tcp", "tls", "ws", "wss"])
async def test_stream_end_to_end_with_chunking(net: str) -> None:
    """Objects larger than a chunk and a window arrive whole, in order, with the context."""
    rec = Recorder()
    producer = Producer(6, size=100_000)
    fl_ctx = FLContext(identity_name="tx")
    stream_ctx: dict[str, Any] = {"job": "j1", "round": 3}
    with trio.fail_after(15):
        async with pair(
            rx_opts={"window": 32 * 1024, "chunk_size": 16 * 1024},
            tx_opts={"chunk_size": 16 * 1024, "window": 32 * 1024},
            net=net,
        ) as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, result = await tx.stream_objects(CH, TOPIC, stream_ctx, ["rx"], producer, fl_ctx)
    assert (rc, result) == (OK, None)
    consumer = rec.only
    assert consumer.items == list(range(6))
    assert consumer.blobs == [bytes([i]) * 100_000 for i in range(6)]
    assert consumer.open_ctx["job"] == "j1"
    assert consumer.open_ctx["round"] == 3
    assert consumer.open_ctx[StreamContextKey.CHANNEL] == CH
    assert consumer.open_ctx[StreamContextKey.TOPIC] == TOPIC
    assert consumer.fl_ctx.get_identity_name() == "rx"
    peer_ctx = consumer.fl_ctx.get_peer_context()
    assert peer_ctx is not None
    assert peer_ctx.get_identity_name() == "tx"
    assert consumer.rc == OK
    assert consumer.finalized == 1
    assert consumer.returned
    assert producer.rcs("rx") == [OK] * 6
    assert stream_ctx[StreamContextKey.CHANNEL] == CH
    assert stream_ctx[StreamContextKey.TOPIC] == TOPIC


async def test_fan_out_to_several_targets() -> None:
    recs = {name: Recorder() for name in ("r1", "r2", "r3")}
    producer = Producer(4, size=10_000)
    with trio.fail_after(15):
        async with (
            open_site("r1", listen=LOOP) as r1,
            open_site("r2", listen=LOOP) as r2,
            open_site("r3", listen=LOOP) as r3,
            open_site("tx", connect=[r1.address, r2.address, r3.address]) as tx,
        ):
            for site in (r1, r2, r3):
                site.register_stream_processing(CH, TOPIC, recs[site.name])
            assert tx.peers == ["r1", "r2", "r3"]
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["r1", "r2", "r3"], producer, None)
    assert rc == OK
    for name, rec in recs.items():
        assert rec.only.items == [0, 1, 2, 3]
        assert rec.only.rc == OK
        assert producer.rcs(name) == [OK] * 4


async def test_consume_returning_none_reply_is_an_ok_ack() -> None:
    rec = Recorder(lambda c, s, ctx, fl: (True, None))
    producer = Producer(3)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, FLContext())
    assert rc == OK
    assert producer.rcs("rx") == [OK, OK, OK]
    assert all(set(r["rx"].keys()) == {"__headers__"} for r in producer.replies)


async def test_consumer_replies_reach_process_replies() -> None:
    def reply(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, Shareable]:
        out = make_reply(OK)
        out["echo"] = s["i"] * 10
        return True, out

    rec = Recorder(reply)
    producer = Producer(3)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, FLContext())
    assert [r["rx"]["echo"] for r in producer.replies] == [0, 10, 20]


@pytest.mark.parametrize(
    ("result", "expected_rc"),
    [
        (True, ReturnCode.OK),
        ("done", ReturnCode.OK),
        ({"n": 1}, ReturnCode.OK),
        (False, ReturnCode.ERROR),
        (0, ReturnCode.ERROR),
        ("", ReturnCode.ERROR),
        ([], ReturnCode.ERROR),
    ],
)
async def test_process_replies_result_maps_to_rc(result: Any, expected_rc: str) -> None:
    rec = Recorder()
    producer = Producer(10, result_at=2, result=result)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, got = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, FLContext())
    assert rc == expected_rc
    assert got == result
    assert type(got) is type(result)
    assert producer.sent == 2
    assert rec.only.items == [0, 1]
    assert rec.only.rc == OK


async def test_process_replies_that_triggers_the_abort_signal_gives_task_aborted() -> None:
    class Aborting(Producer):
        def process_replies(self, replies: Any, stream_ctx: Any, fl_ctx: FLContext) -> Any:
            self.judge(replies)
            if len(self.replies) == 2:
                fl_ctx.get_run_abort_signal().trigger("enough")
                return "stop"
            return None

    rec = Recorder()
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], Aborting(10), FLContext())
    assert rc == ReturnCode.TASK_ABORTED
    assert rec.only.items == [0, 1]
    assert rec.only.rc == ReturnCode.TASK_ABORTED


async def test_already_triggered_abort_signal_sends_nothing() -> None:
    rec = Recorder()
    fl_ctx = FLContext()
    fl_ctx.get_run_abort_signal().trigger(True)
    producer = Producer(3)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, fl_ctx)
    assert rc == ReturnCode.TASK_ABORTED
    assert producer.sent == 0
    assert rec.consumers == []


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_consumed_cb_runs_after_each_consume_with_kwargs(kind: str) -> None:
    # FLARE's convention: consumed_cb((keep_going, reply), stream_ctx, fl_ctx, **cb_kwargs).
    calls: list[tuple[int, Any, str]] = []
    results: list[Any] = []
    rec = Recorder() if kind == "sync" else AsyncRecorder()

    def consumed_sync(
        result: Any, stream_ctx: dict[str, Any], fl_ctx: FLContext, *, tag: str
    ) -> None:
        results.append(result)
        calls.append((len(rec.only.items), stream_ctx[StreamContextKey.TOPIC], tag))

    async def consumed_async(
        result: Any, stream_ctx: dict[str, Any], fl_ctx: FLContext, *, tag: str
    ) -> None:
        await trio.sleep(0)
        consumed_sync(result, stream_ctx, fl_ctx, tag=tag)

    cb = consumed_sync if kind == "sync" else consumed_async
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec, consumed_cb=cb, tag="t1")
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(4), FLContext())
    assert rc == OK
    assert calls == [(1, TOPIC, "t1"), (2, TOPIC, "t1"), (3, TOPIC, "t1"), (4, TOPIC, "t1")]
    assert all(keep_going is True for keep_going, _ in results)


async def test_stream_done_cb_gets_kwargs_and_its_truthy_result_reaches_the_sender() -> None:
    seen: list[tuple[str, str, Any]] = []

    def done(stream_ctx: dict[str, Any], fl_ctx: FLContext, *, who: str) -> Any:
        seen.append((stream_ctx[StreamContextKey.RC], fl_ctx.get_identity_name(), who))
        return {"site": fl_ctx.get_identity_name(), "n": 3}

    rec = Recorder()
    stream_ctx: dict[str, Any] = {}
    producer = Producer(3)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec, stream_done_cb=done, who="me")
            rc, _ = await tx.stream_objects(CH, TOPIC, stream_ctx, ["rx"], producer, FLContext())
    assert rc == OK
    assert seen == [(OK, "rx", "me")]
    assert stream_ctx[END_RESULTS] == {"rx": {"site": "rx", "n": 3}}
    # The sender ended this stream, so no reply is a "last" one: no END_RESULT header.
    assert all(r["rx"].get_header(END_RESULT) is None for r in producer.replies)


@pytest.mark.parametrize("falsy", [None, 0, "", {}, False])
async def test_falsy_stream_done_cb_result_is_not_reported(falsy: Any) -> None:
    rec = Recorder()
    stream_ctx: dict[str, Any] = {}
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec, stream_done_cb=lambda s, f: falsy)
            rc, _ = await tx.stream_objects(CH, TOPIC, stream_ctx, ["rx"], Producer(2), None)
    assert rc == OK
    assert END_RESULTS not in stream_ctx


async def test_async_stream_done_cb_runs_after_finalize() -> None:
    order: list[str] = []

    class Ordered(Consumer):
        def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
            order.append("finalize")

    class OrderedRecorder(Recorder):
        consumer_class = Ordered

        def return_consumer(self, consumer: Any, stream_ctx: Any, fl_ctx: Any) -> None:
            order.append("return_consumer")

    async def done(stream_ctx: dict[str, Any], fl_ctx: FLContext) -> str:
        await trio.sleep(0)
        order.append("stream_done_cb")
        return "ok!"

    stream_ctx: dict[str, Any] = {}
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, OrderedRecorder(), stream_done_cb=done)
            await tx.stream_objects(CH, TOPIC, stream_ctx, ["rx"], Producer(1), None)
    assert order == ["finalize", "stream_done_cb", "return_consumer"]
    assert stream_ctx[END_RESULTS] == {"rx": "ok!"}


async def test_receiver_that_stops_gets_end_result_on_its_last_reply() -> None:
    """``consume`` returning ``keep_going=False`` ends the session; its result rides the reply."""

    def stop_at_two(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, Any]:
        return s["i"] < 2, None

    rec = Recorder(stop_at_two)
    stream_ctx: dict[str, Any] = {}
    producer = Producer(10)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(
                CH, TOPIC, rec, stream_done_cb=lambda s, f: {"kept": len(rec.only.items)}
            )
            rc, _ = await tx.stream_objects(CH, TOPIC, stream_ctx, ["rx"], producer, None)
    assert rc == OK
    assert rec.only.items == [0, 1, 2]
    assert rec.only.rc == OK
    assert producer.sent == 3
    assert producer.replies[-1]["rx"].get_header(END_RESULT) == {"kept": 3}
    assert all(r["rx"].get_header(END_RESULT) is None for r in producer.replies[:-1])
    assert stream_ctx[END_RESULTS] == {"rx": {"kept": 3}}


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_end_stream_called_by_consumer_ends_only_its_session(kind: str) -> None:
    """``stream_ctx[END_STREAM](rc, fl_ctx)`` ends that receiver's session.

    The other target keeps receiving; the sender sees the ended target stop,
    and gets its ``stream_done_cb`` result as ``END_RESULT`` on that target's
    last reply and in ``stream_ctx[END_RESULTS]``.
    """

    def end_at_two(c: Consumer, s: Shareable, ctx: dict[str, Any], fl: FLContext) -> Any:
        if s["i"] == 2:
            ctx[StreamContextKey.END_STREAM](OK, fl)
        return True, None

    async def end_at_two_async(c: Consumer, s: Shareable, ctx: dict[str, Any], fl: Any) -> Any:
        await trio.sleep(0)
        return end_at_two(c, s, ctx, fl)

    quitter = Recorder(end_at_two) if kind == "sync" else AsyncRecorder(end_at_two_async)
    stayer = Recorder()
    stream_ctx: dict[str, Any] = {}
    producer = Producer(8)
    with trio.fail_after(15):
        async with (
            open_site("quitter", listen=LOOP) as q,
            open_site("stayer", listen=LOOP) as s,
            open_site("tx", connect=[q.address, s.address]) as tx,
        ):
            q.register_stream_processing(
                CH, TOPIC, quitter, stream_done_cb=lambda sc, f: f"bye from {f.get_identity_name()}"
            )
            s.register_stream_processing(CH, TOPIC, stayer)
            rc, _ = await tx.stream_objects(
                CH, TOPIC, stream_ctx, ["quitter", "stayer"], producer, None
            )
    assert rc == OK
    assert quitter.only.items == [0, 1, 2]
    assert quitter.only.rc == OK
    assert stayer.only.items == list(range(8))
    assert stayer.only.rc == OK
    assert stream_ctx[END_RESULTS] == {"quitter": "bye from quitter"}
    with_result = [
        n for n, r in enumerate(producer.replies) if r["quitter"].get_header(END_RESULT) is not None
    ]
    assert with_result, "no reply to the sender carried the ended target's END_RESULT"
    assert producer.replies[with_result[0]]["quitter"].get_header(END_RESULT) == "bye from quitter"


async def test_end_stream_with_error_rc_reaches_the_sender() -> None:
    def give_up(c: Consumer, s: Shareable, ctx: dict[str, Any], fl: FLContext) -> Any:
        if s["i"] == 1:
            ctx[StreamContextKey.END_STREAM](ReturnCode.EXECUTION_RESULT_ERROR, fl)
        return True, None

    rec = Recorder(give_up)
    producer = Producer(10)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
    assert rc == ReturnCode.EXECUTION_RESULT_ERROR
    assert rec.only.rc == ReturnCode.EXECUTION_RESULT_ERROR
    assert rec.only.items == [0, 1]
    assert producer.sent <= 3


async def test_receiver_abort_signal_ends_its_session_with_task_aborted() -> None:
    def abort_at_one(c: Consumer, s: Shareable, ctx: dict[str, Any], fl: FLContext) -> Any:
        if s["i"] == 1:
            fl.get_run_abort_signal().trigger("consumer gave up")
        return True, None

    rec = Recorder(abort_at_one)
    producer = Producer(10)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
    assert rc == ReturnCode.TASK_ABORTED
    assert rec.only.rc == ReturnCode.TASK_ABORTED
    assert producer.sent <= 3


async def test_consumer_exception_becomes_execution_exception() -> None:
    def explode(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> Any:
        if s["i"] == 1:
            raise Boom("consumer broke")
        return True, None

    rec = Recorder(explode)
    producer = Producer(10)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
    assert rc == ReturnCode.EXECUTION_EXCEPTION
    assert producer.rcs("rx")[:2] == [OK, ReturnCode.EXECUTION_EXCEPTION]
    assert "consumer broke" in producer.replies[1]["rx"].get_header("__error__")
    assert rec.only.rc == ReturnCode.EXECUTION_EXCEPTION
    assert producer.sent == 2


async def test_unknown_channel_or_topic_gets_topic_unknown() -> None:
    producer = Producer(5)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, Recorder())
            rc, _ = await tx.stream_objects(CH, "nobody-listens", {}, ["rx"], producer, None)
            rc2, _ = await tx.stream_objects("other", TOPIC, {}, ["rx"], Producer(5), None)
    assert producer.rcs("rx") == [ReturnCode.TOPIC_UNKNOWN]
    assert rc == ReturnCode.TOPIC_UNKNOWN
    assert rc2 == ReturnCode.TOPIC_UNKNOWN


async def test_consumer_stopping_with_an_error_reply_ends_with_that_rc() -> None:
    def refuse(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, Shareable]:
        if s["i"] == 1:
            return False, make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        return True, None

    rec = Recorder(refuse)
    producer = Producer(10)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, result = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
    assert (rc, result) == (ReturnCode.EXECUTION_RESULT_ERROR, None)
    assert producer.rcs("rx") == [OK, ReturnCode.EXECUTION_RESULT_ERROR]
    assert rec.only.rc == ReturnCode.EXECUTION_RESULT_ERROR


async def test_stream_of_zero_objects_opens_no_session() -> None:
    rec = Recorder()
    producer = Producer(0)
    stream_ctx: dict[str, Any] = {}
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec, stream_done_cb=lambda s, f: "never")
            rc, result = await tx.stream_objects(CH, TOPIC, stream_ctx, ["rx"], producer, None)
    assert (rc, result) == (OK, None)
    assert producer.replies == []
    assert rec.consumers == []
    assert END_RESULTS not in stream_ctx


async def test_get_consumer_raising_gives_execution_exception_and_still_runs_done_cb() -> None:
    done: list[str] = []

    class Broken(Recorder):
        def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Consumer:
            raise Boom("no consumer for you")

    producer = Producer(3)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(
                CH, TOPIC, Broken(), stream_done_cb=lambda s, f: done.append(s[StreamContextKey.RC])
            )
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
    assert rc == ReturnCode.EXECUTION_EXCEPTION
    assert producer.rcs("rx") == [ReturnCode.EXECUTION_EXCEPTION]
    assert done == [ReturnCode.EXECUTION_EXCEPTION]


async def test_finalize_errors_do_not_skip_the_later_end_steps() -> None:
    steps: list[str] = []

    class BadFinalize(Consumer):
        def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
            steps.append("finalize")
            raise Boom("finalize broke")

    class BadFinalizeRecorder(Recorder):
        consumer_class = BadFinalize

        def return_consumer(self, consumer: Any, stream_ctx: Any, fl_ctx: Any) -> None:
            steps.append("return_consumer")

    def done(stream_ctx: dict[str, Any], fl_ctx: FLContext) -> str:
        steps.append("stream_done_cb")
        raise Boom("done broke too")

    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, BadFinalizeRecorder(), stream_done_cb=done)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(2), None)
            # The site is fine afterwards.
            rx.register_stream_processing(CH, TOPIC, Recorder())
            rc2, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(2), None)
    assert (rc, rc2) == (OK, OK)
    assert steps == ["finalize", "stream_done_cb", "return_consumer"]


async def test_fan_out_delivers_to_targets_concurrently() -> None:
    """``a`` cannot consume object n before ``b`` has: only concurrent delivery finishes."""
    b_has: list[threading.Event] = [threading.Event() for _ in range(3)]

    def a_waits(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        assert b_has[s["i"]].wait(10), "delivery to b waited for a's reply"
        return True, None

    def b_signals(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        b_has[s["i"]].set()
        return True, None

    producer = Producer(3)
    with trio.fail_after(20):
        async with (
            open_site("a", listen=LOOP) as a,
            open_site("b", listen=LOOP) as b,
            open_site("tx", connect=[a.address, b.address]) as tx,
        ):
            a.register_stream_processing(CH, TOPIC, Recorder(a_waits))
            b.register_stream_processing(CH, TOPIC, Recorder(b_signals))
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["a", "b"], producer, None)
    assert rc == OK
    assert producer.rcs("a") == [OK] * 3


# ============================================================ targets


async def test_empty_or_unknown_targets_raise_unknown_target_error() -> None:
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, Recorder())
            with pytest.raises(UnknownTargetError):
                await tx.stream_objects(CH, TOPIC, {}, [], Producer(1), None)
            with pytest.raises(UnknownTargetError):
                await tx.stream_objects(CH, TOPIC, {}, ["ghost"], Producer(1), None)
            with pytest.raises(UnknownTargetError):
                await tx.stream_objects(CH, TOPIC, {}, ["rx", "ghost"], Producer(1), None)
            with pytest.raises(UnknownTargetError):
                await tx.stream_objects(CH, TOPIC, {}, ["tx"], Producer(1), None)
            with pytest.raises(UnknownTargetError):
                await tx.stream_objects(
                    CH, TOPIC, {}, ["ghost", "spook"], Producer(1), None, optional=True
                )
            # Still usable afterwards.
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(1), None)
            assert rc == OK
    assert issubclass(UnknownTargetError, ValueError)
    assert issubclass(UnknownTargetError, FedstreamError)


async def test_optional_stream_gives_unknown_targets_communication_error() -> None:
    rec = Recorder()
    producer = Producer(3)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(
                CH, TOPIC, {}, ["rx", "ghost"], producer, None, optional=True
            )
    assert rc == OK
    assert producer.rcs("rx") == [OK] * 3
    assert producer.rcs("ghost") == [ReturnCode.COMMUNICATION_ERROR] * 3
    assert rec.only.items == [0, 1, 2]


async def test_duplicate_targets_and_secure_are_refused() -> None:
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, Recorder())
            with pytest.raises(ValueError, match="duplicate"):
                await tx.stream_objects(CH, TOPIC, {}, ["rx", "rx"], Producer(1), None)
            with pytest.raises(FedstreamError):
                await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(1), None, secure=True)
            with pytest.raises(TypeError):
                await tx.stream_objects(CH, TOPIC, {}, ["rx"], object(), None)  # type: ignore[arg-type]


# ============================================================ producer errors


@pytest.mark.parametrize("where", ["produce", "process_replies"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_producer_exceptions_propagate_as_themselves(where: str, kind: str) -> None:
    err = Boom(f"{kind} {where} failed")

    class Failing(Producer):
        def fail_or(self, value: Any) -> Any:
            if len(self.replies) == 2:
                raise err
            return value

        def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            if where == "produce":
                return self.fail_or(self.make())
            return self.make()

        def process_replies(self, replies: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            out = self.judge(replies)
            if where == "process_replies" and len(self.replies) == 3:
                raise err
            return out

    class AsyncFailing(Failing):
        async def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:  # type: ignore[override]
            await trio.sleep(0)
            return Failing.produce(self, stream_ctx, fl_ctx)

        async def process_replies(self, replies: Any, stream_ctx: Any, fl_ctx: Any) -> Any:  # type: ignore[override]
            await trio.sleep(0)
            return Failing.process_replies(self, replies, stream_ctx, fl_ctx)

    producer = Failing(10) if kind == "sync" else AsyncFailing(10)
    rec = Recorder()
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            with pytest.raises(Boom) as info:
                await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
            # The site survives its caller's error.
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(1), None)
            assert rc == OK
    assert info.value is err
    first = rec.consumers[0]
    assert first.rc == ReturnCode.EXECUTION_EXCEPTION
    assert first.finalized == 1


def _bad_outputs() -> list[Any]:
    good = Shareable({"i": 1})
    return [
        pytest.param(("not a shareable", 5.0), id="str-object"),
        pytest.param(({"i": 1}, 5.0), id="plain-dict"),
        pytest.param((good, 0), id="zero-timeout"),
        pytest.param((good, -1.0), id="negative-timeout"),
        pytest.param((good, math.nan), id="nan-timeout"),
        pytest.param((good, math.inf), id="inf-timeout"),
        pytest.param((good, True), id="bool-timeout"),
        pytest.param((good, "5"), id="str-timeout"),
        pytest.param((good, None), id="none-timeout"),
        pytest.param((good,), id="one-tuple"),
        pytest.param((good, 5.0, 1), id="three-tuple"),
        pytest.param(good, id="bare-shareable"),
        pytest.param((Shareable({"x": object()}), 5.0), id="unencodable-object"),
    ]


@pytest.mark.parametrize("bad", _bad_outputs())
async def test_invalid_producer_output_raises_value_error(bad: Any) -> None:
    class Bad(Producer):
        def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            if self.sent == 1:
                self.sent += 1
                return bad
            return self.make()

    rec = Recorder()
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            with pytest.raises(ValueError):
                await tx.stream_objects(CH, TOPIC, {}, ["rx"], Bad(5), None)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(1), None)
            assert rc == OK
    assert rec.consumers[0].items == [0]
    assert rec.consumers[0].rc == ReturnCode.EXECUTION_EXCEPTION


@pytest.mark.parametrize("timeout", [5, 1, 0.5, 10**6])
async def test_int_and_float_timeouts_are_accepted(timeout: float) -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(
                CH, TOPIC, {}, ["rx"], Producer(2, timeout=timeout), None
            )
    assert rc == OK
    assert rec.only.items == [0, 1]


async def test_unencodable_stream_ctx_is_a_value_error() -> None:
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, Recorder())
            with pytest.raises(ValueError, match="stream_ctx"):
                await tx.stream_objects(CH, TOPIC, {"bad": object()}, ["rx"], Producer(1), None)


# ============================================================ registration


async def test_wildcard_registration_precedence_and_replacement() -> None:
    exact, by_channel, by_topic, anything = (Recorder(tag=t) for t in ("exact", "ch", "tp", "any"))
    replacement = Recorder(tag="replacement")
    with trio.fail_after(15):
        async with pair() as (rx, tx):
            rx.register_stream_processing("*", "*", anything)
            rx.register_stream_processing("*", "t", by_topic)
            rx.register_stream_processing("c", "*", by_channel)
            rx.register_stream_processing("c", "t", exact)
            for channel, topic in [("c", "t"), ("c", "x"), ("y", "t"), ("y", "x")]:
                rc, _ = await tx.stream_objects(channel, topic, {}, ["rx"], Producer(1), None)
                assert rc == OK
            rx.register_stream_processing("c", "t", replacement)
            rc, _ = await tx.stream_objects("c", "t", {}, ["rx"], Producer(1), None)
            assert rc == OK
    assert [c.open_ctx[StreamContextKey.TOPIC] for c in exact.consumers] == ["t"]
    assert [
        (c.open_ctx[StreamContextKey.CHANNEL], c.open_ctx[StreamContextKey.TOPIC])
        for c in by_channel.consumers
    ] == [("c", "x")]
    assert [c.open_ctx[StreamContextKey.CHANNEL] for c in by_topic.consumers] == ["y"]
    assert [
        (c.open_ctx[StreamContextKey.CHANNEL], c.open_ctx[StreamContextKey.TOPIC])
        for c in anything.consumers
    ] == [("y", "x")]
    assert len(replacement.consumers) == 1
    assert len(exact.consumers) == 1


async def test_register_rejects_non_factories() -> None:
    with trio.fail_after(5):
        async with open_site("a") as a:
            with pytest.raises(TypeError):
                a.register_stream_processing(CH, TOPIC, object())  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                a.register_stream_processing(1, TOPIC, Recorder())  # type: ignore[arg-type]


# ============================================================ connections


async def test_serve_site_with_nursery_start() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve_site, "srv", listen=LOOP))
            assert isinstance(server, Site)
            assert server.name == "srv"
            assert server.address is not None
            server.register_stream_processing(CH, TOPIC, rec)
            # started() came only once listening: dialing right away works.
            async with open_site("cli", connect=[server.address]) as cli:
                rc, _ = await cli.stream_objects(CH, TOPIC, {}, ["srv"], Producer(3), None)
                assert rc == OK
            # serve_site can dial too.
            other = await nursery.start(
                partial(serve_site, "other", connect=[server.address], heartbeat_interval=1.0)
            )
            assert other.peers == ["srv"]
            nursery.cancel_scope.cancel()
    assert rec.only.items == [0, 1, 2]
    assert server.closed
    assert other.closed


async def test_shutdown_streamer_ends_serve_site() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve_site, "srv", listen=LOOP))
            await server.shutdown_streamer()
        # The nursery exits on its own: serve_site returned.
    assert server.closed


async def test_connect_after_start_returns_the_peer_name() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with open_site("b", listen=LOOP) as b, open_site("a") as a:
            b.register_stream_processing(CH, TOPIC, rec)
            assert a.peers == []
            name = await a.connect(b.address)
            assert name == "b"
            assert a.peers == ["b"]
            await b.wait_for_peers(["a"])
            rc, _ = await a.stream_objects(CH, TOPIC, {}, [name], Producer(2), None)
            assert rc == OK
    assert rec.only.items == [0, 1]


async def test_connect_to_a_closed_port_raises_connection_lost() -> None:
    port = free_port()
    with trio.fail_after(10):
        async with open_site("a") as a:
            with pytest.raises(ConnectionLostError):
                await a.connect(f"tcp://127.0.0.1:{port}")
            assert a.peers == []


async def test_second_site_with_a_connected_name_is_refused() -> None:
    rec = Recorder()
    with trio.fail_after(15):
        async with open_site("srv", listen=LOOP) as srv:
            srv.register_stream_processing(CH, TOPIC, rec)
            async with open_site("dup", connect=[srv.address]) as first:
                await srv.wait_for_peers(["dup"])
                # As a dial at start: open_site itself raises HandshakeError.
                with pytest.raises(HandshakeError):
                    await _open_and_wait("dup", connect=[srv.address])
                # As a dial later on.
                async with open_site("dup") as second:
                    with pytest.raises(HandshakeError):
                        await second.connect(srv.address)
                    assert second.peers == []
                assert srv.peers == ["dup"]
                # The first connection is undisturbed.
                rc, _ = await first.stream_objects(CH, TOPIC, {}, ["srv"], Producer(2), None)
                assert rc == OK
            await wait_until(lambda: srv.peers == [])
            # Once the first one left, the name is free again.
            async with open_site("dup", connect=[srv.address]) as again:
                rc, _ = await again.stream_objects(CH, TOPIC, {}, ["srv"], Producer(1), None)
                assert rc == OK
    assert [c.items for c in rec.consumers] == [[0, 1], [0]]


async def _open_and_wait(name: str, **kwargs: Any) -> None:
    async with open_site(name, **kwargs):
        pytest.fail("open_site should have raised")


async def test_site_using_the_servers_own_name_is_refused() -> None:
    with trio.fail_after(10):
        async with open_site("srv", listen=LOOP) as srv:
            with pytest.raises(HandshakeError):
                await _open_and_wait("srv", connect=[srv.address])
            async with open_site("srv") as impostor:
                with pytest.raises(HandshakeError):
                    await impostor.connect(srv.address)
                assert impostor.peers == []
            assert srv.peers == []
            async with open_site("fine", connect=[srv.address]):
                await srv.wait_for_peers(["fine"])


async def test_refused_dialer_is_told_why() -> None:
    """The acceptor refuses with a GOAWAY whose reason ends up in the HandshakeError."""
    with trio.fail_after(10):
        async with open_site("srv", listen=LOOP) as srv, open_site("dup", connect=[srv.address]):
            await srv.wait_for_peers(["dup"])
            async with open_site("dup") as second:
                with pytest.raises(HandshakeError, match="already connected") as refused:
                    await second.connect(srv.address)
                assert refused.value.code == ErrorCode.DUPLICATE_SITE
                assert "tls://" not in str(refused.value)  # no transport hint on a refusal
            async with open_site("srv") as impostor:
                with pytest.raises(HandshakeError, match="own site name") as refused:
                    await impostor.connect(srv.address)
                assert refused.value.code == ErrorCode.DUPLICATE_SITE


async def test_a_handshake_that_fails_without_a_refusal_has_no_code() -> None:
    """Typed, not matched by message text: ``code`` is set only by a GOAWAY refusal."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def hang_up(stream: trio.SocketStream) -> None:
                await stream.aclose()

            listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with open_site("a", reconnect=False) as a:
                with pytest.raises(HandshakeError, match="dial it as tls://") as failed:
                    await a.connect(f"tcp://127.0.0.1:{port}")
                assert failed.value.code is None
            nursery.cancel_scope.cancel()


async def test_dialer_refuses_a_peer_whose_name_it_already_has() -> None:
    """``a`` is already connected to one site named ``x`` and dials another ``x``."""
    with trio.fail_after(10):
        async with (
            open_site("a", listen=LOOP) as a,
            open_site("x", connect=[a.address]),
            open_site("x", listen=LOOP) as other_x,
        ):
            await a.wait_for_peers(["x"])
            with pytest.raises(HandshakeError, match="already connected"):
                await a.connect(other_x.address)
            assert a.peers == ["x"]
            await wait_until(lambda: other_x.peers == [])


async def test_dialing_back_an_already_connected_peer_is_refused() -> None:
    with trio.fail_after(10):
        async with open_site("a", listen=LOOP) as a, open_site("b", listen=LOOP) as b:
            assert await a.connect(b.address) == "b"
            await b.wait_for_peers(["a"])
            with pytest.raises(HandshakeError):
                await b.connect(a.address)
            with pytest.raises(HandshakeError):
                await a.connect(b.address)
            assert a.peers == ["b"]
            assert b.peers == ["a"]


async def test_streams_flow_both_ways_over_one_connection() -> None:
    """Only ``a`` dialed; both sides send at the same time over that one connection."""
    at_a, at_b = Recorder(), Recorder()
    results: dict[str, tuple[str, Any]] = {}
    with trio.fail_after(15):
        async with open_site("b", listen=LOOP) as b, open_site("a", connect=[b.address]) as a:
            await b.wait_for_peers(["a"])
            a.register_stream_processing(CH, TOPIC, at_a)
            b.register_stream_processing(CH, TOPIC, at_b)

            async def send(site: Site, target: str) -> None:
                results[site.name] = await site.stream_objects(
                    CH, TOPIC, {"from": site.name}, [target], Producer(8, size=50_000), None
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, a, "b")
                nursery.start_soon(send, b, "a")
            assert a.peers == ["b"]
            assert b.peers == ["a"]
            assert a.addresses == []  # a never listened: b can only have used a's dial
    assert results == {"a": (OK, None), "b": (OK, None)}
    assert at_a.only.items == list(range(8))
    assert at_a.only.open_ctx["from"] == "b"
    assert at_b.only.items == list(range(8))
    assert at_b.only.open_ctx["from"] == "a"


async def test_wait_for_peers_semantics() -> None:
    got: list[list[str]] = []
    with trio.fail_after(15):
        async with open_site("hub", listen=LOOP) as hub:
            await hub.wait_for_peers([])  # nothing to wait for

            async def waiter() -> None:
                await hub.wait_for_peers(["a", "b"])
                got.append(hub.peers)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                async with open_site("a", connect=[hub.address]):
                    await trio.sleep(0.1)
                    assert got == [], "wait_for_peers returned before b connected"
                    async with open_site("b", connect=[hub.address]):
                        await wait_until(lambda: bool(got))
                        assert got == [["a", "b"]]
                        await hub.wait_for_peers(["a"])  # already there: returns at once
            # Both left: waiting again blocks until a site of that name returns.
            await wait_until(lambda: hub.peers == [])
            with trio.move_on_after(0.2) as scope:
                await hub.wait_for_peers(["a"])
            assert scope.cancelled_caught
            returned = trio.Event()

            async def wait_for_a() -> None:
                await hub.wait_for_peers(["a"])
                returned.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_a)
                await trio.sleep(0.05)
                assert not returned.is_set()
                async with open_site("a", connect=[hub.address]):
                    await returned.wait()
    assert got == [["a", "b"]]


async def test_wait_for_peers_raises_site_closed_when_the_site_shuts_down() -> None:
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            site = await nursery.start(partial(serve_site, "lonely", listen=LOOP))

            async def waiter() -> None:
                try:
                    await site.wait_for_peers(["ghost"])
                except SiteClosedError as exc:
                    errors.append(exc)

            nursery.start_soon(waiter)
            await trio.sleep(0.05)
            await site.shutdown_streamer()
        with pytest.raises(SiteClosedError):
            await site.wait_for_peers(["ghost"])
    assert len(errors) == 1


async def test_stream_objects_and_connect_after_shutdown_raise_site_closed() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            rx = await nursery.start(partial(serve_site, "rx", listen=LOOP))
            tx = await nursery.start(partial(serve_site, "tx", connect=[rx.address]))
            rx.register_stream_processing(CH, TOPIC, Recorder())
            await tx.shutdown_streamer()
            await tx.shutdown_streamer()  # idempotent
            assert tx.closed
            with pytest.raises(SiteClosedError):
                await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(1), None)
            with pytest.raises(SiteClosedError):
                await tx.connect(rx.address)
            await wait_until(lambda: rx.peers == [])
            nursery.cancel_scope.cancel()
    assert issubclass(SiteClosedError, FedstreamError)


async def test_body_of_open_site_continues_after_shutdown_streamer() -> None:
    """Shutting a site down from inside its own ``async with`` must not cancel the body."""
    reached: list[str] = []
    with trio.fail_after(10):
        async with open_site("a", listen=LOOP) as a:
            await a.shutdown_streamer()
            with pytest.raises(SiteClosedError):
                await a.stream_objects(CH, TOPIC, {}, ["x"], Producer(1), None)
            await trio.sleep(0)
            reached.append("after shutdown")
    assert reached == ["after shutdown"]


async def _stream_then_raise(rec: Recorder, err: Exception) -> None:
    async with pair() as (rx, tx):
        rx.register_stream_processing(CH, TOPIC, rec)
        await tx.stream_objects(CH, TOPIC, {}, ["rx"], Producer(1), None)
        raise err


async def test_open_site_reraises_the_bodys_own_exception() -> None:
    err = Boom("from the body")
    rec = Recorder()
    with trio.fail_after(10), pytest.raises(Boom) as info:
        await _stream_then_raise(rec, err)
    assert info.value is err
    assert type(info.value) is Boom  # not wrapped in an exception group
    assert rec.only.rc == OK


async def test_open_site_reraises_a_key_error_from_a_bare_site() -> None:
    with trio.fail_after(10), pytest.raises(KeyError, match="missing"):
        async with open_site("solo", listen=LOOP):
            raise KeyError("missing")


async def test_open_site_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="site name"):
        await _open_and_wait("")
    with pytest.raises(ValueError, match="peer_timeout"):
        await _open_and_wait("x", heartbeat_interval=5.0, peer_timeout=1.0)
    with pytest.raises(ValueError, match="transport"):
        await _open_and_wait("x", listen="carrier-pigeon://127.0.0.1:1")


# ============================================================ shutdown mid-stream


async def test_sender_shutdown_mid_stream_returns_service_unavailable() -> None:
    release = trio.Event()

    class Waiting(AsyncProducer):
        async def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            if self.sent == 2:
                await release.wait()
            return self.make()

    rec = Recorder()
    results: list[tuple[str, Any]] = []
    producer = Waiting(10)
    with trio.fail_after(10):
        async with open_site("rx", listen=LOOP) as rx, trio.open_nursery() as nursery:
            rx.register_stream_processing(CH, TOPIC, rec)
            tx = await nursery.start(partial(serve_site, "tx", connect=[rx.address]))

            async def run() -> None:
                results.append(await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None))

            nursery.start_soon(run)
            await wait_until(lambda: producer.sent == 2 and len(producer.replies) == 2)
            await tx.shutdown_streamer()
    assert results == [(ReturnCode.SERVICE_UNAVAILABLE, None)]
    assert rec.only.items == [0, 1]
    assert rec.only.rc == ReturnCode.SERVICE_UNAVAILABLE


async def test_receiver_shutdown_mid_stream_reaches_the_sender() -> None:
    rec = Recorder()
    producer = AsyncProducer(10_000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            rx = await nursery.start(partial(serve_site, "rx", listen=LOOP))
            rx.register_stream_processing(CH, TOPIC, rec)
            async with open_site("tx", connect=[rx.address]) as tx:

                async def stop_soon() -> None:
                    await wait_until(lambda: len(producer.replies) >= 3)
                    await rx.shutdown_streamer()

                nursery.start_soon(stop_soon)
                rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
                await wait_until(lambda: tx.peers == [])
    assert rc == ReturnCode.SERVICE_UNAVAILABLE
    assert producer.sent < 10_000
    assert rec.only.rc == ReturnCode.SERVICE_UNAVAILABLE


# ============================================================ threads and cancellation


@pytest.mark.parametrize("via", ["same-connection", "another-site"])
async def test_blocking_sync_consume_does_not_stall_another_session(via: str) -> None:
    entered = threading.Event()
    release = threading.Event()

    def block(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        if s["i"] == 1:
            entered.set()
            release.wait(20)
        return True, None

    blocked, free = Recorder(block), Recorder()
    first_result: list[tuple[str, Any]] = []
    with trio.fail_after(30):
        async with (
            open_site("rx", listen=LOOP) as rx,
            open_site("tx", connect=[rx.address]) as tx,
            open_site("tx2", connect=[rx.address]) as tx2,
        ):
            rx.register_stream_processing(CH, "block", blocked)
            rx.register_stream_processing(CH, "free", free)
            second_sender = tx if via == "same-connection" else tx2
            producer = Producer(3)
            try:
                async with trio.open_nursery() as nursery:

                    async def first() -> None:
                        first_result.append(
                            await tx.stream_objects(CH, "block", {}, ["rx"], producer, None)
                        )

                    nursery.start_soon(first)
                    with trio.fail_after(5):
                        while not entered.is_set():
                            await trio.sleep(0.005)
                    second = Producer(20, size=20_000)
                    with trio.fail_after(5):
                        rc, _ = await second_sender.stream_objects(
                            CH, "free", {}, ["rx"], second, None
                        )
                    assert rc == OK
                    assert free.only.items == list(range(20))
                    assert first_result == [], "the blocked stream finished while blocked"
                    release.set()
            finally:
                release.set()
    assert first_result == [(OK, None)]
    assert blocked.only.items == [0, 1, 2]


async def test_sync_producer_runs_in_a_worker_thread() -> None:
    threads: list[int] = []

    class Watching(Producer):
        def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            threads.append(threading.get_ident())
            return self.make()

    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, Recorder())
            await tx.stream_objects(CH, TOPIC, {}, ["rx"], Watching(2), None)
    assert threads
    assert threading.get_ident() not in threads


async def test_async_producer_is_cancelled_promptly_on_abort() -> None:
    cancelled: list[float] = []

    class Stuck(AsyncProducer):
        async def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            if self.sent == 2:
                try:
                    await trio.sleep_forever()
                finally:
                    cancelled.append(trio.current_time())
            return self.make()

    rec = AsyncRecorder()
    fl_ctx = FLContext()
    producer = Stuck(10)
    results: list[tuple[str, Any]] = []
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    results.append(await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, fl_ctx))

                nursery.start_soon(run)
                await wait_until(lambda: len(producer.replies) == 2)
                await trio.sleep(0.05)
                start = trio.current_time()
                # From a thread that is not trio's, as FLARE code would.
                await trio.to_thread.run_sync(fl_ctx.get_run_abort_signal().trigger, "stop")
            elapsed = trio.current_time() - start
    assert results == [(ReturnCode.TASK_ABORTED, None)]
    assert len(cancelled) == 1
    assert cancelled[0] - start < 1.0
    assert elapsed < 2.0
    assert rec.only.items == [0, 1]
    assert rec.only.rc == ReturnCode.TASK_ABORTED


async def test_async_consumer_is_cancelled_promptly_on_abort() -> None:
    cancelled: list[float] = []

    async def stuck(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        if s["i"] == 1:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.append(trio.current_time())
        return True, None

    rec = AsyncRecorder(stuck)
    fl_ctx = FLContext()
    producer = AsyncProducer(10, timeout=60)
    results: list[tuple[str, Any]] = []
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    results.append(await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, fl_ctx))

                nursery.start_soon(run)
                await wait_until(lambda: len(rec.consumers) == 1 and rec.only.items == [0, 1])
                await trio.sleep(0.05)
                start = trio.current_time()
                fl_ctx.get_run_abort_signal().trigger("stop")
            elapsed = trio.current_time() - start
    assert results == [(ReturnCode.TASK_ABORTED, None)]
    assert len(cancelled) == 1
    assert cancelled[0] - start < 1.0
    assert elapsed < 2.0, "stream_objects did not return promptly after the abort"
    assert rec.only.rc == ReturnCode.TASK_ABORTED
    assert rec.only.finalized == 1


async def test_sync_consumer_polling_the_abort_signal_stops_when_the_sender_aborts() -> None:
    polled: list[str] = []

    def poll(c: Consumer, s: Shareable, ctx: Any, fl: FLContext) -> tuple[bool, None]:
        if s["i"] == 1:
            signal = fl.get_run_abort_signal()
            deadline = time.monotonic() + 10
            while not signal.triggered and time.monotonic() < deadline:
                time.sleep(0.005)
            polled.append("triggered" if signal.triggered else "gave up")
        return True, None

    rec = Recorder(poll)
    fl_ctx = FLContext()
    producer = Producer(10, timeout=60)
    with trio.fail_after(10):
        async with pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            async with trio.open_nursery() as nursery:
                result: list[tuple[str, Any]] = []

                async def run() -> None:
                    result.append(await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, fl_ctx))

                nursery.start_soon(run)
                await wait_until(lambda: len(rec.consumers) == 1 and len(rec.only.items) == 2)
                start = trio.current_time()
                fl_ctx.get_run_abort_signal().trigger("stop")
            elapsed = trio.current_time() - start
    assert result == [(ReturnCode.TASK_ABORTED, None)]
    assert polled == ["triggered"]
    assert elapsed < 2.0
    assert rec.only.rc == ReturnCode.TASK_ABORTED


# ============================================================ memory sites, mock clock


@asynccontextmanager
async def memory_pair(**opts: Any) -> AsyncIterator[tuple[Site, Site]]:
    """Two memory sites; plain callbacks run inline so the mock clock cannot jump past them."""
    opts.setdefault("sync_callbacks", "inline")
    async with (
        open_site("rx", listen=memory_url(), **opts) as rx,
        open_site("tx", connect=[rx.address], **opts) as tx,
    ):
        await rx.wait_for_peers(["tx"])
        yield rx, tx


async def test_200_concurrent_streams_from_one_sender_all_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = AsyncRecorder()
    results: dict[int, tuple[str, Any]] = {}
    producers: dict[int, Producer] = {}
    with trio.fail_after(120):
        async with memory_pair(sync_callbacks="inline") as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)

            async def one(k: int) -> None:
                producers[k] = AsyncProducer(4, size=k * 100)
                results[k] = await tx.stream_objects(
                    CH, TOPIC, {"k": k}, ["rx"], producers[k], None
                )

            async with trio.open_nursery() as nursery:
                for k in range(200):
                    nursery.start_soon(one, k)
    assert sorted(results) == list(range(200))
    assert all(value == (OK, None) for value in results.values())
    assert len(rec.consumers) == 200
    by_k = {c.open_ctx["k"]: c for c in rec.consumers}
    assert sorted(by_k) == list(range(200))
    for k, consumer in by_k.items():
        assert consumer.items == [0, 1, 2, 3]
        assert consumer.blobs == [bytes([i]) * (k * 100) for i in range(4)]
        assert consumer.rc == OK
        assert producers[k].rcs("rx") == [OK] * 4


async def test_memory_sites_stream_with_inline_sync_callbacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder()
    producer = Producer(5, size=1000)
    with trio.fail_after(30):
        async with memory_pair(sync_callbacks="inline") as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
    assert rc == OK
    assert rec.only.items == [0, 1, 2, 3, 4]


async def test_no_reply_within_timeout_gives_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        if s["i"] == 1:
            await trio.sleep(100)
        return True, None

    rec = AsyncRecorder(slow)
    producer = AsyncProducer(5, timeout=5)
    with trio.fail_after(60):
        async with memory_pair() as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            start = trio.current_time()
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
            elapsed = trio.current_time() - start
    assert producer.rcs("rx") == [OK, ReturnCode.TIMEOUT]
    assert rc == ReturnCode.TIMEOUT
    assert 5.0 <= elapsed < 10.0
    assert rec.only.rc == ReturnCode.TIMEOUT


async def test_timed_out_target_drops_out_and_the_others_carry_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_at_one(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        if s["i"] == 1:
            await trio.sleep(100)
        return True, None

    slow, fast = AsyncRecorder(slow_at_one), AsyncRecorder()
    producer = AsyncProducer(5, timeout=5)
    with trio.fail_after(120):
        async with (
            open_site("slow", listen=memory_url(), sync_callbacks="inline") as s,
            open_site("fast", listen=memory_url(), sync_callbacks="inline") as f,
            open_site("tx", connect=[s.address, f.address], sync_callbacks="inline") as tx,
        ):
            s.register_stream_processing(CH, TOPIC, slow)
            f.register_stream_processing(CH, TOPIC, fast)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["slow", "fast"], producer, None)
    assert rc == OK
    assert producer.rcs("slow") == [OK] + [ReturnCode.TIMEOUT] * 4
    assert producer.rcs("fast") == [OK] * 5
    assert slow.only.items == [0, 1]
    assert slow.only.rc == ReturnCode.TIMEOUT
    assert fast.only.items == [0, 1, 2, 3, 4]
    assert fast.only.rc == OK


async def test_busy_receiver_is_not_mistaken_for_a_lost_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A receiver whose consume never returns still answers PINGs: no false loss."""

    async def slow(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        await trio.sleep(40)
        return True, None

    rec = AsyncRecorder(slow)
    producer = AsyncProducer(2, timeout=100)
    with trio.fail_after(300):
        async with memory_pair(heartbeat_interval=1.0, peer_timeout=3.0) as (rx, tx):
            rx.register_stream_processing(CH, TOPIC, rec)
            rc, _ = await tx.stream_objects(CH, TOPIC, {}, ["rx"], producer, None)
            assert tx.peers == ["rx"]
    assert rc == OK
    assert producer.rcs("rx") == [OK, OK]


def test_public_names_used_here_are_exported() -> None:
    for name in ("open_site", "serve_site", "END_RESULT", "END_RESULTS", "HandshakeError"):
        assert name in fedstream.__all__


async def test_stuck_consumer_times_out_while_the_connection_stays_busy() -> None:
    """A busy connection counts as progress only for bytes not yet written.

    Once an object has left (here at once, by a direct write), only its
    consumer's reply counts: another stream keeping the same connection busy
    must not stretch the no-progress deadline.
    """

    async def stuck(c: Consumer, s: Shareable, ctx: Any, fl: Any) -> tuple[bool, None]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    stuck_rec, busy_rec = AsyncRecorder(stuck), AsyncRecorder()
    stuck_producer = AsyncProducer(1, size=1000, timeout=0.5)
    busy_producer = AsyncProducer(100_000, size=1000, timeout=5)
    elapsed = math.inf
    async with pair({"sync_callbacks": "inline"}, {"sync_callbacks": "inline"}) as (rx, tx):
        rx.register_stream_processing(CH, "stuck", stuck_rec)
        rx.register_stream_processing(CH, "busy", busy_rec)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def run_stuck() -> None:
                    nonlocal elapsed
                    await trio.sleep(0.2)  # the busy stream is flowing by now
                    start = trio.current_time()
                    rc, _ = await tx.stream_objects(CH, "stuck", {}, ["rx"], stuck_producer, None)
                    elapsed = trio.current_time() - start
                    assert rc == ReturnCode.TIMEOUT
                    nursery.cancel_scope.cancel()

                nursery.start_soon(tx.stream_objects, CH, "busy", {}, ["rx"], busy_producer, None)
                nursery.start_soon(run_stuck)
    assert stuck_producer.rcs("rx") == [ReturnCode.TIMEOUT]
    assert busy_producer.sent > 10, "the busy stream kept the connection writing"
    assert elapsed < 3.0, f"TIMEOUT after {elapsed:.2f} s for a 0.5 s no-progress timeout"
