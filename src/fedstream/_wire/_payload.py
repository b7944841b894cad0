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
comes back as a ``Shareable``; the top-level value is always one. NumPy
arrays are written as RFC 8746 arrays (see ``_arrays.py``); reassembly from
frames is in ``_assembler.py``.

This module is sans-io: it never imports trio.
"""

from __future__ import annotations

import functools
import io
import mmap
import secrets
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from .._errors import LocalProtocolError, RemoteProtocolError
from .._shareable import Shareable
from ._arrays import (
    _ARRAY_DECODERS,
    MAX_ARRAY_DIMS,
    TAG_COLUMN_MAJOR,
    TAG_NDARRAY,
    TAG_ROW_MAJOR,
    TAG_TENSOR,
    TENSOR_DTYPES,
    TYPED_ARRAY_TAGS,
    _array_decoding,
    _ArrayDecoding,
    _BufferView,
    _encode_ndarray,
    _encode_numpy_other,
    _encode_tensor,
)

__all__ = [
    "MAX_ARRAY_DIMS",
    "OUT_OF_BAND_MIN",
    "TAG_BUFFER",
    "TAG_COLUMN_MAJOR",
    "TAG_INT_MAP",
    "TAG_NDARRAY",
    "TAG_ROW_MAJOR",
    "TAG_SHAREABLE",
    "TAG_TENSOR",
    "TENSOR_DTYPES",
    "TYPED_ARRAY_TAGS",
    "EncodedObject",
    "RawObject",
    "ScatteredObject",
    "decode_object",
    "decode_object_views",
    "encode_object",
]

#: Byte strings at least this long travel beside the CBOR head, not inside it.
OUT_OF_BAND_MIN: Final = 32 * 1024
#: Tag wrapping the index of an out-of-band buffer (private-use tag number).
TAG_BUFFER: Final = 0xFED5
#: Tag wrapping a nested ``Shareable`` map (private-use tag number).
TAG_SHAREABLE: Final = 0xFED6
#: Tag wrapping ``[[key, value], ...]``: a map with integer keys (and any
#: text or byte-string keys beside them). Plain CBOR maps carry text and
#: byte-string keys only, because receivers decode them with cbor2's
#: ``strict_hashable_types``; integers get this tag, whose decoder admits
#: 64-bit integers, text and byte strings and nothing else (private-use tag).
TAG_INT_MAP: Final = 0xFED9
#: Nesting bound for decoded objects.
MAX_OBJECT_DEPTH: Final = 64

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

    The encoding is checked with the receiver's own decoder (out-of-band
    byte strings are not copied for it), so what is returned is exactly what
    :func:`decode_object` accepts: an object a receiver would refuse is
    refused here, before anything is sent.

    Raises:
        LocalProtocolError: ``obj`` holds a value that cannot be encoded or
            that a receiver would refuse. The message names the value's key
            path (``shareable['a'][3]``) and its type.
    """
    if type(obj) is dict or isinstance(obj, Shareable):
        simple = _encode_simple(obj)
        if simple is not None:
            return simple
    error: Exception | None = None
    try:
        value, buffers = _encode_value(obj)
    except Exception as exc:
        error = exc
    if error is not None:
        # Outside the handler, so the search's own errors do not chain to it.
        raise _unsendable(obj, error) from error
    head = cbor2.dumps([len(b) for b in buffers]) + value
    first = memoryview(_LEN.pack(len(head)) + head)
    parts = (first, *buffers)
    return EncodedObject(parts, sum(len(p) for p in parts))


#: Tags that the object encoding gives a meaning: a ``CBORTag`` of the
#: caller's with one of these would come back as something else.
_RESERVED_TAGS: Final = frozenset(
    {
        TAG_BUFFER,
        TAG_SHAREABLE,
        TAG_INT_MAP,
        TAG_NDARRAY,
        TAG_ROW_MAJOR,
        TAG_COLUMN_MAJOR,
        TAG_TENSOR,
        *range(64, 88),
    }
)


