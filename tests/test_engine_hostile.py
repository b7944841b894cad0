"""A listening site under attack by a raw peer that speaks the wire protocol by hand.

The raw peer opens a plain TCP connection to 127.0.0.1 and drives its own
sans-io ``FrameProtocol``: as the dialer it sends HELLO first, reads the
site's HELLO, and then sends whatever the case calls for. Two kinds of
misbehaviour are distinguished:

* **connection-level** (garbage, oversized or malformed frames, a CHUNK at the
  wrong offset, a stream id of the wrong parity): the site closes that
  connection, ideally after a GOAWAY that says why;
* **session-level** (a sequence gap, a duplicate or orphan object, an
  oversized or undecodable object, an unknown channel): the site answers that
  one stream with an error reply and keeps the connection.

Whatever happens, the site stays up: a well-behaved site's stream that was
live during the attack completes, and a fresh stream after it succeeds.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
import trio

from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    Site,
    StreamContextKey,
    open_site,
)
from fedstream._engine._sender import MAX_IN_FLIGHT
from fedstream._wire import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    ErrorCode,
    Frame,
    FrameProtocol,
    GoAway,
    Hello,
    Ping,
    Pong,
    Reply,
    decode_object,
    encode_frame,
    encode_object,
)
from fedstream._wire._frames import OPENER_ABORT_RCS

LOOP = "tcp://127.0.0.1:0"
CH = "app"
OK = ReturnCode.OK
BAD = ReturnCode.BAD_REQUEST_DATA
U32 = struct.Struct(">I")


# ------------------------------------------------------------ hub side


class Consumer(ObjectConsumer):
    def __init__(self, stream_ctx: dict[str, Any]) -> None:
        self.topic = stream_ctx[StreamContextKey.TOPIC]
        self.items: list[Any] = []
        self.rc: str | None = None
        self.finalized = 0

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.items.append(shareable.get("i"))
        return True, None

    def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.rc = stream_ctx[StreamContextKey.RC]
        self.finalized += 1


class Recorder(ConsumerFactory):
    def __init__(self) -> None:
        self.consumers: list[Consumer] = []

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Consumer:
        consumer = Consumer(stream_ctx)
        self.consumers.append(consumer)
        return consumer

    def topic(self, topic: str) -> list[Consumer]:
        return [c for c in self.consumers if c.topic == topic]


class Producer(ObjectProducer):
    """``count`` small objects; with a ``gate``, waits before object ``gate_at``."""

    def __init__(self, count: int, gate: trio.Event | None = None, gate_at: int = 0) -> None:
        self.count = count
        self.gate = gate
        self.gate_at = gate_at
        self.sent = 0
        self.replies: list[dict[str, Shareable]] = []

    async def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        if self.gate is not None and self.sent == self.gate_at:
            await self.gate.wait()
        if self.sent >= self.count:
            return None, 10.0
        self.sent += 1
        return Shareable({"i": self.sent - 1, "blob": b"g" * 1000}), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies.append(dict(replies))
        return None


@dataclass
class Hub:
    site: Site
    good: Site
    rec: Recorder


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.005)


@asynccontextmanager
async def attacked_hub(**hub_opts: Any) -> AsyncIterator[Hub]:
    """A listening ``hub`` with a consumer on channel ``app``, and a well-behaved ``good`` site.

    A background stream from ``good`` is live (2 objects in, waiting for the
    rest) for the whole body; on exit it must complete normally, and a fresh
    stream must succeed too.
    """
    rec = Recorder()
    opts: dict[str, Any] = {"handshake_timeout": 2.0, **hub_opts}
    gate = trio.Event()
    background = Producer(6, gate=gate, gate_at=2)
    result: list[tuple[str, Any]] = []
    with trio.fail_after(30):
        async with (
            open_site("hub", listen=LOOP, **opts) as hub,
            open_site("good", connect=[hub.address]) as good,
        ):
            hub.register_stream_processing(CH, "*", rec)
            await hub.wait_for_peers(["good"])
            async with trio.open_nursery() as nursery:

                async def run_background() -> None:
                    result.append(
                        await good.stream_objects(CH, "background", {}, ["hub"], background, None)
                    )

                nursery.start_soon(run_background)
                await wait_until(lambda: len(background.replies) == 2)
                try:
                    yield Hub(hub, good, rec)
                finally:
                    gate.set()
            # The session that was live during the attack was not disturbed.
            assert result == [(OK, None)]
            assert [r["hub"].get_return_code() for r in background.replies] == [OK] * 6
            (bg,) = rec.topic("background")
            assert bg.items == list(range(6))
            assert bg.rc == OK
            # And the hub still takes new streams from well-behaved sites.
            fresh = Producer(3)
            rc, _ = await good.stream_objects(CH, "fresh", {}, ["hub"], fresh, None)
            assert rc == OK
            assert rec.topic("fresh")[-1].items == [0, 1, 2]
            assert "good" in hub.peers


# ------------------------------------------------------------ raw peer side


class RawPeer:
    """The dialing end of a TCP connection, driven frame by frame."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.protocol = FrameProtocol()
        #: The site's HELLO, once :meth:`handshake` got it.
        self.hello: Hello | None = None

    async def handshake(self, name: str = "evil", **limits: int) -> Hello:
        all_limits = {"max_object_size": 1 << 30, "window": 0, "heartbeat_ms": 5000, **limits}
        await self.send(self.protocol.hello(name, limits=all_limits))
        self.hello = await self.expect(Hello)
        return self.hello

    async def send(self, frame: Frame) -> None:
        await self.stream.send_all(self.protocol.send(frame))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_frame(self, limit: float = 5.0) -> Frame | None:
        """The next frame that is not CREDIT, PING or PONG (PINGs are answered); None at EOF."""
        with trio.fail_after(limit):
            while True:
                event = self.protocol.next_event()
                if event is NEED_DATA:
                    self.protocol.receive_data(await self.stream.receive_some(65536))
                    continue
                if event is CLOSED:
                    return None
                if isinstance(event, Ping):
                    await self.send(Pong(event.opaque))
                    continue
                if isinstance(event, (Credit, Pong)):
                    continue
                return event

    async def expect(self, cls: type[Any], limit: float = 5.0) -> Any:
        frame = await self.next_frame(limit)
        assert isinstance(frame, cls), f"expected {cls.__name__}, got {frame!r}"
        return frame

    async def expect_reply(self, sid: int, seq: int) -> tuple[Reply, Shareable]:
        frame = await self.expect(Reply)
        assert (frame.sid, frame.seq) == (sid, seq), frame
        assert len(frame.body) == frame.size
        return frame, decode_object(frame.body)

    async def expect_done(self, sid: int, rc: str) -> Done:
        frame = await self.expect(Done)
        assert (frame.sid, frame.rc) == (sid, rc), frame
        return frame

    async def expect_closed(self, limit: float = 5.0) -> list[Frame]:
        """Read until the site closes the connection; return the frames seen on the way."""
        frames: list[Frame] = []
        with trio.fail_after(limit):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return frames
                try:
                    self.protocol.receive_data(data)
                    while (event := self.protocol.next_event()) not in (NEED_DATA, CLOSED):
                        frames.append(event)
                except Exception:  # after GOAWAY nothing else may be parsed; keep reading
                    pass
                if not data:
                    return frames

    async def stream_ok(self, sid: int, topic: str, count: int = 2) -> None:
        """A well-formed stream on this connection: every object acked, then END and DONE."""
        for seq in range(count):
            await self.send(data_frame(sid, seq, topic=topic))
            _, reply = await self.expect_reply(sid, seq)
            assert reply.get_return_code() == OK
        await self.send(End(sid, count))
        await self.expect_done(sid, OK)


