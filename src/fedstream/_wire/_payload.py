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

This module is sans-io: it never imports trio.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from .._errors import LocalProtocolError, ObjectTooLargeError, RemoteProtocolError
from .._shareable import Shareable

__all__ = [
    "OUT_OF_BAND_MIN",
    "TAG_BUFFER",
    "TAG_SHAREABLE",
    "EncodedObject",
    "ObjectAssembler",
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

    def chunks(self, max_chunk: int) -> Iterator[memoryview]:
        """Yield consecutive views of at most ``max_chunk`` bytes covering the object.

        A view never spans two parts, so nothing is copied.
        """
        for part in self.parts:
            for start in range(0, len(part), max_chunk):
                yield part[start : start + max_chunk]

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
        encoder.encode(cbor2.CBORTag(TAG_SHAREABLE, dict(value)))

    encoders: dict[type, Any] = {
        bytes: encode_bytes,
        bytearray: encode_bytes,
        memoryview: encode_bytes,
        Shareable: encode_shareable,
    }
    try:
        value = cbor2.dumps(dict(obj), encoders=encoders)
        head = cbor2.dumps([len(b) for b in buffers]) + value
    except Exception as exc:
        raise LocalProtocolError(f"cannot encode object: {exc}") from exc
    first = memoryview(_LEN.pack(len(head)) + head)
    parts = (first, *buffers)
    return EncodedObject(parts, sum(len(p) for p in parts))


def _decoder(fp: io.BytesIO, tag_hook: Any) -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        fp,
        tag_hook=tag_hook,
        semantic_decoders=_REJECTED_TAGS,
        max_depth=MAX_OBJECT_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
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


def decode_object(data: BytesLike) -> Shareable:
    """Decode an object produced by :func:`encode_object`.

    Raises:
        RemoteProtocolError: ``data`` is not a valid encoded object.
    """
    view = memoryview(data)
    if len(view) < _LEN.size:
        raise RemoteProtocolError("encoded object is shorter than its length prefix")
    (head_len,) = _LEN.unpack_from(view)
    if head_len > len(view) - _LEN.size:
        raise RemoteProtocolError("encoded object head is longer than the object")
    fp = io.BytesIO(bytes(view[_LEN.size : _LEN.size + head_len]))
    try:
        lengths = _decoder(fp, None).decode()
    except Exception as exc:
        raise RemoteProtocolError(f"object head is not valid CBOR: {exc}") from exc
    if type(lengths) is not list or not all(type(n) is int and n >= 0 for n in lengths):
        raise RemoteProtocolError("object head must start with an array of buffer lengths")
    offset = _LEN.size + head_len
    if offset + sum(lengths) != len(view):
        raise RemoteProtocolError("object buffer lengths do not add up to its size")
    buffers: list[memoryview] = []
    for n in lengths:
        buffers.append(view[offset : offset + n])
        offset += n

    used: set[int] = set()

    def buffer(index: Any, immutable: bool) -> Any:
        if type(index) is not int or not 0 <= index < len(buffers) or index in used:
            raise ValueError(f"bad out-of-band buffer index {index!r}")
        used.add(index)
        return bytes(buffers[index])

    def shareable(value: Any, immutable: bool) -> Any:
        if not isinstance(value, dict):
            raise ValueError("nested Shareable must be a map")
        return Shareable(value)

    try:
        value = cbor2.CBORDecoder(
            fp,
            semantic_decoders={**_REJECTED_TAGS, TAG_BUFFER: buffer, TAG_SHAREABLE: shareable},
            max_depth=MAX_OBJECT_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        ).decode()
    except Exception as exc:
        raise RemoteProtocolError(f"object value is not valid CBOR: {exc}") from exc
    if fp.tell() != head_len:
        raise RemoteProtocolError("object head length does not match its CBOR items")
    if not isinstance(value, dict):
        raise RemoteProtocolError("object value must be a CBOR map")
    return Shareable(value)


class ObjectAssembler:
    """Reassembles one object (or reply) from its DATA/REPLY body and CHUNK bodies.

    The buffer for the whole object is allocated once, when the first frame
    announces its size, and only after that size was checked against
    ``max_size``.

    Raises:
        ObjectTooLargeError: ``size`` exceeds ``max_size`` (from the constructor).
        RemoteProtocolError: a chunk is out of order or overruns the size.
    """

    __slots__ = ("_buf", "_view", "received", "size")

    def __init__(self, size: int, *, max_size: int) -> None:
        if size > max_size:
            raise ObjectTooLargeError(f"object of {size} bytes exceeds max_object_size {max_size}")
        self.size = size
        self.received = 0
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)

    @property
    def complete(self) -> bool:
        return self.received == self.size

    def target(self, offset: int, nbytes: int) -> memoryview | None:
        """The slice of the buffer where ``nbytes`` at ``offset`` belong, if they fit.

        A transport can receive a chunk's body straight into it; :meth:`feed`
        then sees the bytes are already in place and copies nothing.
        """
        if offset != self.received or offset + nbytes > self.size:
            return None
        return self._view[offset : offset + nbytes]

    def feed(self, offset: int, body: BytesLike) -> bool:
        """Add ``body`` at ``offset``; return whether the object is complete."""
        if offset != self.received:
            raise RemoteProtocolError(f"chunk at offset {offset}, expected {self.received}")
        end = offset + len(body)
        if end > self.size:
            raise RemoteProtocolError(f"chunk overruns the object size {self.size}")
        if not (isinstance(body, memoryview) and body.obj is self._buf):
            self._view[offset:end] = body
        self.received = end
        return end == self.size

    def take(self) -> bytearray:
        """Return the completed buffer."""
        if not self.complete:
            raise LocalProtocolError("object is not complete")
        self._view.release()
        return self._buf
