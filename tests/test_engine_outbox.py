"""The connection's outbox: one queue per stream, taken in turn (memory streams).

A large transfer queues chunk after chunk; a small stream that shares the
connection must not wait behind all of them, only behind the frame being
written. These tests drive a :class:`Connection` directly over a
``trio.testing`` memory stream and read what it writes with a second
:class:`FrameProtocol`, so the order on the wire is observed exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import fedstream
from engine_helpers import AcceptingFactory, slow_writes
from fedstream import (
    FLContext,
    ObjectProducer,
    ReturnCode,
    Shareable,
)
from fedstream._engine._connection import Connection
from fedstream._engine._options import DEFAULT_CHUNK_SIZE, SHARED_CHUNK_SIZE, SiteOptions
from fedstream._wire import Chunk, Data, Frame, FrameProtocol, Hello, Ping
from fedstream._wire import Done as DoneFrame
from strategies import drain, open_pair

MIB = 1024 * 1024


@asynccontextmanager
async def connection(
    **options: object,
) -> AsyncIterator[tuple[Connection, FrameProtocol, Callable[[], None]]]:
    """A running Connection, what reads its bytes, and a function that lets the writer go.

    Nothing leaves until then: the writer is held inside its first write (a
    PING), and everything queued meanwhile waits in the outbox.
    """
    ours, theirs = open_pair()
    send_stream = trio.testing.MemorySendStream()
    receive_stream = trio.testing.MemoryReceiveStream()
    stream = trio.StapledStream(send_stream, receive_stream)
    conn = Connection(
        stream,
        ours,
        Hello(1, "site-b", {"max_frame_size": ours.peer_max_frame_size}, []),
        local="site-a",
        dialer=True,
        options=SiteOptions(**options),  # type: ignore[arg-type]
        url="memory://outbox",
    )
    gate = trio.Event()

    async def held() -> None:
        await gate.wait()

    def release() -> None:
        send_stream.send_all_hook = None
        gate.set()

    send_stream.send_all_hook = held
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        conn.send_control(Ping(0))
        await trio.testing.wait_all_tasks_blocked()
        try:
            yield conn, theirs, release
        finally:
            gate.set()
            conn.lose("test over")
            nursery.cancel_scope.cancel()


def written_frames(conn: Connection, peer: FrameProtocol) -> list[Frame]:
    """The frames written since the last call (PINGs left out)."""
    assert isinstance(conn.stream, trio.StapledStream)
    send_stream = conn.stream.send_stream
    assert isinstance(send_stream, trio.testing.MemorySendStream)
    try:
        data = send_stream.get_data_nowait()
    except trio.WouldBlock:
        return []
    peer.receive_data(data)
    frames, _ = drain(peer)
    return [f for f in frames if not isinstance(f, Ping)]


async def collect(conn: Connection, peer: FrameProtocol, count: int) -> list[Frame]:
    """Let the writer run until ``count`` frames (PINGs aside) are written; return them."""
    got: list[Frame] = []
    with trio.fail_after(5):
        while len(got) < count:
            await trio.sleep(0)
            got += written_frames(conn, peer)
    return got


async def test_a_small_stream_waits_behind_one_frame_of_a_large_one() -> None:
    async with connection() as (conn, peer, release):
        big = 1  # our stream ids are odd
        small = 3
        body = memoryview(b"\x5a" * (MIB // 2))
        queued: list[int] = []

        async def large_transfer() -> None:
            await conn.send_data(Data(big, 0, 8 * len(body), "c", "t", None, body))
            queued.append(0)
            for i in range(1, 8):
                await conn.send_data(Chunk(big, 0, i * len(body), body))
                queued.append(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(large_transfer)
            await trio.testing.wait_all_tasks_blocked()
            # The large stream filled its own queue and now waits for room...
            assert 2 <= len(queued) < 8
            assert conn.pending(big) >= 2 * MIB // 2
            # ...which does not stop another stream from queueing at once.
            with trio.fail_after(1):
                await conn.send_data(Data(small, 0, 10, "c", "t", None, b"0123456789"))
            assert conn.pending(small) > 0
            flushed = conn.flushed_event(small)
            assert not flushed.is_set()
            release()
            got = await collect(conn, peer, 9)
        order = [(f.sid, getattr(f, "offset", 0)) for f in got]
        position = order.index((small, 0))
        # Only frames the writer had already taken may go first: one turn.
        assert position <= 1, order
        assert [o for s, o in order if s == big] == [i * len(body) for i in range(8)]
        assert flushed.is_set()
        assert conn.pending(small) == 0
        assert conn.pending(big) == 0


async def test_streams_take_turns_frame_by_frame() -> None:
    async with connection() as (conn, peer, release):
        body = memoryview(b"\xa5" * (256 * 1024))
        sids = (1, 3, 5)
        for sid in sids:
            await conn.send_data(Data(sid, 0, 3 * len(body), "c", "t", None, body))
            await conn.send_data(Chunk(sid, 0, len(body), body))
            await conn.send_data(Chunk(sid, 0, 2 * len(body), body))
        release()
        got = await collect(conn, peer, 9)
    assert [f.sid for f in got] == [1, 3, 5] * 3
    for sid in sids:
        frames = [f for f in got if f.sid == sid]
        assert isinstance(frames[0], Data)
        assert [f.offset for f in frames[1:]] == [len(body), 2 * len(body)]  # type: ignore[attr-defined]


async def test_control_frames_go_before_queued_data() -> None:
    async with connection() as (conn, peer, release):
        body = memoryview(b"\x01" * (256 * 1024))
        await conn.send_data(Data(1, 0, len(body), "c", "t", None, body))
        conn.send_control(DoneFrame(2, "OK", None))
        release()
        got = await collect(conn, peer, 2)
    assert [type(f) for f in got] == [DoneFrame, Data]


async def test_small_frames_go_before_the_large_frames_queued_with_them() -> None:
    """Queued behind large frames of three streams, a control frame and two
    small objects of other streams are written before any large frame; the
    large frames then go one per stream in turn, each stream's in order."""
    async with connection() as (conn, peer, release):
        body = memoryview(b"\xa5" * (256 * 1024))
        for sid in (1, 5, 7):
            await conn.send_data(Data(sid, 0, 2 * len(body), "c", "t", None, body))
            await conn.send_data(Chunk(sid, 0, len(body), body))
        conn.send_control(DoneFrame(2, "OK", None))
        for sid in (3, 9):
            await conn.send_data(Data(sid, 0, 10, "c", "t", None, b"0123456789"))
        release()
        got = await collect(conn, peer, 9)
    assert [(type(f), f.sid) for f in got] == [  # type: ignore[attr-defined]
        (DoneFrame, 2),
        (Data, 3),
        (Data, 9),
        (Data, 1),
        (Data, 5),
        (Data, 7),
        (Chunk, 1),
        (Chunk, 5),
        (Chunk, 7),
    ]


