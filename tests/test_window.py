"""The default credit window against a long round trip, and what it costs.

A receiver grants a stream ``window`` bytes of credit and more only as bytes
arrive, so one stream moves at most a window per round trip. The default
must let a pipelined stream keep its window of objects in flight through a
long link (issue #14's ``wan`` target: 16 objects of 1 MiB), and a large
object fill such a link; both run here over ``memory://`` links that delay
every byte by a fixed time each way, on the autojump clock, with
infinite bandwidth, so the elapsed time counts round trips.

What a larger window must not do is make legitimate peers that wait for
the receive budget spend it as *early bytes* and be refused
(docs/semantics.md, "Per-peer limits"): the last tests hold the site's
budget and check that peers at the default window wait their turn, with
the early bytes the documentation states.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from engine_helpers import AcceptingConsumer, AcceptingFactory, engine_leaks
from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    Site,
    SiteOptions,
    open_site,
)
from fedstream._engine._connection import Connection

KIB = 1024
MIB = 1024 * KIB
CH = "win"
LOOP = "tcp://127.0.0.1:0"
#: One-way delay of the delayed links (a 50 ms round trip, as the ``wan`` relay's).
DELAY = 0.025
RTT = 2 * DELAY
_ids = itertools.count()


class Blobs(ObjectProducer):
    """``count`` objects of ``size`` payload bytes; replies are only counted."""

    def __init__(self, count: int, size: int) -> None:
        self.left = count
        self.size = size
        self.replies = 0

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        self.left -= 1
        return (Shareable({"b": b"x" * self.size}) if self.left >= 0 else None), 60.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies += 1
        return None


def _delay(nursery: trio.Nursery, writer: Connection, reader: Connection, delay: float) -> None:
    """Deliver what ``writer`` writes to ``reader`` ``delay`` seconds later, in order,
    without slowing the writer (a link with latency and no bandwidth cap)."""
    source = writer.stream.send_stream
    sink = reader.stream.receive_stream
    send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    def take() -> None:
        try:
            data = source.get_data_nowait()
        except trio.WouldBlock:
            return
        send.send_nowait((trio.current_time() + delay, data))

    async def take_async() -> None:
        take()

    async def deliver() -> None:
        async for due, data in receive:
            await trio.sleep_until(due)
            try:
                if data:
                    sink.put_data(data)
                else:
                    sink.put_eof()
            except trio.ClosedResourceError:
                return

    source.send_all_hook = take_async
    source.close_hook = take
    nursery.start_soon(deliver)


@asynccontextmanager
async def delayed_pair(**options: Any) -> AsyncIterator[tuple[Site, Site]]:
    """A receiving ``hub`` and a sending ``tx`` (both with ``options``) joined by a
    ``memory://`` link that delays each direction by :data:`DELAY`."""
    url = f"memory://window-{next(_ids)}"
    async with trio.open_nursery() as links:
        async with open_site("hub", listen=url, **options) as hub:
            hub.register_stream_processing(CH, "*", AcceptingFactory())
            async with open_site("tx", connect=[url], **options) as tx:
                await tx.wait_for_peers(["hub"])
                await hub.wait_for_peers(["tx"])
                out, back = tx._connections["hub"], hub._connections["tx"]
                _delay(links, out, back, DELAY)
                _delay(links, back, out, DELAY)
                yield hub, tx
                assert engine_leaks([hub, tx]) == []
        links.cancel_scope.cancel()


async def _timed(tx: Site, producer: Blobs, **kwargs: Any) -> float:
    start = trio.current_time()
    result = await tx.stream_objects(CH, "t", {}, ["hub"], producer, None, **kwargs)
    assert result == (ReturnCode.OK, None)
    return trio.current_time() - start


