"""Object encoding (``encode_object``/``decode_object``) and reassembly."""

from __future__ import annotations

import array
import ctypes
import gc
import io
import itertools
import os
import struct
import sys
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedstream._errors import LocalProtocolError, ObjectTooLargeError, RemoteProtocolError
from fedstream._shareable import Shareable
from fedstream._wire import (
    OUT_OF_BAND_MIN,
    TAG_BUFFER,
    TAG_SHAREABLE,
    EncodedObject,
    ObjectAssembler,
    ScatteredObject,
    _inplace,
    decode_object,
    encode_object,
)
from fedstream._wire._payload import MAX_OBJECT_DEPTH
from strategies import (
    assert_same_payload,
    at_most,
    blob_sizes,
    expected_payload,
    payload_values,
    shareables,
    unicode_texts,
)

U32 = struct.Struct(">I")


def head_of(encoded: bytes) -> tuple[list[int], Any, bytes]:
    """Split an encoding into its lengths array, its raw value and the buffer area."""
    (head_len,) = U32.unpack_from(encoded)
    head = encoded[4 : 4 + head_len]
    decoder = cbor2.CBORDecoder(io.BytesIO(head))
    lengths = decoder.decode()
    value = decoder.decode()
    return lengths, value, encoded[4 + head_len :]


def build(lengths: list[Any], value_cbor: bytes, buffers: bytes = b"") -> bytes:
    head = cbor2.dumps(lengths) + value_cbor
    return U32.pack(len(head)) + head + buffers


def must_reject(data: bytes | bytearray | memoryview) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_object(data)
    return info.value


# ------------------------------------------------------------------ round trips


@given(obj=shareables())
@at_most(60)
def test_shareable_round_trip(obj: Shareable) -> None:
    encoded = encode_object(obj)
    data = encoded.to_bytes()
    assert encoded.size == len(data)
    decoded = decode_object(data)
    assert type(decoded) is type(Shareable())
    assert_same_payload(decoded, expected_payload(obj))
    assert decoded.get_header("__nonexistent__") is None


@given(value=payload_values, key=unicode_texts)
@at_most(60)
def test_any_value_round_trips(value: Any, key: str) -> None:
    obj = Shareable({key: value}) if key != "__headers__" else Shareable({"k": value})
    decoded = decode_object(encode_object(obj).to_bytes())
    assert_same_payload(decoded, expected_payload(obj))


@given(size=blob_sizes, kind=st.sampled_from([bytes, bytearray, memoryview]))
@at_most(40)
def test_out_of_band_threshold(size: int, kind: type) -> None:
    blob = kind(bytes([7]) * size)
    encoded = encode_object(Shareable({"b": blob}))
    lengths, value, tail = head_of(encoded.to_bytes())
    if size >= OUT_OF_BAND_MIN:
        assert lengths == [size]
        assert value["b"] == cbor2.CBORTag(TAG_BUFFER, 0)
        assert tail == bytes(blob)
        assert len(encoded.parts) == 2
        assert encoded.parts[1].obj is (blob.obj if isinstance(blob, memoryview) else blob)
    else:
        assert lengths == []
        assert value["b"] == bytes(blob)
        assert tail == b""
        assert len(encoded.parts) == 1
    decoded = decode_object(encoded.to_bytes())
    assert type(decoded["b"]) is bytes
    assert decoded["b"] == bytes(blob)


def test_several_mib_and_many_buffers() -> None:
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    obj = Shareable(
        {
            "w": big,
            "layers": [
                bytearray(b"\x01" * OUT_OF_BAND_MIN),
                b"small",
                memoryview(big)[:OUT_OF_BAND_MIN],
            ],
            "nested": Shareable({"x": bytes(OUT_OF_BAND_MIN + 1)}),
        }
    )
    encoded = encode_object(obj)
    lengths, _, _ = head_of(encoded.to_bytes())
    assert sorted(lengths) == sorted(
        [len(big), OUT_OF_BAND_MIN, OUT_OF_BAND_MIN, OUT_OF_BAND_MIN + 1]
    )
    decoded = decode_object(encoded.to_bytes())
    assert decoded["w"] == big
    assert decoded["layers"] == [b"\x01" * OUT_OF_BAND_MIN, b"small", big[:OUT_OF_BAND_MIN]]
    assert type(decoded["nested"]) is type(Shareable())
    assert decoded["nested"]["x"] == bytes(OUT_OF_BAND_MIN + 1)


