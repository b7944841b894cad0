"""NumPy arrays in objects: RFC 8746 typed arrays, the private dtype tag, no copies, no pickle.

Round trips are checked bit for bit (``tobytes``), with the exact dtype
(byte order included) and shape, through ``encode_object``/``decode_object``
and through a pair of sites on the memory transport. The send side must not
copy a contiguous array and the receive side must not copy out-of-band
elements; both are checked by memory address. NumPy stays optional: a
subprocess without it imports and uses fedstream, and a decoder without it
rejects arrays with a clear :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from strategies import at_most

np = pytest.importorskip("numpy")
hnp = pytest.importorskip("hypothesis.extra.numpy")

import fedstream  # noqa: E402
from fedstream import (  # noqa: E402
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
)
from fedstream._errors import LocalProtocolError, RemoteProtocolError  # noqa: E402
from fedstream._wire import (  # noqa: E402
    OUT_OF_BAND_MIN,
    TAG_BUFFER,
    _payload,
    decode_object,
    encode_object,
)
from fedstream._wire._payload import (  # noqa: E402
    MAX_ARRAY_DIMS,
    TAG_COLUMN_MAJOR,
    TAG_NDARRAY,
    TAG_ROW_MAJOR,
    TYPED_ARRAY_TAGS,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

#: Every dtype the issue names, in native, little- and big-endian spellings.
NUMERIC = ["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"]
DTYPES = [
    *NUMERIC,
    *(f">{c}" for c in NUMERIC if c[1] != "1"),
    *(f"<{c}" for c in NUMERIC if c[1] != "1"),
    "?",
    "c8",
    "c16",
    ">c8",
    ">c16",
    "M8[ns]",
    ">M8[ns]",
    "M8[D]",
    "m8[us]",
    "S5",
    "U3",
    ">U3",
]


def T(tag: int, value: Any) -> cbor2.CBORTag:
    return cbor2.CBORTag(tag, value)


def same_array(got: Any, want: Any) -> None:
    """Exact equality: type, dtype with byte order, shape and every bit of every element."""
    assert type(got) is np.ndarray, type(got)
    assert got.dtype == want.dtype
    assert got.dtype.str == want.dtype.str
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def round_trip(value: Any, *, writable: bool = True) -> Any:
    encoded = encode_object(Shareable({"v": value}))
    data = bytearray(encoded.to_bytes()) if writable else encoded.to_bytes()
    return decode_object(data)["v"]


def random_array(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
    """An array of ``dtype`` with random but valid elements (any bit pattern where all are)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind == "U":
        codes = rng.integers(1, 0x10FFFF, size=count * (dtype.itemsize // 4), dtype=np.uint32)
        return codes.astype(dtype.byteorder.replace("|", "=") + "u4").view(dtype).reshape(shape)
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


# ------------------------------------------------------------- encode/decode


layouts = st.sampled_from(["as is", "step", "reverse", "transpose", "fortran", "slice"])


def apply_layout(array: Any, layout: str) -> Any:
    if array.ndim == 0:
        return array
    if layout == "step":
        return array[::2]
    if layout == "reverse":
        return array[::-1]
    if layout == "transpose":
        return array.T
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "slice" and array.ndim >= 2:
        return array[:, 1:]
    return array


@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    layout=layouts,
)
@at_most(200)
def test_small_arrays_round_trip(data: st.DataObject, dtype: str, shape: Any, layout: str) -> None:
    array = apply_layout(data.draw(hnp.arrays(np.dtype(dtype), shape)), layout)
    got = round_trip(array)
    same_array(got, array)
    assert got.flags.writeable


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["as is", "step", "transpose", "fortran"])
def test_large_arrays_round_trip_out_of_band(dtype: str, layout: str) -> None:
    base = random_array(dtype, (96, 8 * 1024 // np.dtype(dtype).itemsize + 3), seed=len(dtype))
    array = apply_layout(base, layout)
    encoded = encode_object(Shareable({"v": array}))
    assert len(encoded.parts) == 2, "the elements travel out of band"
    buf = bytearray(encoded.to_bytes())
    got = decode_object(buf)["v"]
    same_array(got, array)
    assert got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(buf, np.uint8)), "received without a copy"
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        # Sent as tag 1040 without a copy (RFC 8746 dtypes) or copied to C order.
        assert got.flags.f_contiguous == (array.dtype.kind in "uif")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_d_and_empty_arrays(dtype: str) -> None:
    for shape in [(), (0,), (3, 0), (0, 4, 2), (1,), (1, 1, 1)]:
        array = random_array(dtype, shape, seed=7)
        same_array(round_trip(array), array)


@given(dtype=st.sampled_from(DTYPES), threshold=st.sampled_from([-1, 0, 1]))
@at_most(60)
def test_out_of_band_threshold_for_arrays(dtype: str, threshold: int) -> None:
    itemsize = np.dtype(dtype).itemsize
    count = OUT_OF_BAND_MIN // itemsize + threshold
    array = random_array(dtype, (count,), seed=count)
    encoded = encode_object(Shareable({"v": array}))
    out_of_band = count * itemsize >= OUT_OF_BAND_MIN
    assert len(encoded.parts) == (2 if out_of_band else 1)
    same_array(decode_object(bytearray(encoded.to_bytes()))["v"], array)


def test_decoded_from_bytes_is_read_only_but_equal() -> None:
    array = random_array("<f8", (10_000,))
    got = round_trip(array, writable=False)
    same_array(got, array)
    assert not got.flags.writeable
    small = round_trip(np.arange(3), writable=False)
    assert small.flags.writeable, "inline elements are copied into a fresh array"


def test_many_arrays_and_bytes_in_one_object() -> None:
    arrays = {f"layer{i}": random_array(d, (64, 130), seed=i) for i, d in enumerate(DTYPES)}
    obj = Shareable(
        {
            **arrays,
            "nested": Shareable({"w": random_array("f4", (200, 50))}),
            "list": [np.zeros(3), b"x" * OUT_OF_BAND_MIN, np.ones((2, 2), ">i2")],
            "blob": bytes(OUT_OF_BAND_MIN),
        }
    )
    got = decode_object(bytearray(encode_object(obj).to_bytes()))
    for key, array in arrays.items():
        same_array(got[key], array)
    assert isinstance(got["nested"], Shareable)
    same_array(got["nested"]["w"], obj["nested"]["w"])
    same_array(got["list"][0], np.zeros(3))
    assert got["list"][1] == b"x" * OUT_OF_BAND_MIN
    assert type(got["list"][1]) is bytes
    same_array(got["list"][2], np.ones((2, 2), ">i2"))
    assert type(got["blob"]) is bytes


def test_byte_order_is_kept_not_converted() -> None:
    big = np.arange(5, dtype=">u4")
    little = np.arange(5, dtype="<u4")
    assert (
        encode_object(Shareable({"v": big})).to_bytes()
        != encode_object(Shareable({"v": little})).to_bytes()
    )
    assert round_trip(big).dtype.str == ">u4"
    assert round_trip(little).dtype.str == "<u4"


# ------------------------------------------------------------- scalars and subclasses


@pytest.mark.parametrize(
    ("scalar", "expected"),
    [
        (np.float32(0.5), 0.5),
        (np.float16(-2.0), -2.0),
        (np.float64(0.1), 0.1),
        (np.int8(-3), -3),
        (np.uint64(2**64 - 1), 2**64 - 1),
        (np.int64(-(2**63)), -(2**63)),
        (np.bool_(True), True),
        (np.complex64(1 + 2j), 1 + 2j),
        (np.complex128(-0.5j), -0.5j),
        (np.str_("héllo"), "héllo"),
        (np.bytes_(b"ab"), b"ab"),
    ],
)
def test_numeric_scalars_travel_as_python_values(scalar: Any, expected: Any) -> None:
    got = round_trip(scalar)
    assert type(got) is type(expected)
    assert got == expected


@pytest.mark.parametrize(
    "scalar", [np.datetime64("2024-02-29T12:00:00.123456789"), np.timedelta64(-5, "ms")]
)
def test_other_scalars_travel_as_zero_d_arrays(scalar: Any) -> None:
    same_array(round_trip(scalar), np.asarray(scalar))


class Tagged(np.ndarray):  # type: ignore[misc]
    """A user's ndarray subclass."""


def test_ndarray_subclass_is_sent_as_plain_array() -> None:
    plain = np.arange(6.0).reshape(2, 3)
    same_array(round_trip(plain.view(Tagged)), plain)


def test_long_bytes_scalar_goes_out_of_band() -> None:
    encoded = encode_object(Shareable({"b": np.bytes_(b"z" * OUT_OF_BAND_MIN)}))
    assert len(encoded.parts) == 2
    assert decode_object(encoded.to_bytes())["b"] == b"z" * OUT_OF_BAND_MIN


# ------------------------------------------------------------------- refusals


REFUSED = {
    "object": lambda: np.array([1, "a", None], dtype=object),
    "empty object": lambda: np.empty((0,), dtype=object),
    "structured with object": lambda: np.zeros(2, dtype=[("a", "i4"), ("b", "O")]),
    "structured": lambda: np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]),
    "void": lambda: np.zeros(2, dtype="V4"),
    "masked": lambda: np.ma.masked_array([1, 2], mask=[0, 1]),
}


