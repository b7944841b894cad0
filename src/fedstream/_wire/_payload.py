"""Encoding of one streamed object (a ``Shareable``) into bytes and back.

An encoded object is::

    u32 head_len | lengths | value | buffer 0 | buffer 1 | ...

``lengths`` and ``value`` are two CBOR items that together fill ``head_len``
bytes: ``lengths`` is the array ``[len(buffer 0), len(buffer 1), ...]`` and
``value`` is the object itself. Inside ``value``, every byte string of at
least :data:`OUT_OF_BAND_MIN` bytes is replaced by tag :data:`TAG_BUFFER`
wrapping its index, and its bytes are carried raw after the head. That lets
the sender hand a large ``bytes``, ``bytearray`` or ``memoryview`` to the
socket without copying it into the CBOR item, and lets the receiver slice it
out of the reassembly buffer.

A ``Shareable`` nested inside the value is tagged :data:`TAG_SHAREABLE` so it
comes back as a ``Shareable``; the top-level value is always one.

NumPy arrays (NumPy is optional) use the RFC 8746 tags: tag 40 (row-major)
or 1040 (column-major) wrapping ``[shape, typed array]``, where the typed
array tag (64-87) names the dtype and wraps the raw element bytes, which go
out of band like any other long byte string. Contiguous arrays are sent as a
view of their own memory; on receipt, arrays are ``numpy.frombuffer`` views
of the reassembly buffer. Dtypes RFC 8746 has no tag for use the private tag
:data:`TAG_NDARRAY`. Nothing is ever pickled: object dtypes are refused.

The decoder finds out whether a buffer reference sits directly inside a
typed array (so that it may hand out a view instead of a ``bytes`` copy)
with cbor2's two-stage decoders: the typed-array tags are pushed on a stack
before their content is decoded and popped after.

This module is sans-io: it never imports trio.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import mmap
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

import cbor2

from .._errors import LocalProtocolError, ObjectTooLargeError, RemoteProtocolError
from .._shareable import Shareable

__all__ = [
    "MAX_ARRAY_DIMS",
    "OUT_OF_BAND_MIN",
    "TAG_BUFFER",
    "TAG_COLUMN_MAJOR",
    "TAG_NDARRAY",
    "TAG_ROW_MAJOR",
    "TAG_SHAREABLE",
    "TAG_TENSOR",
    "TENSOR_DTYPES",
    "TYPED_ARRAY_TAGS",
    "EncodedObject",
    "ObjectAssembler",
    "RawObject",
    "ScatteredObject",
    "decode_object",
    "encode_object",
]

#: Byte strings at least this long travel beside the CBOR head, not inside it.
OUT_OF_BAND_MIN: Final = 32 * 1024
#: Tag wrapping the index of an out-of-band buffer (private-use tag number).
TAG_BUFFER: Final = 0xFED5
#: Tag wrapping a nested ``Shareable`` map (private-use tag number).
TAG_SHAREABLE: Final = 0xFED6
#: Nesting bound for decoded objects.
MAX_OBJECT_DEPTH: Final = 64

#: RFC 8746 multi-dimensional array, row-major: ``40([shape, typed array])``.
TAG_ROW_MAJOR: Final = 40
#: RFC 8746 multi-dimensional array, column-major (Fortran order).
TAG_COLUMN_MAJOR: Final = 1040
#: Tag wrapping ``[dtype, shape, data]`` for NumPy dtypes without an RFC 8746
#: typed-array tag (private-use tag number).
TAG_NDARRAY: Final = 0xFED7
#: Tag wrapping ``[dtype name, array]`` for a torch tensor (private-use tag
#: number); the array is an RFC 8746 array or :data:`TAG_NDARRAY`.
TAG_TENSOR: Final = 0xFED8
#: Most dimensions an array may have (NumPy 1.x supports 32).
MAX_ARRAY_DIMS: Final = 32

#: NumPy ``dtype.str`` -> RFC 8746 typed-array tag. The tag's low five bits
#: are ``f s e ll``: float, signed, little-endian, log2 of the element size
#: (minus ``f``). 68 (uint8, clamped) decodes as ``|u1``; 76 is reserved.
TYPED_ARRAY_TAGS: Final[Mapping[str, int]] = {
    "|u1": 64,
    ">u2": 65,
    ">u4": 66,
    ">u8": 67,
    "<u2": 69,
    "<u4": 70,
    "<u8": 71,
    "|i1": 72,
    ">i2": 73,
    ">i4": 74,
    ">i8": 75,
    "<i2": 77,
    "<i4": 78,
    "<i8": 79,
    ">f2": 80,
    ">f4": 81,
    ">f8": 82,
    ">f16": 83,
    "<f2": 84,
    "<f4": 85,
    "<f8": 86,
    "<f16": 87,
}
_TYPED_DTYPES: Final = {tag: dtype for dtype, tag in TYPED_ARRAY_TAGS.items()} | {68: "|u1"}

#: torch dtype name (``str(dtype)`` without ``"torch."``) -> NumPy dtype of
#: the array that carries its elements (byte order aside). Dtypes NumPy lacks
#: travel as same-width integers and are viewed back on receipt.
TENSOR_DTYPES: Final[Mapping[str, str]] = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<i2",
    "float8_e4m3fn": "|u1",
    "float8_e5m2": "|u1",
    "complex128": "<c16",
    "complex64": "<c8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "|i1",
    "uint8": "|u1",
    "bool": "|b1",
}
#: The tensor dtypes above that NumPy has no dtype for.
_NUMPY_LESS_TENSOR_DTYPES: Final = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}

#: ``dtype.str`` values allowed inside :data:`TAG_NDARRAY`: bool, complex,
#: datetime64/timedelta64 (with an optional unit), fixed-width bytes and
#: UCS-4 text. ``c32`` is accepted only where ``long double`` is IEEE binary128.
_NDARRAY_DTYPE: Final = re.compile(
    r"\|b1"
    r"|[<>](?:c8|c16|c32|[Mm]8(?:\[(?:[1-9][0-9]{0,5})?(?:Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\])?)"
    r"|\|S[1-9][0-9]{0,8}"
    r"|[<>]U[1-9][0-9]{0,8}"
)

_LEN = struct.Struct(">I")

BytesLike = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class EncodedObject:
    """An object ready to send: a list of parts whose concatenation is its encoding.

    ``parts[0]`` holds the length prefix and the head; the others are views of
    the caller's own buffers, which must not be modified until the object has
    been sent.
    """

    parts: tuple[memoryview, ...]
    size: int

    def chunks(self, max_chunk: int, start: int = 0) -> Iterator[memoryview]:
        """Yield consecutive views of at most ``max_chunk`` bytes covering the
        object from byte ``start`` on.

        A view never spans two parts, so nothing is copied.
        """
        pos = 0
        for part in self.parts:
            end = pos + len(part)
            if end > start:
                for index in range(max(0, start - pos), len(part), max_chunk):
                    yield part[index : index + max_chunk]
            pos = end

    def to_bytes(self) -> bytes:
        """The whole encoding as one ``bytes`` (copies; for tests and small objects)."""
        return b"".join(self.parts)


def _flat(buf: BytesLike) -> memoryview:
    view = memoryview(buf)
    if (
        view.ndim == 1
        and view.itemsize == 1
        and view.format in ("B", "b", "c")
        and view.c_contiguous
    ):
        return view if view.format == "B" else view.cast("B")
    if view.c_contiguous:
        return view.cast("B")
    return memoryview(view.tobytes())


def encode_object(obj: Mapping[str, Any]) -> EncodedObject:
    """Encode a ``Shareable`` (or any ``str``-keyed mapping) for the wire.

    Raises:
        LocalProtocolError: ``obj`` holds a value CBOR cannot encode.
    """
    buffers: list[memoryview] = []

    def encode_bytes(encoder: cbor2.CBOREncoder, value: BytesLike) -> None:
        view = _flat(value)
        if len(view) >= OUT_OF_BAND_MIN:
            encoder.encode(cbor2.CBORTag(TAG_BUFFER, len(buffers)))
            buffers.append(view)
        else:
            encoder.encode_bytes(bytes(view))

    def encode_shareable(encoder: cbor2.CBOREncoder, value: Shareable) -> None:
        _check_keys(value)
        encoder.encode(cbor2.CBORTag(TAG_SHAREABLE, dict(value)))

    def encode_map(encoder: cbor2.CBOREncoder, value: dict[Any, Any]) -> None:
        _check_keys(value)
        encoder.encode_map(value)

    encoders: dict[type, Any] = {
        bytes: encode_bytes,
        bytearray: encode_bytes,
        memoryview: encode_bytes,
        Shareable: encode_shareable,
        dict: encode_map,
    }
    # cbor2 matches a subclass to the first base in its table, and dict comes
    # first there: name Shareable's subclasses (nvflare's mix-in among them).
    for sub in _subclasses(Shareable):
        encoders[sub] = encode_shareable
    default: Callable[[cbor2.CBOREncoder, Any], None] | None = None
    # No tensor can be in the object unless the caller has imported torch,
    # and no array unless NumPy (which a tensor's conversion needs).
    torch = sys.modules.get("torch")
    if torch is not None:
        encoders[torch.Tensor] = functools.partial(_encode_tensor, torch)
        default = functools.partial(_encode_numpy_other, None, torch)
    np = sys.modules.get("numpy")
    if np is not None:
        encoders[np.ndarray] = functools.partial(_encode_ndarray, np)
        encoders[np.bytes_] = encode_bytes
        default = functools.partial(_encode_numpy_other, np, torch)
    try:
        value = cbor2.dumps(dict(obj), encoders=encoders, default=default)
        head = cbor2.dumps([len(b) for b in buffers]) + value
    except Exception as exc:
        raise LocalProtocolError(f"cannot encode object: {exc}") from exc
    first = memoryview(_LEN.pack(len(head)) + head)
    parts = (first, *buffers)
    return EncodedObject(parts, sum(len(p) for p in parts))


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    pending: list[type] = cls.__subclasses__()
    while pending:
        sub = pending.pop()
        found.append(sub)
        pending.extend(sub.__subclasses__())
    return found


def _encode_ndarray(np: ModuleType, encoder: cbor2.CBOREncoder, array: Any) -> None:
    """Encode a NumPy array as an RFC 8746 array, or :data:`TAG_NDARRAY`.

    The element bytes are a ``memoryview`` of the array itself when it is C-
    or (for RFC 8746 dtypes) Fortran-contiguous, so the ``bytes`` encoder
    puts them out of band without copying; other arrays are copied once into
    C order.
    """
    dtype = array.dtype
    tag = _typed_array_tag(np, dtype)
    if tag is None:
        _check_ndarray_dtype(np, dtype)
    if array.flags.c_contiguous:
        flat, layout = array.reshape(-1), TAG_ROW_MAJOR
    elif array.flags.f_contiguous and tag is not None:
        flat, layout = array.reshape(-1, order="F"), TAG_COLUMN_MAJOR
    else:
        flat, layout = np.ascontiguousarray(array).reshape(-1), TAG_ROW_MAJOR
    data = memoryview(flat.view(np.uint8))
    shape = [int(n) for n in array.shape]
    if tag is None:
        encoder.encode(cbor2.CBORTag(TAG_NDARRAY, [dtype.str, shape, data]))
    else:
        encoder.encode(cbor2.CBORTag(layout, [shape, cbor2.CBORTag(tag, data)]))


def _encode_tensor(torch: ModuleType, encoder: cbor2.CBOREncoder, tensor: Any) -> None:
    """Encode a CPU torch tensor as :data:`TAG_TENSOR` around a NumPy array of its elements.

    A contiguous tensor's elements are a view of its own memory, so large
    ones go out of band without a copy. Gradients are not sent.
    """
    name = str(tensor.dtype).removeprefix("torch.")
    storage = TENSOR_DTYPES.get(name)
    if storage is None:
        raise TypeError(f"torch dtype {tensor.dtype} has no wire form")
    if tensor.device.type != "cpu":
        raise TypeError(f"a tensor on {tensor.device} cannot be sent; move it to the CPU first")
    if tensor.layout != torch.strided:
        raise TypeError(f"a {tensor.layout} tensor cannot be sent; make it dense first")
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous()
    if name in _NUMPY_LESS_TENSOR_DTYPES:
        flat = flat.view(torch.int16 if storage == "<i2" else torch.uint8)
    encoder.encode_length(6, TAG_TENSOR)
    encoder.encode_length(4, 2)
    encoder.encode_string(name)
    _encode_ndarray(importlib.import_module("numpy"), encoder, flat.numpy())


def _encode_numpy_other(
    np: ModuleType | None, torch: ModuleType | None, encoder: cbor2.CBOREncoder, value: Any
) -> None:
    """``default`` hook: NumPy scalars, ``ndarray`` subclasses and tensor subclasses.

    A scalar whose value a Python ``bool``, ``int``, ``float`` or ``complex``
    holds exactly travels as that value; any other scalar (datetime64,
    timedelta64, long double, void) as a 0-d array. (``float64`` and ``str_``
    subclass Python types and never get here: cbor2 encodes them as float and
    text; ``bytes_`` goes to the ``bytes`` encoder.)
    """
    if torch is not None and isinstance(value, torch.Tensor):  # nn.Parameter and the like
        _encode_tensor(torch, encoder, value)
        return
    if np is None:
        raise TypeError(f"cannot encode type {type(value)}")
    if isinstance(value, np.ndarray):
        if isinstance(value, np.ma.MaskedArray):
            raise TypeError("masked arrays cannot be sent (the mask would be lost)")
        _encode_ndarray(np, encoder, value.view(np.ndarray))
        return
    if isinstance(value, np.generic):
        kind, size = value.dtype.kind, value.dtype.itemsize
        if kind in "biu" or (kind == "f" and size <= 8) or (kind == "c" and size <= 16):
            encoder.encode(value.item())
        else:
            _encode_ndarray(np, encoder, np.asarray(value))
        return
    raise TypeError(f"cannot encode type {type(value)}")


def _ieee_quad_long_double(np: ModuleType) -> bool:
    """Whether this platform's ``long double`` is IEEE 754 binary128."""
    info = np.finfo(np.longdouble)
    return bool(info.nmant == 112 and info.nexp == 15 and info.dtype.itemsize == 16)