@pytest.mark.parametrize("size", [3, OUT_OF_BAND_MIN + 3])
def test_non_contiguous_and_typed_memoryviews(size: int) -> None:
    raw = bytes(range(256)) * (2 * size // 256 + 1)
    strided = memoryview(raw)[: 2 * size : 2]
    doubles = array.array("d", [1.5] * size)
    raw = raw * 2
    twod = memoryview(bytearray(raw[: 4 * size])).cast("B", (2, 2 * size))
    obj = Shareable({"s": strided, "d": memoryview(doubles), "2d": twod})
    decoded = decode_object(encode_object(obj).to_bytes())
    assert decoded["s"] == strided.tobytes()
    assert decoded["d"] == doubles.tobytes()
    assert decoded["2d"] == raw[: 4 * size]
    assert {type(v) for k, v in decoded.items() if k != "__headers__"} == {bytes}


def test_nested_shareable_keeps_its_type_and_headers() -> None:
    inner = Shareable({"v": 1})
    inner.set_return_code("OK")
    outer = Shareable({"inner": inner, "plain": {"v": 1}, "list": [Shareable()]})
    outer.set_header("__topic__", "t")
    encoded = encode_object(outer).to_bytes()
    _, value, _ = head_of(encoded)
    assert value["inner"].tag == TAG_SHAREABLE
    assert not isinstance(value["plain"], cbor2.CBORTag)
    decoded = decode_object(encoded)
    assert type(decoded["inner"]) is type(Shareable())
    assert decoded["inner"].get_return_code() == "OK"
    assert type(decoded["plain"]) is dict
    assert type(decoded["list"][0]) is type(Shareable())
    assert decoded.get_header("__topic__") == "t"


def test_plain_mapping_comes_back_as_shareable() -> None:
    decoded = decode_object(encode_object({"a": 1}).to_bytes())
    assert type(decoded) is type(Shareable())
    assert decoded == {"a": 1, "__headers__": {}}


def test_decode_accepts_bytes_like() -> None:
    data = encode_object(Shareable({"b": bytes(OUT_OF_BAND_MIN)})).to_bytes()
    for form in (data, bytearray(data), memoryview(data)):
        assert decode_object(form)["b"] == bytes(OUT_OF_BAND_MIN)


@pytest.mark.parametrize(
    "value",
    [object(), {"k": object()}, iter([]), lambda: 0],
    ids=["object", "nested object", "iterator", "function"],
)
def test_unencodable_values(value: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_object(Shareable({"v": value}))


# ------------------------------------------------------------ chunks and assembly


@given(obj=shareables(), n=st.one_of(st.integers(1, 64), st.integers(1, 200_000)))
@at_most(50)
def test_chunks_cover_the_encoding(obj: Shareable, n: int) -> None:
    encoded = encode_object(obj)
    views = list(encoded.chunks(n))
    assert all(0 < len(v) <= n for v in views)
    assert b"".join(views) == encoded.to_bytes()
    assembler = ObjectAssembler(encoded.size, max_size=encoded.size)
    offset = 0
    for i, view in enumerate(views):
        done = assembler.feed(offset, view)
        offset += len(view)
        assert done == (i == len(views) - 1)
        assert assembler.received == offset
    assert assembler.complete
    buf = assembler.take()
    assert bytes(buf) == encoded.to_bytes()
    assert_same_payload(decode_object(buf), expected_payload(obj))


@given(data=st.data())
@at_most(50)
def test_assembler_rejects_wrong_offsets(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 1000))
    assembler = ObjectAssembler(size, max_size=size)
    first = data.draw(st.integers(0, size - 1))
    if first:
        assembler.feed(0, bytes(first))
    bad_offset = data.draw(st.integers(0, 2 * size).filter(lambda o: o != first))
    with pytest.raises(RemoteProtocolError, match="offset"):
        assembler.feed(bad_offset, b"x")
    overrun = data.draw(st.integers(size - first + 1, size - first + 100))
    with pytest.raises(RemoteProtocolError, match="overruns"):
        assembler.feed(first, bytes(overrun))
    assert assembler.received == first
    assert not assembler.complete
    with pytest.raises(LocalProtocolError):
        assembler.take()


def test_empty_object_assembler() -> None:
    assembler = ObjectAssembler(0, max_size=0)
    assert assembler.complete
    assert assembler.take() == bytearray()


def test_assembler_size_is_checked_before_allocation() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ObjectTooLargeError):
            ObjectAssembler(2**40, max_size=64 * 1024 * 1024)
        with pytest.raises(ObjectTooLargeError):
            ObjectAssembler(2**64 - 1, max_size=2**40)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert issubclass(ObjectTooLargeError, LocalProtocolError)
    ObjectAssembler(1024, max_size=1024)  # exactly the limit is fine