#: Leaf types every receiver accepts whatever their value.
_PLAIN_LEAVES: Final = frozenset({str, bytes, bytearray, float, bool, type(None)})
#: Integers in this range are CBOR major types 0 and 1 (no big-number tags).
_INT_LIMIT: Final = 2**64
#: Containers nested deeper than this are checked by decoding: the walk below
#: stays far inside :data:`MAX_OBJECT_DEPTH` however the decoder counts tags.
_PLAIN_DEPTH: Final = 16


def _plain(value: Any, depth: int) -> bool:
    """Whether ``value`` holds only values every receiver accepts: str-keyed
    ``dict``/``Shareable`` maps, lists and tuples (at most ``depth`` deep),
    and :data:`_PLAIN_LEAVES` or 64-bit integers (exact types, no subclasses).

    Such an object needs no checking by decoding, and its maps need no key
    check while encoding.
    """
    kind = type(value)
    if kind in _PLAIN_LEAVES:
        return True
    if kind is int:
        return bool(-_INT_LIMIT <= value < _INT_LIMIT)
    if depth <= 0:
        return False
    if kind is dict or isinstance(value, Shareable):  # nvflare's mix-in is a subclass
        for key, item in value.items():
            if type(key) is not str:
                return False
            if type(item) not in _PLAIN_LEAVES and not _plain(item, depth - 1):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:
            if type(item) not in _PLAIN_LEAVES and not _plain(item, depth - 1):
                return False
        return True
    return False


#: Byte-string types whose values :func:`_encode_simple` takes as they are.
_INLINE_BYTES: Final = (bytes, bytearray)


def _encode_simple(obj: Mapping[str, Any]) -> EncodedObject | None:
    """:func:`encode_object` for the usual object, or None for any other.

    The usual object maps text keys to :func:`_inline` values and to byte
    strings (``bytes``, ``bytearray``) of any size. Its large byte strings
    are all at the top, so the buffer index of each is its rank among them,
    and nothing else needs a tag or a check by decoding: cbor2's own encoder
    writes exactly what the general path would (a test pins that), without
    setting up fedstream's encoders.
    """
    value = dict(obj)
    buffers: list[memoryview] = []
    for key, item in value.items():
        if type(key) is not str:
            return None
        kind = type(item)
        if kind is str or kind is float or kind is bool or item is None:
            continue
        if kind is int:
            if not -_INT_LIMIT <= item < _INT_LIMIT:
                return None
        elif kind in _INLINE_BYTES:
            if len(item) >= OUT_OF_BAND_MIN:
                # (Replacing the value of a key does not disturb the iteration.)
                value[key] = cbor2.CBORTag(TAG_BUFFER, len(buffers))
                buffers.append(memoryview(item))
        elif kind is dict:
            if not _inline(item, _PLAIN_DEPTH - 1):
                return None
        elif kind is list or kind is tuple:
            if not _inline_items(item, _PLAIN_DEPTH - 1):
                return None
        else:
            return None
    try:
        head = cbor2.dumps([len(b) for b in buffers]) + cbor2.dumps(value)
    except Exception:  # e.g. a lone surrogate: the general path reports it
        return None
    first = memoryview(_LEN.pack(len(head)) + head)
    return EncodedObject((first, *buffers), len(first) + sum(len(b) for b in buffers))


def _inline(value: Any, depth: int) -> bool:
    """Whether ``value`` is :func:`_plain` and encodes the same without
    fedstream's encoders: every byte string is shorter than
    :data:`OUT_OF_BAND_MIN` (so none goes out of band) and every nested map is
    an exact ``dict`` (a nested ``Shareable`` needs its tag).

    The top-level value may be a ``Shareable``: it is encoded as its plain map.
    """
    for key, item in value.items():
        if type(key) is not str or not _inline_item(item, depth):
            return False
    return True