@pytest.mark.parametrize("make", list(REFUSED.values()), ids=list(REFUSED))
def test_unsupported_arrays_are_refused_locally(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_object(Shareable({"v": [1, {"deep": make()}]}))


def test_object_dtype_message_says_no_pickle() -> None:
    with pytest.raises(LocalProtocolError, match="never pickles"):
        encode_object(Shareable({"v": np.array([object()])}))


@pytest.mark.skipif(
    np.finfo(np.longdouble).nmant == 112, reason="long double is IEEE binary128 here"
)
def test_x87_long_double_is_refused() -> None:
    for value in (np.zeros(3, np.longdouble), np.zeros(3, np.clongdouble), np.longdouble(1)):
        with pytest.raises(LocalProtocolError, match="portable"):
            encode_object(Shareable({"v": value}))


def test_pickle_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used")

    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, forbidden)
    array = random_array("c16", (50, 50))
    same_array(round_trip(array), array)
    with pytest.raises(LocalProtocolError):
        encode_object(Shareable({"v": np.array([{}], dtype=object)}))


# --------------------------------------------------------------------- copies


@pytest.mark.parametrize("order", ["C", "F"])
def test_contiguous_array_is_not_copied_on_send(order: str) -> None:
    array = np.asarray(random_array("<f4", (512, 300)), order=order)
    encoded = encode_object(Shareable({"w": array}))
    (head, part) = encoded.parts
    sent = np.frombuffer(part, np.uint8)
    assert sent.__array_interface__["data"][0] == array.__array_interface__["data"][0]
    assert np.shares_memory(sent, array)
    assert len(part) == array.nbytes
    assert len(head) < 100