# -------------------------------------------------------------- hostile objects


HOSTILE_OBJECTS = {
    "empty": b"",
    "short prefix": b"\x00\x00\x01",
    "head_len beyond data": U32.pack(0xFFFFFFFF) + b"\x80\xa0",
    "empty head": U32.pack(0),
    "lengths not an array": build({}, cbor2.dumps({})),  # type: ignore[arg-type]
    "negative length": build([-1], cbor2.dumps({})),
    "length not an int": build(["1"], cbor2.dumps({})),
    "huge lengths": build([2**64 - 1, 2**40], cbor2.dumps({})),
    "lengths exceed data": build([10], cbor2.dumps({}), b"123"),
    "trailing unreferenced bytes": build([], cbor2.dumps({})) + b"x",
    "value missing": build([], b""),
    "value not a map": build([], cbor2.dumps([1, 2])),
    "head longer than items": U32.pack(3) + b"\x80\xa0\x00",
    "buffer index out of range": build([1], cbor2.dumps({"b": cbor2.CBORTag(TAG_BUFFER, 1)}), b"x"),
    "buffer index not an int": build([1], cbor2.dumps({"b": cbor2.CBORTag(TAG_BUFFER, "0")}), b"x"),
    "nested shareable not a map": build([], cbor2.dumps({"s": cbor2.CBORTag(TAG_SHAREABLE, 1)})),
    "indefinite map": build([], b"\xbf\x61a\x01\xff"),
    "duplicate keys": build([], b"\xa2\x61a\x01\x61a\x02"),
    "tag 28": build([], cbor2.dumps({"a": cbor2.CBORTag(28, [1])})),
    "tag 29": build([], cbor2.dumps({"a": cbor2.CBORTag(29, 0)})),
    "tag 35": build([], cbor2.dumps({"a": cbor2.CBORTag(35, "x")})),
    "tag 256": build([], cbor2.dumps({"a": cbor2.CBORTag(256, "x")})),
    "tag 25": build([], cbor2.dumps({"a": cbor2.CBORTag(25, 0)})),
    "huge byte string": build([], b"\xa1\x61a\x5b" + b"\x00\x00\x00\x01\x00\x00\x00\x00"),
    "huge array": build([], b"\xa1\x61a\x9b" + b"\xff" * 8),
    "too deep": build([], b"\xa1\x61a" + b"\x81" * MAX_OBJECT_DEPTH + b"\x00"),
    "shareable as map key": build(
        [], b"\xa1" + cbor2.dumps(cbor2.CBORTag(TAG_SHAREABLE, {})) + b"\x01"
    ),
}


