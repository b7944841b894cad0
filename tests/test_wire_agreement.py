"""The object encoder refuses exactly what the decoder refuses.

``encode_object`` must succeed if and only if ``decode_object`` accepts the
encoding and gives the value back; when it refuses, the error names the key
path and the type, and the encoding it would have produced without its
check is one a receiver refuses (``BAD_REQUEST_DATA`` on a site).
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import math
import re
import struct
import uuid
from collections.abc import Mapping
from typing import Any
from unittest import mock

import cbor2
import pytest
import trio
from hypothesis import event, given
from hypothesis import strategies as st

import fedstream
from engine_helpers import (
    CHANNEL,
    TOPIC,
    AsyncRecordingProducer,
    Recorder,
    make_factory,
)
from fedstream import ReturnCode, Shareable
from fedstream._errors import LocalProtocolError, RemoteProtocolError
from fedstream._wire import (
    OUT_OF_BAND_MIN,
    TAG_BUFFER,
    TAG_SHAREABLE,
    _payload,
    decode_object,
    encode_object,
)
from fedstream._wire._payload import MAX_OBJECT_DEPTH, TAG_INT_MAP
from strategies import U64_MAX, blobs, unicode_texts


def unchecked_encoding(obj: Mapping[str, Any]) -> bytes | None:
    """What ``encode_object`` would produce without checking it by decoding;
    None when the value cannot be encoded at all."""
    real = _payload._decode_value

    def skip_check(fp: Any, head_len: int, buffers: Any, *, check_only: bool = False) -> Any:
        if check_only:
            return Shareable(), False
        return real(fp, head_len, buffers)

    with mock.patch.object(_payload, "_decode_value", skip_check):
        try:
            return encode_object(obj).to_bytes()
        except LocalProtocolError:
            return None


def _nan(value: Any) -> bool:
    return isinstance(value, (float, decimal.Decimal)) and value != value


def same(got: Any, want: Any) -> bool:
    """``got`` is what decoding gives back for ``want`` (lists and tuples alike)."""
    if _nan(want):
        return type(got) is float and math.isnan(got)
    if isinstance(want, (bytes, bytearray, memoryview)):
        return type(got) is bytes and got == bytes(memoryview(want).tobytes())
    if isinstance(want, Mapping):
        if isinstance(want, Shareable) != isinstance(got, Shareable):
            return False
        return (
            isinstance(got, Mapping)
            and list(got) == list(want)
            and all(same(got[k], want[k]) for k in want)
        )
    if isinstance(want, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(got) == len(want)
            and all(same(g, w) for g, w in zip(got, want, strict=True))
        )
    if isinstance(want, cbor2.CBORTag):
        return (
            isinstance(got, cbor2.CBORTag) and got.tag == want.tag and same(got.value, want.value)
        )
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    return bool(got == want)


class Key(str):
    """A ``str`` subclass: a text key like any other on the wire."""


#: Tags the decoder handles specially, refuses, or keeps as opaque tags.
_TAG_NUMBERS = [
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261,
    1004, 55799, 43000, 99, 1000, 40, 1040, 64, 72, 87, TAG_BUFFER, TAG_SHAREABLE,
    _payload.TAG_NDARRAY,
]  # fmt: skip

_plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**66), 2**66),
    st.floats(),
    unicode_texts,
    st.binary(max_size=16),
)

#: Leaves a receiver may or may not accept.
doubtful_leaves = st.one_of(
    _plain,
    st.sampled_from([U64_MAX, U64_MAX + 1, -(2**64), -(2**64) - 1, 2**70, -(2**70)]),
    st.decimals(allow_nan=False),
    st.just(decimal.Decimal("NaN")),
    st.fractions(max_denominator=100),
    st.complex_numbers(allow_nan=False),
    st.datetimes(timezones=st.just(datetime.timezone.utc)),
    st.datetimes(),  # naive: cbor2 cannot encode it
    st.dates(),
    st.times(),
    st.uuids(),
    st.just(re.compile("a+")),
    st.sets(st.one_of(st.integers(0, 3), unicode_texts, st.binary(max_size=4)), max_size=3),
    st.frozensets(unicode_texts, max_size=3),
    st.builds(cbor2.CBORTag, st.sampled_from(_TAG_NUMBERS), _plain | st.lists(_plain, max_size=2)),
    st.just(cbor2.undefined),
    blobs(),
)

_keys = st.one_of(
    unicode_texts,
    unicode_texts.map(Key),
    st.binary(max_size=8),
    st.just(b"k" * OUT_OF_BAND_MIN),
    st.integers(0, 3),
    st.tuples(st.integers(0, 3)),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_keys, inner, max_size=3),
        st.builds(Shareable, st.dictionaries(unicode_texts, inner, max_size=3)),
    )


def _nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


doubtful_values = st.one_of(
    st.recursive(doubtful_leaves, _containers, max_leaves=8),
    # Around the depth bound (the top map is level 1).
    st.builds(_nested, _plain, st.integers(MAX_OBJECT_DEPTH - 3, MAX_OBJECT_DEPTH + 2)),
)


@given(value=st.dictionaries(unicode_texts, doubtful_values, min_size=1, max_size=3))
def test_encode_succeeds_iff_a_receiver_accepts_and_round_trips(value: dict[str, Any]) -> None:
    obj = Shareable(value)
    error: LocalProtocolError | None = None
    try:
        encoded = encode_object(obj)
    except LocalProtocolError as exc:
        error = exc
    event("refused" if error else "sent")
    if error is not None:
        assert str(error).startswith("cannot send shareable"), str(error)
        raw = unchecked_encoding(obj)
        if raw is not None:  # what would have gone out: a receiver refuses it
            try:
                got = decode_object(bytearray(raw))
            except RemoteProtocolError:
                pass
            else:
                # Accepted but changed (a fedstream tag given by the caller).
                assert not same(got, obj)
        return
    got = decode_object(bytearray(encoded.to_bytes()))
    assert same(got, obj), f"{got!r:.300} != {obj!r:.300}"


def _bool_array_holding_two() -> Any:
    np = pytest.importorskip("numpy")
    return np.frombuffer(b"\x01\x02\x00", dtype=np.bool_)


REFUSED = {
    "set of ints": lambda: {1, 2},
    "Decimal": lambda: decimal.Decimal("1.5"),
    "int beyond 64 bits": lambda: 2**70,
    "negative int beyond 64 bits": lambda: -(2**64) - 1,
    "Fraction": lambda: fractions.Fraction(1, 3),
    "regular expression": lambda: re.compile("x"),
    "date-time tag over an int": lambda: cbor2.CBORTag(0, 5),
    "bignum tag": lambda: cbor2.CBORTag(2, b"\x01"),
    "bool array holding 2": _bool_array_holding_two,
}


@pytest.mark.parametrize("make", list(REFUSED.values()), ids=list(REFUSED))
def test_what_receivers_refuse_is_refused_with_its_path_and_type(make: Any) -> None:
    value = make()
    obj = Shareable({"a": [0, 1, 2, value], "b": {"c": "fine"}})
    name = type(value).__name__
    with pytest.raises(LocalProtocolError, match=rf"shareable\['a'\]\[3\] \({name}\)"):
        encode_object(obj)
    raw = unchecked_encoding(obj)
    assert raw is not None
    with pytest.raises(RemoteProtocolError):
        decode_object(bytearray(raw))


def test_a_bad_key_is_named_with_its_map() -> None:
    obj = Shareable({"outer": {"inner": {(1, 2): "v"}}})
    with pytest.raises(LocalProtocolError, match=r"shareable\['outer'\]\['inner'\] key \(1, 2\)"):
        encode_object(obj)


@pytest.mark.parametrize("tag", [TAG_BUFFER, TAG_SHAREABLE, 40, 72])
def test_fedstream_tags_given_by_the_caller_are_refused(tag: int) -> None:
    """A receiver would read them as fedstream's own (a buffer, a Shareable, an array)."""
    with pytest.raises(LocalProtocolError, match=rf"shareable\['t'\] \(CBORTag\).*{tag}"):
        encode_object(Shareable({"t": cbor2.CBORTag(tag, {"a": 1})}))