@asynccontextmanager
async def raw_peer(hub: Hub) -> AsyncIterator[RawPeer]:
    assert hub.site.address is not None
    port = int(hub.site.address.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        yield RawPeer(stream)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


def encoded(i: int = 0) -> bytes:
    return encode_object(Shareable({"i": i})).to_bytes()


def data_frame(
    sid: int,
    seq: int,
    *,
    topic: str = "evil",
    channel: str = CH,
    body: bytes | None = None,
    size: int | None = None,
) -> Data:
    body = encoded(seq) if body is None else body
    return Data(
        sid,
        seq,
        len(body) if size is None else size,
        channel,
        topic,
        {} if seq == 0 else None,
        body,
    )


def framed(head: Any, body: bytes = b"") -> bytes:
    """A frame from a hand-built head, bypassing every check of the encoder."""
    raw = cbor2.dumps(head) + body
    return U32.pack(len(raw)) + raw


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def framed_bytes(head: bytes, body: bytes = b"") -> bytes:
    """A frame from raw head bytes."""
    return U32.pack(len(head) + len(body)) + head + body


# ============================================================ before HELLO


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", id="http-request"),
        pytest.param(U32.pack(6) + b"\xff\xfe\xfd\xfc\xfb\xfa", id="invalid-cbor"),
        pytest.param(U32.pack(0), id="empty-frame"),
        pytest.param(encode_frame(Ping(7))[0], id="ping-before-hello"),
        pytest.param(framed([1, 99, "evil", {}, []]), id="wrong-version"),
        pytest.param(framed([1, PROTOCOL_VERSION, "", {}, []]), id="empty-site-name"),
        pytest.param(
            framed([1, PROTOCOL_VERSION, "evil", {"max_frame_size": 10}, []]), id="tiny-max-frame"
        ),
        pytest.param(
            framed([1, PROTOCOL_VERSION, "evil", {"window": -1}, []]), id="negative-limit"
        ),
        pytest.param(framed(["hello"]), id="string-frame-type"),
    ],
)
async def test_garbage_before_hello_closes_the_connection(garbage: bytes) -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.send_raw(garbage)
        frames = await peer.expect_closed()
        assert not any(isinstance(f, Hello) for f in frames), frames
        assert "evil" not in hub.site.peers


