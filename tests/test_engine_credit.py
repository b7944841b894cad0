"""The credit for an object's last bytes, held for the object's reply (real loopback TCP).

On a stop-and-wait stream the sender starts nothing before the reply, so the
receiver sends the credit its object's last bytes earn in the same write as
the reply. It must never stall a sender that needs that credit sooner: the
next object arriving first (a pipelined stream), another stream starting on
the connection, and a bound on the time held each send it at once.

Each test records what the receiving site writes to its socket, frame by
frame and write by write (``os.writev``: the connection writes straight to an
idle socket).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
from fedstream._engine import _connection
from fedstream._wire import Credit, Frame, Reply, decode_head, encode_object

LOOP = "tcp://127.0.0.1:0"
CHANNEL = "credit"
MIB = 1024 * 1024


def split_frames(data: bytes) -> list[Frame]:
    """The frames in the bytes of one write (each ``u32 length | frame``)."""
    frames = []
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        frames.append(decode_head(data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return frames


class Writes:
    """The frames of every ``os.writev`` to one socket, one list per write."""

    def __init__(self) -> None:
        self.fd = -1
        self.writes: list[list[Frame]] = []

    @contextmanager
    def recording(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        writev = os.writev

        def record(fd: int, parts: Any) -> int:
            parts = list(parts)
            if fd == self.fd:
                self.writes.append(split_frames(b"".join(bytes(p) for p in parts)))
            return writev(fd, parts)

        monkeypatch.setattr(os, "writev", record)
        try:
            yield
        finally:
            monkeypatch.setattr(os, "writev", writev)

    def watch(self, site: Site, peer: str) -> None:
        self.fd = site._connections[peer].stream.socket.fileno()

    def of(self, sid: int) -> list[list[type[Frame]]]:
        """Each write's frame types, for the writes with a frame of stream ``sid``."""
        return [
            [type(f) for f in write]
            for write in self.writes
            if any(getattr(f, "sid", None) == sid for f in write)
        ]

    def credit(self, sid: int) -> int:
        return sum(
            f.increment for w in self.writes for f in w if isinstance(f, Credit) and f.sid == sid
        )


class Objects(ObjectProducer):
    """``count`` objects of ``size`` bytes, plain methods."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.data = b"\x5a" * size
        self.sent = 0
        self.replies: list[str] = []

    def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.sent == self.count:
            return None, 30.0
        self.sent += 1
        return Shareable({"data": self.data}), 30.0

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies += [str(r.get_return_code()) for r in replies.values()]
        return None


class Consumer(ObjectConsumer):
    """Counts objects; ``wait(seq)`` (async) runs before object ``seq`` is answered."""

    def __init__(self, factory: Factory) -> None:
        self.factory = factory
        self.seq = 0

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        seq, self.seq = self.seq, self.seq + 1
        self.factory.consumed += 1
        await self.factory.wait(seq)
        return True, None


class Factory(ConsumerFactory):
    def __init__(self) -> None:
        self.consumed = 0
        self.entered = trio.Event()
        self.go = trio.Event()

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        return Consumer(self)

    async def wait(self, seq: int) -> None:
        if seq == 0:
            self.entered.set()
            await self.go.wait()


class PlainConsumer(ObjectConsumer):
    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        return True, None


class PlainFactory(ConsumerFactory):
    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return PlainConsumer()


def object_size(size: int) -> int:
    return encode_object(Shareable({"data": b"\x5a" * size})).size


async def poll(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.005)


async def test_stop_and_wait_credit_leaves_with_the_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain methods, default options: per object, the CREDIT for its bytes and
    its REPLY go in one write, and no CREDIT goes alone."""
    monkeypatch.setattr(_connection, "_CREDIT_HOLD", 60.0)
    writes = Writes()
    producer = Objects(4, MIB)
    with trio.fail_after(30):
        async with fedstream.open_site("recv", listen=LOOP) as recv:
            recv.register_stream_processing(CHANNEL, "*", PlainFactory())
            async with fedstream.open_site("send", connect=[recv.address]) as send:
                await poll(lambda: "send" in recv._connections)
                writes.watch(recv, "send")
                with writes.recording(monkeypatch):
                    rc, _ = await send.stream_objects(CHANNEL, "t", {}, ["recv"], producer, None)
    assert rc == ReturnCode.OK
    assert producer.replies == [ReturnCode.OK] * 4
    sid = 1  # the first stream the dialing site opens
    per_object = [w for w in writes.of(sid) if Reply in w]
    assert per_object == [[Credit, Reply]] * 4
    assert [Credit] not in writes.of(sid)
    # The stream is granted exactly what it was before: each object's bytes.
    assert writes.credit(sid) == 4 * object_size(MIB)


