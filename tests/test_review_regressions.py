"""Regressions for problems found in review: each test failed before its fix."""

from __future__ import annotations

import itertools
from pathlib import Path
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
    StreamContextKey,
)

_names = itertools.count()


def _url() -> str:
    return f"memory://review-{next(_names)}"


class Recorder(ConsumerFactory):
    def __init__(self, hold: trio.Event | None = None) -> None:
        self.hold = hold
        self.items: list[int] = []
        self.rcs: list[str] = []

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        # Async: a plain callback would run in a worker thread, and the mock
        # clock of the tests below jumps ahead while the thread works.
        return _Consumer(self)


class _Consumer(ObjectConsumer):
    def __init__(self, factory: Recorder) -> None:
        self.factory = factory

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.factory.items.append(shareable["i"])
        if self.factory.hold is not None:
            await self.factory.hold.wait()
        return True, None

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.factory.rcs.append(stream_ctx[StreamContextKey.RC])


class Counter(ObjectProducer):
    def __init__(self, n: int) -> None:
        self.n = n
        self.i = 0
        self.produced = 0

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        self.produced += 1
        if self.i == self.n:
            return None, 0
        self.i += 1
        return Shareable(i=self.i - 1), 30.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return None


async def test_caller_cancelling_stream_objects_aborts_receivers(
    autojump_clock: trio.abc.Clock,
) -> None:
    url = _url()
    rec = Recorder(hold=trio.Event())
    with trio.fail_after(120):
        async with (
            fedstream.open_site("rx", listen=url) as rx,
            fedstream.open_site("tx", connect=[url]) as tx,
        ):
            rx.register_stream_processing("*", "*", rec)
            await rx.wait_for_peers(["tx"])
            with trio.move_on_after(5):
                await tx.stream_objects("c", "t", {}, ["rx"], Counter(3), FLContext())
            with trio.fail_after(60):
                while not rec.rcs:
                    await trio.sleep(0.1)
    assert rec.items == [0]
    assert rec.rcs == [ReturnCode.TASK_ABORTED]


async def test_stream_ctx_too_large_for_a_peer_fails_before_producing(
    autojump_clock: trio.abc.Clock,
) -> None:
    url = _url()
    with trio.fail_after(60):
        async with (
            fedstream.open_site(
                "rx", listen=url, max_frame_size=64 * 1024, chunk_size=32 * 1024
            ) as rx,
            fedstream.open_site("rx2", listen=_url()) as rx2,
            fedstream.open_site("tx", connect=[url, rx2.address or ""]) as tx,
        ):
            rx.register_stream_processing("*", "*", Recorder())
            rx2.register_stream_processing("*", "*", Recorder())
            await tx.wait_for_peers(["rx", "rx2"])
            producer = Counter(1)
            with pytest.raises(fedstream.LocalProtocolError, match="rx"):
                await tx.stream_objects(
                    "c", "t", {"big": "x" * 100_000}, ["rx", "rx2"], producer, FLContext()
                )
            assert producer.produced == 0
            deep: dict[str, Any] = {}
            node = deep
            for _ in range(40):
                node["n"] = {}
                node = node["n"]
            with pytest.raises(fedstream.LocalProtocolError):
                await tx.stream_objects("c", "t", deep, ["rx", "rx2"], Counter(1), FLContext())


async def test_a_lost_peer_can_connect_again_at_once() -> None:
    rec = Recorder()
    with trio.fail_after(20):
        async with fedstream.open_site("srv", listen="tcp://127.0.0.1:0") as srv:
            srv.register_stream_processing("*", "*", rec)
            async with fedstream.open_site("cli", connect=[srv.address or ""]) as cli:
                await srv.wait_for_peers(["cli"])
                cli._connections["srv"].lose("test cut")
                assert "srv" not in cli.peers
                with trio.fail_after(5):
                    while "cli" in srv.peers:
                        await trio.sleep(0.01)
                assert await cli.connect(srv.address or "") == "srv"
                await srv.wait_for_peers(["cli"])
                rc, _ = await cli.stream_objects("c", "t", {}, ["srv"], Counter(2), FLContext())
    assert rc == ReturnCode.OK
    assert rec.items == [0, 1]


