"""Frame records <-> bytes: round trips, field validation and strict CBOR.

These tests drive ``encode_frame``/``decode_head`` directly and through a
connected pair of ``FrameProtocol``s. Connection-state rules live in
``test_wire_protocol.py``.
"""

from __future__ import annotations

import array
import re
import struct
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedstream._errors import LocalProtocolError, RemoteProtocolError
from fedstream._wire import (
    FRAME_TYPES,
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
    FrameType,
    GoAway,
    Hello,
    Ping,
    Pong,
    ProtocolState,
    Reply,
    _protocol,
    decode_head,
    encode_frame,
)
from fedstream._wire._protocol import MAX_HEAD_DEPTH
from strategies import (
    FRAME_STRATEGIES,
    U64_MAX,
    at_most,
    hellos,
    normalized,
    open_pair,
    stream_frames,
    uints,
)

ALL_FRAME_CLASSES = sorted(FRAME_TYPES.values(), key=lambda cls: cls.TYPE)
BODY_CLASSES = [cls for cls in ALL_FRAME_CLASSES if cls.HAS_BODY]


def wire(frame: Frame) -> bytes:
    head, body = encode_frame(frame)
    return head if body is None else head + bytes(body)


def raw_frame(head: bytes, tail: bytes = b"") -> bytes:
    """A length-prefixed frame built from raw head bytes (for hostile input)."""
    return struct.pack(">I", len(head) + len(tail)) + head + tail


def receiver() -> FrameProtocol:
    """A protocol that has seen a valid peer HELLO and waits for the next frame."""
    _, b = open_pair()
    return b


def receive_one(data: bytes) -> Any:
    p = receiver()
    p.receive_data(data)
    return p.next_event()


DATA_HEAD = [int(FrameType.DATA), 1, 0, 5, "chan", "topic"]