def test_non_contiguous_array_is_copied_once_into_c_order() -> None:
    base = random_array("<i8", (900, 40))
    array = base[::3, ::2]
    (_, part) = encode_object(Shareable({"w": array})).parts
    assert not np.shares_memory(np.frombuffer(part, np.uint8), base)
    assert bytes(part) == np.ascontiguousarray(array).tobytes()


def test_received_array_is_a_writable_view_of_the_receive_buffer() -> None:
    array = random_array(">f8", (100, 100))
    buf = bytearray(encode_object(Shareable({"w": array})).to_bytes())
    got = decode_object(buf)["w"]
    assert not got.flags.owndata
    got[0, 0] = 42.0
    assert np.frombuffer(buf, np.uint8)[-array.nbytes :].view(">f8")[0] == 42.0


# ------------------------------------------------------------- wire format


def test_typed_array_tags_follow_the_rfc_bit_layout() -> None:
    for name, tag in TYPED_ARRAY_TAGS.items():
        dtype = np.dtype(name) if name[1:] != "f16" else None
        kind, size, little = name[1], int(name[2:]), name[0] == "<"
        f = int(kind == "f")
        s = int(kind == "i")
        ll = size.bit_length() - 1 - f
        assert tag == 0b010_00000 | f << 4 | s << 3 | int(little) << 2 | ll, name
        if dtype is not None:
            assert dtype.str == name
    assert len(TYPED_ARRAY_TAGS) == 22
    assert 76 not in TYPED_ARRAY_TAGS.values()
    assert 68 not in TYPED_ARRAY_TAGS.values()


def head_items(encoded: bytes) -> tuple[Any, Any]:
    """The lengths array and the value of an encoding, as raw CBOR (tags left as tags)."""
    head_len = int.from_bytes(encoded[:4], "big")
    decoder = cbor2.CBORDecoder(io.BytesIO(encoded[4 : 4 + head_len]))
    return decoder.decode(), decoder.decode()


