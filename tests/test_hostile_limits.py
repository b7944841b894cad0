"""A hostile peer against a site's resource bounds: threads, memory, handshakes, stream state.

Each test plays an attacker over loopback with a raw socket that speaks the
wire protocol through the project's own encoder (``RawPeer`` of
``test_engine_hostile``), then asserts the bound the site documents in
docs/semantics.md: OS threads, memory growth (tracemalloc), pending
handshakes, reaping time.

In CI the attacks are scaled down (and the site's options shrunk) so that
each test takes a few seconds at most. To run them at the scale of the
issue's findings (thousands of streams or connections), set
``FEDSTREAM_HOSTILE_SCALE`` (a multiplier, default 1), for example::

    ulimit -n 65536
    FEDSTREAM_HOSTILE_SCALE=40 python -m pytest -q tests/test_hostile_limits.py
"""

from __future__ import annotations

import os
import threading
import tracemalloc
from typing import Any

import trio

from engine_helpers import AcceptingFactory
from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    Shareable,
    open_site,
)
from fedstream._engine._options import DEFAULT_MAX_THREADS
from fedstream._wire import encode_object
from test_engine_hostile import CH, LOOP, RawPeer, data_frame, wait_until

KIB = 1024
MIB = 1024 * KIB
SCALE = max(1, int(os.environ.get("FEDSTREAM_HOSTILE_SCALE", "1")))


class BlockingFactory(ConsumerFactory):
    """A plain (thread-run) ``get_consumer`` that blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        with self._lock:
            self.entered += 1
        self.release.wait(30)
        return _Accepting()


class _Accepting(ObjectConsumer):
    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        return True, None


async def connect_raw(address: str | None, name: str = "evil", **limits: int) -> RawPeer:
    assert address is not None
    port = int(address.rsplit(":", 1)[1])
    peer = RawPeer(await trio.open_tcp_stream("127.0.0.1", port))
    await peer.handshake(name, **limits)
    return peer


# ================================================================ threads


async def test_threads_stay_within_max_threads_whatever_the_peer_opens() -> None:
    """Streams whose plain ``get_consumer`` blocks: the default bound holds the thread count."""
    streams = 120 * SCALE
    factory = BlockingFactory()
    baseline = threading.active_count()
    peak = 0
    async with open_site("hub", listen=LOOP) as hub:
        hub.register_stream_processing(CH, "*", factory)
        peer = await connect_raw(hub.address)
        try:
            for i in range(streams):
                await peer.send(data_frame(2 * i + 1, 0))
            conn = hub._connections["evil"]
            await wait_until(lambda: len(conn.receivers) == streams, limit=10)
            await wait_until(lambda: factory.entered >= DEFAULT_MAX_THREADS, limit=10)
            # Give surplus threads (if any) every chance to start.
            for _ in range(20):
                peak = max(peak, threading.active_count())
                await trio.sleep(0.01)
        finally:
            factory.release.set()
            await peer.stream.aclose()
    assert factory.entered <= streams
    assert peak - baseline <= DEFAULT_MAX_THREADS + 2, (peak, baseline)


# ================================================================ memory


def _object_prefix(size: int, prefix: int) -> tuple[int, bytes]:
    """A real encoded object of about ``size`` bytes: its full size and its first bytes."""
    encoded = encode_object(Shareable({"blob": b"x" * size})).to_bytes()
    return len(encoded), encoded[:prefix]


async def test_objects_waiting_for_the_budget_allocate_nothing_for_their_claim() -> None:
    """Many streams announce objects the budget cannot admit yet: no buffer is made for them.

    The first object takes the whole (shrunk) budget and stays unfinished;
    every later one waits. Before the fix each waiting object got its
    zero-filled buffer at its first frame.
    """
    streams = 40 * SCALE
    claim = 900 * KIB
    size, prefix = _object_prefix(claim, KIB)
    opts: dict[str, Any] = {
        "max_receive_buffer_per_peer": MIB,
        "chunk_size": 64 * KIB,
        "window": 128 * KIB,
    }
    async with open_site("hub", listen=LOOP, **opts) as hub:
        hub.register_stream_processing(CH, "*", AcceptingFactory())
        peer = await connect_raw(hub.address)
        try:
            conn = hub._connections["evil"]
            await peer.send(data_frame(1, 0, body=prefix, size=size))
            await wait_until(lambda: conn.receive_budget.held == size)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(1, streams + 1):
                    await peer.send(data_frame(2 * i + 1, 0, body=prefix, size=size))
                await wait_until(lambda: conn.receive_budget.waiting == streams)
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
        finally:
            await peer.stream.aclose()
    # Sessions, their contexts and the 1 KiB each sent cost a few KiB per
    # stream; one buffer for a claim alone would be 900 KiB.
    assert grown < streams * 40 * KIB, grown


async def test_the_site_wide_budget_bounds_what_many_peer_names_can_make_a_site_hold() -> None:
    """Names are free: each raw peer connects as a new site and claims a budget's worth."""
    peers = 4 * SCALE
    size, prefix = _object_prefix(900 * KIB, KIB)
    opts: dict[str, Any] = {
        "max_receive_buffer_per_peer": MIB,
        "max_receive_buffer": MIB,
        "chunk_size": 64 * KIB,
        "window": 128 * KIB,
    }
    async with open_site("hub", listen=LOOP, **opts) as hub:
        hub.register_stream_processing(CH, "*", AcceptingFactory())
        raws = [await connect_raw(hub.address, f"evil{i}") for i in range(peers)]
        try:
            for raw in raws:
                await raw.send(data_frame(1, 0, body=prefix, size=size))
            conns = [hub._connections[f"evil{i}"] for i in range(peers)]
            await wait_until(lambda: sum(c.receive_budget.waiting for c in conns) == peers - 1)
            held = sum(c.receive_budget.held for c in conns)
            assert held == size  # one admitted, alone; every other peer waits
            assert not any(c.receive_budget.held and c.receive_budget.waiting for c in conns)
        finally:
            for raw in raws:
                await raw.stream.aclose()
