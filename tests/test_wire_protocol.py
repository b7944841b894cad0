"""``FrameProtocol`` as a state machine: chunking, hostile input, bounds, handshake.

Everything here is sans-io: bytes go in through ``receive_data`` and frames
come out of ``next_event``; no sockets, no trio.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fedstream._errors import LocalProtocolError, RemoteProtocolError
from fedstream._wire import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_FRAME_LIMIT,
    MIN_MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    BodyStart,
    Chunk,
    Credit,
    Data,
    End,
    ErrorCode,
    Frame,
    FrameProtocol,
    FrameType,
    GoAway,
    Hello,
    Ping,
    ProtocolState,
    Reply,
    decode_head,
    encode_frame,
)
from strategies import (
    at_most,
    drain,
    goaways,
    hellos,
    normalized,
    open_pair,
    small_bodies,
    stream_frames,
)

U32 = struct.Struct(">I")


def raw_frame(head: bytes, tail: bytes = b"") -> bytes:
    return U32.pack(len(head) + len(tail)) + head + tail


def hello_bytes(site: str = "peer", **limits: int) -> bytes:
    """A peer's HELLO, built without the sending side's checks."""
    return raw_frame(cbor2.dumps([int(FrameType.HELLO), PROTOCOL_VERSION, site, limits, []]))


def opened(**kwargs: Any) -> FrameProtocol:
    """A protocol whose peer HELLO (announcing the default frame size) was received."""
    p = FrameProtocol(**kwargs)
    p.receive_data(hello_bytes(max_frame_size=DEFAULT_MAX_FRAME_SIZE))
    assert isinstance(p.next_event(), Hello)
    return p


def feed_all(protocol: FrameProtocol, pieces: list[bytes]) -> tuple[list[Frame], Any]:
    """Feed ``pieces`` (then EOF), draining after each; return frames and the final marker."""
    frames: list[Frame] = []
    for piece in pieces:
        protocol.receive_data(piece)
        got, marker = drain(protocol)
        frames += got
        assert marker is NEED_DATA or marker is CLOSED
    protocol.receive_data(b"")
    got, marker = drain(protocol)
    return frames + got, marker


# ------------------------------------------------------------ chunking independence


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[bytes, list[Frame]]:
    """A HELLO, some frames, maybe a GOAWAY: the bytes and the records."""
    sender = FrameProtocol()
    frames: list[Frame] = [draw(hellos())]
    frames += draw(st.lists(stream_frames(small_bodies), max_size=8))
    if draw(st.booleans()):
        frames.append(draw(goaways))
    return b"".join(sender.send(f) for f in frames), frames


@given(stream=frame_streams(), data=st.data())
@at_most(60)
def test_chunking_does_not_change_the_frames(
    stream: tuple[bytes, list[Frame]], data: st.DataObject
) -> None:
    wire, sent = stream
    expected = [normalized(f) for f in sent]
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts")))
    bounds = [0, *cuts, len(wire)]
    splits = [wire[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    ways = {
        "whole": [wire],
        "bytewise": [wire[i : i + 1] for i in range(len(wire))],
        "random": splits,
    }
    for how, pieces in ways.items():
        p = FrameProtocol()
        frames, marker = feed_all(p, pieces)
        assert [normalized(f) for f in frames] == expected, how
        assert marker is CLOSED, how
        assert p.their_state is ProtocolState.CLOSED, how
        assert p.next_event() is CLOSED, how
        assert p.buffered == 0, how


@given(
    sizes=st.lists(st.integers(0, 150_000), min_size=1, max_size=6),
    data=st.data(),
)
@at_most(25)
def test_large_frames_in_random_pieces(sizes: list[int], data: st.DataObject) -> None:
    """Frames far above the 64 KiB compaction threshold, split anywhere."""
    a, _ = open_pair()
    sent = [Chunk(1, i, i * 7, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
    wire = b"".join(a.send(f) for f in sent)
    cuts = data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=30), label="cuts")
    bounds = [0, *sorted(set(cuts)), len(wire)]
    p = opened()
    frames, marker = feed_all(p, [wire[x:y] for x, y in itertools.pairwise(bounds) if x < y])
    assert [normalized(f) for f in frames] == [normalized(f) for f in sent]
    assert marker is CLOSED


def test_goaway_closes_before_eof() -> None:
    p = opened()
    p.receive_data(encode_frame(GoAway(8, "bye"))[0])
    assert p.next_event() == GoAway(8, "bye")
    assert p.next_event() is CLOSED
    assert p.their_state is ProtocolState.CLOSED


def test_eof_at_frame_boundary_is_clean_close() -> None:
    p = opened()
    p.receive_data(b"")
    assert p.next_event() is CLOSED
    assert p.their_state is ProtocolState.CLOSED
    p.receive_data(b"")  # a second EOF is harmless
    assert p.next_event() is CLOSED
    with pytest.raises(LocalProtocolError):
        p.receive_data(b"more")


# --------------------------------------------------------------- hostile input


def _pull(protocol: FrameProtocol) -> None:
    """Drain ``protocol``; only frames, markers or RemoteProtocolError may come out."""
    for _ in range(10_000):
        error: RemoteProtocolError | None = None
        try:
            event = protocol.next_event()
        except RemoteProtocolError as exc:
            error = exc
        except Exception as exc:  # anything else is a bug in the protocol
            pytest.fail(f"next_event raised {type(exc).__name__}: {exc}")
        if error is not None:
            assert protocol.their_state is ProtocolState.ERROR
            assert isinstance(error.error_code, int)
            for _ in range(2):
                with pytest.raises(RemoteProtocolError) as again:
                    protocol.next_event()
                assert again.value is error
            return
        if event is NEED_DATA or event is CLOSED:
            return
        if isinstance(event, BodyStart):
            _answer(protocol, event)
            continue
        assert isinstance(event, Frame)
    pytest.fail("next_event kept returning frames")


def _hostile(protocol: FrameProtocol, data: bytes, pieces: int = 1) -> None:
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        if protocol.their_state is ProtocolState.ERROR:
            return
        protocol.receive_data(data[i : i + step])
        _pull(protocol)
    if protocol.their_state is not ProtocolState.ERROR:
        protocol.receive_data(b"")
        _pull(protocol)
        assert protocol.their_state in (ProtocolState.CLOSED, ProtocolState.ERROR)


@given(data=st.binary(max_size=400), pieces=st.integers(1, 5), handshaken=st.booleans())
def test_random_bytes_only_raise_remote_errors(data: bytes, pieces: int, handshaken: bool) -> None:
    protocol = opened() if handshaken else FrameProtocol()
    _hostile(protocol, data, pieces)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "set"]),
        st.integers(0, 2**16),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, ops: list[tuple[str, int, int]], truncate: int | None) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        i = where % (len(buf) + 1)
        if op == "insert":
            buf.insert(i, value)
        elif buf and i < len(buf):
            if op == "flip":
                buf[i] ^= 1 << (value % 8)
            elif op == "delete":
                del buf[i]
            else:
                buf[i] = value
    if truncate is not None:
        del buf[truncate % (len(buf) + 1) :]
    return bytes(buf)


@given(
    stream=frame_streams(),
    ops=mutations,
    truncate=st.none() | st.integers(0, 2**16),
    pieces=st.integers(1, 4),
)
@at_most(150)
def test_mutated_streams_only_raise_remote_errors(
    stream: tuple[bytes, list[Frame]],
    ops: list[tuple[str, int, int]],
    truncate: int | None,
    pieces: int,
) -> None:
    wire, _ = stream
    bad = mutate(wire, ops, truncate)
    _hostile(FrameProtocol(), bad, pieces)
    # The same bytes after the length prefix of the first frame, straight into
    # decode_head: a frame or RemoteProtocolError, nothing else.
    for body in (bad[4:], bad):
        try:
            decode_head(body)
        except RemoteProtocolError:
            pass
        except Exception as exc:
            pytest.fail(f"decode_head raised {type(exc).__name__}: {exc}")


@given(frame=stream_frames(small_bodies), ops=mutations)
@at_most(150)
def test_mutated_single_frames_after_handshake(
    frame: Frame, ops: list[tuple[str, int, int]]
) -> None:
    head, body = encode_frame(frame)
    bad = mutate(head + (bytes(body) if body is not None else b""), ops, None)
    _hostile(opened(), bad)


def test_error_is_sticky_and_drops_the_buffer() -> None:
    p = opened()
    p.receive_data(raw_frame(cbor2.dumps([0x7F])) + encode_frame(Credit(1, 1))[0])
    with pytest.raises(RemoteProtocolError, match="unknown frame type") as first:
        p.next_event()
    assert p.buffered == 0
    with pytest.raises(RemoteProtocolError) as second:
        p.next_event()
    assert second.value is first.value


# -------------------------------------------------------------- bounded memory


@pytest.mark.parametrize(
    "prefix",
    [b"\xff\xff\xff\xff", U32.pack(0x1_0000_0000 - 1), U32.pack(DEFAULT_MAX_FRAME_SIZE + 1)],
    ids=["ffffffff", "4GiB-1", "max+1"],
)
def test_oversized_length_rejected_on_prefix(prefix: bytes) -> None:
    p = opened()
    for byte in prefix[:3]:
        p.receive_data(bytes([byte]))
        assert p.next_event() is NEED_DATA
        assert p.buffered < 4
    p.receive_data(prefix[3:])
    assert p.buffered == 4
    with pytest.raises(RemoteProtocolError) as info:
        p.next_event()
    assert info.value.error_code == ErrorCode.FRAME_TOO_LARGE
    assert p.buffered == 0


def test_length_limit_follows_max_frame_size() -> None:
    p = opened(max_frame_size=MIN_MAX_FRAME_SIZE)
    p.receive_data(U32.pack(MIN_MAX_FRAME_SIZE))  # exactly the limit: keep waiting
    assert p.next_event() is NEED_DATA
    q = opened(max_frame_size=MIN_MAX_FRAME_SIZE)
    q.receive_data(U32.pack(MIN_MAX_FRAME_SIZE + 1))
    with pytest.raises(RemoteProtocolError) as info:
        q.next_event()
    assert info.value.error_code == ErrorCode.FRAME_TOO_LARGE


def test_frame_of_exactly_max_frame_size_is_accepted() -> None:
    a, b = open_pair(max_frame_size=MIN_MAX_FRAME_SIZE)
    head, _ = encode_frame(Chunk(1, 0, 0, b"x"))
    body = b"\xab" * (MIN_MAX_FRAME_SIZE - (len(head) - 4))
    b.receive_data(a.send(Chunk(1, 0, 0, body)))
    got = b.next_event()
    assert isinstance(got, Chunk)
    assert bytes(got.body) == body
    with pytest.raises(LocalProtocolError, match="peer's limit"):
        a.send(Chunk(1, 0, 0, body + b"!"))


def test_frames_before_hello_are_limited() -> None:
    p = FrameProtocol()
    assert p.receive_limit == HANDSHAKE_FRAME_LIMIT < p.max_frame_size
    p.receive_data(U32.pack(HANDSHAKE_FRAME_LIMIT + 1))
    with pytest.raises(RemoteProtocolError) as info:
        p.next_event()
    assert info.value.error_code == ErrorCode.FRAME_TOO_LARGE
    q = FrameProtocol()
    q.receive_data(U32.pack(HANDSHAKE_FRAME_LIMIT))
    assert q.next_event() is NEED_DATA
    q.receive_data(hello_bytes()[4:5])
    assert q.next_event() is NEED_DATA
    assert q.buffered == 5


def test_large_hello_is_refused() -> None:
    big = Hello(PROTOCOL_VERSION, "s", {}, ["f" * 100] * 700)
    with pytest.raises(LocalProtocolError, match="peer's limit"):
        FrameProtocol().send(big)  # before the peer's HELLO we may send 64 KiB only
    head, _ = encode_frame(big)
    p = FrameProtocol()
    p.receive_data(head)
    with pytest.raises(RemoteProtocolError) as info:
        p.next_event()
    assert info.value.error_code == ErrorCode.FRAME_TOO_LARGE


def test_receive_limit_after_hello() -> None:
    p = opened(max_frame_size=MIN_MAX_FRAME_SIZE * 4)
    assert p.receive_limit == MIN_MAX_FRAME_SIZE * 4


def test_empty_frame_rejected() -> None:
    p = opened()
    p.receive_data(U32.pack(0))
    with pytest.raises(RemoteProtocolError, match="empty frame"):
        p.next_event()


@pytest.mark.parametrize("size", [0, MIN_MAX_FRAME_SIZE - 1, 2**32])
def test_max_frame_size_argument_is_bounded(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        FrameProtocol(max_frame_size=size)


# ------------------------------------------------------------- handshake rules


def test_first_frame_must_be_hello() -> None:
    p = FrameProtocol()
    p.receive_data(encode_frame(Credit(1, 1))[0])
    with pytest.raises(RemoteProtocolError, match="expected HELLO") as info:
        p.next_event()
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR


def test_goaway_instead_of_hello_is_a_refusal() -> None:
    p = FrameProtocol()
    refusal = GoAway(ErrorCode.VERSION_MISMATCH.value, "v1 only")
    p.receive_data(encode_frame(refusal)[0])
    assert p.next_event() == refusal
    assert p.their_state is ProtocolState.CLOSED
    assert p.their_hello is None
    assert p.next_event() is CLOSED


def test_second_hello_rejected() -> None:
    p = opened()
    p.receive_data(hello_bytes())
    with pytest.raises(RemoteProtocolError, match="second HELLO"):
        p.next_event()


@pytest.mark.parametrize("version", [0, 1, PROTOCOL_VERSION + 1, 2**64 - 1])
def test_version_mismatch(version: int) -> None:
    p = FrameProtocol()
    p.receive_data(encode_frame(Hello(version, "future"))[0])
    with pytest.raises(RemoteProtocolError) as info:
        p.next_event()
    assert info.value.error_code == ErrorCode.VERSION_MISMATCH
    assert p.their_hello is None


def test_hello_records_peer_limits() -> None:
    p = FrameProtocol()
    assert p.peer_max_frame_size == HANDSHAKE_FRAME_LIMIT
    p.receive_data(hello_bytes("srv", max_frame_size=1 << 20, window=99))
    hello = p.next_event()
    assert isinstance(hello, Hello)
    assert p.their_hello == hello
    assert hello.limits == {"max_frame_size": 1 << 20, "window": 99}
    assert p.peer_max_frame_size == 1 << 20
    assert p.their_state is ProtocolState.OPEN


def test_missing_max_frame_size_means_the_minimum() -> None:
    p = FrameProtocol()
    p.receive_data(hello_bytes())
    p.next_event()
    assert p.peer_max_frame_size == MIN_MAX_FRAME_SIZE


@pytest.mark.parametrize("announced", [0, MIN_MAX_FRAME_SIZE - 1, 2**32])
def test_out_of_range_peer_max_frame_size(announced: int) -> None:
    p = FrameProtocol()
    p.receive_data(hello_bytes(max_frame_size=announced))
    with pytest.raises(RemoteProtocolError, match="max_frame_size"):
        p.next_event()


def test_hello_helper_announces_our_limit() -> None:
    p = FrameProtocol(max_frame_size=1 << 20)
    hello = p.hello("me", limits={"window": 5}, features=["x"])
    assert hello == Hello(PROTOCOL_VERSION, "me", {"max_frame_size": 1 << 20, "window": 5}, ["x"])


def test_data_after_goaway_rejected() -> None:
    p = opened()
    p.receive_data(encode_frame(GoAway(0))[0] + encode_frame(Credit(1, 1))[0])
    assert isinstance(p.next_event(), GoAway)
    with pytest.raises(RemoteProtocolError, match="after GOAWAY"):
        p.next_event()


def test_partial_bytes_after_goaway_rejected() -> None:
    p = opened()
    p.receive_data(encode_frame(GoAway(0))[0] + b"\x00")
    assert isinstance(p.next_event(), GoAway)
    with pytest.raises(RemoteProtocolError):
        p.next_event()


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_eof_mid_frame(cut: int) -> None:
    p = opened()
    p.receive_data(encode_frame(End(2**40, 2**40))[0][:cut])
    assert p.next_event() is NEED_DATA
    p.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        p.next_event()


def test_send_before_our_hello() -> None:
    p = FrameProtocol()
    for frame in (Ping(1), Credit(1, 1), Data(1, 0, 0, "c", "t")):
        with pytest.raises(LocalProtocolError, match="first frame sent must be HELLO"):
            p.send(frame)
    assert p.our_state is ProtocolState.HANDSHAKE


def test_refuse_with_goaway_instead_of_hello() -> None:
    p = FrameProtocol()
    p.send(GoAway(ErrorCode.VERSION_MISMATCH.value, "v1 only"))
    assert p.our_state is ProtocolState.CLOSED
    with pytest.raises(LocalProtocolError, match="after GOAWAY"):
        p.send(p.hello("late"))


def test_send_hello_twice() -> None:
    p = FrameProtocol()
    p.send(p.hello("me"))
    with pytest.raises(LocalProtocolError, match="already sent"):
        p.send(p.hello("me"))


def test_send_after_goaway() -> None:
    a, _ = open_pair()
    a.send(GoAway(ErrorCode.SHUTDOWN.value, "bye"))
    assert a.our_state is ProtocolState.CLOSED
    for frame in (Ping(1), GoAway(0), Hello(1, "again")):
        with pytest.raises(LocalProtocolError, match="after GOAWAY"):
            a.send(frame)


def test_send_larger_than_peer_limit() -> None:
    a = FrameProtocol()
    a.send(a.hello("a"))
    # Before the peer's HELLO we may only send what the handshake limit allows.
    with pytest.raises(LocalProtocolError, match="peer's limit"):
        a.send(Chunk(1, 0, 0, bytes(HANDSHAKE_FRAME_LIMIT)))
    a.receive_data(hello_bytes(max_frame_size=200_000))
    a.next_event()
    assert a.peer_max_frame_size == 200_000
    a.send(Chunk(1, 0, 0, bytes(HANDSHAKE_FRAME_LIMIT)))
    with pytest.raises(LocalProtocolError, match="peer's limit"):
        a.send(Chunk(1, 0, 0, bytes(200_000)))
    assert a.our_state is ProtocolState.OPEN


def test_send_parts_matches_send() -> None:
    a, _ = open_pair()
    frame = Data(1, 0, 10, "c", "t", {"a": 1}, b"0123456789")
    head, body = a.send_parts(frame)
    assert body is not None
    assert head + bytes(body) == a.send(frame)
    head, body = a.send_parts(Credit(1, 2))
    assert body is None
    assert head == a.send(Credit(1, 2))


def test_frame_type_numbers_are_stable() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0x01,
        "GOAWAY": 0x02,
        "PING": 0x03,
        "PONG": 0x04,
        "DATA": 0x10,
        "CHUNK": 0x11,
        "REPLY": 0x12,
        "END": 0x13,
        "ABORT": 0x14,
        "DONE": 0x15,
        "CREDIT": 0x16,
    }
    assert {c.name: int(c) for c in ErrorCode} == {
        "NO_ERROR": 0,
        "PROTOCOL_ERROR": 1,
        "FRAME_TOO_LARGE": 2,
        "VERSION_MISMATCH": 3,
        "DUPLICATE_SITE": 4,
        "INTERNAL_ERROR": 5,
        "HANDSHAKE_TIMEOUT": 6,
        "HEARTBEAT_TIMEOUT": 7,
        "SHUTDOWN": 8,
        "IDENTITY_MISMATCH": 9,
    }


# ------------------------------------------------------------ stateful model


class SenderReceiver(RuleBasedStateMachine):
    """A sends to B over a byte pipe that delivers arbitrary prefixes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = FrameProtocol()
        self.b = FrameProtocol()
        self.pending = b""
        self.sent: list[Frame] = []
        self.sent_sizes: list[int] = []
        self.received: list[Frame] = []
        self.saw_closed = False

    def _send(self, frame: Frame) -> None:
        data = self.a.send(frame)
        self.pending += data
        self.sent.append(frame)
        self.sent_sizes.append(len(data))

    @initialize(hello=hellos())
    def handshake(self, hello: Hello) -> None:
        # B's HELLO reaches A, so A may send frames up to B's max_frame_size.
        self.a.receive_data(self.b.send(self.b.hello("b")))
        assert isinstance(self.a.next_event(), Hello)
        self._send(hello)

    @precondition(lambda self: self.a.our_state is ProtocolState.OPEN)
    @rule(frame=stream_frames(small_bodies))
    def send_frame(self, frame: Frame) -> None:
        self._send(frame)

    @precondition(lambda self: self.a.our_state is ProtocolState.OPEN)
    @rule(goaway=goaways)
    def send_goaway(self, goaway: GoAway) -> None:
        self._send(goaway)
        assert self.a.our_state is ProtocolState.CLOSED

    @precondition(lambda self: self.a.our_state is ProtocolState.CLOSED)
    @rule(frame=stream_frames(small_bodies))
    def send_after_goaway_fails(self, frame: Frame) -> None:
        with pytest.raises(LocalProtocolError):
            self.a.send(frame)

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.pending)), label="deliver")
        piece, self.pending = self.pending[:n], self.pending[n:]
        if piece:  # b"" would mean EOF
            self.b.receive_data(piece)
        frames, marker = drain(self.b)
        self.received += frames
        self.saw_closed = self.saw_closed or marker is CLOSED

    @invariant()
    def b_yields_a_prefix_of_what_a_sent(self) -> None:
        got = [normalized(f) for f in self.received]
        assert got == [normalized(f) for f in self.sent[: len(got)]]
        # Every byte is either still in the pipe or buffered in B, and B never
        # holds a whole frame it has not returned.
        outstanding = self.sent_sizes[len(self.received) :]
        assert self.b.buffered + len(self.pending) == sum(outstanding)
        if outstanding:
            assert self.b.buffered < outstanding[0]
        if self.saw_closed:
            assert isinstance(self.received[-1], GoAway)

    def teardown(self) -> None:
        if self.pending:
            self.b.receive_data(self.pending)
        self.pending = b""
        frames, marker = drain(self.b)
        self.received += frames
        if marker is NEED_DATA:
            self.b.receive_data(b"")
            frames, marker = drain(self.b)
            self.received += frames
        assert marker is CLOSED
        assert [normalized(f) for f in self.received] == [normalized(f) for f in self.sent]
        assert self.b.their_state is ProtocolState.CLOSED