async def test_hello_cut_short_by_eof_closes_the_connection() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        hello = peer.protocol.send(peer.protocol.hello("evil"))
        await peer.send_raw(hello[: len(hello) // 2])
        await peer.stream.send_eof()
        await peer.expect_closed()


async def test_silent_dialer_is_dropped_after_the_handshake_timeout() -> None:
    async with attacked_hub(handshake_timeout=0.5) as hub, raw_peer(hub) as peer:
        start = trio.current_time()
        await peer.expect_closed(limit=5)
        assert trio.current_time() - start < 3


async def test_oversized_length_prefix_before_hello() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.send_raw(b"\xff\xff\xff\xff" + b"x" * 16)
        await peer.expect_closed()


async def test_hello_claiming_a_connected_name_is_refused() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.send(peer.protocol.hello("good"))
        frames = await peer.expect_closed()
        assert not any(isinstance(f, Hello) for f in frames), frames
        assert hub.site.peers == ["good"]


# ============================================================ connection-level, after HELLO


async def test_oversized_length_prefix_after_hello() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await wait_until(lambda: "evil" in hub.site.peers)
        await peer.send_raw(b"\xff\xff\xff\xff" + b"x" * 16)
        await peer.expect_closed()
        await wait_until(lambda: "evil" not in hub.site.peers)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(U32.pack(5) + b"\xff\xff\xff\xff\xff", id="invalid-cbor"),
        pytest.param(framed(42), id="head-not-an-array"),
        pytest.param(framed([]), id="empty-array"),
        pytest.param(framed([0x7F, 1, 2]), id="unknown-frame-type"),
        pytest.param(framed([0x10, "one", 0, 5, CH, "t", None], b"abcde"), id="data-str-sid"),
        pytest.param(framed([0x10, 1, -1, 5, CH, "t", None], b"abcde"), id="data-negative-seq"),
        pytest.param(framed([0x10, 1, 0]), id="data-too-few-fields"),
        pytest.param(framed([0x10, 1, 0, 2, CH, "t", {}], b"abcdef"), id="body-longer-than-size"),
        pytest.param(framed([0x03, 1], b"tail"), id="ping-with-a-body"),
        pytest.param(framed([0x01, PROTOCOL_VERSION, "evil", {}, []]), id="second-hello"),
        pytest.param(
            framed([0x10, 1, 0, 5, CH, "t", {"k": nested(40)}]),
            id="ctx-nested-too-deep",
        ),
        pytest.param(framed([0x10, 1, 0, 5, CH, "t", {1: "int key"}]), id="ctx-int-key"),
        pytest.param(
            framed_bytes(
                b"\x87\x10\x01\x00\x05\xd8\x1c" + cbor2.dumps(CH) + b"\x61t\xf6", b"abcde"
            ),
            id="shared-ref-tag",
        ),
    ],
)
async def test_malformed_frame_after_hello_closes_only_that_connection(bad: bytes) -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await wait_until(lambda: "evil" in hub.site.peers)
        await peer.send_raw(bad)
        await peer.expect_closed()
        await wait_until(lambda: "evil" not in hub.site.peers)