@pytest.mark.parametrize("data", list(HOSTILE_OBJECTS.values()), ids=list(HOSTILE_OBJECTS))
def test_hostile_objects_are_rejected(data: bytes) -> None:
    tracemalloc.start()
    try:
        must_reject(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def test_out_of_band_buffers_are_not_amplified() -> None:
    """One buffer referenced many times must not be copied once per reference."""
    blob = bytes(1024 * 1024)
    refs = cbor2.dumps({"b": [cbor2.CBORTag(TAG_BUFFER, 0)] * 64})
    data = build([len(blob)], refs, blob)
    tracemalloc.start()
    try:
        try:
            decode_object(data)
        except RemoteProtocolError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(data)
    assert peak < 4 * size


def test_depth_bound_counts_the_top_map() -> None:
    def nested(depth: int) -> Any:
        value: Any = 0
        for _ in range(depth):
            value = [value]
        return value

    ok = Shareable({"a": nested(MAX_OBJECT_DEPTH - 1)})
    assert decode_object(encode_object(ok).to_bytes()) == ok
    with pytest.raises(LocalProtocolError, match=r"shareable\['a'\](\[0\])+ \(.*depth"):
        encode_object(Shareable({"a": nested(MAX_OBJECT_DEPTH)}))
    too_deep = build([], cbor2.dumps({"a": nested(MAX_OBJECT_DEPTH)}))
    with pytest.raises(RemoteProtocolError, match="depth"):
        decode_object(too_deep)


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        i = where % (len(buf) + 1)
        if op == 0:
            buf.insert(i, value)
        elif i < len(buf):
            if op == 1:
                buf[i] ^= 1 << (value % 8)
            elif op == 2:
                del buf[i]
            else:
                del buf[i:]
    return bytes(buf)


@given(
    obj=shareables(),
    ops=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2**20), st.integers(0, 255)),
        min_size=1,
        max_size=5,
    ),
)
@at_most(100)
def test_mutated_objects_only_raise_remote_errors(
    obj: Shareable, ops: list[tuple[int, int, int]]
) -> None:
    data = _mutate(b"".join(part.tobytes() for part in encode_object(obj).parts), ops)
    try:
        decoded = decode_object(data)
    except RemoteProtocolError:
        return
    except Exception as exc:
        pytest.fail(f"decode_object raised {type(exc).__name__}: {exc}")
    assert isinstance(decoded, Shareable)


@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_remote_errors(data: bytes) -> None:
    try:
        decode_object(data)
    except RemoteProtocolError:
        pass
    except Exception as exc:
        pytest.fail(f"decode_object raised {type(exc).__name__}: {exc}")


def test_encoded_object_is_immutable_record() -> None:
    encoded = encode_object(Shareable())
    assert isinstance(encoded, EncodedObject)
    with pytest.raises(AttributeError):
        encoded.size = 0  # type: ignore[misc]


# ------------------------------------------------------ part-by-part reassembly


def assemble(encoding: bytes, cuts: list[int], *, in_place: bool = False) -> bytearray | Any:
    """Feed ``encoding`` to an assembler cut at ``cuts``; receive via target() if asked."""
    assembler = ObjectAssembler(len(encoding), max_size=len(encoding))
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(encoding))), len(encoding)]
    for start, end in itertools.pairwise(bounds):
        piece = encoding[start:end]
        target = assembler.target(start, len(piece)) if in_place else None
        if target is not None:
            target[:] = piece
            done = assembler.feed(start, target)
        else:
            done = assembler.feed(start, piece)
        assert done == (end == len(encoding))
        assert assembler.received == end
    return assembler.take()