SenderReceiver.TestCase.settings = at_most(50, stateful_step_count=20)
TestSenderReceiver = SenderReceiver.TestCase


# ------------------------------------------------------------ receiving in place


class _Targets:
    """Answers each :class:`BodyStart`: declines the frames listed, gives the
    rest a buffer of their own, and records what it was asked."""

    def __init__(self, decline: set[int]) -> None:
        self.decline = decline
        self.asked: list[int] = []
        self.given: dict[int, bytearray] = {}

    def drain(self, p: FrameProtocol) -> tuple[list[Frame], Any]:
        frames: list[Frame] = []
        while True:
            event = p.next_event()
            if isinstance(event, BodyStart):
                seq = event.frame.seq  # type: ignore[attr-defined]
                assert event.frame.body == b""  # type: ignore[attr-defined]
                self.asked.append(seq)
                if seq not in self.decline:
                    self.given[seq] = bytearray(event.length)
                    p.receive_body_into(memoryview(self.given[seq]))
                continue
            if not isinstance(event, Frame):
                return frames, event
            frames.append(event)


def _feed_in_two(p: FrameProtocol, targets: _Targets, wire: bytes, cut: int) -> list[Frame]:
    """Feed one frame in two pieces, draining after each."""
    p.receive_data(wire[:cut])
    first, marker = targets.drain(p)
    assert marker is NEED_DATA
    p.receive_data(wire[cut:])
    rest, marker = targets.drain(p)
    assert marker is NEED_DATA
    return first + rest