def _typed_array_tag(np: ModuleType, dtype: Any) -> int | None:
    tag = TYPED_ARRAY_TAGS.get(dtype.str)
    if tag is not None and dtype.kind == "f" and dtype.itemsize == 16:
        return tag if _ieee_quad_long_double(np) else None
    return tag


def _check_ndarray_dtype(np: ModuleType, dtype: Any) -> None:
    """Refuse dtypes that have no wire form in :data:`TAG_NDARRAY`."""
    if dtype.hasobject:
        raise TypeError(
            f"NumPy arrays of dtype {dtype} hold Python objects and cannot be sent "
            "(fedstream never pickles)"
        )
    name = dtype.str
    if not _NDARRAY_DTYPE.fullmatch(name) or (name[1:] == "c32" and not _ieee_quad_long_double(np)):
        raise TypeError(
            f"NumPy dtype {dtype} ({name!r}) has no portable wire form; "
            "convert the array to a numeric, bool, complex, datetime64, bytes or str dtype"
        )


def _decoder(fp: io.BytesIO, semantic_decoders: Mapping[int, Any]) -> cbor2.CBORDecoder:
    """A decoder with the object CBOR profile (see docs/protocol.md)."""
    return cbor2.CBORDecoder(
        fp,
        semantic_decoders=semantic_decoders,
        max_depth=MAX_OBJECT_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        # Keys other than text and byte strings (tuples, big numbers) can be
        # chosen to collide in Python's hash table and make decoding quadratic.
        strict_hashable_types=True,
    )