def test_small_array_is_inline_tag_40_over_a_typed_array() -> None:
    array = np.arange(4, dtype="<i2").reshape(2, 2)
    lengths, value = head_items(encode_object(Shareable({"a": array})).to_bytes())
    assert lengths == []
    # (cbor2 decodes the content of tags it does not know as tuples.)
    assert value["a"] == T(TAG_ROW_MAJOR, ((2, 2), T(77, array.tobytes())))


def test_out_of_band_typed_array_uses_a_buffer_reference() -> None:
    encoded = encode_object(Shareable({"a": np.zeros(OUT_OF_BAND_MIN, "u1")})).to_bytes()
    lengths, value = head_items(encoded)
    assert lengths == [OUT_OF_BAND_MIN]
    assert value["a"] == T(TAG_ROW_MAJOR, ((OUT_OF_BAND_MIN,), T(64, T(TAG_BUFFER, 0))))


def test_fortran_array_is_tag_1040_and_private_dtypes_are_row_major() -> None:
    array = np.asfortranarray(np.arange(6, dtype=">u2").reshape(2, 3))
    _, value = head_items(encode_object(Shareable({"a": array})).to_bytes())
    assert value["a"] == T(TAG_COLUMN_MAJOR, ((2, 3), T(65, array.T.tobytes())))
    flags = np.asfortranarray(np.array([[True, False, True], [False, False, True]]))
    _, value = head_items(encode_object(Shareable({"a": flags})).to_bytes())
    assert value["a"] == T(TAG_NDARRAY, ("|b1", (2, 3), flags.tobytes(order="C")))


def _obj(value: Any, buffers: bytes = b"", lengths: list[int] | None = None) -> bytes:
    head = cbor2.dumps(lengths or []) + cbor2.dumps({"v": value})
    return len(head).to_bytes(4, "big") + head + buffers


def test_peer_arrays_in_other_valid_forms_are_accepted() -> None:
    # Inside a tag fedstream does not know (cbor2 decodes its content immutably).
    got = decode_object(_obj(T(1234, [T(TAG_ROW_MAJOR, [[2], T(72, b"\x01\xff")])])))["v"]
    assert got.tag == 1234
    same_array(got.value[0], np.array([1, -1], "i1"))
    # A bare typed array is one-dimensional; tag 68 (clamped uint8) reads as uint8.
    same_array(decode_object(_obj(T(69, b"\x01\x00\x02\x00")))["v"], np.array([1, 2], "<u2"))
    same_array(decode_object(_obj(T(68, b"\x01\x02")))["v"], np.array([1, 2], "u1"))
    # Column-major from a peer.
    got = decode_object(_obj(T(TAG_COLUMN_MAJOR, [[2, 3], T(72, bytes(range(6)))])))["v"]
    same_array(got, np.arange(6, dtype="i1").reshape(3, 2).T)
    # A buffer reference for small inline-sized data is fine too.
    got = decode_object(_obj(T(64, T(TAG_BUFFER, 0)), b"\x07\x08", [2]))["v"]
    same_array(got, np.array([7, 8], "u1"))
    # The private tag with its data out of band.
    got = decode_object(_obj(T(TAG_NDARRAY, ["|S2", [2], T(TAG_BUFFER, 0)]), b"abcd", [4]))["v"]
    same_array(got, np.array([b"ab", b"cd"], "S2"))