@st.composite
def large_objects(draw: st.DrawFn) -> Shareable:
    """Objects with several out-of-band buffers (some empty-ish, some large)."""
    sizes = draw(
        st.lists(
            st.one_of(
                st.sampled_from([OUT_OF_BAND_MIN, OUT_OF_BAND_MIN + 1, 3 * OUT_OF_BAND_MIN]),
                st.integers(OUT_OF_BAND_MIN, 4 * OUT_OF_BAND_MIN),
            ),
            min_size=1,
            max_size=4,
        )
    )
    blobs = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    extra = draw(st.dictionaries(unicode_texts, payload_values, max_size=3))
    return Shareable({**extra, "blobs": blobs, "small": b"inline"})


@given(obj=large_objects(), data=st.data(), in_place=st.booleans())
@at_most(60)
def test_parts_reassemble_at_any_cut(obj: Shareable, data: st.DataObject, in_place: bool) -> None:
    encoding = encode_object(obj).to_bytes()
    cuts = data.draw(st.lists(st.integers(0, len(encoding)), max_size=12))
    raw = assemble(encoding, cuts, in_place=in_place)
    assert isinstance(raw, ScatteredObject)
    assert bytes(raw) == encoding
    assert len(raw) == len(encoding)
    got = decode_object(raw)
    assert_same_payload(got, expected_payload(obj))


@pytest.mark.skipif(_inplace._inplace_bytes is None, reason="needs CPython in-place bytes")
def test_large_bytes_are_delivered_without_a_copy() -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB
    encoding = encode_object(Shareable({"blob": blob})).to_bytes()
    raw = assemble(encoding, list(range(0, len(encoding), 300_000)), in_place=True)
    assert isinstance(raw, ScatteredObject)
    (part,) = raw.buffers
    assert type(part) is bytes
    got = decode_object(raw)
    assert got["blob"] is part, "the received bytes object itself is delivered"
    assert got["blob"] == blob
    assert hash(got["blob"]) == hash(blob)
    assert {got["blob"]: 1}[blob] == 1


def test_small_buffers_and_arrays_get_their_own_writable_parts() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(OUT_OF_BAND_MIN, dtype="<i8").reshape(64, -1)
    obj = Shareable({"w": array, "b": bytes(OUT_OF_BAND_MIN)})
    raw = assemble(encode_object(obj).to_bytes(), [5, 17, 70_000], in_place=True)
    assert isinstance(raw, ScatteredObject)
    got = decode_object(raw)
    assert got["w"].flags.writeable
    np.testing.assert_array_equal(got["w"], array)
    got["w"][0, 0] = -1  # the array owns writable memory, not a bytes object
    assert type(got["b"]) is bytes
    assert got["b"] == bytes(OUT_OF_BAND_MIN)


def test_head_trickling_in_byte_by_byte() -> None:
    obj = Shareable({f"k{i}": "v" * 50 for i in range(200)} | {"blob": b"z" * OUT_OF_BAND_MIN})
    encoding = encode_object(obj).to_bytes()
    raw = assemble(encoding, list(range(1, 12_000)))
    assert isinstance(raw, ScatteredObject)
    assert decode_object(raw) == expected_payload(obj)


def test_target_view_keeps_its_part_alive() -> None:
    """A view handed to the transport stays valid even if the assembler is dropped."""
    encoding = encode_object(Shareable({"blob": b"q" * (2 * OUT_OF_BAND_MIN)})).to_bytes()
    assembler = ObjectAssembler(len(encoding), max_size=len(encoding))
    (head_len,) = U32.unpack_from(encoding)
    assembler.feed(0, encoding[: 4 + head_len])
    target = assembler.target(4 + head_len, 1000)
    assert target is not None
    assert not target.readonly
    del assembler
    gc.collect()
    if _inplace._inplace_bytes is not None:
        # The memory the view writes to still belongs to a live bytes object.
        start = ctypes.addressof(target.obj)
        reachable = gc.get_referents(target.obj)
        reachable += [o for r in reachable for o in gc.get_referents(r)]
        assert any(
            type(o) is bytes and id(o) + bytes.__basicsize__ - 1 == start for o in reachable
        ), "nothing keeps the part alive"
    # Freed memory would be reused by the next bytes objects of that size.
    victims = [bytes(2 * OUT_OF_BAND_MIN) for _ in range(4)]
    target[:] = b"w" * 1000
    assert bytes(target[:3]) == b"www"
    assert all(v == bytes(2 * OUT_OF_BAND_MIN) for v in victims)