def _reject(value: object, immutable: bool) -> Any:
    raise ValueError("tag not allowed in fedstream objects")


def _reject_number(value: object, immutable: bool) -> Any:
    raise ValueError(
        "integers beyond 64 bits, decimal fractions, bigfloats and rationals "
        "are not accepted in fedstream objects"
    )


#: Tags a peer could use to make decoding expensive: shared and string
#: references (25, 28, 29, 256), regular expressions (35), and numbers whose
#: Python hashes can be made to collide as map keys (2, 3, 4, 5, 30).
_REJECTED_TAGS: Final = {
    **{tag: _reject for tag in (25, 28, 29, 35, 256)},
    **{tag: _reject_number for tag in (2, 3, 4, 5, 30)},
}


def _check_keys(mapping: Mapping[Any, Any]) -> None:
    # Receivers refuse other key types (see decode_object); fail here instead.
    for key in mapping:
        if type(key) is not str and type(key) is not bytes:
            raise LocalProtocolError(
                f"map keys must be str or bytes, not {type(key).__name__} ({key!r:.40})"
            )


def _split_head(view: memoryview) -> tuple[io.BytesIO, int, list[int]]:
    """Parse the length prefix and the ``lengths`` item of an encoded object.

    Returns a stream positioned at ``value``, ``head_len`` and the lengths.
    """
    if len(view) < _LEN.size:
        raise RemoteProtocolError("encoded object is shorter than its length prefix")
    (head_len,) = _LEN.unpack_from(view)
    if head_len > len(view) - _LEN.size:
        raise RemoteProtocolError("encoded object head is longer than the object")
    head = bytes(view[_LEN.size : _LEN.size + head_len])
    fp = io.BytesIO(head)
    if head[:1] == b"\x80":  # no out-of-band buffers, the usual case for small objects
        fp.seek(1)
        return fp, head_len, []
    try:
        lengths = _decoder(fp, _REJECTED_TAGS).decode()
    except Exception as exc:
        raise RemoteProtocolError(f"object head is not valid CBOR: {exc}") from exc
    if type(lengths) is not list or not all(type(n) is int and n >= 0 for n in lengths):
        raise RemoteProtocolError("object head must start with an array of buffer lengths")
    return fp, head_len, lengths


