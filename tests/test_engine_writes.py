"""How a connection hands frames to a TCP socket (real loopback sockets, ``slow``).

trio limits the unsent bytes a socket holds to 16 KiB (``TCP_NOTSENT_LOWAT``).
A connection that carries one stream raises that limit so a whole chunk goes
out in one write; as soon as a second stream shares the connection, it goes
back to 16 KiB, so that frames queued behind a large object wait in the
outbox only (where the writer interleaves them), not in the kernel.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

import fedstream
from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    Site,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="no TCP_NOTSENT_LOWAT here"
    ),
]

LOOP = "tcp://127.0.0.1:0"
CHANNEL = "writes"
MIB = 1024 * 1024
#: trio's TCP_NOTSENT_LOWAT for its sockets.
TRIO_UNSENT = 16 * 1024


class Consumer(ObjectConsumer):
    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        return True, None


class Factory(ConsumerFactory):
    async def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return Consumer()


def unsent_limit(site: Site, peer: str) -> int:
    conn = site._connections[peer]
    value = conn.stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    assert isinstance(value, int)
    return value


class Producer(ObjectProducer):
    """``count`` objects of ``size`` bytes; after each reply, records the
    sender's unsent limit and runs ``between`` (if given)."""

    def __init__(self, site: Site, count: int, size: int, between: Any = None) -> None:
        self.site = site
        self.count = count
        self.data = b"\x5a" * size
        self.between = between
        self.sent = 0
        self.limits: list[int] = []

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.sent == self.count:
            return None, 10.0
        self.sent += 1
        return Shareable(data=self.data), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        assert replies["recv"].get_return_code() == ReturnCode.OK
        self.limits.append(unsent_limit(self.site, "recv"))
        if self.between is not None:
            await self.between(self.sent)
        return None


async def test_one_stream_writes_whole_chunks_two_streams_keep_trios_limit() -> None:
    with trio.fail_after(30):
        async with fedstream.open_site("recv", listen=LOOP, sync_callbacks="inline") as recv:
            recv.register_stream_processing(CHANNEL, "*", Factory())
            async with fedstream.open_site(
                "send", connect=[recv.address], sync_callbacks="inline"
            ) as send:
                whole = send._connections["recv"].max_body
                alone = Producer(send, 2, MIB)
                rc, _ = await send.stream_objects(CHANNEL, "a", {}, ["recv"], alone, None)
                assert rc == ReturnCode.OK
                assert alone.limits == [whole + 64 * 1024] * 2

                # A second stream on the same connection: from the next write on,
                # the kernel holds no more than trio's 16 KiB.
                release = trio.Event()

                async def hold(sent: int) -> None:
                    if sent == 1:
                        await release.wait()

                small = Producer(send, 2, 1024, hold)

                async def share(sent: int) -> None:
                    if sent == 1:
                        nursery.start_soon(
                            send.stream_objects, CHANNEL, "b", {}, ["recv"], small, None
                        )
                        while not small.limits:
                            await trio.sleep(0.001)
                    elif sent == 3:
                        release.set()

                shared = Producer(send, 3, MIB, share)
                async with trio.open_nursery() as nursery:
                    rc, _ = await send.stream_objects(CHANNEL, "c", {}, ["recv"], shared, None)
                assert rc == ReturnCode.OK
                assert shared.limits == [whole + 64 * 1024, TRIO_UNSENT, TRIO_UNSENT]
                assert small.limits == [TRIO_UNSENT, TRIO_UNSENT]