async def test_a_streams_small_frame_never_passes_its_own_large_one() -> None:
    """A stream whose large frame a batch takes sits out the rest of that
    batch: its next, small frame goes after it, while another stream's small
    frame goes before it."""
    async with connection() as (conn, peer, release):
        body = memoryview(b"\xa5" * (256 * 1024))
        await conn.send_data(Data(1, 0, len(body) + 1, "c", "t", None, body))
        await conn.send_data(Chunk(1, 0, len(body), b"x"))
        await conn.send_data(Data(3, 0, 1, "c", "t", None, b"y"))
        release()
        got = await collect(conn, peer, 3)
    assert [(type(f), f.sid) for f in got] == [(Data, 3), (Data, 1), (Chunk, 1)]  # type: ignore[attr-defined]


async def test_losing_the_connection_wakes_waiting_streams() -> None:
    async with connection() as (conn, _peer, _release):
        body = memoryview(b"\x02" * MIB)
        outcome: list[str] = []

        async def fill() -> None:
            try:
                for i in range(8):
                    await conn.send_data(
                        Chunk(1, 0, i * len(body), body)
                        if i
                        else Data(1, 0, 8 * len(body), "c", "t", None, body)
                    )
            except Exception as exc:
                outcome.append(type(exc).__name__)

        with trio.fail_after(1):  # a sender left waiting would hang the nursery
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fill)
                await trio.testing.wait_all_tasks_blocked()
                flushed = conn.flushed_event(1)
                assert not flushed.is_set()
                assert not outcome
                conn.lose("gone")
                await flushed.wait()
        assert outcome == ["ConnectionLostError"]


