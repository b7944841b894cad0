"""How a connection hands frames to a TCP socket (real loopback sockets, ``slow``).

trio limits the unsent bytes a socket holds to 16 KiB (``TCP_NOTSENT_LOWAT``).
A connection raises that limit so a whole chunk goes out in one write, with
one stream or several: what a stream that shares the connection has in
flight is bounded by its credit (see ``test_engine_outbox.py``), wherever
those bytes wait.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

import fedstream
from engine_helpers import AcceptingFactory
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
        return Shareable({"data": self.data}), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        assert replies["recv"].get_return_code() == ReturnCode.OK
        self.limits.append(unsent_limit(self.site, "recv"))
        if self.between is not None:
            await self.between(self.sent)
        return None


async def test_the_kernel_takes_whole_chunks_with_one_stream_or_two() -> None:
    with trio.fail_after(30):
        async with fedstream.open_site("recv", listen=LOOP, sync_callbacks="inline") as recv:
            recv.register_stream_processing(CHANNEL, "*", AcceptingFactory())
            async with fedstream.open_site(
                "send", connect=[recv.address], sync_callbacks="inline"
            ) as send:
                whole = send._connections["recv"].max_body
                alone = Producer(send, 2, MIB)
                rc, _ = await send.stream_objects(CHANNEL, "a", {}, ["recv"], alone, None)
                assert rc == ReturnCode.OK
                assert alone.limits == [whole + 64 * 1024] * 2

                # A second stream on the same connection changes nothing here.
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
                assert shared.limits == [whole + 64 * 1024] * 3
                assert small.limits == [whole + 64 * 1024] * 2
                assert whole + 64 * 1024 > TRIO_UNSENT


class Blobs(ObjectProducer):
    """One object per entry of ``shapes``: a list of blob sizes, each blob its own buffer."""

    def __init__(self, shapes: list[list[int]]) -> None:
        self.shapes = shapes
        self.sent = 0
        self.replies: list[str] = []

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.sent == len(self.shapes):
            return None, 10.0
        sizes = self.shapes[self.sent]
        self.sent += 1
        return Shareable(blobs=[bytes([i % 251]) * size for i, size in enumerate(sizes)]), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies.append(str(replies["recv"].get_return_code()))
        return None


class Keeper(ObjectConsumer):
    def __init__(self, seen: list[list[bytes]]) -> None:
        self.seen = seen

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.seen.append([bytes(b) for b in shareable["blobs"]])
        return True, None


class KeeperFactory(ConsumerFactory):
    def __init__(self) -> None:
        self.seen: list[list[bytes]] = []

    async def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return Keeper(self.seen)


async def test_head_and_buffer_leave_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB buffer and the object head before it: one ``writev`` on an idle connection."""
    import os

    writes: list[int] = []
    writev = os.writev

    def counting(fd: int, parts: Any) -> int:
        parts = list(parts)
        written = writev(fd, parts)
        writes.append(len(parts))
        return written

    with trio.fail_after(30):
        async with fedstream.open_site("recv", listen=LOOP, sync_callbacks="inline") as recv:
            factory = KeeperFactory()
            recv.register_stream_processing(CHANNEL, "*", factory)
            async with fedstream.open_site(
                "send", connect=[recv.address], sync_callbacks="inline"
            ) as send:
                producer = Blobs([[MIB], [MIB]])
                monkeypatch.setattr(os, "writev", counting)
                rc, _ = await send.stream_objects(CHANNEL, "t", {}, ["recv"], producer, None)
                monkeypatch.setattr(os, "writev", writev)
    assert rc == ReturnCode.OK
    assert producer.replies == [ReturnCode.OK] * 2
    assert [[len(b) for b in blobs] for blobs in factory.seen] == [[MIB], [MIB]]
    # (The receiving site in this process writes its replies with writev too.)
    # Per object, the DATA with the object's head and the CHUNK with its buffer
    # (two frames, four parts) leave in one write. (Object 0 is preceded by the
    # stream context's DATA, a head only; replies are two parts.)
    assert writes.count(4) == 2
    assert max(writes) == 4


@pytest.mark.parametrize("window", [4 * 1024, 12 * 1024])
async def test_many_small_buffers_under_a_tight_window(window: int) -> None:
    """Views grouped into one write never wait for credit while held back."""
    # Blobs of 32 KiB and more are buffers of their own; smaller ones are in the head.
    shapes = [[33_000] * 3 + [50_000], [40_000, 600], [100_000, 33_000, 33_000], [600] * 9]
    with trio.fail_after(30):
        async with fedstream.open_site(
            "recv", listen=LOOP, sync_callbacks="inline", chunk_size=4 * 1024, window=window
        ) as recv:
            factory = KeeperFactory()
            recv.register_stream_processing(CHANNEL, "*", factory)
            async with fedstream.open_site(
                "send", connect=[recv.address], sync_callbacks="inline", chunk_size=4 * 1024
            ) as send:
                producer = Blobs(shapes)
                rc, _ = await send.stream_objects(CHANNEL, "t", {}, ["recv"], producer, None)
    assert rc == ReturnCode.OK
    assert producer.replies == [ReturnCode.OK] * len(shapes)
    expected = [[bytes([i % 251]) * size for i, size in enumerate(sizes)] for sizes in shapes]
    assert factory.seen == expected


@pytest.mark.parametrize("window", [4 * 1024, 12 * 1024])
async def test_paired_views_never_overdraw_the_window(
    window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pairing a head with the next part never spends credit the sender does not have."""
    from fedstream._wire import _stream

    over: list[tuple[int, float]] = []
    spent = [0]
    spend = _stream.OpenerStream._spend

    def checked_spend(self: _stream.OpenerStream, nbytes: int) -> None:
        # (The stream would refuse it too, and the stream would then fail.)
        spent[0] += nbytes
        if nbytes > self.credit:
            over.append((nbytes, self.credit))
        spend(self, nbytes)

    monkeypatch.setattr(_stream.OpenerStream, "_spend", checked_spend)
    shapes = [[33_000] * 3 + [50_000], [40_000, 600], [100_000, 33_000, 33_000], [600] * 9]
    with trio.fail_after(30):
        async with fedstream.open_site(
            "recv", listen=LOOP, sync_callbacks="inline", chunk_size=4 * 1024, window=window
        ) as recv:
            recv.register_stream_processing(CHANNEL, "*", KeeperFactory())
            async with fedstream.open_site(
                "send", connect=[recv.address], sync_callbacks="inline", chunk_size=4 * 1024
            ) as send:
                rc, _ = await send.stream_objects(CHANNEL, "t", {}, ["recv"], Blobs(shapes), None)
    assert rc == ReturnCode.OK
    assert spent[0] > window  # the check saw the object bytes
    assert over == [], "the sender spent credit it did not have"