async def test_a_pipelined_stream_keeps_its_window_of_objects_in_flight_at_the_defaults(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """16 objects of 1 MiB in flight through a 50 ms round trip, default options:
    the replies pace the stream (16 objects per round trip), not the credit.
    64 objects take 4 round trips of the pipeline and one more for the END
    and DONE: 5 in all (the bound leaves one spare). With credit for 8 MiB
    per round trip (the old default window) they took 11."""
    objects, in_flight = 64, 16
    async with delayed_pair() as (_, tx):
        producer = Blobs(objects, MIB)
        elapsed = await _timed(tx, producer, max_in_flight=in_flight)
    assert producer.replies == objects
    assert elapsed < (objects / in_flight + 2) * RTT, elapsed / RTT


async def test_stop_and_wait_stays_one_round_trip_per_object(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The window changes nothing for stop-and-wait: one round trip per object."""
    objects = 8
    async with delayed_pair() as (_, tx):
        elapsed = await _timed(tx, Blobs(objects, MIB))
    assert objects * RTT <= elapsed < (objects + 2) * RTT, elapsed / RTT


async def test_one_large_object_fills_a_long_link_at_the_defaults(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stream moves one window per round trip: a 96 MiB object through a
    50 ms round trip takes 3 at the default window and 2 more for its reply,
    the END and DONE, 5 in all (14 at 8 MiB); and one stream alone can fill
    a 450 MB/s link with that round trip (22.5 MB in flight)."""
    size = 96 * MIB
    async with delayed_pair() as (_, tx):
        elapsed = await _timed(tx, Blobs(1, size))
    assert SiteOptions().window >= 450e6 * RTT
    assert elapsed < 5.5 * RTT, elapsed / RTT


# ------------------------------------------------ peers waiting for the budget


async def _hold_the_budget_then_release(
    hub_opts: dict[str, Any], held: int, peers: list[tuple[int, int, int]], min_early: int = 1
) -> tuple[dict[str, Any], list[int], int]:
    """Peer ``p0`` takes ``held`` bytes of the hub's site budget and keeps them;
    then peers ``p1 …`` (``(objects, size, max_in_flight)`` each, default
    options) stream objects that cannot be admitted. No consumer is made
    until they all wait (so no object is taken either); then all are.

    Returns each peer's result, the early bytes each waiting connection held
    (once each holds ``min_early`` and whatever else was sent had time to
    arrive), and the site-wide early bytes.
    """
    gate = trio.Event()

    class Held(ConsumerFactory):
        async def get_consumer(  # type: ignore[override]
            self, stream_ctx: dict[str, Any], fl_ctx: FLContext
        ) -> ObjectConsumer:
            await gate.wait()
            return AcceptingConsumer()

    results: dict[str, Any] = {}
    early: list[int] = []
    site_early = [0]
    with trio.fail_after(60):
        async with open_site("hub", listen=LOOP, **hub_opts) as hub:
            hub.register_stream_processing(CH, "*", Held())

            async def peer(name: str, topic: str, objects: int, size: int, window: int) -> None:
                async with open_site(name, connect=[hub.address]) as site:
                    await site.wait_for_peers(["hub"])
                    results[name] = await site.stream_objects(
                        CH, topic, {}, ["hub"], Blobs(objects, size), None, max_in_flight=window
                    )

            def early_bytes() -> list[int]:
                return [c.receive_budget.early for n, c in hub._connections.items() if n != "p0"]

            def waiting() -> int:
                return sum(c.receive_budget.waiting for c in hub._connections.values())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer, "p0", "hold", 1, held, 1)
                while hub._receive_budget.held < held:
                    await trio.sleep(0.01)
                for i, (objects, size, window) in enumerate(peers, 1):
                    nursery.start_soon(peer, f"p{i}", "x", objects, size, window)
                expected = sum(min(objects, window) for objects, _, window in peers)
                with trio.fail_after(20):
                    while waiting() < expected:
                        await trio.sleep(0.01)
                    while min(early_bytes()) < min_early:
                        await trio.sleep(0.01)
                await trio.sleep(0.5)  # whatever else they send before admission has arrived
                early = early_bytes()
                site_early[0] = hub._receive_budget.early
                gate.set()
    return results, early, site_early[0]


async def test_peers_waiting_at_the_default_window_send_a_step_and_a_frame_each() -> None:
    """Eight stop-and-wait peers at the default options whose 4 MiB objects wait
    for the site's budget: each sends at most ``shared_in_flight`` (the credit
    step and a frame, 1.25 MiB) before admission, so all wait their turn
    within a 16 MiB bound on early bytes. Spending their credit (4 MiB each,
    at any window of 4 MiB or more) they would pass it: 32 MiB."""
    defaults = SiteOptions()
    step_and_frame = defaults.credit_step + defaults.chunk_size
    peers = 8
    results, early, site_early = await _hold_the_budget_then_release(
        {"max_receive_buffer": 16 * MIB}, 15 * MIB, [(1, 4 * MIB, 1)] * peers
    )
    assert results == {f"p{i}": (ReturnCode.OK, None) for i in range(peers + 1)}
    assert len(early) == peers
    assert all(0 < nbytes <= step_and_frame for nbytes in early), early
    assert site_early == sum(early)


@pytest.mark.parametrize("in_flight", [4, 16])
async def test_pipelined_peers_waiting_hold_their_objects_in_flight_at_most(
    in_flight: int,
) -> None:
    """Pipelined peers whose objects wait for the site's budget may send every
    object in flight before admission (docs/semantics.md: at most the window,
    and at most ``shared_in_flight`` per object in flight): objects of 512 KiB
    go whole, so each peer holds ``max_in_flight`` of them. Within the bound
    they all wait their turn and complete."""
    peers, size = 3, 512 * KIB
    results, early, _ = await _hold_the_budget_then_release(
        {"max_receive_buffer": 32 * MIB},
        32 * MIB - 256 * KIB,
        [(2 * in_flight, size, in_flight)] * peers,
        min_early=in_flight * size,
    )
    assert results == {f"p{i}": (ReturnCode.OK, None) for i in range(peers + 1)}
    window = SiteOptions().window
    for nbytes in early:
        # Each object's bytes and its encoding's few bytes of framing.
        assert in_flight * size <= nbytes <= min(window, in_flight * (size + KIB)), early