def test_accepted_edge_values_round_trip() -> None:
    obj = Shareable(
        {
            "u64": U64_MAX,
            "n64": -(2**64),
            "strs": frozenset({"a", "b"}),
            "big bytes in a set": frozenset({b"x" * OUT_OF_BAND_MIN, b"y" * OUT_OF_BAND_MIN}),
            "when": datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc),
            "id": uuid.UUID(int=7),
            Key("sub"): 1,
            "tag": cbor2.CBORTag(99, [1, "x"]),
            "nested": _nested(0, MAX_OBJECT_DEPTH - 1),
        }
    )
    assert same(decode_object(bytearray(encode_object(obj).to_bytes())), obj)


def test_large_bytes_are_not_copied_to_check_an_object() -> None:
    """The check decodes the head only: a large byte string is not copied for it."""
    blob = bytes(64 * 1024 * 1024)
    real = _payload._decode_value
    seen: list[Any] = []

    def spy(fp: Any, head_len: int, buffers: Any, *, check_only: bool = False) -> Any:
        seen.extend(buffers)
        return real(fp, head_len, buffers, check_only=check_only)

    # A tag makes the object one that is checked by decoding.
    with mock.patch.object(_payload, "_decode_value", spy):
        encoded = encode_object(Shareable({"blob": blob, "tag": cbor2.CBORTag(99, 1)}))
    assert encoded.parts[1].obj is blob
    assert [b.obj for b in seen] == [blob]