def decode_object(data: RawObject) -> Shareable:
    """Decode an object produced by :func:`encode_object`.

    ``data`` is the whole encoding in one buffer, or a :class:`ScatteredObject`
    from an :class:`ObjectAssembler`, whose out-of-band ``bytes`` are handed
    out as they are (no copy).

    Raises:
        RemoteProtocolError: ``data`` is not a valid encoded object.
    """
    buffers: Sequence[BytesLike | mmap.mmap]
    if isinstance(data, ScatteredObject):
        fp, head_len, lengths = _split_head(memoryview(data.head))
        buffers = data.buffers
        if lengths != [len(b) for b in buffers] or _LEN.size + head_len != len(data.head):
            raise RemoteProtocolError("object buffer lengths do not match its parts")
    else:
        view = memoryview(data)
        fp, head_len, lengths = _split_head(view)
        offset = _LEN.size + head_len
        if offset + sum(lengths) != len(view):
            raise RemoteProtocolError("object buffer lengths do not add up to its size")
        views = []
        for n in lengths:
            views.append(view[offset : offset + n])
            offset += n
        buffers = views

    used: set[int] = set()
    arrays = _ArrayDecoding()
    token = _array_decoding.set(arrays)

    def buffer(index: Any, immutable: bool) -> Any:
        if type(index) is not int or not 0 <= index < len(buffers) or index in used:
            raise ValueError(f"bad out-of-band buffer index {index!r}")
        used.add(index)
        buf = buffers[index]
        if arrays.open_tags:
            return _BufferView(memoryview(buf))
        # A ``bytes`` part was received in place and is used only here.
        return buf if type(buf) is bytes else bytes(buf)

    hooks = {**_OBJECT_DECODERS, TAG_BUFFER: buffer} if buffers else _NO_BUFFER_DECODERS
    try:
        value = _decoder(fp, hooks).decode()
    except Exception as exc:
        cause = _remote_cause(exc)
        if cause is not None:
            raise RemoteProtocolError(f"invalid object: {cause}") from exc
        raise RemoteProtocolError(f"object value is not valid CBOR: {exc}") from exc
    finally:
        _array_decoding.reset(token)
    if fp.tell() != head_len:
        raise RemoteProtocolError("object head length does not match its CBOR items")
    if not isinstance(value, dict):
        raise RemoteProtocolError("object value must be a CBOR map")
    return Shareable(value)