HOSTILE_PARTS = {
    "lengths beyond the size": lambda blob: build([len(blob) + 1], cbor2.dumps({}), blob),
    "head_len beyond the size": lambda blob: U32.pack(10**6) + blob,
    "buffer referenced twice": lambda blob: build(
        [len(blob)],
        cbor2.dumps({"a": cbor2.CBORTag(TAG_BUFFER, 0), "b": cbor2.CBORTag(TAG_BUFFER, 0)}),
        blob,
    ),
    "rejected tag in the value": lambda blob: build(
        [len(blob)],
        cbor2.dumps({"a": cbor2.CBORTag(25, 0), "b": cbor2.CBORTag(TAG_BUFFER, 0)}),
        blob,
    ),
    "value not a map": lambda blob: build(
        [len(blob)], cbor2.dumps([cbor2.CBORTag(TAG_BUFFER, 0)]), blob
    ),
}


@pytest.mark.parametrize("make", list(HOSTILE_PARTS.values()), ids=list(HOSTILE_PARTS))
def test_hostile_large_objects_are_rejected_after_reassembly(make: Any) -> None:
    encoding = make(b"\x07" * (2 * OUT_OF_BAND_MIN))
    raw = assemble(encoding, [3, 9, 4000])
    with pytest.raises(RemoteProtocolError):
        decode_object(raw)


def test_scattered_object_checks_its_parts() -> None:
    encoding = encode_object(Shareable({"blob": b"a" * OUT_OF_BAND_MIN})).to_bytes()
    raw = assemble(encoding, [])
    assert isinstance(raw, ScatteredObject)
    with pytest.raises(RemoteProtocolError, match="parts"):
        decode_object(ScatteredObject(raw.head, [*raw.buffers, b""]))
    with pytest.raises(RemoteProtocolError, match="parts"):
        decode_object(ScatteredObject(raw.head, [b"short"]))


def test_objects_with_very_many_buffers_use_one_buffer() -> None:
    """Part-by-part reassembly is for a bounded number of parts."""
    encoding = build(
        [40] * 2000, cbor2.dumps({"b": cbor2.CBORTag(TAG_BUFFER, 1999)}), b"x" * 80_000
    )
    raw = assemble(encoding, [3, 50_000])
    assert not isinstance(raw, ScatteredObject)
    assert decode_object(raw)["b"] == b"x" * 40


def test_plain_ok_reply_shortcut_matches_the_decoder() -> None:
    """The sender recognises the receiver's plain OK reply without decoding it."""
    from fedstream._engine import _receiver, _target
    from fedstream._shareable import ReturnCode, make_reply

    assert _receiver._PLAIN_OK_ENCODED.to_bytes() == _target._PLAIN_OK_BYTES
    decoded = decode_object(_target._PLAIN_OK_BYTES)
    shortcut = make_reply(ReturnCode.OK)
    assert decoded == shortcut
    assert decoded.get_return_code() == shortcut.get_return_code() == "OK"
    assert dict(decoded) == dict(shortcut)


@pytest.mark.skipif(_inplace._inplace_bytes is None, reason="needs CPython in-place bytes")
def test_distinct_part_sizes_do_not_accumulate_memory() -> None:
    """A peer choosing a new buffer size for every object must not grow what we keep."""
    assert _inplace._inplace_bytes is not None
    for size in range(4096, 4096 + 64):  # warm the few size classes used below
        _inplace._inplace_bytes(size)
    gc.collect()
    tracemalloc.start()
    try:
        for size in range(4096, 4096 + 3000):
            obj, view = _inplace._inplace_bytes(size)
            assert len(view) == size == len(obj)
            view.release()
            del obj, view
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 256 * 1024, f"{current} bytes kept after 3000 distinct sizes"


