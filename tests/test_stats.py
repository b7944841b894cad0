"""Site.stats(): frozen snapshots of connections and stream sessions."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import trio

import fedstream
from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    Shareable,
)

_names = itertools.count()


class Gate(ObjectConsumer):
    def __init__(self, arrived: trio.Event, release: trio.Event) -> None:
        self.arrived = arrived
        self.release = release
        self.seen = 0

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.seen += 1
        if self.seen == 2:
            self.arrived.set()
            await self.release.wait()
        return True, None


class GateFactory(ConsumerFactory):
    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.release = trio.Event()

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return Gate(self.arrived, self.release)


class Three(ObjectProducer):
    def __init__(self, size: int) -> None:
        self.sent = 0
        self.size = size

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.sent == 3:
            return None, 0
        self.sent += 1
        return Shareable({"data": b"z" * self.size}), 60.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return None


# The sites run plain callbacks inline: a worker thread would let the mock
# clock jump past the test's deadlines.


async def test_stats_show_live_sessions_and_counters(autojump_clock: trio.abc.Clock) -> None:
    url = f"memory://stats-{next(_names)}"
    factory = GateFactory()
    size = 100_000  # out of band: DATA head + CHUNK body
    with trio.fail_after(60):
        async with (
            fedstream.open_site("rx", listen=url, sync_callbacks="inline") as rx,
            fedstream.open_site("tx", connect=[url], sync_callbacks="inline") as tx,
            trio.open_nursery() as nursery,
        ):
            rx.register_stream_processing("ch", "tp", factory)
            await rx.wait_for_peers(["tx"])
            assert [c.peer for c in tx.stats()] == ["rx"]
            assert tx.stats()[0].streams == ()
            results: list[tuple[str, Any]] = []

            async def send() -> None:
                results.append(
                    await tx.stream_objects("ch", "tp", {}, ["rx"], Three(size), FLContext())
                )

            nursery.start_soon(send)
            await factory.arrived.wait()

            (tx_conn,) = tx.stats()
            (rx_conn,) = rx.stats()
            assert tx_conn.peer == "rx"
            assert tx_conn.dialer
            assert tx_conn.url == url
            assert rx_conn.peer == "tx"
            assert not rx_conn.dialer
            assert rx_conn.url == ""
            (out,) = tx_conn.streams
            (inn,) = rx_conn.streams
            assert out.sending
            assert not inn.sending
            assert out.sid == inn.sid
            assert (out.channel, out.topic, inn.channel, inn.topic) == ("ch", "tp", "ch", "tp")
            # object 0 is answered; object 1 is with the consumer
            assert out.objects == 2
            assert inn.objects == 2
            assert out.bytes == inn.bytes >= 2 * size
            assert out.credit is not None
            assert 0 <= out.credit <= tx.options.window
            assert inn.credit is not None
            assert inn.credit >= 0
            # All written; less than a credit step received, so none granted back yet.
            assert (out.queued, inn.queued) == (0, 0)
            assert out.unacknowledged == out.bytes == inn.credit
            assert inn.unacknowledged is None
            assert tx_conn.bytes_sent >= out.bytes
            assert rx_conn.bytes_received >= inn.bytes
            # The receive budget: object 1 is with the consumer, so nothing is held now.
            assert rx_conn.receive_buffered == 0
            assert size < rx_conn.receive_buffered_peak < 2 * size
            assert rx_conn.objects_waiting == 0
            assert (tx_conn.receive_buffered, tx_conn.receive_buffered_peak) == (0, 0)
            with pytest.raises(dataclasses.FrozenInstanceError):
                out.objects = 0  # type: ignore[misc]

            factory.release.set()
        assert results == [("OK", None)]


async def test_stats_forget_finished_sessions(autojump_clock: trio.abc.Clock) -> None:
    url = f"memory://stats-{next(_names)}"
    factory = GateFactory()
    factory.release.set()
    with trio.fail_after(60):
        async with (
            fedstream.open_site("rx", listen=url, sync_callbacks="inline") as rx,
            fedstream.open_site("tx", connect=[url], sync_callbacks="inline") as tx,
        ):
            rx.register_stream_processing("*", "*", factory)
            await rx.wait_for_peers(["tx"])
            rc, _ = await tx.stream_objects("a", "b", {}, ["rx"], Three(10), FLContext())
            assert rc == "OK"
            (tx_conn,) = tx.stats()
            assert tx_conn.streams == ()
            assert tx_conn.bytes_sent > 0
            assert tx_conn.bytes_received > 0
            assert tx_conn.bytes_queued == 0
            # the receiver drops its session once it has finalized
            with trio.fail_after(5):
                while rx.stats()[0].streams:
                    await trio.sleep(0.01)
