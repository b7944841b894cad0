"""Reassembly of one encoded object from the bodies of its frames.

An object arrives as a DATA (or REPLY) body and CHUNK bodies, in order. The
assembler decides where each byte lands: one buffer for small objects, or,
once the head is in, one destination per out-of-band buffer, chosen by what
the value makes of it (a ``bytes`` object to fill in place, or a buffer that
an array will view). See :class:`ObjectAssembler`.

This module is sans-io: it never imports trio.
"""

from __future__ import annotations

import functools
import io
import mmap
from collections.abc import Callable
from typing import Any, Final

import cbor2

from .._errors import LocalProtocolError, ObjectTooLargeError, RemoteProtocolError
from . import _inplace
from ._arrays import _TYPED_DTYPES, TAG_COLUMN_MAJOR, TAG_NDARRAY, TAG_ROW_MAJOR, TAG_TENSOR
from ._payload import (
    _LEN,
    _REJECTED_TAGS,
    OUT_OF_BAND_MIN,
    TAG_BUFFER,
    TAG_INT_MAP,
    TAG_SHAREABLE,
    BytesLike,
    ScatteredObject,
    _decoder,
    _split_head,
)

__all__ = ["MMAP_MIN", "SCATTER_MIN", "ObjectAssembler"]

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
        TAG_INT_MAP: _ignore,
        TAG_TENSOR: _ignore,
        TAG_BUFFER: scan.buffer,
    }
    _decoder(fp, hooks).decode()
    return scan.in_array


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
    that will be delivered (see :func:`._inplace._inplace_bytes_factory`), so it is never
    copied; array elements go into a writable ``bytearray`` or map that the
    array will view. :meth:`take` then returns a :class:`ScatteredObject`.
    Parts are filled in order, and each is allocated only when its first byte
    is due: a head announcing many parts commits nothing for them, and at
    most one part (under :data:`MMAP_MIN` bytes, or an untouched map) is
    allocated beyond the bytes that have arrived.

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
        "_plan",
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
        # Part-by-part mode: the head, each part's length and whether it holds
        # array elements, then the parts allocated so far and a writable view of each.
        self._head = b""
        self._plan: list[tuple[int, bool]] = []
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
        self._plan = list(zip(lengths, in_array, strict=True))
        self.received = head_end
        self._part = -1
        self._part_end = head_end
        self._next_part()
        return True

    def _next_part(self) -> None:
        """Move to the next part that still has room (parts may be empty), allocating it."""
        while self._part_end == self.received and self._part + 1 < len(self._plan):
            self._part += 1
            length, is_array = self._plan[self._part]
            part: bytes | bytearray | mmap.mmap
            inplace_bytes = _inplace._inplace_bytes
            if not is_array and length >= _inplace.INPLACE_BYTES_MIN and inplace_bytes is not None:
                part, view = inplace_bytes(length)
            else:
                part = mmap.mmap(-1, length) if length >= MMAP_MIN else bytearray(length)
                view = memoryview(part)
            self._parts.append(part)
            self._views.append(view)
            self._part_start = self._part_end
            self._part_end += length

    def target(self, offset: int, nbytes: int) -> memoryview | None:
        """The slice of the buffer where ``nbytes`` at ``offset`` belong, if they fit.

        A transport can receive a chunk's body straight into it; :meth:`feed`
        then sees the bytes are already in place and copies nothing.
        """
        if offset != self.received or offset + nbytes > self.size:
            return None
        if self._view is not None:
            return self._view[offset : offset + nbytes]
        if not self._plan or offset + nbytes > self._part_end:
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
        if not self._plan:
            assert rest is not None
            rest = self._feed_start(rest if rest.format == "B" else rest.cast("B"))
            if rest is None:
                self.received = end  # still waiting for the head
                return False
            self.received = end - len(rest)
            if not self._plan:  # one buffer after all
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