async def test_chunk_at_the_wrong_offset_closes_the_connection_with_goaway() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0))
        await peer.expect_reply(1, 0)
        full = encoded(1)
        await peer.send(data_frame(1, 1, body=full[:10], size=len(full)))
        await peer.send(Chunk(1, 1, 12, full[12:]))
        frames = await peer.expect_closed()
        goaways = [f for f in frames if isinstance(f, GoAway)]
        assert goaways, f"connection closed without a GOAWAY; frames seen: {frames}"
        assert goaways[0].code == ErrorCode.PROTOCOL_ERROR
        await wait_until(lambda: "evil" not in hub.site.peers)
        (session,) = hub.rec.topic("evil")
        await wait_until(lambda: session.rc is not None)
        assert session.rc == ReturnCode.COMMUNICATION_ERROR
        assert session.items == [0]


async def test_chunk_overrunning_the_object_closes_the_connection() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        full = encoded(0)
        await peer.send(data_frame(1, 0, body=full[:10], size=len(full)))
        await peer.send(Chunk(1, 0, 10, full[10:] + b"overrun"))
        await peer.expect_closed()
        await wait_until(lambda: "evil" not in hub.site.peers)


async def test_chunk_for_an_object_not_being_sent_closes_the_connection() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0))
        await peer.expect_reply(1, 0)
        await peer.send(Chunk(1, 0, 0, b"late"))
        await peer.expect_closed()


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(data_frame(2, 0), id="data-on-even-sid"),
        pytest.param(End(4, 1), id="end-on-even-sid"),
        pytest.param(Reply(1, 0, 3, False, b"abc"), id="reply-on-odd-sid"),
        pytest.param(Done(5, "OK", None), id="done-on-odd-sid"),
        pytest.param(data_frame(0, 0), id="data-on-reserved-sid-0"),
    ],
)
async def test_stream_id_of_the_wrong_parity_closes_the_connection(frame: Frame) -> None:
    """The hub accepted this connection: even ids are its own, odd ones the dialer's."""
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await wait_until(lambda: "evil" in hub.site.peers)
        await peer.send(frame)
        await peer.expect_closed()
        await wait_until(lambda: "evil" not in hub.site.peers)
        assert hub.rec.topic("evil") == []


async def test_peer_that_stops_answering_is_dropped_after_peer_timeout() -> None:
    async with attacked_hub(heartbeat_interval=0.2, peer_timeout=1.0) as hub, raw_peer(hub) as peer:
        await peer.send(peer.protocol.hello("evil"))
        # Read the HELLO but never answer anything after it.
        start = trio.current_time()
        await wait_until(lambda: "evil" in hub.site.peers)
        await wait_until(lambda: "evil" not in hub.site.peers, limit=5)
        assert trio.current_time() - start < 3
        await peer.expect_closed()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        pytest.param(
            "oversized-before-hello", ErrorCode.FRAME_TOO_LARGE, id="oversized-before-hello"
        ),
        pytest.param("wrong-version", ErrorCode.VERSION_MISMATCH, id="wrong-version"),
        pytest.param("duplicate-name", ErrorCode.DUPLICATE_SITE, id="duplicate-name"),
        pytest.param(
            "oversized-after-hello", ErrorCode.FRAME_TOO_LARGE, id="oversized-after-hello"
        ),
        pytest.param(
            "invalid-cbor-after-hello", ErrorCode.PROTOCOL_ERROR, id="invalid-cbor-after-hello"
        ),
        pytest.param("wrong-parity", ErrorCode.PROTOCOL_ERROR, id="wrong-parity"),
        pytest.param("silent-dialer", ErrorCode.HANDSHAKE_TIMEOUT, id="silent-dialer"),
    ],
)
async def test_the_site_says_why_with_a_goaway_before_closing(case: str, code: int) -> None:
    """docs/protocol.md: the side that detects a connection error sends GOAWAY, then closes."""
    async with attacked_hub(handshake_timeout=0.5) as hub, raw_peer(hub) as peer:
        if case == "silent-dialer":
            pass
        elif case == "oversized-before-hello":
            await peer.send_raw(b"\xff\xff\xff\xff")
        elif case == "wrong-version":
            await peer.send_raw(framed([1, 99, "evil", {}, []]))
        elif case == "duplicate-name":
            await peer.send(peer.protocol.hello("good"))
        else:
            await peer.handshake()
            if case == "oversized-after-hello":
                await peer.send_raw(b"\xff\xff\xff\xff")
            elif case == "invalid-cbor-after-hello":
                await peer.send_raw(U32.pack(3) + b"\xff\xff\xff")
            else:
                await peer.send(data_frame(2, 0))
        frames = await peer.expect_closed()
        goaways = [f for f in frames if isinstance(f, GoAway)]
        assert goaways, f"closed without a GOAWAY; frames seen: {frames}"
        assert goaways[-1].code == code