def _shareable_hook(value: Any, immutable: bool) -> Any:
    if not isinstance(value, dict):
        raise ValueError("nested Shareable must be a map")
    return Shareable(value)


_torch_missing = False


def _torch() -> ModuleType | None:
    """torch if it is installed (imported on first use), else ``None``."""
    global _torch_missing
    module = sys.modules.get("torch")
    if module is not None or _torch_missing:
        return module
    try:
        return importlib.import_module("torch")
    except ImportError:
        _torch_missing = True
        return None


def _tensor_hook(value: Any, immutable: bool) -> Any:
    """A :data:`TAG_TENSOR`: a torch tensor sharing the decoded array's memory.

    Without torch on this site, the NumPy array itself (for dtypes NumPy has).
    """
    if type(value) not in (list, tuple) or len(value) != 2:
        raise RemoteProtocolError("a tensor tag must hold [dtype, array]")
    name, array = value
    storage = TENSOR_DTYPES.get(name) if type(name) is str else None
    if storage is None:
        raise RemoteProtocolError(f"unsupported tensor dtype {name!r:.40}")
    np = _numpy()
    if not isinstance(array, np.ndarray) or array.dtype.str[1:] != storage[1:]:
        raise RemoteProtocolError(f"a {name} tensor must hold a {storage[1:]} array")
    torch = _torch()
    if torch is None:
        if name in _NUMPY_LESS_TENSOR_DTYPES:
            raise RemoteProtocolError(f"the object holds a {name} tensor; install torch here")
        return array
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(array)
    if name in _NUMPY_LESS_TENSOR_DTYPES:
        tensor = tensor.view(getattr(torch, name))
    return tensor


def _no_buffer_hook(index: Any, immutable: bool) -> Any:
    raise ValueError(f"bad out-of-band buffer index {index!r}")


def _remote_cause(exc: BaseException) -> RemoteProtocolError | None:
    """The :class:`RemoteProtocolError` a decoder hook raised, if cbor2 wrapped one."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 16:
        if isinstance(cause, RemoteProtocolError):
            return cause
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return None


class _BufferView:
    """An out-of-band buffer referenced directly by an array tag: used as a view."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view


def _numpy() -> ModuleType:
    try:
        return importlib.import_module("numpy")
    except ImportError as exc:
        raise RemoteProtocolError(
            "the object holds a NumPy array, but NumPy is not installed on this site"
        ) from exc


def _shape(value: Any) -> tuple[int, ...]:
    # Lists, or tuples where cbor2 decodes immutably (inside an unknown tag).
    if (
        type(value) not in (list, tuple)
        or len(value) > MAX_ARRAY_DIMS
        or not all(type(n) is int and n >= 0 for n in value)
    ):
        raise RemoteProtocolError(
            f"array shape must be an array of at most {MAX_ARRAY_DIMS} unsigned integers"
        )
    return tuple(value)


class _ArrayDecoding:
    """Decoder hooks for NumPy arrays, with the state of one ``decode_object`` call.

    Arrays are built over the element bytes without copying them when those
    come out of band (``numpy.frombuffer`` on the object's buffer, writable if
    that buffer is); inline element bytes are copied into a fresh ``bytearray``
    so every array is writable and inline ones are aligned.
    """

    def __init__(self) -> None:
        #: Typed-array and :data:`TAG_NDARRAY` tags whose content is being decoded.
        self.open_tags: list[int] = []
        #: 1-D arrays made by typed-array tags, by id, until a tag 40/1040 takes them.
        self._typed: dict[int, Any] = {}

    def open(self, tag: int) -> tuple[None, Callable[[Any], Any]]:
        """First stage of a typed-array or :data:`TAG_NDARRAY` tag, before its content."""
        self.open_tags.append(tag)
        finish = self._ndarray if tag == TAG_NDARRAY else self._typed_array

        def close(value: Any) -> Any:
            self.open_tags.pop()
            return finish(tag, value)

        return None, close

    @staticmethod
    def _elements(np: ModuleType, dtype: Any, data: Any) -> Any:
        if isinstance(data, _BufferView):
            raw: memoryview | bytearray = data.view
        elif type(data) is bytes:
            raw = bytearray(data)
        else:
            raise RemoteProtocolError("array data must be a byte string or a buffer reference")
        if len(raw) % dtype.itemsize:
            raise RemoteProtocolError(
                f"array data of {len(raw)} bytes is not a whole number of {dtype} elements"
            )
        if not raw:
            return np.empty(0, dtype)
        return np.frombuffer(raw, dtype)

    def _typed_array(self, tag: int, value: Any) -> Any:
        np = _numpy()
        name = _TYPED_DTYPES[tag]
        if name.endswith("f16") and not _ieee_quad_long_double(np):
            raise RemoteProtocolError(
                f"typed array tag {tag} holds binary128 floats, which NumPy cannot represent here"
            )
        array = self._elements(np, np.dtype(name), value)
        self._typed[id(array)] = array
        return array

    def multi_dimensional(self, order: str, value: Any) -> Any:
        if type(value) not in (list, tuple) or len(value) != 2:
            raise RemoteProtocolError("a multi-dimensional array must be [shape, typed array]")
        shape = _shape(value[0])
        flat = value[1]
        if self._typed.pop(id(flat), None) is not flat:
            raise RemoteProtocolError(
                "the data of a multi-dimensional array must be an RFC 8746 typed array"
            )
        if math.prod(shape) != flat.size:
            raise RemoteProtocolError(f"shape {list(shape)} does not match {flat.size} elements")
        return flat.reshape(shape, order=order)

    def _ndarray(self, tag: int, value: Any) -> Any:
        if type(value) not in (list, tuple) or len(value) != 3:
            raise RemoteProtocolError("a NumPy array tag must hold [dtype, shape, data]")
        name, shape, data = value
        if type(name) is not str or not _NDARRAY_DTYPE.fullmatch(name):
            raise RemoteProtocolError(f"unsupported array dtype {name!r:.40}")
        shape = _shape(shape)
        np = _numpy()
        if name[1:] == "c32" and not _ieee_quad_long_double(np):
            raise RemoteProtocolError("complex binary128 arrays cannot be represented here")
        dtype = np.dtype(name)
        flat = self._elements(np, dtype, data)
        if math.prod(shape) != flat.size:
            raise RemoteProtocolError(f"shape {list(shape)} does not match {flat.size} elements")
        if flat.size and dtype.kind == "b" and flat.view(np.uint8).max() > 1:
            raise RemoteProtocolError("bool array elements must be 0 or 1")
        if flat.size and dtype.kind == "U":
            codes = flat.view(np.dtype(name[0] + "u4"))
            if codes.max() > 0x10FFFF:
                raise RemoteProtocolError("str array holds a code point beyond U+10FFFF")
        return flat.reshape(shape)