# ------------------------------------------------------------ in-place bytes check


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython only")
def test_inplace_bytes_self_check_passes_on_this_interpreter() -> None:
    assert _inplace._inplace_bytes_factory() is not None


class _NewBytesSpy:
    """Records calls to ``PyBytes_FromStringAndSize`` made through ctypes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = ctypes.PYFUNCTYPE

        def prototype(*types: Any) -> Any:
            make = real(*types)

            def bind(*args: Any) -> Any:
                function = make(*args)

                def call(*call_args: Any) -> Any:
                    self.calls += 1
                    return function(*call_args)

                return call

            return bind

        monkeypatch.setattr(ctypes, "PYFUNCTYPE", prototype)


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython only")
@pytest.mark.parametrize("lie", ["size", "contents", "length field"])
def test_inplace_bytes_fall_back_when_the_read_only_check_fails(
    lie: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layout other than expected is found by reading a known ``bytes``
    object, before any object is made to be written into."""
    spy = _NewBytesSpy(monkeypatch)
    if lie == "size":
        real_getsizeof = sys.getsizeof
        monkeypatch.setattr(sys, "getsizeof", lambda obj, *a: real_getsizeof(obj, *a) + 8)
    elif lie == "contents":
        real_string_at = ctypes.string_at
        monkeypatch.setattr(
            ctypes, "string_at", lambda addr, size=-1: b"?" + real_string_at(addr + 1, size - 1)
        )
    else:
        real_ssize_t = ctypes.c_ssize_t

        class WrongSize:
            @staticmethod
            def from_address(address: int) -> Any:
                return real_ssize_t(real_ssize_t.from_address(address).value + 1)

        monkeypatch.setattr(ctypes, "c_ssize_t", WrongSize)
    assert _inplace._inplace_bytes_factory() is None
    assert spy.calls == 0


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython only")
def test_inplace_bytes_check_reads_the_fresh_object_before_writing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The uninitialised object is checked read-only too; on a mismatch
    nothing is written into it."""
    real = _inplace._bytes_layout_matches
    fresh: list[bytes] = []

    def check(ctypes_module: Any, obj: bytes, offset: int, *, contents: bool = True) -> bool:
        if not contents:
            fresh.append(obj)
            return False
        return real(ctypes_module, obj, offset, contents=contents)

    monkeypatch.setattr(_inplace, "_bytes_layout_matches", check)
    assert _inplace._inplace_bytes_factory() is None
    (obj,) = fresh
    assert obj != b"fedstream in-place bytes", "the probe was written before the check"


def test_large_bytes_are_copied_where_in_place_bytes_are_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_inplace, "_inplace_bytes", None)
    blob = bytes(range(256)) * 512
    encoding = encode_object(Shareable({"blob": blob})).to_bytes()
    raw = assemble(encoding, [7, 40_000], in_place=True)
    assert isinstance(raw, ScatteredObject)
    assert [type(b) for b in raw.buffers] == [bytearray]
    got = decode_object(raw)
    assert type(got["blob"]) is bytes
    assert got["blob"] == blob


# ------------------------------------------------------------ allocation follows arrival


def _head_announcing(count: int, length: int, *, arrays: bool) -> tuple[bytes, int]:
    """The start of an object announcing ``count`` out-of-band parts of
    ``length`` bytes (uint8 arrays or byte strings); returns it and the size."""
    refs = [cbor2.CBORTag(TAG_BUFFER, i) for i in range(count)]
    if arrays:
        value = {
            f"a{i}": cbor2.CBORTag(40, [[length], cbor2.CBORTag(64, r)]) for i, r in enumerate(refs)
        }
    else:
        value = {f"b{i}": r for i, r in enumerate(refs)}
    head = cbor2.dumps([length] * count) + cbor2.dumps(value)
    start = U32.pack(len(head)) + head
    return start, len(start) + count * length


def _traced_growth(action: Any) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        action()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before


@pytest.mark.parametrize("arrays", [True, False], ids=["array parts", "bytes parts"])
def test_a_head_alone_allocates_no_parts(arrays: bool) -> None:
    """A head announcing 200 parts of almost 1 MiB commits at most one part
    before any of their bytes arrive (not 200 MiB)."""
    start, size = _head_announcing(200, 1024 * 1024 - 8, arrays=arrays)
    assembler = ObjectAssembler(size, max_size=size)
    growth = _traced_growth(lambda: assembler.feed(0, start))
    assert assembler.received == len(start)
    assert growth < 2 * 1024 * 1024, f"{growth} bytes allocated for a {len(start)}-byte head"


def _statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_a_head_alone_does_not_grow_rss() -> None:
    start, size = _head_announcing(200, 1024 * 1024 - 8, arrays=True)
    assembler = ObjectAssembler(size, max_size=size)
    gc.collect()
    before = _statm_rss()
    assembler.feed(0, start)
    growth = _statm_rss() - before
    assert growth < 16 * 1024 * 1024, f"RSS grew by {growth} bytes for a {len(start)}-byte head"


@pytest.mark.parametrize("arrays", [True, False], ids=["array parts", "bytes parts"])
def test_parts_are_allocated_as_their_bytes_arrive(arrays: bool) -> None:
    count, length = 40, 200_000
    start, size = _head_announcing(count, length, arrays=arrays)
    piece = bytes(range(256)) * 256  # 64 KiB
    assembler = ObjectAssembler(size, max_size=size)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        assembler.feed(0, start)
        offset = len(start)
        while offset < size:
            n = min(len(piece), size - offset)
            assembler.feed(offset, piece[:n])
            offset += n
            held = tracemalloc.get_traced_memory()[0] - base
            assert held <= offset - len(start) + length + 64 * 1024, (
                f"{held} bytes held after {offset - len(start)} payload bytes"
            )
    finally:
        tracemalloc.stop()
    got = decode_object(assembler.take())
    assert len(got) == count + 1


@given(shareables())
def test_objects_without_out_of_band_parts_encode_as_the_general_path_does(
    value: Shareable,
) -> None:
    """The shortcut for objects with nothing out of band or tagged (cbor2's own
    encoder, no check by decoding) writes the same bytes as the general path,
    and refuses what it refuses."""
    from fedstream._wire._payload import _encode_value

    try:
        cbor_value, buffers = _encode_value(value)
    except Exception:
        with pytest.raises(LocalProtocolError):
            encode_object(value)
        return
    head = cbor2.dumps([len(b) for b in buffers]) + cbor_value
    want = U32.pack(len(head)) + head + b"".join(bytes(b) for b in buffers)
    assert encode_object(value).to_bytes() == want


def test_the_usual_object_takes_the_shortcut() -> None:
    """A Shareable of byte strings (large ones at the top), texts and numbers,
    headers included, is encoded without fedstream's encoders; one with a
    large byte string deeper down, a nested Shareable, a big integer or a
    memoryview is not."""
    from fedstream._wire._payload import _encode_simple

    usual = Shareable(
        {"data": b"x" * 1024, "round": 3, "names": ["a", ("b", 1.5)], "w": b"y" * OUT_OF_BAND_MIN}
    )
    usual.set_header("peer", "site-1")
    encoded = _encode_simple(usual)
    assert encoded is not None
    assert len(encoded.parts) == 2
    assert encoded.parts[1].obj is usual["w"]  # not copied
    for unusual in (
        {"inner": {"data": b"x" * OUT_OF_BAND_MIN}},
        {"inner": Shareable({"a": 1})},
        {"n": 2**64},
        {"v": memoryview(b"ab")},
    ):
        assert _encode_simple(Shareable(unusual)) is None