async def test_pipelined_stream_gets_credit_while_its_first_object_is_consumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipelined stream sends more than a window of objects while the first
    one's consume waits: the credit held for that object's reply goes as soon
    as the next object arrives, and credit flows from then on."""
    monkeypatch.setattr(_connection, "_CREDIT_HOLD", 60.0)
    window = 8 * MIB
    count = 12  # 12 MiB: more than the window
    factory = Factory()
    producer = Objects(count, MIB)
    with trio.fail_after(15):
        async with fedstream.open_site(
            "recv", listen=LOOP, sync_callbacks="inline", window=window
        ) as recv:
            recv.register_stream_processing(CHANNEL, "*", factory)
            async with fedstream.open_site("send", connect=[recv.address]) as send:
                conn = await _connection_of(recv, "send")

                async def release_when_all_arrived() -> None:
                    await factory.entered.wait()
                    # Object 0 left the budget for its consumer; all the others are in.
                    await poll(lambda: conn.receive_budget.held >= (count - 1) * MIB)
                    factory.go.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(release_when_all_arrived)
                    rc, _ = await send.stream_objects(
                        CHANNEL, "t", {}, ["recv"], producer, None, max_in_flight=count
                    )
    assert rc == ReturnCode.OK
    assert producer.replies == [ReturnCode.OK] * count


async def _connection_of(site: Site, peer: str) -> Any:
    await poll(lambda: peer in site._connections)
    return site._connections[peer]


@pytest.mark.parametrize("opener", ["sender", "receiver"])
async def test_held_credit_goes_when_another_stream_starts(
    opener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a stream's credit is held for a reply, a second stream starting on
    the connection (opened by either site) sends it at once: the sender's
    streams may now need it (a shared connection bounds their unacknowledged
    bytes)."""
    monkeypatch.setattr(_connection, "_CREDIT_HOLD", 60.0)
    writes = Writes()
    factory = Factory()
    first = Objects(1, MIB)
    with trio.fail_after(30):
        async with fedstream.open_site("recv", listen=LOOP, sync_callbacks="inline") as recv:
            recv.register_stream_processing(CHANNEL, "first", factory)
            recv.register_stream_processing(CHANNEL, "second", PlainFactory())
            async with fedstream.open_site("send", connect=[recv.address]) as send:
                send.register_stream_processing(CHANNEL, "second", PlainFactory())
                await _connection_of(recv, "send")
                writes.watch(recv, "send")
                with writes.recording(monkeypatch):
                    async with trio.open_nursery() as nursery:

                        async def stream_first() -> None:
                            rc, _ = await send.stream_objects(
                                CHANNEL, "first", {}, ["recv"], first, None
                            )
                            assert rc == ReturnCode.OK

                        nursery.start_soon(stream_first)
                        await factory.entered.wait()
                        assert writes.credit(1) == 0, "held while consume runs"
                        second = Objects(1, 1024)
                        if opener == "sender":
                            rc, _ = await send.stream_objects(
                                CHANNEL, "second", {}, ["recv"], second, None
                            )
                        else:
                            rc, _ = await recv.stream_objects(
                                CHANNEL, "second", {}, ["send"], second, None
                            )
                        assert rc == ReturnCode.OK
                        assert writes.credit(1) == object_size(MIB)
                        factory.go.set()
    assert first.replies == [ReturnCode.OK]
    # The credit went on its own, before the reply.
    assert [w for w in writes.of(1) if Credit in w or Reply in w] == [[Credit], [Reply]]


async def test_held_credit_goes_on_its_own_after_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consume that takes long does not keep the credit: it goes alone once
    it has been held ``_CREDIT_HOLD`` seconds."""
    monkeypatch.setattr(_connection, "_CREDIT_HOLD", 0.05)
    writes = Writes()
    factory = Factory()
    producer = Objects(2, MIB)
    with trio.fail_after(15):
        async with fedstream.open_site("recv", listen=LOOP, sync_callbacks="inline") as recv:
            recv.register_stream_processing(CHANNEL, "*", factory)
            async with fedstream.open_site("send", connect=[recv.address]) as send:
                await _connection_of(recv, "send")
                writes.watch(recv, "send")
                with writes.recording(monkeypatch):

                    async def release_after_credit() -> None:
                        await factory.entered.wait()
                        entered = trio.current_time()
                        await poll(lambda: writes.credit(1) > 0)
                        assert trio.current_time() - entered >= 0.04
                        factory.go.set()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(release_after_credit)
                        rc, _ = await send.stream_objects(
                            CHANNEL, "t", {}, ["recv"], producer, None
                        )
    assert rc == ReturnCode.OK
    assert producer.replies == [ReturnCode.OK] * 2
    # Object 0's credit alone, its reply, then object 1's credit with its reply.
    assert [w for w in writes.of(1) if Credit in w or Reply in w] == [
        [Credit],
        [Reply],
        [Credit, Reply],
    ]
    assert writes.credit(1) == 2 * object_size(MIB)


async def test_held_credit_is_dropped_when_the_sender_aborts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender aborts while its object's consume runs: the session ends
    without sending the credit it held (the stream takes no more bytes), and
    the connection forgets it."""
    monkeypatch.setattr(_connection, "_CREDIT_HOLD", 60.0)
    writes = Writes()
    factory = Factory()
    producer = Objects(2, MIB)
    fl_ctx = FLContext()
    with trio.fail_after(15):
        async with fedstream.open_site("recv", listen=LOOP, sync_callbacks="inline") as recv:
            recv.register_stream_processing(CHANNEL, "*", factory)
            async with fedstream.open_site("send", connect=[recv.address]) as send:
                conn = await _connection_of(recv, "send")
                writes.watch(recv, "send")
                with writes.recording(monkeypatch):

                    async def abort_while_consuming() -> None:
                        await factory.entered.wait()
                        assert len(conn._held) == 1
                        fl_ctx.get_run_abort_signal().trigger("enough")

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(abort_while_consuming)
                        rc, _ = await send.stream_objects(
                            CHANNEL, "t", {}, ["recv"], producer, fl_ctx
                        )
                    await poll(lambda: not recv._connections["send"].receivers)
                    assert conn._held == {}
    assert rc == ReturnCode.TASK_ABORTED
    assert writes.credit(1) == 0
    assert not any(Reply in w for w in writes.of(1))