_array_decoding: ContextVar[_ArrayDecoding] = ContextVar("fedstream_array_decoding")


def _open_array_tag(tag: int, immutable: bool) -> tuple[None, Callable[[Any], Any]]:
    return _array_decoding.get().open(tag)


def _multi_dimensional(order: str, value: Any, immutable: bool) -> Any:
    return _array_decoding.get().multi_dimensional(order, value)


#: Array hooks, built once; each call's state is in ``_array_decoding``.
_ARRAY_DECODERS: Final[Mapping[int, Any]] = {
    **{
        tag: cbor2.shareable_decoder(functools.partial(_open_array_tag, tag))
        for tag in (*_TYPED_DTYPES, TAG_NDARRAY)
    },
    TAG_ROW_MAJOR: functools.partial(_multi_dimensional, "C"),
    TAG_COLUMN_MAJOR: functools.partial(_multi_dimensional, "F"),
}

_OBJECT_DECODERS: Final = {
    **_REJECTED_TAGS,
    **_ARRAY_DECODERS,
    TAG_SHAREABLE: _shareable_hook,
    TAG_TENSOR: _tensor_hook,
}
#: Hooks for an object without out-of-band buffers.
_NO_BUFFER_DECODERS: Final = {**_OBJECT_DECODERS, TAG_BUFFER: _no_buffer_hook}


#: Objects at least this large are reassembled in an anonymous memory map: a
#: peer that announces a large object makes us commit only what it really sends.
MMAP_MIN: Final = 1024 * 1024
#: Objects at least this large (any object with an out-of-band buffer) are
#: reassembled part by part when their head comes first (see ObjectAssembler).
SCATTER_MIN: Final = OUT_OF_BAND_MIN
#: Most out-of-band buffers an object may have for part-by-part reassembly.
_SCATTER_MAX_PARTS: Final = 1024
#: Longest head held while waiting to decide how to reassemble an object.
_SCATTER_MAX_HEAD: Final = 1024 * 1024
#: Out-of-band ``bytes`` at least this long are received straight into the
#: ``bytes`` object that is delivered (where the interpreter allows it).
INPLACE_BYTES_MIN: Final = 4096


def _inplace_bytes_factory() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """A way to receive straight into a new ``bytes`` object, or None.

    A payload must arrive as ``bytes`` (FLARE code checks for it), and copying
    a large one out of the reassembly buffer costs as much as receiving it and
    holds the only trio thread (150 ms for 256 MiB). On CPython an
    uninitialised ``bytes`` object can be made with
    ``PyBytes_FromStringAndSize(NULL, n)`` and filled before anyone else sees
    it, which is what C extensions do. The view returned keeps the object
    alive, and the object is handed out only once every byte is written (by
    :meth:`ObjectAssembler.take`); until then nothing else refers to it, so
    nobody can observe it change. Other interpreters, or a CPython where the
    self-check below fails, copy instead.
    """
    if sys.implementation.name != "cpython":
        return None
    try:
        import ctypes

        prototype = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)
        new_bytes = prototype(("PyBytes_FromStringAndSize", ctypes.pythonapi))
        # ``ob_sval``, the first byte, ends the fixed part of the object.
        offset = bytes.__basicsize__ - 1

        def inplace_bytes(size: int) -> tuple[bytes, memoryview]:
            obj = new_bytes(None, size)
            array_type = ctypes.c_char * size
            array = array_type.from_address(id(obj) + offset)
            array._owner = obj  # type: ignore[attr-defined]  # the view keeps obj alive
            return obj, memoryview(array).cast("B")

        probe = b"fedstream in-place bytes"
        obj, view = inplace_bytes(len(probe))
        view[:] = probe
        view.release()
        if obj != probe or hash(obj) != hash(probe) or len(obj) != len(probe):
            return None
    except Exception:  # no ctypes, or an unexpected object layout
        return None
    return inplace_bytes