def _inline_items(values: list[Any] | tuple[Any, ...], depth: int) -> bool:
    """:func:`_inline` for the items of a list or tuple."""
    return all(_inline_item(item, depth) for item in values)


def _inline_item(item: Any, depth: int) -> bool:
    """One value of a map, list or tuple at nesting ``depth`` (see :func:`_inline`)."""
    kind = type(item)
    if kind is str or kind is float or kind is bool or item is None:
        return True
    if kind is int:
        return bool(-_INT_LIMIT <= item < _INT_LIMIT)
    if kind in _INLINE_BYTES:
        return len(item) < OUT_OF_BAND_MIN
    if kind is dict:
        return depth > 1 and _inline(item, depth - 1)
    if kind is list or kind is tuple:
        return depth > 1 and _inline_items(item, depth - 1)
    return False


#: Tags the receivers' CBOR decoder turns into other values (datetimes,
#: sets, UUIDs, addresses...): a ``CBORTag`` of the caller's with one of
#: these would not come back as itself. (Tag 0 over a text string too; tags
#: that receivers refuse are left to the check by decoding, which says so.)
_DECODED_TAGS: Final = frozenset({1, 36, 37, 52, 54, 100, 258, 260, 261, 1004, 43000, 55799})


def _encode_value(obj: Mapping[str, Any]) -> tuple[bytes, list[memoryview]]:
    """The CBOR value of ``obj`` and its out-of-band buffers, checked by decoding
    unless it holds only values every receiver accepts (:func:`_plain`).

    Raises:
        Exception: whatever the encoder raised for a value it cannot encode.
        RemoteProtocolError: what :func:`decode_object` would say of the encoding.
    """
    buffers: list[memoryview] = []

    def encode_bytes(encoder: cbor2.CBOREncoder, value: BytesLike) -> None:
        view = _flat(value)
        if len(view) >= OUT_OF_BAND_MIN:
            encoder.encode_semantic(TAG_BUFFER, len(buffers))
            buffers.append(view)
        else:
            encoder.encode_bytes(bytes(view))

    def encode_shareable(encoder: cbor2.CBOREncoder, value: Shareable) -> None:
        _check_keys(value)
        encoder.encode_semantic(TAG_SHAREABLE, dict(value))

    def encode_map(encoder: cbor2.CBOREncoder, value: dict[Any, Any]) -> None:
        if not _has_int_key(value):
            _check_keys(value)
            encoder.encode_map(value)
            return
        encoder.encode_length(6, TAG_INT_MAP)
        encoder.encode_length(4, len(value))
        for key, item in value.items():
            encoder.encode_length(4, 2)
            encoder.encode(key)
            encoder.encode(item)

    def encode_tag(encoder: cbor2.CBOREncoder, value: cbor2.CBORTag) -> None:
        if value.tag in _RESERVED_TAGS:
            raise TypeError(f"tag {value.tag} is reserved by fedstream's object encoding")
        if value.tag in _DECODED_TAGS or (value.tag == 0 and isinstance(value.value, str)):
            raise TypeError(
                f"tag {value.tag} would not come back as a tag (receivers' decoder "
                "gives it a meaning): send the value it stands for instead"
            )
        encoder.encode_semantic(value.tag, value.value)

    plain = (type(obj) is dict or isinstance(obj, Shareable)) and _plain(obj, _PLAIN_DEPTH)
    if plain:
        # Keys already checked: plain maps use cbor2's own encoder.
        def tag_shareable(encoder: cbor2.CBOREncoder, value: Shareable) -> None:
            encoder.encode_semantic(TAG_SHAREABLE, dict(value))

        encoders: dict[type, Any] = {
            bytes: encode_bytes,
            bytearray: encode_bytes,
            Shareable: tag_shareable,
        }
        for sub in _subclasses(Shareable):  # nvflare's mix-in among them
            encoders[sub] = tag_shareable
        value = cbor2.dumps(dict(obj), encoders=encoders)
        return value, buffers
    encoders = {
        bytes: encode_bytes,
        bytearray: encode_bytes,
        memoryview: encode_bytes,
        Shareable: encode_shareable,
        dict: encode_map,
        cbor2.CBORTag: encode_tag,
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
    value = cbor2.dumps(dict(obj), encoders=encoders, default=default)
    _decode_value(io.BytesIO(value), len(value), buffers, check_only=True)
    return value, buffers


def _unsendable(obj: Mapping[str, Any], exc: Exception) -> LocalProtocolError:
    """The error for an object that :func:`_encode_value` refused, naming the culprit."""
    if isinstance(exc, LocalProtocolError) and str(exc).startswith("cannot send "):
        return exc
    path, culprit, cause = _locate(obj, exc)
    what = "a receiver would refuse it" if isinstance(exc, RemoteProtocolError) else "cannot encode"
    return LocalProtocolError(f"cannot send {path} ({type(culprit).__name__}): {what}: {cause}")


def _refusal(obj: Mapping[str, Any]) -> Exception | None:
    try:
        _encode_value(obj)
    except Exception as exc:
        return exc
    return None


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    pending: list[type] = cls.__subclasses__()
    while pending:
        sub = pending.pop()
        found.append(sub)
        pending.extend(sub.__subclasses__())
    return found


def _items(value: Any) -> list[tuple[Any, Any]] | None:
    """The entries of a container the encoder walks into, or None for a leaf."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return None


def _like(container: Any, items: list[tuple[Any, Any]]) -> Any:
    """A container of ``container``'s kind (as the encoder sees it) holding ``items``."""
    if isinstance(container, Shareable):
        copy = Shareable.__new__(Shareable)  # no headers added: the entries are as given
        dict.update(copy, items)
        return copy
    if isinstance(container, dict):
        return dict(items)
    return [v for _, v in items]


def _locate(obj: Mapping[str, Any], exc: Exception) -> tuple[str, Any, str]:
    """The key path, value and reason of what makes ``obj`` unsendable.

    Narrows down by encoding copies of the object that keep one branch
    (halves of a container's entries, then one entry), each at its original
    depth so the depth bound applies as it did. Only runs for a refused
    object. Falls back to the innermost container that is refused as a whole.
    """
    chain: list[tuple[Any, Any]] = []  # (container, key) from the top down
    path = "shareable"
    culprit: Any = obj
    cause: Exception = exc

    def rebuilt(container: Any, items: list[tuple[Any, Any]]) -> Any:
        node = _like(container, items)
        for parent, key in reversed(chain):
            node = _like(parent, [(key, node)])
        return node

    for _ in range(MAX_OBJECT_DEPTH):
        items = _items(culprit)
        if not items:
            break
        while len(items) > 1:
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                refused = _refusal(rebuilt(culprit, part))
                if refused is not None:
                    items, cause = part, refused
                    break
            else:
                break  # only the entries together are refused
        if len(items) != 1:
            break
        ((key, child),) = items
        refused = _refusal(rebuilt(culprit, [(key, child)]))
        if refused is None:
            break
        cause = refused
        if isinstance(culprit, dict):
            key_refused = _refusal(rebuilt(culprit, [(key, None)]))
            if key_refused is not None:
                return f"{path} key {key!r:.60}", key, str(key_refused)
        chain.append((culprit, key))
        path += f"[{key!r:.60}]"
        culprit = child
    return path, culprit, str(cause)


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
    raise RemoteProtocolError("tag not allowed in fedstream objects")


def _reject_number(value: object, immutable: bool) -> Any:
    raise RemoteProtocolError(
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


def _has_int_key(mapping: Mapping[Any, Any]) -> bool:
    """Whether ``mapping`` travels as :data:`TAG_INT_MAP`: an ``int`` key
    (``bool`` aside), the others ``int``, ``str`` or ``bytes``."""
    found = False
    for key in mapping:
        if isinstance(key, int) and not isinstance(key, bool):
            found = True
        elif not isinstance(key, (str, bytes)):
            raise LocalProtocolError(
                f"map keys must be str, bytes or int, not {type(key).__name__} ({key!r:.40})"
            )
    return found


def _check_keys(mapping: Mapping[Any, Any]) -> None:
    # Receivers refuse other key types (see decode_object); fail here instead.
    for key in mapping:
        if not isinstance(key, (str, bytes)):
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
    return decode_object_views(data)[0]


def decode_object_views(data: RawObject) -> tuple[Shareable, bool]:
    """:func:`decode_object`, also saying whether the result views ``data``.

    The flag is True when some value (a NumPy array over out-of-band
    elements) is a view of ``data``'s memory or of one of its parts: the
    caller must then leave that memory alone for as long as the values live.
    When it is False, every value owns its memory (or is a ``bytes`` part the
    caller no longer writes to), and the caller may reuse ``data``'s buffer.

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
    return _decode_value(fp, head_len, buffers)


#: Stands in for out-of-band byte strings when an encoding is only checked:
#: with the buffer index appended, distinct from any other byte string in
#: practice (it would take a 2**-128 coincidence), so maps and sets see
#: distinct keys as the receiver will.
_PLACEHOLDER: Final = secrets.token_bytes(16)


def _decode_value(
    fp: io.BytesIO,
    head_len: int,
    buffers: Sequence[BytesLike | mmap.mmap],
    *,
    check_only: bool = False,
) -> tuple[Shareable, bool]:
    """Decode the value at ``fp`` (its CBOR ends at ``head_len``) over ``buffers``.

    With ``check_only``, byte-string buffers are not copied (a placeholder
    stands in); the rules applied are the same.
    """
    used: set[int] = set()
    viewed: list[int] = []
    arrays = _ArrayDecoding()
    token = _array_decoding.set(arrays)

    def buffer(index: Any, immutable: bool) -> Any:
        if type(index) is not int or not 0 <= index < len(buffers) or index in used:
            raise ValueError(f"bad out-of-band buffer index {index!r}")
        used.add(index)
        buf = buffers[index]
        if arrays.open_tags:
            viewed.append(index)
            return _BufferView(memoryview(buf))
        if check_only:
            return _PLACEHOLDER + index.to_bytes(8, "big")
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
    return Shareable(value), bool(viewed)


def _shareable_hook(value: Any, immutable: bool) -> Any:
    if not isinstance(value, dict):
        raise ValueError("nested Shareable must be a map")
    return Shareable(value)


def _int_map_hook(value: Any, immutable: bool) -> Any:
    """A :data:`TAG_INT_MAP`: a dict whose keys are 64-bit integers, text or bytes.

    Integers beyond 64 bits never decode (their tags are refused), and at
    most about 17 integers of that range share a Python hash, so a peer
    cannot make this map's hash table degrade.
    """
    if type(value) is not list:
        raise RemoteProtocolError("an integer-keyed map must be a list of pairs")
    result: dict[Any, Any] = {}
    for pair in value:
        if type(pair) is not list or len(pair) != 2:
            raise RemoteProtocolError("an integer-keyed map entry must be a [key, value] pair")
        key, item = pair
        if type(key) not in (int, str, bytes):
            raise RemoteProtocolError(
                f"an integer-keyed map's keys must be int, str or bytes, not {type(key).__name__}"
            )
        if key in result:
            raise RemoteProtocolError(f"duplicate key {key!r:.40} in an integer-keyed map")
        result[key] = item
    return result


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


_OBJECT_DECODERS: Final = {
    **_REJECTED_TAGS,
    **_ARRAY_DECODERS,
    TAG_SHAREABLE: _shareable_hook,
    TAG_INT_MAP: _int_map_hook,
}
#: Hooks for an object without out-of-band buffers.
_NO_BUFFER_DECODERS: Final = {**_OBJECT_DECODERS, TAG_BUFFER: _no_buffer_hook}


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