# ============================================================ session-level


async def test_sequence_gap_gets_bad_request_data_and_finalizes_the_session() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        # A second, well-formed stream on the same connection, open the whole time.
        await peer.send(data_frame(3, 0, topic="neighbour"))
        await peer.expect_reply(3, 0)

        await peer.send(data_frame(1, 0, topic="gap"))
        _, reply = await peer.expect_reply(1, 0)
        assert reply.get_return_code() == OK
        await peer.send(data_frame(1, 2, topic="gap"))
        frame, reply = await peer.expect_reply(1, 2)
        assert frame.last
        assert reply.get_return_code() == BAD
        await peer.expect_done(1, BAD)
        (session,) = hub.rec.topic("gap")
        assert session.items == [0]
        assert session.rc == BAD
        assert session.finalized == 1

        # The neighbour stream on the same connection carries on.
        await peer.send(data_frame(3, 1, topic="neighbour"))
        _, reply = await peer.expect_reply(3, 1)
        assert reply.get_return_code() == OK
        await peer.send(End(3, 2))
        await peer.expect_done(3, OK)
        assert hub.rec.topic("neighbour")[0].items == [0, 1]
        assert "evil" in hub.site.peers


async def test_stream_error_reply_says_what_was_wrong() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 3, topic="orphan"))
        _, reply = await peer.expect_reply(1, 3)
        assert reply.get_return_code() == BAD
        message = reply.get_header("__error__")
        assert isinstance(message, str)
        assert message
        assert hub.rec.topic("orphan") == []


async def test_late_frames_for_a_finished_stream_are_ignored() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.stream_ok(1, "finished")
        await peer.send(Chunk(1, 1, 5, b"late"))
        await peer.send(End(1, 2))
        await peer.send(Abort(1, ReturnCode.TASK_ABORTED, "late", "evil"))
        await peer.stream_ok(3, "after-late")
        assert [c.rc for c in hub.rec.topic("finished")] == [OK]


async def test_goaway_from_the_raw_peer_ends_its_sessions_only() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, topic="left"))
        await peer.expect_reply(1, 0)
        await peer.send(GoAway(ErrorCode.NO_ERROR, "bye"))
        await peer.expect_closed()
        await wait_until(lambda: "evil" not in hub.site.peers)
        (session,) = hub.rec.topic("left")
        await wait_until(lambda: session.rc is not None)
        assert session.rc == ReturnCode.COMMUNICATION_ERROR


async def test_bytes_after_goaway_close_the_connection() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send_raw(
            peer.protocol.send(GoAway(ErrorCode.NO_ERROR, "bye")) + b"\x00\x00\x00\x02\x81\x03"
        )
        await peer.expect_closed()
        await wait_until(lambda: "evil" not in hub.site.peers)


async def test_object_for_a_stream_that_does_not_exist_gets_bad_request_data() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(7, 5, topic="orphan"))
        frame, reply = await peer.expect_reply(7, 5)
        assert frame.last
        assert reply.get_return_code() == BAD
        assert hub.rec.topic("orphan") == []
        # Its trailing frames are ignored, and the connection stays usable.
        await peer.send(Chunk(7, 5, 3, b"tail"))
        await peer.send(End(7, 6))
        await peer.send(Abort(9, "TASK_ABORTED", "nothing", "evil"))
        await peer.stream_ok(11, "after-orphan")
        assert hub.rec.topic("after-orphan")[0].rc == OK


async def test_duplicate_first_object_gets_bad_request_data() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, topic="dup"))
        await peer.expect_reply(1, 0)
        await peer.send(data_frame(1, 0, topic="dup"))
        frame, reply = await peer.expect_reply(1, 0)
        assert frame.last
        assert reply.get_return_code() == BAD
        await peer.expect_done(1, BAD)
        (session,) = hub.rec.topic("dup")
        assert session.items == [0]
        assert session.rc == BAD
        await peer.stream_ok(3, "after-dup")