_inplace_bytes: Final = _inplace_bytes_factory()


class _BufferScan:
    """Decoder hooks that find which out-of-band buffers hold array elements."""

    def __init__(self, count: int) -> None:
        self.depth = 0
        self.in_array = [False] * count

    def open(self, immutable: bool) -> tuple[None, Callable[[Any], None]]:
        self.depth += 1
        return None, self._close

    def _close(self, value: Any) -> None:
        self.depth -= 1

    def buffer(self, index: Any, immutable: bool) -> None:
        if self.depth and type(index) is int and 0 <= index < len(self.in_array):
            self.in_array[index] = True


def _ignore(value: Any, immutable: bool) -> None:
    return None


def _scan_buffers(fp: io.BytesIO, count: int) -> list[bool]:
    """For each out-of-band buffer, whether it is the element data of an array.

    Decodes the object's value with hooks mirroring :func:`decode_object`:
    a buffer referenced inside a typed-array or :data:`TAG_NDARRAY` tag
    becomes (a view for) a NumPy array, any other becomes ``bytes``.
    """
    scan = _BufferScan(count)
    opener = cbor2.shareable_decoder(functools.partial(_BufferScan.open, scan))
    hooks = {
        **_REJECTED_TAGS,
        **{tag: opener for tag in (*_TYPED_DTYPES, TAG_NDARRAY)},
        TAG_ROW_MAJOR: _ignore,
        TAG_COLUMN_MAJOR: _ignore,
        TAG_SHAREABLE: _ignore,
        TAG_TENSOR: _ignore,
        TAG_BUFFER: scan.buffer,
    }
    _decoder(fp, hooks).decode()
    return scan.in_array


@dataclass(frozen=True, slots=True, eq=False)
class ScatteredObject:
    """An object reassembled as its head plus one buffer per out-of-band part.

    ``bytes`` parts were received in place and are delivered as they are;
    ``bytearray`` and ``mmap`` parts become array views or ``bytes`` copies.
    """

    head: bytes
    buffers: list[bytes | bytearray | mmap.mmap]

    def __len__(self) -> int:
        return len(self.head) + sum(len(b) for b in self.buffers)

    def __bytes__(self) -> bytes:
        return b"".join([self.head, *self.buffers])


#: A received object before decoding: one buffer, or its parts.
RawObject = bytes | bytearray | memoryview | mmap.mmap | ScatteredObject


