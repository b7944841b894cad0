"""The connection's outbox: one queue per stream, taken in turn (memory streams).

A large transfer queues chunk after chunk; a small stream that shares the
connection must not wait behind all of them, only behind the frame being
written. These tests drive a :class:`Connection` directly over a
``trio.testing`` memory stream and read what it writes with a second
:class:`FrameProtocol`, so the order on the wire is observed exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from fedstream._engine._connection import Connection
from fedstream._engine._options import SiteOptions
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
            got: list[Frame] = []
            with trio.fail_after(5):
                while len(got) < 9:
                    await trio.sleep(0)
                    got += written_frames(conn, peer)
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
        got: list[Frame] = []
        with trio.fail_after(5):
            while len(got) < 9:
                await trio.sleep(0)
                got += written_frames(conn, peer)
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
        got: list[Frame] = []
        with trio.fail_after(5):
            while len(got) < 2:
                await trio.sleep(0)
                got += written_frames(conn, peer)
    assert [type(f) for f in got] == [DoneFrame, Data]


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

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill)
            await trio.testing.wait_all_tasks_blocked()
            flushed = conn.flushed_event(1)
            assert not flushed.is_set()
            assert not outcome
            conn.lose("gone")
            with trio.fail_after(1):
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