@pytest.mark.parametrize("use_get_buffer", [False, True])
def test_a_declined_body_start_applies_to_that_frame_only(use_get_buffer: bool) -> None:
    """After one large frame is staged (its body could not be received in
    place), the next large frames are received in place again."""
    p = opened()
    targets = _Targets(decline={0})
    p.announce_bodies = True
    sender = FrameProtocol()
    sender.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
    sender.our_state = ProtocolState.OPEN
    bodies = [bytes([seq + 1]) * (200_000 + seq) for seq in range(3)]
    frames: list[Frame] = []
    for seq, body in enumerate(bodies):
        wire = sender.send(Chunk(7, seq, 0, body))
        if use_get_buffer:
            # A transport receiving straight into the protocol's buffers.
            for start in range(0, len(wire), 70_000):
                piece = wire[start : start + 70_000]
                with p.get_buffer(len(piece)) as buf:
                    n = min(len(buf), len(piece))
                    buf[:n] = piece[:n]
                p.buffer_updated(n)
                if n < len(piece):
                    p.receive_data(piece[n:])
                got, marker = targets.drain(p)
                frames += got
                assert marker is NEED_DATA
        else:
            frames += _feed_in_two(p, targets, wire, 1000)
    assert [bytes(f.body) for f in frames] == bodies  # type: ignore[attr-defined]
    assert targets.asked == [0, 1, 2]
    for seq in (1, 2):
        body = frames[seq].body  # type: ignore[attr-defined]
        assert body.obj is targets.given[seq], f"frame {seq} was staged, not received in place"
    assert p.buffered == 0