async def test_new_object_while_one_is_half_sent_gets_bad_request_data() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        full = encoded(0)
        await peer.send(data_frame(1, 0, topic="half", body=full[:5], size=len(full)))
        await peer.send(data_frame(1, 0, topic="half"))
        _, reply = await peer.expect_reply(1, 0)
        assert reply.get_return_code() == BAD
        await peer.expect_done(1, BAD)
        await peer.stream_ok(3, "after-half")


@pytest.mark.parametrize("size", [(1 << 20) + 1, 2 << 20, 1 << 62])
async def test_object_larger_than_max_object_size_is_refused_promptly(size: int) -> None:
    async with attacked_hub(max_object_size=1 << 20) as hub, raw_peer(hub) as peer:
        hello = await peer.handshake()
        assert hello.limits["max_object_size"] == 1 << 20
        await peer.send(data_frame(1, 0, topic="huge", body=b"\x00" * 1000, size=size))
        with trio.fail_after(2):
            frame, reply = await peer.expect_reply(1, 0)
        assert frame.last
        assert reply.get_return_code() == BAD
        await peer.expect_done(1, BAD)
        # The rest of that object is discarded without harm.
        for offset in range(1000, 1000 + 4 * 16_000, 16_000):
            await peer.send(Chunk(1, 0, offset, b"\x00" * 16_000))
        await peer.stream_ok(3, "after-huge")
        assert all(c.rc in (None, BAD) for c in hub.rec.topic("huge"))
        assert all(c.items == [] for c in hub.rec.topic("huge"))


async def test_well_behaved_sender_is_told_the_object_is_too_large() -> None:
    async with attacked_hub(max_object_size=1 << 20) as hub:

        class Big(Producer):
            async def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
                if self.sent:
                    return None, 10.0
                self.sent += 1
                return Shareable({"blob": b"\x01" * (2 << 20)}), 10.0

        big = Big(1)
        rc, _ = await hub.good.stream_objects(CH, "too-big", {}, ["hub"], big, None)
        assert [r["hub"].get_return_code() for r in big.replies] == [BAD]
        assert rc == BAD


async def test_undecodable_object_gets_bad_request_data() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, topic="junk", body=b"\x00\x00\x00\x02\xff\xff junk"))
        _, reply = await peer.expect_reply(1, 0)
        assert reply.get_return_code() == BAD
        await peer.expect_done(1, BAD)
        (session,) = hub.rec.topic("junk")
        assert session.items == []
        assert session.rc == BAD
        await peer.stream_ok(3, "after-junk")


async def test_objects_sent_without_waiting_for_replies_are_refused() -> None:
    """More objects than a pipelined stream may have in flight (MAX_IN_FLIGHT)."""
    flood = MAX_IN_FLIGHT + 6
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send_raw(
            b"".join(peer.protocol.send(data_frame(1, n, topic="flood")) for n in range(flood))
        )
        codes: list[str] = []
        while True:
            frame = await peer.next_frame()
            assert isinstance(frame, (Reply, Done)), frame
            if isinstance(frame, Done):
                assert frame.rc == BAD
                break
            codes.append(decode_object(frame.body).get_return_code())
        assert codes[-1] == BAD
        assert len(codes) < flood
        # The session may end before its consumer was even made; if one was, it saw BAD.
        for session in hub.rec.topic("flood"):
            await wait_until(lambda s=session: s.rc is not None)
            assert session.rc == BAD
            assert len(session.items) < flood
        await peer.stream_ok(3, "after-flood")


async def test_unknown_channel_gets_topic_unknown() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, channel="no-such-channel", topic="x"))
        frame, reply = await peer.expect_reply(1, 0)
        assert frame.last
        assert reply.get_return_code() == ReturnCode.TOPIC_UNKNOWN
        await peer.expect_done(1, ReturnCode.TOPIC_UNKNOWN)
        await peer.stream_ok(3, "after-unknown")
        assert len(hub.rec.consumers) == 2  # background and after-unknown only