HOSTILE = {
    "shape not a list": T(TAG_ROW_MAJOR, [2, T(64, b"ab")]),
    "shape negative": T(TAG_ROW_MAJOR, [[-2], T(64, b"ab")]),
    "shape bool": T(TAG_ROW_MAJOR, [[True, True], T(64, b"a")]),
    "shape too deep": T(TAG_ROW_MAJOR, [[1] * (MAX_ARRAY_DIMS + 1), T(64, b"a")]),
    "shape mismatch": T(TAG_ROW_MAJOR, [[3], T(64, b"ab")]),
    "huge empty shape": T(TAG_ROW_MAJOR, [[0, 2**64 - 1], T(64, b"")]),
    "huge shape": T(TAG_ROW_MAJOR, [[2**32, 2**32], T(64, b"a")]),
    "partial element": T(TAG_ROW_MAJOR, [[1], T(66, b"abc")]),
    "plain array data": T(TAG_ROW_MAJOR, [[2], [1, 2]]),
    "three elements": T(TAG_ROW_MAJOR, [[1], T(64, b"a"), 0]),
    "not an array": T(TAG_ROW_MAJOR, {"shape": [1]}),
    "private tag inside 40": T(TAG_ROW_MAJOR, [[1], T(TAG_NDARRAY, ["|b1", [1], b"\x01"])]),
    "typed array of an int": T(64, 5),
    "typed array of text": T(65, "ab"),
    "reserved tag 76 inside 40": T(TAG_ROW_MAJOR, [[1], T(76, b"a")]),
    "buffer nested in typed array": T(64, [T(TAG_BUFFER, 0)]),
    "buffer in a shareable in typed array": T(64, T(0xFED6, {"x": T(TAG_BUFFER, 0)})),
    "private dtype object": T(TAG_NDARRAY, ["|O", [1], bytes(8)]),
    "private dtype structured": T(TAG_NDARRAY, ["|V8", [1], bytes(8)]),
    "private dtype rfc": T(TAG_NDARRAY, ["<f8", [1], bytes(8)]),
    "private dtype list": T(TAG_NDARRAY, [["i4"], [1], bytes(4)]),
    "private dtype subarray": T(TAG_NDARRAY, ["(2,)<i4", [1], bytes(8)]),
    "private dtype S0": T(TAG_NDARRAY, ["|S0", [0], b""]),
    "private bool 2": T(TAG_NDARRAY, ["|b1", [2], b"\x01\x02"]),
    "private code point": T(TAG_NDARRAY, ["<U1", [1], (0x110000).to_bytes(4, "little")]),
    "private too short": T(TAG_NDARRAY, ["<c8", [2], bytes(8)]),
    "private two elements": T(TAG_NDARRAY, ["<c8", [1]]),
    "private data int": T(TAG_NDARRAY, ["<c8", [1], 0]),
    "private buffer in shape": T(TAG_NDARRAY, ["<c8", [T(TAG_BUFFER, 0)], bytes(8)]),
    "private bad unit": T(TAG_NDARRAY, ["<M8[fortnight]", [1], bytes(8)]),
}
if np.finfo(np.longdouble).nmant != 112:
    HOSTILE["binary128 typed array"] = T(TAG_ROW_MAJOR, [[1], T(87, bytes(16))])
    HOSTILE["private c32"] = T(TAG_NDARRAY, ["<c32", [1], bytes(32)])