# ------------------------------------------------------------ fuzzing byte by byte


def test_body_start_is_announced_only_when_asked_for_and_answered_at_once() -> None:
    sender = FrameProtocol()
    sender.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
    sender.our_state = ProtocolState.OPEN
    body = bytes(range(256)) * 1000
    wire = sender.send(Reply(9, 4, len(body), True, body))
    # Without announce_bodies: frames only.
    quiet = opened()
    quiet.receive_data(wire[:5000])
    assert quiet.next_event() is NEED_DATA
    quiet.receive_data(wire[5000:])
    assert bytes(quiet.next_event().body) == body  # type: ignore[union-attr]
    p = opened()
    p.announce_bodies = True
    p.receive_data(wire[:5000])
    start = p.next_event()
    assert isinstance(start, BodyStart)
    assert start.frame == Reply(9, 4, len(body), True, b"")
    assert start.length == len(body)
    with pytest.raises(LocalProtocolError, match="body size"):
        p.receive_body_into(memoryview(bytearray(10)))
    with pytest.raises(LocalProtocolError, match="body size"):
        p.receive_body_into(memoryview(bytes(len(body))))  # read-only
    target = bytearray(len(body))
    p.receive_body_into(memoryview(target))
    assert p.next_event() is NEED_DATA
    with p.get_buffer() as buf:
        assert len(buf) == len(wire) - 5000  # the rest of the target
        buf[:] = wire[5000:]
    p.buffer_updated(len(wire) - 5000)
    frame = p.next_event()
    assert isinstance(frame, Reply)
    assert frame.body.obj is target  # type: ignore[union-attr]
    assert target == body
    # An unanswered BodyStart is staged once more bytes come (never offered twice).
    p.receive_data(wire[:5000])
    assert isinstance(p.next_event(), BodyStart)
    assert p.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError, match="no body"):
        p.receive_body_into(memoryview(bytearray(len(body))))
    p.receive_data(wire[5000:])
    assert bytes(p.next_event().body) == body  # type: ignore[union-attr]