async def test_abort_from_the_raw_peer_finalizes_with_its_rc() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, topic="aborted"))
        await peer.expect_reply(1, 0)
        await peer.send(Abort(1, ReturnCode.TASK_ABORTED, "changed my mind", "evil"))
        await peer.expect_done(1, ReturnCode.TASK_ABORTED)
        (session,) = hub.rec.topic("aborted")
        assert session.rc == ReturnCode.TASK_ABORTED
        await peer.stream_ok(3, "after-abort")


# ============================================================ END and ABORT checked


@pytest.mark.parametrize("count", [0, 1, 3, 1 << 40], ids=["none", "fewer", "more", "huge"])
async def test_end_with_the_wrong_object_count_ends_with_bad_request_data(count: int) -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        for seq in range(2):
            await peer.send(data_frame(1, seq, topic="miscounted"))
            await peer.expect_reply(1, seq)
        await peer.send(End(1, count))
        await peer.expect_done(1, BAD)
        (session,) = hub.rec.topic("miscounted")
        assert (session.items, session.rc, session.finalized) == ([0, 1], BAD, 1)
        await peer.stream_ok(3, "after-miscounted")


async def test_end_in_the_middle_of_an_object_ends_with_bad_request_data() -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, topic="cut"))
        await peer.expect_reply(1, 0)
        full = encoded(1)
        await peer.send(data_frame(1, 1, topic="cut", body=full[:5], size=len(full)))
        await peer.send(End(1, 2))
        await peer.expect_done(1, BAD)
        (session,) = hub.rec.topic("cut")
        assert (session.items, session.rc, session.finalized) == ([0], BAD, 1)
        await peer.stream_ok(3, "after-cut")


@pytest.mark.parametrize(
    "rc", [ReturnCode.OK, "", "NOT_A_CODE", "X" * 10_000, ReturnCode.TOPIC_UNKNOWN]
)
async def test_abort_with_an_rc_outside_the_documented_set_is_a_protocol_error(
    rc: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, topic="bad-abort"))
        await peer.expect_reply(1, 0)
        await peer.send(Abort(1, rc, "see my rc", "evil"))
        await peer.expect_done(1, BAD)
        (session,) = hub.rec.topic("bad-abort")
        assert (session.rc, session.finalized) == (BAD, 1)
        assert any("ABORT" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        # An ABORT for a stream not seen yet is checked too.
        await peer.send(Abort(5, rc, "early", "evil"))
        await peer.send(data_frame(5, 0, topic="bad-early-abort"))
        await peer.expect_done(5, BAD)
        assert hub.rec.topic("bad-early-abort") == []
        await peer.stream_ok(3, "after-bad-abort")


@pytest.mark.parametrize("rc", sorted(OPENER_ABORT_RCS))
async def test_abort_with_a_documented_rc_finalizes_with_it(rc: str) -> None:
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await peer.send(data_frame(1, 0, topic="aborted"))
        await peer.expect_reply(1, 0)
        await peer.send(Abort(1, rc, "documented", "evil"))
        await peer.expect_done(1, rc)
        (session,) = hub.rec.topic("aborted")
        assert session.rc == rc


# ============================================================ replies checked (opener side)


async def test_a_reply_to_an_object_not_sent_ends_that_stream_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hub's opener checks its targets' replies like its receivers check
    objects: a REPLY to an object that was never sent ends that stream with
    BAD_REQUEST_DATA (the target is told with ABORT), and the connection and
    the target's other streams carry on."""
    async with attacked_hub() as hub, raw_peer(hub) as peer:
        await peer.handshake()
        await wait_until(lambda: "evil" in hub.site.peers)
        results: list[tuple[str, Any]] = []
        producer = Producer(2)
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                results.append(
                    await hub.site.stream_objects(CH, "replies", {}, ["evil"], producer, None)
                )

            nursery.start_soon(run)
            opened = await peer.expect(Data)
            ok = encode_object(Shareable({"__rc__": OK})).to_bytes()
            await peer.send(Reply(opened.sid, 1, len(ok), False, ok))  # object 1 was never sent
            while not isinstance(frame := await peer.next_frame(), Abort):
                assert isinstance(frame, (Data, Chunk)), frame
            assert (frame.sid, frame.rc) == (opened.sid, BAD)
            await peer.send(Done(opened.sid, BAD, None))
        assert results == [(BAD, None)]
        assert [r["evil"].get_return_code() for r in producer.replies] == [BAD]
        assert any("REPLY" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        await peer.stream_ok(3, "after-bad-reply")
        assert "evil" in hub.site.peers