class Stopper(ObjectConsumer):
    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        return False, None


class StopperFactory(ConsumerFactory):
    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return Stopper()


async def test_a_consumer_that_ends_the_stream_sends_the_credit_with_its_last_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_connection, "_CREDIT_HOLD", 60.0)
    writes = Writes()
    producer = Objects(3, MIB)
    with trio.fail_after(15):
        async with fedstream.open_site("recv", listen=LOOP) as recv:
            recv.register_stream_processing(CHANNEL, "*", StopperFactory())
            async with fedstream.open_site("send", connect=[recv.address]) as send:
                await _connection_of(recv, "send")
                writes.watch(recv, "send")
                with writes.recording(monkeypatch):
                    rc, _ = await send.stream_objects(CHANNEL, "t", {}, ["recv"], producer, None)
    assert rc == ReturnCode.OK
    assert producer.replies == [ReturnCode.OK]
    replies = [[(type(f), getattr(f, "last", None)) for f in w] for w in writes.writes]
    assert [(Credit, None), (Reply, True)] in replies
    assert writes.credit(1) == object_size(MIB)


class _SlowConsumer(ObjectConsumer):
    async def consume(  # type: ignore[override]
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        await trio.sleep(0.05)
        return True, None


class _SlowFactory(ConsumerFactory):
    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _SlowConsumer()


class _NotYet(ObjectProducer):
    """A stream whose first object is not ready yet (a model still loading)."""

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def produce(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        await self.gate.wait()
        return None, 30.0

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return None


@pytest.mark.parametrize("stream_not_open_yet", [False, True])
async def test_a_pipelined_opener_never_waits_for_a_credit_held_for_a_reply(
    stream_not_open_yet: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sides count a stream as sharing the connection only once its first
    DATA went out (and until its session ended): a stream of the opener that
    has not sent anything yet must not make the opener bound its
    unacknowledged bytes while the receiver, which knows nothing of that
    stream, holds the last credit of each object for its reply. (Found in
    review: each object of the pipelined stream then waited for the reply or
    the 10 ms bound.)"""
    from fedstream._engine import _receiver, _target

    producer = Objects(8, 0)
    # Text travels inside the object's head (bytes would go out of band
    # behind a small first frame): a whole 1 MiB first frame, then the rest.
    producer.data = "x" * (3 * MIB // 2)  # type: ignore[assignment]
    not_yet = _NotYet()
    links: list[_target.TargetLink] = []
    stalls: list[str] = []
    init = _target.TargetLink.__init__
    release = _receiver.ReceiverSession.release_credit

    def spy_init(self: _target.TargetLink, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        links.append(self)

    def spy_release(self: _receiver.ReceiverSession) -> None:
        # The connection's time bound sends a held credit while the opener's
        # delivery waits for credit: a stall. (The next object's DATA also
        # releases it, legitimately, while the opener waits for that
        # object's admission grant.)
        timer = sys._getframe(1).f_code.co_name == "_release_late_credit"
        if timer and self._credit_held and any(link._awaiting_credit for link in links):
            stalls.append(f"stream {self.sid}: credit released while the opener waited for it")
        release(self)

    monkeypatch.setattr(_target.TargetLink, "__init__", spy_init)
    monkeypatch.setattr(_receiver.ReceiverSession, "release_credit", spy_release)
    with trio.fail_after(30):
        async with fedstream.open_site("recv", listen=LOOP, sync_callbacks="inline") as recv:
            recv.register_stream_processing(CHANNEL, "*", _SlowFactory())
            async with fedstream.open_site("send", connect=[recv.address]) as send:
                await _connection_of(recv, "send")
                async with trio.open_nursery() as nursery:
                    if stream_not_open_yet:
                        nursery.start_soon(
                            send.stream_objects, CHANNEL, "idle", {}, ["recv"], not_yet, None
                        )
                        with trio.fail_after(5):
                            while len(links) < 1:
                                await trio.sleep(0.01)
                    rc, _ = await send.stream_objects(
                        CHANNEL, "busy", {}, ["recv"], producer, None, max_in_flight=4
                    )
                    not_yet.gate.set()
    assert rc == ReturnCode.OK
    assert producer.replies == [ReturnCode.OK] * 8
    assert stalls == []