def _answer(protocol: FrameProtocol, start: BodyStart) -> None:
    if start.length % 3 == 0:
        event("a body start was declined")
        return
    event("a body start was answered")
    protocol.receive_body_into(memoryview(bytearray(start.length)))


@st.composite
def garbage(draw: st.DrawFn, handshaken: bool) -> bytes:
    """Random bytes, sometimes after a valid HELLO, and sometimes a large
    frame's valid head followed by garbage (its body goes to a target)."""
    hello = not handshaken and draw(st.booleans())
    data = hello_bytes(max_frame_size=DEFAULT_MAX_FRAME_SIZE) if hello else b""
    if draw(st.booleans()):
        ftype = draw(st.sampled_from([0x11, 0x12, 0x16]))
        fields = draw(st.lists(st.integers(0, 2**64 - 1), min_size=3, max_size=3))
        if ftype == 0x12:
            fields.append(draw(st.booleans()))
        data += U32.pack(draw(st.integers(64 * 1024, 1024 * 1024))) + cbor2.dumps([ftype, *fields])
        return data + draw(st.binary(min_size=64, max_size=300))
    return data + draw(st.binary(max_size=300))


@given(
    handshaken=st.booleans(), via_buffer=st.booleans(), with_target=st.booleans(), draw=st.data()
)
@at_most(300)
def test_garbage_fed_byte_by_byte_only_raises_remote_errors(
    handshaken: bool, via_buffer: bool, with_target: bool, draw: st.DataObject
) -> None:
    """h11's rule: whatever the peer sends, the protocol raises
    RemoteProtocolError and nothing else, one byte at a time too."""
    data = draw.draw(garbage(handshaken), label="data")
    protocol = opened() if handshaken else FrameProtocol()
    protocol.announce_bodies = with_target
    for byte in data:
        if protocol.their_state is ProtocolState.ERROR:
            return
        if via_buffer:
            with protocol.get_buffer(1) as buf:
                buf[0] = byte
            protocol.buffer_updated(1)
        else:
            protocol.receive_data(bytes([byte]))
        _pull(protocol)
    if protocol.their_state is not ProtocolState.ERROR:
        protocol.receive_data(b"")
        _pull(protocol)
        assert protocol.their_state in (ProtocolState.CLOSED, ProtocolState.ERROR)