class ObjectAssembler:
    """Reassembles one object (or reply) from its DATA/REPLY body and CHUNK bodies.

    Nothing is allocated before ``size`` is checked against ``max_size``.

    Small objects (under :data:`SCATTER_MIN`), and objects whose head does not
    come first or is not valid, go into one buffer for the whole object. A
    caller may pass a spare ``buffer`` of exactly that size to reuse (nothing
    needs zeroing: every byte is written before the object completes).
    Buffers of :data:`MMAP_MIN` bytes and more are anonymous memory maps, whose
    pages the kernel zeroes as they are first written, instead of one long
    zero-filling pass: a peer makes us commit only what it really sends.

    Larger objects are reassembled *part by part*: once the head has arrived
    (``u32 head_len | lengths | value``, normally the whole first frame), each
    out-of-band buffer gets its own destination, chosen by what the value
    makes of it. A byte string is received straight into the ``bytes`` object
    that will be delivered (see :func:`_inplace_bytes_factory`), so it is never
    copied; array elements go into a writable ``bytearray`` or map that the
    array will view. :meth:`take` then returns a :class:`ScatteredObject`.

    Raises:
        ObjectTooLargeError: ``size`` exceeds ``max_size`` (from the constructor).
        RemoteProtocolError: a chunk is out of order or overruns the size.
    """

    __slots__ = (
        "_buf",
        "_head",
        "_part",
        "_part_end",
        "_part_start",
        "_parts",
        "_placed",
        "_spare",
        "_stage",
        "_view",
        "_views",
        "received",
        "size",
    )

    def __init__(
        self, size: int, *, max_size: int, buffer: bytearray | mmap.mmap | None = None
    ) -> None:
        if size > max_size:
            raise ObjectTooLargeError(f"object of {size} bytes exceeds max_object_size {max_size}")
        self.size = size
        self.received = 0
        # One-buffer mode: the buffer and a view of it.
        self._buf: bytearray | mmap.mmap | None = None
        self._view: memoryview | None = None
        self._spare = buffer
        # Part-by-part mode: the head, the parts and a writable view of each.
        self._head = b""
        self._parts: list[bytes | bytearray | mmap.mmap] = []
        self._views: list[memoryview] = []
        self._part = 0
        self._part_start = 0
        self._part_end = 0
        #: The view last returned by target(), which feed() sees filled.
        self._placed: memoryview | None = None
        #: The start of the object while it is too short to choose a mode.
        self._stage = bytearray()
        if size < SCATTER_MIN:
            self._one_buffer()

    @property
    def complete(self) -> bool:
        return self.received == self.size

    def _one_buffer(self) -> None:
        size = self.size
        spare = self._spare
        self._spare = None
        if spare is not None and len(spare) == size:
            self._buf = spare
        elif size >= MMAP_MIN:
            self._buf = mmap.mmap(-1, size)
        else:
            self._buf = bytearray(size)
        self._view = memoryview(self._buf)

    def _one_buffer_view(self) -> memoryview:
        assert self._view is not None
        return self._view

    def _feed_start(self, body: memoryview) -> memoryview | None:
        """Take the object's first bytes until the mode can be chosen.

        Returns None while still waiting for the head. Otherwise it chooses
        the mode and returns all bytes received so far that lie beyond what it
        placed (the whole start for one buffer, what follows the head for
        parts).
        """
        stage = self._stage
        if stage:
            stage += body
        have = len(stage) if stage else len(body)
        if have >= _LEN.size:
            (head_len,) = _LEN.unpack_from(stage if stage else body)
            head_end = _LEN.size + head_len
            if head_end <= have or head_end > min(self.size, _SCATTER_MAX_HEAD):
                first = memoryview(bytes(stage)) if stage else body
                self._stage = bytearray()
                if head_end <= min(have, _SCATTER_MAX_HEAD) and self._scatter(first, head_end):
                    return first[head_end:]
                self._one_buffer()
                return first
        if not stage:
            self._stage = bytearray(body)
        return None

    def _scatter(self, first: memoryview, head_end: int) -> bool:
        """Set up part-by-part reassembly from a complete head; False if it does not fit."""
        try:
            fp, _, lengths = _split_head(first[:head_end])
            if not 0 < len(lengths) <= _SCATTER_MAX_PARTS or head_end + sum(lengths) != self.size:
                return False
            in_array = _scan_buffers(fp, len(lengths))
        except Exception:
            # decode_object reports what is wrong with it, as for any object.
            return False
        self._head = bytes(first[:head_end])
        for length, is_array in zip(lengths, in_array, strict=True):
            part: bytes | bytearray | mmap.mmap
            if not is_array and length >= INPLACE_BYTES_MIN and _inplace_bytes is not None:
                part, view = _inplace_bytes(length)
            else:
                part = mmap.mmap(-1, length) if length >= MMAP_MIN else bytearray(length)
                view = memoryview(part)
            self._parts.append(part)
            self._views.append(view)
        self.received = head_end
        self._part = -1
        self._part_end = head_end
        self._next_part()
        return True

    def _next_part(self) -> None:
        """Move to the next part that still has room (parts may be empty)."""
        while self._part_end == self.received and self._part + 1 < len(self._parts):
            self._part += 1
            self._part_start = self._part_end
            self._part_end += len(self._parts[self._part])

    def target(self, offset: int, nbytes: int) -> memoryview | None:
        """The slice of the buffer where ``nbytes`` at ``offset`` belong, if they fit.

        A transport can receive a chunk's body straight into it; :meth:`feed`
        then sees the bytes are already in place and copies nothing.
        """
        if offset != self.received or offset + nbytes > self.size:
            return None
        if self._view is not None:
            return self._view[offset : offset + nbytes]
        if not self._views or offset + nbytes > self._part_end:
            return None  # the head is not in yet, or the body spans two parts
        start = offset - self._part_start
        self._placed = self._views[self._part][start : start + nbytes]
        return self._placed

    def feed(self, offset: int, body: BytesLike) -> bool:
        """Add ``body`` at ``offset``; return whether the object is complete."""
        if offset != self.received:
            raise RemoteProtocolError(f"chunk at offset {offset}, expected {self.received}")
        end = offset + len(body)
        if end > self.size:
            raise RemoteProtocolError(f"chunk overruns the object size {self.size}")
        if self._view is not None:
            if not (isinstance(body, memoryview) and body.obj is self._buf):
                self._view[offset:end] = body
            self.received = end
            return end == self.size
        if body is self._placed and self._placed is not None:
            self._placed = None
            self.received = end
            self._next_part()
            return end == self.size
        rest: memoryview | None = memoryview(body)
        if not self._views:
            assert rest is not None
            rest = self._feed_start(rest if rest.format == "B" else rest.cast("B"))
            if rest is None:
                self.received = end  # still waiting for the head
                return False
            self.received = end - len(rest)
            if not self._views:  # one buffer after all
                self._one_buffer_view()[self.received : end] = rest
                self.received = end
                return end == self.size
        while rest:
            part_offset = self.received - self._part_start
            n = min(len(rest), self._part_end - self.received)
            self._views[self._part][part_offset : part_offset + n] = rest[:n]
            rest = rest[n:]
            self.received += n
            self._next_part()
        return self.received == self.size

    def take(self) -> bytearray | mmap.mmap | ScatteredObject:
        """Return the completed object: its buffer, or its parts."""
        if not self.complete:
            raise LocalProtocolError("object is not complete")
        self._placed = None
        if self._view is not None:
            self._view.release()
            assert self._buf is not None
            return self._buf
        for view in self._views:
            view.release()
        return ScatteredObject(self._head, self._parts)