def test_every_frame_type_has_a_strategy() -> None:
    assert set(FRAME_STRATEGIES) == set(FRAME_TYPES.values())
    assert {int(t) for t in FrameType} == set(FRAME_TYPES)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("cls", ALL_FRAME_CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
@at_most(40)
def test_round_trip_through_protocols(cls: type[Frame], data: st.DataObject) -> None:
    frame = data.draw(FRAME_STRATEGIES[cls])
    if isinstance(frame, Hello):
        a, b = FrameProtocol(), FrameProtocol()
    else:
        a, b = open_pair()
    b.receive_data(a.send(frame))
    got = b.next_event()
    assert type(got) is cls
    assert normalized(got) == normalized(frame)
    if cls.HAS_BODY:
        assert bytes(got.body) == bytes(frame.body)  # type: ignore[attr-defined]
    if isinstance(frame, GoAway):
        assert b.their_state is ProtocolState.CLOSED
    else:
        assert b.next_event() is NEED_DATA


@given(frame=st.one_of(*FRAME_STRATEGIES.values(), hellos(version=uints)))
def test_encode_frame_decode_head_round_trip(frame: Frame) -> None:
    head, body = encode_frame(frame)
    (length,) = struct.unpack_from(">I", head)
    payload = head[4:] + (bytes(body) if body is not None else b"")
    assert length == len(payload)
    assert normalized(decode_head(payload)) == normalized(frame)
    # Encoding is deterministic: the decoded record encodes to the same bytes.
    assert wire(decode_head(payload)) == head + (bytes(body) if body is not None else b"")


@pytest.mark.parametrize(
    "frame",
    [
        Data(0, 0, 0, "", "", None),
        Data(U64_MAX, U64_MAX, U64_MAX, "\U0001f680", "\u6a21\u578b", {"k": None}, b"x"),
        Chunk(U64_MAX, 0, U64_MAX, b""),
        Reply(0, U64_MAX, 0, True),
        End(U64_MAX, 0),
        Credit(0, U64_MAX),
        Ping(0),
        Pong(U64_MAX),
        Abort(1, "TASK_ABORTED", "\u00e9chec", "site-\u00e9"),
        Done(2, "OK", None),
        Done(2, "OK", {"nested": [1, {"x": b"y"}], "f": 1.5}),
        GoAway(U64_MAX, ""),
    ],
    ids=repr,
)
def test_edge_values_round_trip(frame: Frame) -> None:
    a, b = open_pair()
    b.receive_data(a.send(frame))
    assert normalized(b.next_event()) == normalized(frame)


def test_ctx_none_and_empty_map_are_distinct() -> None:
    a, b = open_pair()
    b.receive_data(a.send(Data(1, 0, 0, "c", "t", None)))
    b.receive_data(a.send(Data(1, 0, 0, "c", "t", {})))
    first, second = b.next_event(), b.next_event()
    assert isinstance(first, Data)
    assert isinstance(second, Data)
    assert first.ctx is None
    assert second.ctx == {}


@pytest.mark.parametrize("cls", BODY_CLASSES, ids=lambda c: c.__name__)
def test_large_body_round_trip(cls: type[Frame]) -> None:
    body = bytes(range(251)) * (6 * 1024 * 1024 // 251)
    frame: Frame
    if cls is Data:
        frame = Data(3, 7, len(body) + 10, "c", "t", {"k": 1}, body)
    elif cls is Chunk:
        frame = Chunk(3, 7, 123, body)
    else:
        frame = Reply(3, 7, len(body), False, body)
    a, b = open_pair()
    head, view = a.send_parts(frame)
    assert view is not None
    assert view.obj is body  # the body is not copied on the way out
    b.receive_data(head)
    assert b.next_event() is NEED_DATA
    b.receive_data(view)
    got = b.next_event()
    assert bytes(got.body) == body  # type: ignore[attr-defined]
    assert normalized(got) == normalized(frame)


@pytest.mark.parametrize(
    "body",
    [bytearray(b"abc"), memoryview(b"abc"), memoryview(bytearray(b"xabcx"))[1:4]],
    ids=["bytearray", "memoryview", "sliced-memoryview"],
)
def test_bytes_like_bodies(body: Any) -> None:
    a, b = open_pair()
    b.receive_data(a.send(Chunk(1, 0, 0, body)))
    got = b.next_event()
    assert isinstance(got, Chunk)
    assert bytes(got.body) == b"abc"


def test_received_body_is_a_view_of_the_frame() -> None:
    a, b = open_pair()
    b.receive_data(a.send(Reply(1, 0, 4, False, b"\x00\x01\x02\x03")))
    got = b.next_event()
    assert isinstance(got, Reply)
    assert isinstance(got.body, memoryview)
    assert got.body.tobytes() == b"\x00\x01\x02\x03"


# ------------------------------------------------------------ send-side checks


def _nested_list(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "frame",
    [
        Ping(True),
        Ping(-1),
        Ping(2**64),
        Ping(1.0),  # type: ignore[arg-type]
        Credit(1, False),
        End(-1, 0),
        Data(1, -1, 0, "c", "t"),
        Data(1, 0, 0, b"c", "t"),  # type: ignore[arg-type]
        Data(1, 0, 0, "c", "t", {1: "x"}),  # type: ignore[dict-item]
        Data(1, 0, 0, "c", "t", {"k": object()}),
        Data(1, 0, 0, "c", "t", []),  # type: ignore[arg-type]
        Data(1, 0, 2, "c", "t", None, b"abc"),  # body longer than size
        Reply(1, 0, 0, 1),  # type: ignore[arg-type]
        Reply(1, 0, 2, False, b"abc"),
        Abort(1, None),  # type: ignore[arg-type]
        Done(1, 5),  # type: ignore[arg-type]
        GoAway("x"),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_send_rejects_invalid_fields(frame: Frame) -> None:
    a, _ = open_pair()
    with pytest.raises(LocalProtocolError):
        a.send(frame)
    with pytest.raises(LocalProtocolError):
        encode_frame(frame)
    # A rejected frame does not change the connection state.
    assert a.our_state is ProtocolState.OPEN


@pytest.mark.parametrize(
    "hello",
    [
        Hello(PROTOCOL_VERSION, ""),
        Hello(PROTOCOL_VERSION, "s", {"window": -1}),
        Hello(PROTOCOL_VERSION, "s", {"window": True}),
        Hello(PROTOCOL_VERSION, "s", {1: 2}),  # type: ignore[dict-item]
        Hello(PROTOCOL_VERSION, "s", {}, [1]),  # type: ignore[list-item]
        Hello(PROTOCOL_VERSION, "s", [], []),  # type: ignore[arg-type]
        Hello(-1, "s"),
    ],
    ids=repr,
)
def test_send_rejects_invalid_hello(hello: Hello) -> None:
    p = FrameProtocol()
    with pytest.raises(LocalProtocolError):
        p.send(hello)
    assert p.our_state is ProtocolState.HANDSHAKE


def test_error_codes_may_be_sent_as_enum_members() -> None:
    a, b = open_pair()
    b.receive_data(a.send(GoAway(ErrorCode.SHUTDOWN, "bye")))
    got = b.next_event()
    assert got == GoAway(int(ErrorCode.SHUTDOWN), "bye")


def test_typed_memoryview_body_is_measured_in_bytes() -> None:
    words = memoryview(array.array("i", [1, 2, 3, 4]))  # 16 bytes, 4 items
    a, b = open_pair()
    with pytest.raises(LocalProtocolError, match="exceeds its size"):
        a.send(Data(1, 0, 4, "c", "t", None, words))
    b.receive_data(a.send(Data(1, 0, 16, "c", "t", None, words)))
    got = b.next_event()
    assert isinstance(got, Data)
    assert bytes(got.body) == words.tobytes()


def test_non_contiguous_body_is_sent() -> None:
    a, b = open_pair()
    b.receive_data(a.send(Chunk(1, 0, 0, memoryview(b"a-c-e-")[::2])))
    got = b.next_event()
    assert isinstance(got, Chunk)
    assert bytes(got.body) == b"ace"


@pytest.mark.parametrize(
    "frame",
    [
        Data(1, 0, 0, "c", "t", {"k": _nested_list(MAX_HEAD_DEPTH - 1)}),
        Done(1, "OK", _nested_list(MAX_HEAD_DEPTH)),
        Data(1, 0, 0, "c", "t", {"k": re.compile("x")}),
        Hello(PROTOCOL_VERSION, "s", {"max_frame_size": 10}),
    ],
    ids=["deep ctx", "deep result", "regex in ctx", "tiny max_frame_size"],
)
def test_send_refuses_what_the_peer_would_reject(frame: Frame) -> None:
    """A frame that ``send`` accepts must be accepted by a conforming receiver."""
    sender = FrameProtocol() if isinstance(frame, Hello) else open_pair()[0]
    try:
        data = sender.send(frame)
    except LocalProtocolError:
        return
    receiver_ = FrameProtocol() if isinstance(frame, Hello) else receiver()
    receiver_.receive_data(data)
    receiver_.next_event()


def test_local_errors_are_value_errors() -> None:
    a, _ = open_pair()
    with pytest.raises(ValueError, match=r"Ping\.opaque"):
        a.send(Ping(-5))


# --------------------------------------------------------- receive-side checks


@given(
    frame=stream_frames(),
    extra=st.lists(
        st.one_of(uints, st.text(max_size=5), st.none(), st.binary(max_size=5)),
        min_size=1,
        max_size=3,
    ),
)
@at_most(50)
def test_extra_trailing_head_fields_are_ignored(frame: Frame, extra: list[Any]) -> None:
    head_bytes, body = encode_frame(frame)
    head = cbor2.loads(head_bytes[4:])
    tail = bytes(body) if body is not None else b""
    got = receive_one(raw_frame(cbor2.dumps([*head, *extra]), tail))
    assert normalized(got) == normalized(frame)


@pytest.mark.parametrize(
    "head",
    [
        [],
        {"type": 1},
        "DATA",
        [0x7F, 1, 2],
        [0x00],
        [2**64 - 1],
        [-1],
        [True, 1, "s", {}, []],
        [1.0, 1, "s", {}, []],
        [str(int(FrameType.PING)), 1],
        [[int(FrameType.PING)], 1],
        [{}, 1],
        [None, 1],
    ],
    ids=repr,
)
def test_unknown_or_malformed_frame_type_is_rejected(head: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_head(cbor2.dumps(head))
    with pytest.raises(RemoteProtocolError):
        receive_one(raw_frame(cbor2.dumps(head)))


@pytest.mark.parametrize(
    "head",
    [
        [int(FrameType.PING)],  # missing field
        [int(FrameType.PING), -1],
        [int(FrameType.PING), 2**64],  # a bignum, above u64
        [int(FrameType.PING), True],
        [int(FrameType.PING), 1.0],
        [int(FrameType.PING), None],  # opaque is not nullable
        [int(FrameType.END), 1, "3"],
        [int(FrameType.REPLY), 1, 0, 0, 1],  # last must be a bool
        [int(FrameType.ABORT), 1, b"OK", "", ""],
        [*DATA_HEAD, []],
        [*DATA_HEAD, {1: 2}],
        [*DATA_HEAD, {b"k": 2}],
        [int(FrameType.DATA), 1, 0, 5, None, "topic", None],
        [int(FrameType.HELLO), 1, "", {}, []],
        [int(FrameType.HELLO), 1, "s", {"window": -1}, []],
        [int(FrameType.HELLO), 1, "s", {"window": "big"}, []],
        [int(FrameType.HELLO), 1, "s", {}, [1]],
        [int(FrameType.HELLO), 1, "s", None, []],
        [int(FrameType.GOAWAY), 0, None],
    ],
    ids=repr,
)
def test_wrong_field_types_are_rejected(head: list[Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_head(cbor2.dumps(head))


def test_body_longer_than_size_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds its size"):
        decode_head(cbor2.dumps([*DATA_HEAD, None]) + b"123456")
    with pytest.raises(RemoteProtocolError, match="exceeds its size"):
        decode_head(cbor2.dumps([int(FrameType.REPLY), 1, 0, 1, False]) + b"12")


@pytest.mark.parametrize(
    "frame",
    [
        Ping(1),
        Pong(2),
        End(1, 2),
        Credit(1, 5),
        Abort(1, "ERROR"),
        Done(1, "OK"),
        GoAway(0),
        Hello(1, "s"),
    ],
    ids=repr,
)
def test_trailing_bytes_after_bodyless_head_are_rejected(frame: Frame) -> None:
    head, _ = encode_frame(frame)
    with pytest.raises(RemoteProtocolError, match="unexpected bytes"):
        decode_head(head[4:] + b"\x00")


def test_bodyless_frame_with_exact_head_is_accepted() -> None:
    head, body = encode_frame(Credit(1, 5))
    assert body is None
    assert decode_head(head[4:]) == Credit(1, 5)


# ----------------------------------------------------------------- strict CBOR


def _map_item(key: bytes, value: bytes) -> bytes:
    return b"\xa1" + key + value


#: A DATA head up to (not including) its ctx field: append one CBOR item.
DATA_PREFIX = b"\x87" + b"".join(cbor2.dumps(v) for v in DATA_HEAD)

STRICT_CBOR_CASES = {
    "indefinite head": b"\x9f" + cbor2.dumps(int(FrameType.PING)) + b"\x01\xff",
    "indefinite array": DATA_PREFIX + _map_item(b"\x61k", b"\x9f\x01\xff"),
    "indefinite map": DATA_PREFIX + b"\xbf\x61k\x01\xff",
    "indefinite text": DATA_PREFIX + _map_item(b"\x61k", b"\x7f\x61a\xff"),
    "indefinite bytes": DATA_PREFIX + _map_item(b"\x61k", b"\x5f\x41a\xff"),
    "duplicate ctx key": DATA_PREFIX + b"\xa2\x61k\x01\x61k\x02",
    "duplicate nested key": DATA_PREFIX + _map_item(b"\x61k", b"\xa2\x01\x01\x01\x02"),
    "duplicate limits key": b"\x85\x01\x01\x61s\xa2\x61w\x01\x61w\x02\x80",
    "truncated": cbor2.dumps([int(FrameType.END), 1, 2])[:-1],
    "invalid utf-8": b"\x85\x01\x01\x62\xc3\x28\xa0\x80",
    "break outside container": b"\xff",
    "reserved additional info": b"\x82\x03\x1c",
}
for _tag in (25, 28, 29, 35, 256):
    STRICT_CBOR_CASES[f"tag {_tag} in ctx"] = DATA_PREFIX + _map_item(
        b"\x61k", cbor2.dumps(cbor2.CBORTag(_tag, 0 if _tag in (25, 29) else "x"))
    )
STRICT_CBOR_CASES["tag 28 in DONE result"] = cbor2.dumps(
    [int(FrameType.DONE), 1, "OK", cbor2.CBORTag(28, [1])]
)


@pytest.mark.parametrize("head", list(STRICT_CBOR_CASES.values()), ids=list(STRICT_CBOR_CASES))
def test_strict_cbor_rejections(head: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_head(head)
    p = receiver()
    p.receive_data(raw_frame(head))
    with pytest.raises(RemoteProtocolError) as info:
        p.next_event()
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR
    assert p.their_state is ProtocolState.ERROR


def test_strict_cases_are_otherwise_well_formed() -> None:
    """The tag cases differ from an accepted frame only by the tag number."""
    ok = DATA_PREFIX + _map_item(b"\x61k", cbor2.dumps(cbor2.CBORTag(6, "x")))
    frame = decode_head(ok)
    assert isinstance(frame, Data)
    assert frame.ctx == {"k": cbor2.CBORTag(6, "x")}


def _tags(tag: int, depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = cbor2.CBORTag(tag, value)
    return value


def test_nesting_bound() -> None:
    # The head array is level 1 and ctx level 2, so ctx values may nest
    # MAX_HEAD_DEPTH - 2 more containers (tags count as levels too).
    ok = [*DATA_HEAD, {"k": _nested_list(MAX_HEAD_DEPTH - 2)}]
    assert decode_head(cbor2.dumps(ok)) == Data(*ok[1:])
    too_deep = [*DATA_HEAD, {"k": _nested_list(MAX_HEAD_DEPTH - 1)}]
    with pytest.raises(RemoteProtocolError, match="depth"):
        decode_head(cbor2.dumps(too_deep))
    done_prefix = b"\x84" + cbor2.dumps(int(FrameType.DONE)) + b"\x01\x62OK"
    assert decode_head(done_prefix + b"\xc6" * (MAX_HEAD_DEPTH - 1) + b"\x00") == Done(
        1, "OK", _tags(6, MAX_HEAD_DEPTH - 1)
    )
    with pytest.raises(RemoteProtocolError, match="depth"):
        decode_head(done_prefix + b"\xc6" * MAX_HEAD_DEPTH + b"\x00")


def test_deep_nesting_does_not_recurse() -> None:
    head = DATA_PREFIX + _map_item(b"\x61k", b"\x81" * 60_000 + b"\x00")
    with pytest.raises(RemoteProtocolError):
        decode_head(head)


# ----------------------------------------------------- no allocation from lengths

HUGE_ITEMS = {
    "bytes 4 GiB": b"\x5a\xff\xff\xff\xff",
    "bytes 2**64-1": b"\x5b" + b"\xff" * 8,
    "text 4 GiB": b"\x7a\xff\xff\xff\xff",
    "array 2**32": b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",
    "map 2**64-1": b"\xbb" + b"\xff" * 8,
}


@pytest.mark.parametrize("item", list(HUGE_ITEMS.values()), ids=list(HUGE_ITEMS))
def test_huge_declared_cbor_lengths_do_not_allocate(item: bytes) -> None:
    head = DATA_PREFIX + _map_item(b"\x61k", item) + b"\x00" * 64
    frame_bytes = raw_frame(head)
    p = receiver()
    tracemalloc.start()
    try:
        p.receive_data(frame_bytes)
        with pytest.raises(RemoteProtocolError):
            p.next_event()
        with pytest.raises(RemoteProtocolError):
            decode_head(head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@given(frame=st.one_of(*(FRAME_STRATEGIES[cls] for cls in (Data, Chunk, Reply, Credit))))
def test_hot_frame_shortcut_encodes_like_the_checked_path(frame: Frame) -> None:
    """DATA/CHUNK/REPLY/CREDIT skip the per-field spec walk; the bytes must not change."""
    assert encode_frame(frame) == _protocol._encode_checked(frame)


@pytest.mark.parametrize(
    "frame",
    [
        Chunk(-1, 0, 0, b""),
        Chunk(1, 2**64, 0, b""),
        Reply(1, 0, 0, 1, b""),  # type: ignore[arg-type]
        Data(1, 0, 0, "c", 5, None),  # type: ignore[arg-type]
        Data(1, 0, 2, "c", "t", None, b"too long"),
        Credit(1, -5),
        Credit(1, True),
    ],
    ids=repr,
)
def test_hot_frame_shortcut_still_refuses_invalid_fields(frame: Frame) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(frame)


_simple_items = st.one_of(
    st.integers(0, U64_MAX),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.integers(-(2**63), -1),
    st.binary(max_size=4),
)


@given(
    items=st.lists(_simple_items, min_size=1, max_size=24),
    tail=st.binary(max_size=8),
    cut=st.integers(0, 64),
)
def test_simple_head_reader_agrees_with_the_strict_decoder(
    items: list[Any], tail: bytes, cut: int
) -> None:
    """The shortcut for plain heads decodes exactly what the strict decoder does, or declines."""
    encoded = cbor2.dumps(items) + tail
    for data in (encoded, encoded[: max(1, len(encoded) - cut)]):
        simple = _protocol._loads_simple(data)
        if simple is None:
            continue
        assert simple == _protocol._loads_strict(data, max_depth=MAX_HEAD_DEPTH)


@given(data=st.binary(min_size=1, max_size=64).map(lambda b: bytes([0x81 + b[0] % 23]) + b[1:]))
def test_simple_head_reader_on_arbitrary_bytes(data: bytes) -> None:
    simple = _protocol._loads_simple(data)
    if simple is not None:
        assert simple == _protocol._loads_strict(data, max_depth=MAX_HEAD_DEPTH)


def test_simple_head_reader_declines_what_it_does_not_know() -> None:
    assert _protocol._loads_simple(cbor2.dumps([1, {"a": 1}])) is None
    assert _protocol._loads_simple(cbor2.dumps([1, -1])) is None
    assert _protocol._loads_simple(b"\x82\x01\x62\xff\xfe") is None  # invalid UTF-8
    assert _protocol._loads_simple(b"\x83\x01\x02") is None  # truncated
    assert _protocol._loads_simple(b"\x9f\x01\xff") is None  # indefinite
    assert _protocol._loads_simple(b"\x82\x01\x18\x05") == ([1, 5], 4)  # not shortest: as cbor2


def test_hot_frame_with_unencodable_text_raises_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(Data(1, 1, 0, "\ud800", "t", None, b""))


def test_decode_head_accepts_a_memoryview() -> None:
    head, body = encode_frame(Data(1, 2, 3, "chan", "topic", None, b"abc"))
    frame = decode_head(memoryview(head[4:] + bytes(body or b"")))  # type: ignore[arg-type]
    assert isinstance(frame, Data)
    assert (frame.channel, frame.topic, bytes(frame.body)) == ("chan", "topic", b"abc")