def _decode_by_spec(data: bytes) -> Any:
    """A frame decoded through the field specs alone (no shortcut for the
    per-object frames), or the RemoteProtocolError that path raises."""
    from fedstream._wire._protocol import _check_semantics, _parse_head

    try:
        cls, kwargs, head_len = _parse_head(data, len(data))
        if head_len < len(data):
            kwargs["body"] = memoryview(data)[head_len:]
        frame = cls(**kwargs)
        _check_semantics(frame, RemoteProtocolError)
    except RemoteProtocolError as exc:
        return RemoteProtocolError, str(exc)
    return frame


def _decode(data: bytes) -> Any:
    try:
        return decode_head(data)
    except RemoteProtocolError as exc:
        return RemoteProtocolError, str(exc)


@given(stream_frames(), st.data())
def test_per_object_frames_decode_as_their_field_specs_say(frame: Any, data: st.DataObject) -> None:
    """DATA, CHUNK, REPLY and CREDIT heads are read by a shortcut: it gives the
    same frame, or the same error, as the field specs for any head, including
    one with a field of the wrong type, an extra field, a body longer than
    its size or bytes after a CREDIT."""
    head, body = encode_frame(frame)
    encoded = head[4:] + (bytes(body) if body is not None else b"")
    fields = cbor2.loads(head[4:])
    mutate = data.draw(st.sampled_from(["none", "field", "extra", "tail"]))
    if mutate == "field":
        index = data.draw(st.integers(1, len(fields) - 1))
        fields[index] = data.draw(st.sampled_from([None, True, "x", 2**64, -1, 1.5]))
    elif mutate == "extra":
        fields.append(data.draw(st.sampled_from([0, None, "x"])))
    if mutate != "none":
        tail = bytes(body) if body is not None else b""
        if mutate == "tail":
            tail += data.draw(st.binary(min_size=1, max_size=8))
        encoded = cbor2.dumps(fields) + tail
    assert _decode(encoded) == _decode_by_spec(encoded)


def test_the_per_object_frames_take_the_shortcut() -> None:
    from fedstream._wire._protocol import _hot_frame, _loads_simple

    for frame in (
        Data(1, 0, 10, "ch", "t", None, b"abc"),
        Chunk(1, 0, 3, b"defg"),
        Reply(2, 0, 5, True, b"ok"),
        Credit(1, 4096),
    ):
        head, body = encode_frame(frame)
        encoded = head[4:] + (bytes(body) if body is not None else b"")
        simple = _loads_simple(encoded)
        assert simple is not None
        assert _hot_frame(simple[0], simple[1], encoded) == frame
