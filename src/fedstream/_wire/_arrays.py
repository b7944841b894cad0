"""NumPy arrays inside encoded objects: RFC 8746 typed arrays, both ways.

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

NumPy is imported only when an array is decoded. This module is sans-io: it
never imports trio.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any, Final

import cbor2

from .._errors import RemoteProtocolError

__all__ = [
    "MAX_ARRAY_DIMS",
    "TAG_COLUMN_MAJOR",
    "TAG_NDARRAY",
    "TAG_ROW_MAJOR",
    "TAG_TENSOR",
    "TENSOR_DTYPES",
    "TYPED_ARRAY_TAGS",
]

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
        encoder.encode_semantic(TAG_NDARRAY, [dtype.str, shape, data])
    else:
        # ``layout([shape, tag(data)])``, written item by item.
        encoder.encode_length(6, layout)
        encoder.encode_length(4, 2)
        encoder.encode(shape)
        encoder.encode_semantic(tag, data)


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


#: Array hooks, built once; each call's state is in ``_array_decoding``.
_ARRAY_DECODERS: Final[Mapping[int, Any]] = {
    **{
        tag: cbor2.shareable_decoder(functools.partial(_open_array_tag, tag))
        for tag in (*_TYPED_DTYPES, TAG_NDARRAY)
    },
    TAG_ROW_MAJOR: functools.partial(_multi_dimensional, "C"),
    TAG_COLUMN_MAJOR: functools.partial(_multi_dimensional, "F"),
    TAG_TENSOR: _tensor_hook,
}