@pytest.mark.parametrize("value", list(HOSTILE.values()), ids=list(HOSTILE))
def test_invalid_arrays_are_remote_errors(value: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_object(_obj(value, bytes(8), [8]))


@given(
    array=hnp.arrays(
        st.sampled_from([np.dtype(d) for d in DTYPES]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    ),
    ops=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
@at_most(150)
def test_mutated_array_objects_only_raise_remote_errors(
    array: Any, ops: list[tuple[int, int, int]]
) -> None:
    data = bytearray(encode_object(Shareable({"a": array, "n": 1})).to_bytes())
    for op, where, value in ops:
        i = where % (len(data) + 1)
        if op == 0:
            data.insert(i, value)
        elif i < len(data):
            if op == 1:
                data[i] ^= 1 << (value % 8)
            elif op == 2:
                del data[i]
            else:
                data[i] = value
    try:
        decoded = decode_object(data)
    except RemoteProtocolError:
        return
    except Exception as exc:
        pytest.fail(f"decode_object raised {type(exc).__name__}: {exc}")
    assert isinstance(decoded, Shareable)


def test_decoder_without_numpy_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_object(Shareable({"a": np.arange(3)})).to_bytes()
    private = encode_object(Shareable({"a": np.array([True])})).to_bytes()
    monkeypatch.setitem(sys.modules, "numpy", None)
    for blob in (data, private):
        with pytest.raises(RemoteProtocolError, match="NumPy is not installed"):
            decode_object(blob)
    # Objects without arrays are unaffected.
    assert decode_object(encode_object(Shareable({"b": b"x"})).to_bytes())["b"] == b"x"


def test_fedstream_works_without_numpy() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["numpy"] = None  # any import of numpy now fails
        import fedstream
        from fedstream._wire import decode_object, encode_object
        obj = fedstream.Shareable({"b": b"x" * 40000, "n": [1, 2.5, "t"]})
        got = decode_object(encode_object(obj).to_bytes())
        assert got["b"] == b"x" * 40000 and got["n"] == [1, 2.5, "t"]
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_fedstream_does_not_import_numpy() -> None:
    script = "import sys, fedstream; print('numpy' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- the document


_BLOCK = re.compile(r"^```([\w-]+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_KEY = re.compile(r"^([a-z][a-z-]*):\s?(.*)$")


def _doc_blocks(kind: str) -> list[dict[str, str]]:
    blocks = []
    for lang, text in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        if lang != kind:
            continue
        fields: dict[str, str] = {}
        key = None
        for line in text.splitlines():
            match = _KEY.match(line)
            if match:
                key = match.group(1)
                fields[key] = match.group(2).strip()
            elif line.strip():
                assert key is not None, line
                assert line[0].isspace(), line
                fields[key] += " " + line.strip()
        blocks.append(fields)
    return blocks


ARRAY_VECTORS = _doc_blocks("array-vector")


def test_doc_has_array_vectors() -> None:
    assert {v["name"] for v in ARRAY_VECTORS} >= {"array-inline", "array-out-of-band"}


@pytest.mark.parametrize("vector", ARRAY_VECTORS, ids=[v["name"] for v in ARRAY_VECTORS])
def test_doc_array_vector(vector: dict[str, str]) -> None:
    namespace = {"__builtins__": {}, "numpy": np, "Shareable": Shareable}
    obj = eval(vector["object"], namespace)
    encoded = encode_object(obj)
    if "hex" in vector:
        data = bytes.fromhex("".join(vector["hex"].split()))
        assert encoded.to_bytes().hex() == data.hex()
    else:
        head = bytes.fromhex("".join(vector["head-hex"].split()))
        assert bytes(encoded.parts[0]).hex() == head.hex()
        tail = bytes.fromhex(vector["tail-byte"]) * int(vector["tail-length"])
        assert b"".join(bytes(p) for p in encoded.parts[1:]) == tail
        data = head + tail
    got = decode_object(bytearray(data))
    assert list(got) == list(obj)
    for key, value in obj.items():
        if key != "__headers__":
            same_array(got[key], value)


def test_doc_array_constants_and_table() -> None:
    (block,) = _doc_blocks("array-constants")
    assert {k: int(v, 0) for k, v in block.items()} == {
        "tag-row-major": TAG_ROW_MAJOR,
        "tag-column-major": TAG_COLUMN_MAJOR,
        "tag-ndarray": TAG_NDARRAY,
        "max-array-dims": MAX_ARRAY_DIMS,
    }
    text = DOC.read_text(encoding="utf-8")
    assert f"0xFED7** ({TAG_NDARRAY}" in text or f"0xFED7 ({TAG_NDARRAY}" in text.replace("**", "")
    # The dtype -> typed-array tag table: "| `u2` `u4` `u8` | 65 66 67 / 69 70 71 |".
    table = text[text.index("| dtype (NumPy `dtype.str`)") :].split("\n\n", 1)[0]
    documented: dict[str, int] = {}
    for line in table.splitlines()[2:]:
        _, names_cell, tags_cell, _ = re.split(r"(?<!\\)\|", line)
        names = re.findall(r"`(?:\\\|)?([uif]\d+)`", names_cell)
        tags = [int(n) for n in re.sub(r"\(.*\)", "", tags_cell).replace("/", " ").split()]
        if len(tags) == len(names):  # one-byte types have no byte order
            documented.update({f"|{n}": t for n, t in zip(names, tags, strict=True)})
        else:
            assert len(tags) == 2 * len(names), line
            half = len(names)
            for n, big, little in zip(names, tags[:half], tags[half:], strict=True):
                documented[f">{n}"], documented[f"<{n}"] = big, little
    assert documented == dict(TYPED_ARRAY_TAGS)


# ------------------------------------------------------------ through a site pair


class ArrayProducer(ObjectProducer):
    def __init__(self, objects: list[Shareable]) -> None:
        self.objects = list(objects)
        self.replies: list[dict[str, Shareable]] = []

    async def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        if not self.objects:
            return None
        return self.objects.pop(0), 30.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies.append(dict(replies))
        return None


class EchoConsumer(ObjectConsumer):
    """Keeps what it received and replies with the same arrays (so replies carry arrays too)."""

    def __init__(self, got: list[Shareable]) -> None:
        self.got = got

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.got.append(shareable)
        reply = Shareable({k: v for k, v in shareable.items() if k != "__headers__"})
        reply.set_return_code(ReturnCode.OK)
        return True, reply


class EchoFactory(ConsumerFactory):
    def __init__(self) -> None:
        self.got: list[Shareable] = []

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        return EchoConsumer(self.got)


#: Under the mock clock no callback may run in a worker thread (the clock would
#: jump while it runs), and the base classes' ``finalize``/``return_consumer``
#: are plain ``def``s: run them inline.
SITE_OPTIONS: dict[str, Any] = {"chunk_size": 64 * 1024, "sync_callbacks": "inline"}


async def _through_sites(objects: list[Shareable], **options: Any) -> tuple[Any, list[Any], Any]:
    factory = EchoFactory()
    producer = ArrayProducer(objects)
    options = {**SITE_OPTIONS, **options}
    with trio.fail_after(60):
        async with fedstream.open_site("rx", listen="memory://0", **options) as rx:
            rx.register_stream_processing("np", "arrays", factory)
            assert rx.address is not None
            async with fedstream.open_site("tx", connect=[rx.address], **options) as tx:
                result = await tx.stream_objects("np", "arrays", {}, ["rx"], producer, None)
    return result, factory.got, producer.replies


def _engine_objects() -> list[Shareable]:
    objects = []
    for i, dtype in enumerate(DTYPES):
        obj = Shareable(
            {
                "big": random_array(dtype, (40, 4096 // np.dtype(dtype).itemsize + 1), seed=i),
                "small": random_array(dtype, (2, 3), seed=i + 100),
                "strided": random_array(dtype, (60, 70), seed=i + 200)[::3, ::-2],
                "fortran": np.asfortranarray(random_array(dtype, (30, 500), seed=i)),
                "zero_d": random_array(dtype, (), seed=i + 300),
                "empty": random_array(dtype, (0, 5), seed=i),
            }
        )
        objects.append(obj)
    return objects


async def test_arrays_round_trip_through_a_site_pair(autojump_clock: trio.abc.Clock) -> None:
    objects = _engine_objects()
    result, got, replies = await _through_sites(objects)
    assert result == (ReturnCode.OK, None)
    assert len(got) == len(objects) == len(replies)
    for sent, received, reply in zip(objects, got, replies, strict=True):
        for key, array in sent.items():
            if key == "__headers__":
                continue
            same_array(received[key], array)
            same_array(reply["rx"][key], array)
            assert received[key].flags.writeable
        assert not received["big"].flags.owndata, "out-of-band elements are a view"


@pytest.mark.parametrize("nbytes", [OUT_OF_BAND_MIN, 100_000, 400_000])
async def test_out_of_band_arrays_arrive_writable_at_any_size(
    nbytes: int, autojump_clock: trio.abc.Clock
) -> None:
    """Small objects travel in one frame, larger ones in parts: arrays are writable either way."""
    array = np.arange(nbytes // 4, dtype="<f4")
    blob = bytes(range(256)) * (nbytes // 256)
    # The first object of a stream follows the context's DATA frame in
    # CHUNKs; the second is sent the way most objects are.
    objects = [Shareable({"a": array, "b": blob}) for _ in range(2)]
    result, got, replies = await _through_sites(objects, chunk_size=1024 * 1024)
    assert result == (ReturnCode.OK, None)
    assert len(got) == 2
    for received, reply in zip(got, replies, strict=True):
        same_array(received["a"], array)
        assert received["a"].flags.writeable
        received["a"][0] = -1.0
        assert type(received["b"]) is bytes
        assert received["b"] == blob
        same_array(reply["rx"]["a"], array)


@given(
    arrays=st.lists(
        hnp.arrays(
            st.sampled_from([np.dtype(d) for d in DTYPES]),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
        ),
        min_size=1,
        max_size=4,
    ),
    big=st.sampled_from([None, "<f4", ">i8", "?", "U3"]),
)
@at_most(15)
def test_hypothesis_arrays_through_a_site_pair(arrays: list[Any], big: str | None) -> None:
    objects = [Shareable({f"a{i}": a for i, a in enumerate(arrays)})]
    if big is not None:
        objects.append(Shareable({"big": random_array(big, (300, 70))}))
    result, got, _ = trio.run(
        _through_sites, objects, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    assert result == (ReturnCode.OK, None)
    assert len(got) == len(objects)
    for sent, received in zip(objects, got, strict=True):
        for key, array in sent.items():
            if key != "__headers__":
                same_array(received[key], array)


async def test_unsendable_array_fails_the_stream_locally(autojump_clock: trio.abc.Clock) -> None:
    factory = EchoFactory()
    producer = ArrayProducer([Shareable({"bad": np.array([object()])})])
    with trio.fail_after(30):
        async with fedstream.open_site("rx", listen="memory://0", **SITE_OPTIONS) as rx:
            rx.register_stream_processing("np", "arrays", factory)
            assert rx.address is not None
            async with fedstream.open_site("tx", connect=[rx.address], **SITE_OPTIONS) as tx:
                with pytest.raises(LocalProtocolError, match="never pickles"):
                    await tx.stream_objects("np", "arrays", {}, ["rx"], producer, None)
    assert factory.got == []


def test_payload_module_exports() -> None:
    assert {"TAG_NDARRAY", "TYPED_ARRAY_TAGS", "MAX_ARRAY_DIMS"} <= set(_payload.__all__)


# ------------------------------------------------------------ receive buffer reuse


def test_decoder_reports_whether_it_handed_out_views() -> None:
    array = random_array("<f8", (100, 100))
    with_view = bytearray(encode_object(Shareable({"w": array})).to_bytes())
    got, views = _payload.decode_object_views(with_view)
    assert views
    assert not got["w"].flags.owndata
    inline = bytearray(encode_object(Shareable({"w": array[:2, :2]})).to_bytes())
    assert _payload.decode_object_views(inline)[1] is False
    blob = bytearray(encode_object(Shareable({"b": bytes(2 * OUT_OF_BAND_MIN)})).to_bytes())
    got, views = _payload.decode_object_views(blob)
    assert views is False
    assert type(got["b"]) is bytes


def _one_buffer_objects(count: int, with_array: bool) -> list[Shareable]:
    """Objects of one size that are reassembled in one buffer (their head
    exceeds what part-by-part reassembly holds), optionally with an
    out-of-band array that the receiver hands out as a view of that buffer."""
    objects = []
    for seq in range(count):
        obj = Shareable({"text": chr(ord("a") + seq) * (1024 * 1024 + 10)})
        if with_array:
            obj["a"] = np.full(OUT_OF_BAND_MIN // 8, seq, dtype="<i8")
        else:
            obj["b"] = bytes([seq]) * OUT_OF_BAND_MIN
        objects.append(obj)
    return objects


class _AssemblerSpy:
    """Wraps the receiver's ObjectAssembler to record whether it got a spare buffer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fedstream._engine import _receiver

        self.spares: list[bool] = []
        real = _receiver.ObjectAssembler

        def make(size: int, **kwargs: Any) -> Any:
            self.spares.append(kwargs.get("buffer") is not None)
            return real(size, **kwargs)

        monkeypatch.setattr(_receiver, "ObjectAssembler", make)


@pytest.mark.parametrize("refcount", [2, 1000])
async def test_arrays_kept_by_a_consumer_survive_the_next_object(
    refcount: int, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """A buffer that arrays handed to a consumer still view is never reused,
    whatever ``sys.getrefcount`` reports on this interpreter."""
    monkeypatch.setattr(sys, "getrefcount", lambda obj: refcount)
    spy = _AssemblerSpy(monkeypatch)
    objects = _one_buffer_objects(3, with_array=True)
    result, got, _ = await _through_sites(objects)
    assert result == (ReturnCode.OK, None)
    assert len(got) == 3
    for seq, received in enumerate(got):
        assert not received["a"].flags.owndata
        assert (received["a"] == seq).all(), f"object {seq}'s array was overwritten"
        assert received["text"] == objects[seq]["text"]
    assert spy.spares == [False, False, False]


@pytest.mark.parametrize("refcount", [2, 1000])
async def test_buffers_are_reused_when_no_views_were_handed_out(
    refcount: int, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    monkeypatch.setattr(sys, "getrefcount", lambda obj: refcount)
    spy = _AssemblerSpy(monkeypatch)
    objects = _one_buffer_objects(3, with_array=False)
    result, got, _ = await _through_sites(objects)
    assert result == (ReturnCode.OK, None)
    for seq, received in enumerate(got):
        assert received["b"] == bytes([seq]) * OUT_OF_BAND_MIN
        assert received["text"] == objects[seq]["text"]
    assert spy.spares == [False, True, True]