async def test_cli_send_of_an_empty_file_terminates(tmp_path: Path) -> None:
    """The file streamer (what ``fedstream send`` uses) ends an empty file's stream."""
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    with trio.fail_after(20):
        async with fedstream.open_site("rx", listen="tcp://127.0.0.1:0") as rx:
            rx.register_file_receiver("files", "*", out)
            async with fedstream.open_site("tx", connect=[rx.address]) as tx:
                result = await tx.stream_file("files", "up", ["rx"], empty, chunk_size=1024)
    assert result.ok
    assert (out / "empty.bin").read_bytes() == b""


async def test_unknown_channel_named_by_a_long_string_does_not_crash_the_site() -> None:
    """The TOPIC_UNKNOWN reply quotes the channel: it must stay within the peer's limit."""
    from fedstream._wire import CLOSED, NEED_DATA, Data, FrameProtocol, Reply, decode_object

    with trio.fail_after(20):
        async with fedstream.open_site("victim", listen="tcp://127.0.0.1:0") as victim:
            port = int((victim.address or "").rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            proto = FrameProtocol(max_frame_size=64 * 1024)
            await stream.send_all(proto.send(proto.hello("evil")))
            await stream.send_all(proto.send(Data(1, 0, 4, "c" * 60_000, "t", {}, b"")))
            got = None
            while got is None:
                event = proto.next_event()
                if event is NEED_DATA:
                    proto.receive_data(await stream.receive_some(65536))
                    continue
                assert event is not CLOSED
                if isinstance(event, Reply):
                    got = decode_object(bytes(event.body))
            assert got.get_return_code() == ReturnCode.TOPIC_UNKNOWN
            await stream.aclose()
            assert not victim.closed


class _ParkingConn:
    """A connection stub: the first write goes out at once, later ones wait for room
    forever while the connection keeps writing other streams' frames."""

    def __init__(self, window: int) -> None:
        import itertools
        import math

        from fedstream import SiteOptions
        from fedstream._engine._budget import ReceiveBudget

        self._sids = itertools.count(1, 2)
        self.senders: dict[int, Any] = {}
        self.peer_limits = {"window": window}
        self.peer_window = float(window)
        self.peer_max_object_size = math.inf
        self.max_body = 1024 * 1024
        # What a stream may send of an object before the peer's first grant
        # for it: here the whole window (the stub never grants; the test is
        # about waiting for the connection, not for admission).
        self.shared_in_flight = 2 * window
        self.bytes_queued = self.bytes_sent = 0
        self.last_write = 0.0
        self.options = SiteOptions(finalize_timeout=1.0)
        self.receive_budget = ReceiveBudget(self.options.max_receive_buffer_per_peer)
        self.closed = trio.Event()
        self.calls = 0

    def new_sid(self) -> int:
        return next(self._sids)

    def send_control(self, frame: Any) -> None:
        pass

    def pending(self, sid: int) -> int:
        return 0  # what went out went at once; the rest never got in

    def shared(self) -> bool:
        return False

    def flushed_event(self, sid: int) -> trio.Event:
        event = trio.Event()
        event.set()
        return event

    async def send_data(self, frame: Any, *more: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            await trio.sleep_forever()
        n = sum(len(getattr(f, "body", b"") or b"") + 20 for f in (frame, *more))
        self.bytes_queued += n
        self.bytes_sent += n
        self.last_write = trio.current_time()


async def test_waiting_for_room_with_credit_in_hand_is_not_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A short next view that waits for room in a busy connection is making progress."""
    from fedstream._engine._target import TargetLink
    from fedstream._wire import encode_object

    mib = 1024 * 1024
    conn = _ParkingConn(window=2 * mib)
    link = TargetLink(conn, "peer")  # type: ignore[arg-type]
    obj = encode_object(Shareable({"a": b"x" * (mib + mib // 5), "b": b"y" * (mib + mib // 5)}))
    rcs: list[Any] = []

    async def busy() -> None:
        while True:
            await trio.sleep(0.1)
            conn.last_write = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        with trio.move_on_after(30):
            reply = await link.deliver(0, obj, 2.0, "c", "t", None)
            rcs.append(reply.get_return_code())
        nursery.cancel_scope.cancel()
    assert rcs == [], f"delivery ended with {rcs} while the connection kept moving"