@pytest.mark.parametrize(
    ("value", "checked"),
    [
        ({"a": [1, -(2**64), 2**64 - 1, 2.5, "x", b"y", bytearray(b"z"), None, True]}, False),
        ({"a": (1, {"b": Shareable({"c": [[]]})})}, False),
        ({"big": bytes(OUT_OF_BAND_MIN)}, False),
        ({"a": 2.5, "b": [1.0, 2**63]}, False),
        ({"a": {b"k": 2}}, True),
        ({"a": memoryview(b"xy")}, True),
        ({"a": cbor2.CBORTag(99, 1)}, True),
        ({"a": _nested(0, 20)}, True),
        ({"a": frozenset({"x"})}, True),
    ],
)
def test_only_objects_beyond_plain_values_are_checked_by_decoding(
    value: dict[str, Any], checked: bool
) -> None:
    """Objects made only of values every receiver accepts (str-keyed maps,
    lists, tuples, str, bytes, 64-bit ints, floats, bools, None, not too
    deep) skip the decoding check; anything else is decoded. Either way the
    receiver decodes the same value."""
    real = _payload._decode_value
    calls: list[bool] = []

    def spy(fp: Any, head_len: int, buffers: Any, *, check_only: bool = False) -> Any:
        calls.append(check_only)
        return real(fp, head_len, buffers, check_only=check_only)

    obj = Shareable(value)
    with mock.patch.object(_payload, "_decode_value", spy):
        encoded = encode_object(obj)
    assert calls == ([True] if checked else [])
    assert same(decode_object(bytearray(encoded.to_bytes())), obj)


# ------------------------------------------------------------ through a site pair


class _LateBadValue(AsyncRecordingProducer):
    """Object 1 holds a value receivers refuse."""

    def _produce(self, stream_ctx: dict[str, Any]) -> tuple[Shareable, float] | None:
        produced = super()._produce(stream_ctx)
        if produced is not None and produced[0]["seq"] == 1:
            produced[0]["a"] = [1, 2, 3, decimal.Decimal("1.5")]
        return produced