@pytest.mark.parametrize("sid", [1, 2])
async def test_an_idle_stream_keeps_no_queue(sid: int) -> None:
    async with connection() as (conn, peer, release):
        await conn.send_data(
            DoneFrame(sid, "OK", None) if sid % 2 == 0 else Data(sid, 0, 1, "c", "t", None, b"x")
        )
        assert sid in conn._outbox.queues
        release()
        with trio.fail_after(5):
            while conn.pending(sid):
                await trio.sleep(0)
        written_frames(conn, peer)
        assert sid not in conn._outbox.queues
        assert conn.flushed_event(sid).is_set()


def socket_connection() -> tuple[Connection, FrameProtocol, trio.socket.SocketType]:
    """A Connection over one end of a socket pair (where frames can go straight
    to the socket), the peer's protocol, and the other end (nobody reads it yet)."""
    ours_sock, theirs_sock = trio.socket.socketpair()
    ours, theirs = open_pair()
    conn = Connection(
        trio.SocketStream(ours_sock),
        ours,
        Hello(1, "site-b", {"max_frame_size": ours.peer_max_frame_size}, []),
        local="site-a",
        dialer=True,
        options=SiteOptions(),
        url="unix://outbox",
    )
    return conn, theirs, theirs_sock


async def test_every_sender_waiting_on_a_stream_goes_once_its_queue_empties() -> None:
    """Over a real socket, where a frame can go straight to the socket: two
    tasks of one stream wait for room behind a direct write's leftover. When
    it is written the queue is empty, the first goes straight to the socket,
    and the second must not be left waiting (nor the stream's queue kept)."""
    conn, theirs, theirs_sock = socket_connection()
    body = memoryview(b"\x5a" * (4 * MIB))
    received = bytearray()
    done: list[bytes] = []

    async def one_more(tail: bytes, offset: int) -> None:
        await conn.send_data(Chunk(1, 0, offset, tail))
        done.append(tail)

    async def read_all() -> None:
        while data := await theirs_sock.recv(MIB):
            received.extend(data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            # Nobody reads yet: most of this frame is left over for the writer.
            await conn.send_data(Data(1, 0, len(body) + 2, "c", "t", None, body))
            assert conn.pending(1) > conn._outbox.data_limit
            flushed = conn.flushed_event(1)
            nursery.start_soon(one_more, b"x", len(body))
            nursery.start_soon(one_more, b"y", len(body) + 1)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []
            assert not flushed.is_set()
            nursery.start_soon(read_all)
            while len(done) < 2:
                await trio.sleep(0.01)
            assert flushed.is_set()
            assert conn.pending(1) == 0
            assert 1 not in conn._outbox.queues
            conn.lose("test over")
    theirs_sock.close()
    theirs.receive_data(bytes(received))
    frames, _ = drain(theirs)
    assert isinstance(frames[0], Data)
    assert sorted(bytes(f.body) for f in frames[1:]) == [b"x", b"y"]  # type: ignore[attr-defined]


async def test_a_direct_writes_leftover_counts_as_queued_not_the_whole_frame() -> None:
    """A stream's pending bytes (``StreamStats.queued``) are what is left of a
    direct write the socket took in part, as for the connection's
    ``bytes_queued``, not the whole frame."""
    conn, _theirs, theirs_sock = socket_connection()
    body = memoryview(b"\x5a" * (4 * MIB))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            await trio.testing.wait_all_tasks_blocked()
            before = conn.bytes_sent
            # Nobody reads: the socket takes part of the frame, the rest is left over.
            await conn.send_data(Data(1, 0, len(body), "c", "t", None, body))
            taken = conn.bytes_sent - before
            assert 0 < taken < len(body)
            assert conn.pending(1) == conn.bytes_queued - conn.bytes_sent
            conn.lose("test over")
    theirs_sock.close()


# ------------------------------------------------- what a shared stream keeps in flight

KIB = 1024


class _Producer(ObjectProducer):
    """``count`` objects of ``size`` bytes, or as many as it takes until ``until`` is set."""

    def __init__(self, size: int, count: int, until: trio.Event | None = None) -> None:
        self.data = b"\x5a" * size
        self.count = count
        self.until = until
        self.sent = 0

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if (self.until is not None and self.until.is_set()) or (
            self.until is None and self.sent == self.count
        ):
            return None, 10.0
        self.sent += 1
        return Shareable({"data": self.data}), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        assert all(r.get_return_code() == ReturnCode.OK for r in replies.values())
        return None


_memory_ids = itertools.count()


async def unacknowledged_peaks(*, beside_small_stream: bool) -> tuple[int, int, int]:
    """Send one 4 MiB object over a slow memory connection (64 KiB chunks, 1 MiB
    window), alone or beside a stream of 1 KiB objects. Returns the most object
    bytes the large stream had sent without credit back while the connection
    was shared and while it was not, and the connection's shared_in_flight."""
    options: dict[str, Any] = {
        "chunk_size": 64 * KIB,
        "window": MIB,
        "sync_callbacks": "inline",
    }
    peaks = {True: 0, False: 0}
    queued = [0]  # the most the large stream had waiting in the outbox
    reported = {True: 0, False: 0}  # the most its stats showed unacknowledged
    url = f"memory://outbox-cap-{next(_memory_ids)}"
    with trio.fail_after(120):
        async with fedstream.open_site("rx", listen=url, **options) as rx:
            rx.register_stream_processing("c", "*", AcceptingFactory())
            async with fedstream.open_site("tx", connect=[url], **options) as tx:
                conn = tx._connections["rx"]
                slow_writes(conn, 0.001)
                original = conn.send_data
                big_sids: set[int] = set()

                async def watched(frame: Any, *more: Any) -> None:
                    if isinstance(frame, Data) and frame.size >= MIB:
                        big_sids.add(frame.sid)
                    if frame.sid in big_sids and isinstance(frame, (Data, Chunk)):
                        link = conn.senders[frame.sid]
                        tails = sum(len(f.body) for f in (frame, *more))
                        shared = conn.shared()
                        after = link.bytes_sent - link.credited + tails
                        peaks[shared] = max(peaks[shared], after)
                    await original(frame, *more)
                    for stream in tx.stats()[0].streams:
                        if stream.sid in big_sids:
                            assert stream.unacknowledged is not None
                            assert stream.unacknowledged <= stream.bytes
                            queued[0] = max(queued[0], stream.queued)
                            shared = conn.shared()
                            reported[shared] = max(reported[shared], stream.unacknowledged)

                conn.send_data = watched  # type: ignore[method-assign]
                big_done = trio.Event()
                outcomes: list[Any] = []

                async def big() -> None:
                    outcomes.append(
                        await tx.stream_objects("c", "big", {}, ["rx"], _Producer(4 * MIB, 1), None)
                    )
                    big_done.set()

                async def small() -> None:
                    outcomes.append(
                        await tx.stream_objects(
                            "c", "small", {}, ["rx"], _Producer(KIB, 0, until=big_done), None
                        )
                    )

                async with trio.open_nursery() as nursery:
                    if beside_small_stream:
                        nursery.start_soon(small)
                        await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(big)
                assert outcomes == [(ReturnCode.OK, None)] * (1 + beside_small_stream)
                cap = conn.shared_in_flight
    # The connection is slow: the large stream's frames did wait in its queue.
    assert queued[0] > 0
    # What the stats report unacknowledged is what the bound keeps.
    assert reported[True] <= peaks[True]
    assert reported[False] <= peaks[False]
    assert reported[beside_small_stream] > 0
    return peaks[True], peaks[False], cap


async def test_a_shared_stream_keeps_no_more_than_a_credit_step_and_a_chunk_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared_peak, _, cap = await unacknowledged_peaks(beside_small_stream=True)
    assert cap == 64 * KIB + 64 * KIB  # the peer's credit step and our chunk
    assert 0 < shared_peak <= cap


async def test_a_stream_alone_uses_its_whole_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The control for the test above: on a slow connection the large stream
    does fill more than shared_in_flight when nothing else shares it."""
    shared_peak, alone_peak, cap = await unacknowledged_peaks(beside_small_stream=False)
    assert shared_peak == 0
    assert alone_peak > 4 * cap


class _OneThenIdle(ObjectProducer):
    """One 1 KiB object, then nothing until ``until`` is set: a stream that
    stays open without sending."""

    def __init__(self, until: trio.Event) -> None:
        self.until = until
        self.sent = False

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.sent:
            await self.until.wait()
            return None, 10.0
        self.sent = True
        return Shareable({"data": b"x" * KIB}), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return None


async def large_object_frames(beside: str) -> tuple[list[int], int]:
    """Send one 2 MiB object with the default chunk size, alone (``beside``
    ``""``), beside a stream sending 1 KiB objects back to back (``"busy"``),
    or beside one that sent one and then waits (``"idle"``); with ``"late"``
    an 8 MiB object, and the busy stream starts after its third frame.
    Returns the body sizes of its frames (for ``"late"``, those sent after
    the busy stream's first frame), and the most its stream had sent
    without credit back."""
    bodies: list[int] = []
    peak = [0]
    switch_at: list[int] = []
    size = 8 * MIB if beside == "late" else 2 * MIB
    url = f"memory://outbox-frames-{next(_memory_ids)}"
    with trio.fail_after(60):
        async with fedstream.open_site("rx", listen=url, sync_callbacks="inline") as rx:
            rx.register_stream_processing("c", "*", AcceptingFactory())
            async with fedstream.open_site("tx", connect=[url], sync_callbacks="inline") as tx:
                conn = tx._connections["rx"]
                original = conn.send_data
                big_sids: set[int] = set()

                async def watched(frame: Any, *more: Any) -> None:
                    if isinstance(frame, Data) and frame.size >= MIB:
                        big_sids.add(frame.sid)
                    elif isinstance(frame, Data) and not switch_at:
                        switch_at.append(len(bodies))
                    if frame.sid in big_sids:
                        sizes = [
                            len(f.body) for f in (frame, *more) if isinstance(f, (Data, Chunk))
                        ]
                        bodies.extend(size for size in sizes if size)
                        link = conn.senders[frame.sid]
                        after = link.bytes_sent - link.credited + sum(sizes)
                        peak[0] = max(peak[0], after)
                    await original(frame, *more)

                conn.send_data = watched  # type: ignore[method-assign]
                big_done = trio.Event()
                outcomes: list[Any] = []

                async def big() -> None:
                    outcomes.append(
                        await tx.stream_objects("c", "big", {}, ["rx"], _Producer(size, 1), None)
                    )
                    big_done.set()

                async def small() -> None:
                    producer = (
                        _OneThenIdle(big_done)
                        if beside == "idle"
                        else _Producer(KIB, 0, until=big_done)
                    )
                    outcomes.append(
                        await tx.stream_objects("c", "small", {}, ["rx"], producer, None)
                    )

                async with trio.open_nursery() as nursery:
                    if beside == "late":
                        nursery.start_soon(big)
                        while len(bodies) < 3:
                            await trio.sleep(0)
                        nursery.start_soon(small)
                        beside = ""  # the checks below are for the other cases
                    else:
                        if beside:
                            nursery.start_soon(small)
                            while not conn.senders:
                                await trio.sleep(0)
                            if beside == "idle":
                                await trio.sleep(1)  # its one object is long answered
                        nursery.start_soon(big)
                    while not big_sids:
                        await trio.sleep(0)
                    if not bodies or not switch_at:
                        assert conn.shared() is bool(beside)
                    assert conn.contended() is (beside == "busy")
                    if beside == "busy":
                        assert conn.shared_in_flight == 2 * SHARED_CHUNK_SIZE
                assert outcomes == [(ReturnCode.OK, None)] * (1 + bool(beside or switch_at))
    assert sum(bodies) >= size
    if size > 2 * MIB:
        return bodies[switch_at[0] + 1 :], peak[0]
    return bodies, peak[0]


async def test_a_contended_connection_carries_smaller_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Beside a stream that is sending, a large object goes out in
    shared-connection chunks and keeps one credit step and one such chunk in
    flight (512 KiB by default, against 2 MiB before); alone, or beside a
    stream that only stays open, in whole chunks."""
    alone, _ = await large_object_frames("")
    assert max(alone) == DEFAULT_CHUNK_SIZE
    idle, _ = await large_object_frames("idle")
    assert max(idle) == DEFAULT_CHUNK_SIZE
    busy, peak = await large_object_frames("busy")
    assert max(busy) == SHARED_CHUNK_SIZE < DEFAULT_CHUNK_SIZE
    assert 0 < peak <= 2 * SHARED_CHUNK_SIZE
    assert SiteOptions().credit_step == SHARED_CHUNK_SIZE


async def test_an_object_under_way_is_resliced_when_the_connection_becomes_contended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A large object that started alone switches to shared-connection
    chunks as soon as another stream starts sending (otherwise each of its
    whole chunks would wait for everything before it to be credited)."""
    after, _ = await large_object_frames("late")
    assert after
    assert max(after) <= SHARED_CHUNK_SIZE
