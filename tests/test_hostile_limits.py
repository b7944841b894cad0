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
from typing import Any

import trio

from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    Shareable,
    open_site,
)
from fedstream._engine._options import DEFAULT_MAX_THREADS
from test_engine_hostile import CH, LOOP, RawPeer, data_frame, wait_until

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