async def test_a_refused_value_fails_the_stream_locally_and_aborts_receivers(
    autojump_clock: trio.abc.Clock,
) -> None:
    recorder = Recorder()
    producer = _LateBadValue("s", [100, 100, 100])
    options: dict[str, Any] = {"sync_callbacks": "inline"}
    with trio.fail_after(30):
        async with fedstream.open_site("rx", listen="memory://0", **options) as rx:
            rx.register_stream_processing(
                CHANNEL, TOPIC, make_factory(recorder, "rx", is_async=True)
            )
            assert rx.address is not None
            async with fedstream.open_site("tx", connect=[rx.address], **options) as tx:
                with pytest.raises(LocalProtocolError, match=r"shareable\['a'\]\[3\] \(Decimal\)"):
                    await tx.stream_objects(CHANNEL, TOPIC, {"stream": "s"}, ["rx"], producer, None)
    log = recorder.session("rx", "s")
    assert log.seqs == [0], "nothing of the refused object reached the receiver"
    assert log.rcs("finalize") == [ReturnCode.EXECUTION_EXCEPTION]
    assert recorder.all_problems() == []
    assert len(producer.replies) == 1


@pytest.mark.parametrize(
    "tag",
    [cbor2.CBORTag(1, False), cbor2.CBORTag(0, "2020-01-01T00:00:00Z"), cbor2.CBORTag(258, [1])],
)
def test_caller_tags_the_decoder_would_turn_into_other_values_are_refused(tag: Any) -> None:
    """CBORTag(1, False) came back as a datetime: refused now, by name."""
    with pytest.raises(LocalProtocolError, match=r"shareable\['t'\] \(CBORTag\).*not come back"):
        encode_object(Shareable({"t": tag}))


@pytest.mark.parametrize(
    "value",
    [
        {1: "a", 2: "b"},
        {-(2**63): None, 2**64 - 1: 1.5},
        {0: {1: [b"x" * 40_000]}, "name": "mixed", b"raw": 2},
        [{7: {"nested": {8: 9}}}],
    ],
    ids=["ints", "extremes", "mixed-keys-and-buffer", "nested"],
)
def test_dicts_with_integer_keys_round_trip(value: Any) -> None:
    encoded = encode_object(Shareable({"v": value}))
    decoded = decode_object(bytearray(encoded.to_bytes()))
    assert decoded["v"] == value
    assert type(decoded["v"]) is type(value)


@pytest.mark.parametrize("key", [True, 1.5, (1, 2), 2**70])
def test_other_map_keys_are_refused_before_sending(key: Any) -> None:
    with pytest.raises(LocalProtocolError, match=r"shareable\['v'\]"):
        encode_object(Shareable({"v": {2: "int", key: "other"}}))


@pytest.mark.parametrize(
    "content",
    [
        {"not": "a list"},
        [[1]],
        [[1, 2, 3]],
        [[1.5, "float key"]],
        [[[1], "list key"]],
        [[1, "a"], [1, "duplicate"]],
    ],
    ids=["not-a-list", "short-pair", "long-pair", "float-key", "list-key", "duplicate"],
)
def test_malformed_integer_keyed_maps_are_remote_protocol_errors(content: Any) -> None:
    # Spliced by hand into a valid encoding: the encoder never makes these.
    raw = encode_object(Shareable({"t": content})).to_bytes()
    (length,) = struct.unpack(">I", raw[:4])
    head, rest = raw[4 : 4 + length], raw[4 + length :]
    key = head.index(b"\xa2\x61t") + 3  # the map's first key, "t"
    tag = cbor2.dumps(cbor2.CBORTag(TAG_INT_MAP, None))[:-1]  # the tag's head alone
    head = head[:key] + tag + head[key:]
    with pytest.raises(RemoteProtocolError):
        decode_object(bytearray(struct.pack(">I", len(head)) + head + rest))
