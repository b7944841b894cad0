"""Receiving an out-of-band byte string straight into the ``bytes`` it becomes.

This module is sans-io: it never imports trio.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Final

__all__ = ["INPLACE_BYTES_MIN"]

#: Out-of-band ``bytes`` at least this long are received straight into the
#: ``bytes`` object that is delivered (where the interpreter allows it).
INPLACE_BYTES_MIN: Final = 4096


def _bytes_layout_matches(
    ctypes: ModuleType, obj: bytes, sval_offset: int, *, contents: bool = True
) -> bool:
    """Whether ``obj`` is laid out as in-place receiving assumes; reads only.

    A ``bytes`` object is a variable-size object header (``ob_size``, the
    length, right after the fixed object header) followed by its bytes at
    ``sval_offset`` and a terminating NUL, and its size is the fixed part plus
    its length. Nothing here writes, so a wrong guess costs nothing.
    ``contents=False`` skips comparing the bytes (an uninitialised object).
    """
    size = len(obj)
    if sys.getsizeof(obj) != bytes.__basicsize__ + size:
        return False
    address = id(obj)
    if ctypes.c_ssize_t.from_address(address + object.__basicsize__).value != size:
        return False
    if contents:
        expected = obj + b"\0"
        return bytes(ctypes.string_at(address + sval_offset, size + 1)) == expected
    return bytes(ctypes.string_at(address + sval_offset + size, 1)) == b"\0"


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
    nobody can observe it change.

    Before anything is written, the layout is checked read-only on a known
    ``bytes`` object and on a fresh uninitialised one (see
    :func:`_bytes_layout_matches`); only then is a probe written and read
    back. Other interpreters, or a CPython where any check fails, copy
    instead.
    """
    if sys.implementation.name != "cpython":
        return None
    try:
        import ctypes

        # ``ob_sval``, the first byte, ends the fixed part of the object.
        offset = bytes.__basicsize__ - 1
        known = bytes(range(1, 48))  # a fresh object, not a shared constant
        if not _bytes_layout_matches(ctypes, known, offset):
            return None
        prototype = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)
        new_bytes = prototype(("PyBytes_FromStringAndSize", ctypes.pythonapi))

        def inplace_bytes(size: int) -> tuple[bytes, memoryview]:
            obj = new_bytes(None, size)
            array_type = ctypes.c_char * size
            array = array_type.from_address(id(obj) + offset)
            array._owner = obj  # type: ignore[attr-defined]  # the view keeps obj alive
            return obj, memoryview(array).cast("B")

        probe = b"fedstream in-place bytes"
        obj, view = inplace_bytes(len(probe))
        if type(obj) is not bytes or not _bytes_layout_matches(ctypes, obj, offset, contents=False):
            return None
        view[:] = probe
        view.release()
        if obj != probe or hash(obj) != hash(probe) or len(obj) != len(probe):
            return None
    except Exception:  # no ctypes, or an unexpected object layout
        return None
    return inplace_bytes


_inplace_bytes: Final = _inplace_bytes_factory()
