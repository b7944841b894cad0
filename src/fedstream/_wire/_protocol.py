"""Sans-io framing: bytes in, typed frames out; frames in, bytes out.

:class:`FrameProtocol` owns no socket. The transport feeds it whatever bytes
arrive (``receive_data``), pulls frames out (``next_event``) and writes what
``send`` returns. That keeps every parsing decision testable byte by byte.

Hostile-input rules, all enforced here:

* the 4-byte length is checked against the receive limit *before* any of the
  frame is buffered beyond what the peer already sent us, and the buffer never
  holds more than one maximal frame plus one ``receive_data`` call;
* until the peer's HELLO arrives the limit is :data:`HANDSHAKE_FRAME_LIMIT`;
* the head is decoded with strict CBOR options (bounded depth, no
  indefinite-length items, no duplicate map keys, no shared-reference,
  string-reference or regular-expression tags);
* every field is type-checked against the frame's declared layout.

Anything that fails raises :class:`~fedstream.RemoteProtocolError` and leaves
the protocol in the ERROR state: nothing else can be read from it.

Receiving in place: with ``announce_bodies`` set, ``next_event`` returns a
:class:`BodyStart` as soon as a large DATA, CHUNK or REPLY head is in and
its body is not. The caller decides where that body goes: a writable view
of exactly its length (:meth:`FrameProtocol.receive_body_into`), into which
``get_buffer`` then hands out the rest, or, by asking for the next event
(or feeding bytes) without deciding, the protocol's own staging buffer. The
frame itself follows as usual, its ``body`` being the caller's view. The
protocol never calls back into its caller.
"""

from __future__ import annotations

import enum
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import cbor2

from .._errors import LocalProtocolError, RemoteProtocolError
from ._frames import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    Chunk,
    Credit,
    Data,
    ErrorCode,
    Frame,
    FrameType,
    GoAway,
    Hello,
    Reply,
)

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_SIZE",
    "HANDSHAKE_FRAME_LIMIT",
    "MAX_HEAD_DEPTH",
    "MIN_MAX_FRAME_SIZE",
    "NEED_DATA",
    "BodyStart",
    "FrameProtocol",
    "ProtocolState",
    "decode_head",
    "encode_frame",
]

#: Default bound on one frame (length prefix excluded) that we accept.
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
#: Smallest ``max_frame_size`` either side may announce.
MIN_MAX_FRAME_SIZE: Final = 64 * 1024
#: Bound on frames received before the peer's HELLO.
HANDSHAKE_FRAME_LIMIT: Final = 64 * 1024
#: Hard upper bound of the length prefix (u32).
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
#: Nesting bound for frame heads (the stream context and DONE result included).
MAX_HEAD_DEPTH: Final = 32

_LEN = struct.Struct(">I")
#: Working size of the receive buffer, and the default receive size.
_STAGE_SIZE: Final = 256 * 1024
#: Initial size of the receive buffer: a connection whose HELLO is not in yet
#: holds no more than this plus what the peer really sent (get_buffer grows it).
_HANDSHAKE_STAGE_SIZE: Final = 4 * 1024
#: Bodies at least this large may be received straight into a body target.
_SINK_MIN: Final = 64 * 1024
#: Staged bytes needed before a head is parsed early, and the most looked at.
_HEAD_PEEK_MIN: Final = 64
_HEAD_PEEK_MAX: Final = 64 * 1024


class _Marker(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event`` needs more bytes before it can return a frame.
NEED_DATA: Final = _Marker.NEED_DATA
#: The peer closed its side cleanly (EOF at a frame boundary).
CLOSED: Final = _Marker.CLOSED


@dataclass(slots=True)
class BodyStart:
    """A large frame's head is in and its ``length``-byte body is not (yet).

    ``frame`` is the frame with an empty body. Answer with
    :meth:`FrameProtocol.receive_body_into` to have the body land in a view
    of your own, or do nothing (ask for the next event) to have it staged.
    """

    frame: Frame
    length: int


class ProtocolState(enum.Enum):
    """Where a :class:`FrameProtocol` is in the connection's life."""

    #: Before the HELLO in that direction.
    HANDSHAKE = "HANDSHAKE"
    #: HELLO seen; any frame may follow.
    OPEN = "OPEN"
    #: GOAWAY seen (or EOF reached): nothing more will come.
    CLOSED = "CLOSED"
    #: A protocol error occurred; the connection must be dropped.
    ERROR = "ERROR"


def _reject_tag(value: object, immutable: bool) -> Any:
    raise ValueError("tag not allowed in fedstream frames")


#: Tags that make a decoder do surprising work: shared references (28, 29),
#: string references (25, 256) and regular expressions (35).
_REJECTED_TAGS: Final = {tag: _reject_tag for tag in (25, 28, 29, 35, 256)}


def _loads_strict(data: bytes, *, max_depth: int) -> tuple[Any, int]:
    """Decode one CBOR item from the start of ``data``; return it and its length."""
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        fp,
        semantic_decoders=_REJECTED_TAGS,
        max_depth=max_depth,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        # Map keys other than text/byte strings could be chosen to collide in
        # Python's hash table and make decoding quadratic.
        strict_hashable_types=True,
    )
    item = decoder.decode()
    return item, fp.tell()


def _loads_simple(data: bytes) -> tuple[list[Any], int] | None:
    """Decode a head that is a short array of uints, short texts, booleans and nulls.

    The frames sent once or more per object (DATA without a context, CHUNK,
    REPLY, CREDIT) have such heads; reading them here spares setting up a
    CBOR decoder. Anything else, a truncated head included, returns None and
    goes to :func:`_loads_strict`, which accepts the same items with the same
    values.
    """
    try:
        first = data[0]
        if not 0x81 <= first <= 0x97:
            return None
        pos = 1
        items: list[Any] = []
        append = items.append
        for _ in range(first - 0x80):
            byte = data[pos]
            pos += 1
            if byte < 0x18:
                append(byte)
            elif byte <= 0x1B:
                end = pos + (1 << (byte - 0x18))
                if end > len(data):
                    return None
                append(int.from_bytes(data[pos:end], "big"))
                pos = end
            elif 0x60 <= byte <= 0x78:
                if byte == 0x78:
                    end = pos + 1 + data[pos]
                    pos += 1
                else:
                    end = pos + byte - 0x60
                if end > len(data):
                    return None
                append(str(data[pos:end], "utf-8"))
                pos = end
            elif byte == 0xF6:
                append(None)
            elif byte == 0xF5:
                append(True)
            elif byte == 0xF4:
                append(False)
            else:
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return items, pos


#: Field types whose content is not fixed by the frame layout.
_FREE_FORM: Final = ((dict,), (object,))


def _is_uint(value: Any) -> bool:
    # IntEnum members (ErrorCode) are ints too; bool is not a uint here.
    return (type(value) is int or (isinstance(value, int) and not isinstance(value, bool))) and (
        0 <= value <= _U64_MAX
    )


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_bool(value: Any) -> bool:
    return type(value) is bool


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(type(k) is str for k in value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is str for v in value)


def _is_any(value: Any) -> bool:
    return True


_CHECKERS: Final[dict[tuple[type, ...], Callable[[Any], bool]]] = {
    (int,): _is_uint,
    (str,): _is_str,
    (bool,): _is_bool,
    (dict,): _is_str_map,
    (list,): _is_str_list,
    (object,): _is_any,
}


#: Per frame class: ``(name, checker, nullable, free_form)`` for each wire field.
_FieldSpec = tuple[str, Callable[[Any], bool], bool, bool]
_SPECS: Final[dict[type[Frame], tuple[_FieldSpec, ...]]] = {
    cls: tuple(
        (name, _CHECKERS[types], nullable, types in _FREE_FORM)
        for name, types, nullable in cls._wire_fields
    )
    for cls in FRAME_TYPES.values()
}


def decode_head(data: bytes, *, max_depth: int = MAX_HEAD_DEPTH) -> Frame:
    """Decode one frame's bytes (length prefix excluded) into a frame record.

    Raises:
        RemoteProtocolError: the bytes are not a valid frame.
    """
    simple = _loads_simple(data)
    if simple is not None:
        frame = _hot_frame(simple[0], simple[1], data)
        if frame is not None:
            return frame
        cls, kwargs, head_len = _fields(simple[0], simple[1], len(data))
    else:
        cls, kwargs, head_len = _parse_strict(data, len(data), max_depth=max_depth)
    if head_len < len(data):
        kwargs["body"] = memoryview(data)[head_len:]
    frame = cls(**kwargs)
    _check_semantics(frame, RemoteProtocolError)
    return frame


def _parse_head(
    data: bytes, frame_len: int, *, max_depth: int = MAX_HEAD_DEPTH
) -> tuple[type[Frame], dict[str, Any], int]:
    """Parse the head at the start of ``data`` (all or a prefix of a frame of
    ``frame_len`` bytes); return the record class, its fields and the head length.

    Raises:
        cbor2.CBORDecodeEOF: ``data`` is a strict prefix of the frame and ends
            inside the head (only possible when ``len(data) < frame_len``).
        RemoteProtocolError: the head is invalid.
    """
    simple = _loads_simple(data)
    if simple is not None:
        head, head_len = simple
        return _fields(head, head_len, frame_len)
    return _parse_strict(data, frame_len, max_depth=max_depth)


def _parse_strict(
    data: bytes, frame_len: int, *, max_depth: int = MAX_HEAD_DEPTH
) -> tuple[type[Frame], dict[str, Any], int]:
    """:func:`_parse_head` for a head that :func:`_loads_simple` does not read."""
    try:
        head, head_len = _loads_strict(data, max_depth=max_depth)
    except cbor2.CBORDecodeEOF:
        if len(data) < frame_len:
            raise
        raise RemoteProtocolError("frame head is truncated") from None
    except Exception as exc:  # cbor2 raises CBORDecodeError, but be total here
        raise RemoteProtocolError(f"frame head is not valid CBOR: {exc}") from exc
    return _fields(head, head_len, frame_len)


_DATA: Final = FrameType.DATA.value
_CHUNK: Final = FrameType.CHUNK.value
_REPLY: Final = FrameType.REPLY.value
_CREDIT: Final = FrameType.CREDIT.value


def _hot_frame(head: list[Any], head_len: int, data: bytes) -> Frame | None:
    """The frame of a simple head (:func:`_loads_simple`) if it is one of the
    per-object frames (DATA without a context, CHUNK, REPLY, CREDIT) with
    exactly its fields, each plainly valid; else None.

    Simple heads hold only unsigned integers of at most 64 bits, texts,
    booleans and nulls, so a type check is all a field needs here. Anything
    else (extra fields, a body longer than its size, bytes after a CREDIT)
    returns None and takes the general path (:func:`_fields`), which accepts
    or reports it.
    """
    ftype = head[0]
    count = len(head)
    body: memoryview | bytes = memoryview(data)[head_len:] if head_len < len(data) else b""
    if ftype == _CHUNK and count == 4:
        sid, seq, offset = head[1], head[2], head[3]
        if type(sid) is int and type(seq) is int and type(offset) is int:
            return Chunk(sid, seq, offset, body)
    elif ftype == _REPLY and count == 5:
        sid, seq, size, last = head[1], head[2], head[3], head[4]
        if (
            type(sid) is int
            and type(seq) is int
            and type(size) is int
            and type(last) is bool
            and len(body) <= size
        ):
            return Reply(sid, seq, size, last, body)
    elif ftype == _DATA and count == 7:
        sid, seq, size, channel, topic = head[1], head[2], head[3], head[4], head[5]
        if (
            head[6] is None
            and type(sid) is int
            and type(seq) is int
            and type(size) is int
            and type(channel) is str
            and type(topic) is str
            and len(body) <= size
        ):
            return Data(sid, seq, size, channel, topic, None, body)
    elif ftype == _CREDIT and count == 3:
        sid, increment = head[1], head[2]
        if type(sid) is int and type(increment) is int and head_len == len(data):
            return Credit(sid, increment)
    return None


def _fields(head: Any, head_len: int, frame_len: int) -> tuple[type[Frame], dict[str, Any], int]:
    """Check a decoded head against its frame's spec; see :func:`_parse_head`."""
    if type(head) is not list or not head:
        raise RemoteProtocolError("frame head must be a non-empty CBOR array")
    ftype = head[0]
    cls = FRAME_TYPES.get(ftype) if type(ftype) is int else None
    if cls is None:
        raise RemoteProtocolError(f"unknown frame type {ftype!r}")
    specs = _SPECS[cls]
    if len(head) - 1 < len(specs):
        raise RemoteProtocolError(
            f"{cls.__name__} frame has {len(head) - 1} fields, needs {len(specs)}"
        )
    kwargs: dict[str, Any] = {}
    # Extra trailing elements are ignored so that a later minor revision can
    # append fields without breaking older peers.
    for (name, check, nullable, _), value in zip(specs, head[1:], strict=False):
        if value is None and nullable:
            kwargs[name] = None
        elif check(value):
            kwargs[name] = value
        else:
            raise RemoteProtocolError(
                f"{cls.__name__}.{name} has invalid value {type(value).__name__}"
            )
    if head_len < frame_len and not cls.HAS_BODY:
        raise RemoteProtocolError(
            f"{cls.__name__} frame has {frame_len - head_len} unexpected bytes after its head"
        )
    return cls, kwargs, head_len


def _check_semantics(frame: Frame, error: type[LocalProtocolError | RemoteProtocolError]) -> None:
    """Cross-field rules that the per-field type checks cannot express."""
    if isinstance(frame, Hello):
        if not frame.site:
            raise error("HELLO.site must not be empty")
        for key, value in frame.limits.items():
            if type(value) is not int or not 0 <= value <= _U64_MAX:
                raise error(f"HELLO.limits[{key!r}] must be an unsigned integer")
    size = getattr(frame, "size", None)
    body = getattr(frame, "body", None)
    if size is not None and body is not None and len(body) > size:
        raise error(f"{type(frame).__name__} body ({len(body)} bytes) exceeds its size {size}")


def _hot_head(frame: Frame) -> list[Any] | None:
    """The head of a per-object frame whose fields are plainly valid, else None.

    DATA without a context, CHUNK, REPLY and CREDIT go out once or more per
    object: their fields are checked here inline instead of through
    :data:`_SPECS`. Anything unusual (an ``IntEnum``, a context, a value out
    of range) returns None and takes the general path, which reports it.
    """
    cls = type(frame)
    u64 = _U64_MAX
    if cls is Chunk:
        a, b, c = frame.sid, frame.seq, frame.offset  # type: ignore[attr-defined]
        if (
            type(a) is int
            and type(b) is int
            and type(c) is int
            and 0 <= a <= u64
            and 0 <= b <= u64
            and 0 <= c <= u64
        ):
            return [FrameType.CHUNK.value, a, b, c]
    elif cls is Reply:
        a, b, c, last = frame.sid, frame.seq, frame.size, frame.last  # type: ignore[attr-defined]
        if (
            type(a) is int
            and type(b) is int
            and type(c) is int
            and type(last) is bool
            and 0 <= a <= u64
            and 0 <= b <= u64
            and 0 <= c <= u64
        ):
            return [FrameType.REPLY.value, a, b, c, last]
    elif cls is Data:
        data: Data = frame  # type: ignore[assignment]
        a, b, c = data.sid, data.seq, data.size
        if (
            data.ctx is None
            and type(a) is int
            and type(b) is int
            and type(c) is int
            and type(data.channel) is str
            and type(data.topic) is str
            and 0 <= a <= u64
            and 0 <= b <= u64
            and 0 <= c <= u64
        ):
            return [FrameType.DATA.value, a, b, c, data.channel, data.topic, None]
    elif cls is Credit:
        a, b = frame.sid, frame.increment  # type: ignore[attr-defined]
        if type(a) is int and type(b) is int and 0 <= a <= u64 and 0 <= b <= u64:
            return [FrameType.CREDIT.value, a, b]
    return None


def _body_view(frame: Frame) -> memoryview | None:
    """The frame's body as a flat byte view (None when empty), checked against its size."""
    raw = frame.body  # type: ignore[attr-defined]
    body = raw if isinstance(raw, memoryview) else memoryview(raw)
    if not body.c_contiguous:
        body = memoryview(body.tobytes())
    elif body.ndim != 1 or body.itemsize != 1:
        body = body.cast("B")
    size = getattr(frame, "size", None)
    if size is not None and len(body) > size:
        raise LocalProtocolError(
            f"{type(frame).__name__} body ({len(body)} bytes) exceeds its size {size}"
        )
    return body if len(body) else None


def encode_frame(frame: Frame) -> tuple[bytes, memoryview | None]:
    """Encode ``frame`` into ``(length prefix + head, body or None)``.

    The body is returned separately so that a large payload can be handed to
    the transport without being copied.

    Raises:
        LocalProtocolError: a field has the wrong type, or the head cannot be
            encoded as CBOR.
    """
    hot = _hot_head(frame)
    if hot is not None:
        body = _body_view(frame) if frame.HAS_BODY else None
        try:
            head_bytes = cbor2.dumps(hot)
        except Exception:  # e.g. a lone surrogate in a name: report it as the checked path does
            return _encode_checked(frame)
        length = len(head_bytes) + (len(body) if body is not None else 0)
        if length > _U32_MAX:
            raise LocalProtocolError(f"frame of {length} bytes does not fit a u32 length prefix")
        return _LEN.pack(length) + head_bytes, body
    return _encode_checked(frame)


def _encode_checked(frame: Frame) -> tuple[bytes, memoryview | None]:
    """:func:`encode_frame` for any frame: every field checked against its spec."""
    specs = _SPECS[type(frame)]
    head: list[Any] = [int(frame.TYPE)]
    free_form = False
    for name, check, nullable, is_free in specs:
        value = getattr(frame, name)
        if value is None and nullable:
            head.append(None)
            continue
        if not check(value):
            raise LocalProtocolError(
                f"{type(frame).__name__}.{name} has invalid value {value!r:.80}"
            )
        head.append(int(value) if check is _is_uint else value)
        free_form = free_form or is_free
    body = _body_view(frame) if frame.HAS_BODY else None
    if isinstance(frame, Hello):
        mfs = frame.limits.get("max_frame_size", MIN_MAX_FRAME_SIZE)
        if isinstance(mfs, int) and not MIN_MAX_FRAME_SIZE <= mfs <= _U32_MAX:
            raise LocalProtocolError(f"HELLO announces max_frame_size {mfs}, out of range")
    _check_semantics(frame, LocalProtocolError)
    try:
        head_bytes = cbor2.dumps(head)
        if free_form:
            # Free-form fields (stream context, DONE result, HELLO limits) get
            # the same strict check the peer will apply, so we fail here, not there.
            _loads_strict(head_bytes, max_depth=MAX_HEAD_DEPTH)
    except Exception as exc:
        raise LocalProtocolError(f"cannot encode {type(frame).__name__} head: {exc}") from exc
    length = len(head_bytes) + (len(body) if body is not None else 0)
    if length > _U32_MAX:
        raise LocalProtocolError(f"frame of {length} bytes does not fit a u32 length prefix")
    return _LEN.pack(length) + head_bytes, body


class FrameProtocol:
    """The sans-io state of one side of one fedstream connection.

    Args:
        max_frame_size: the largest frame (length prefix excluded) this side
            accepts once the handshake is done. Announce it in our HELLO.

    Error handling:
        ``receive_data``/``next_event`` raise :class:`RemoteProtocolError` for
        anything the peer got wrong; ``send`` raises :class:`LocalProtocolError`
        for anything the caller got wrong. After a remote error the object is
        in :attr:`ProtocolState.ERROR` and every later ``next_event`` raises
        again.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= _U32_MAX:
            raise LocalProtocolError(
                f"max_frame_size must be in [{MIN_MAX_FRAME_SIZE}, {_U32_MAX}]"
            )
        self.max_frame_size = max_frame_size
        # Received bytes not yet returned as frames live in _buf[_pos:_end];
        # _buf[_end:] is free room that get_buffer() hands out.
        self._buf = bytearray(_HANDSHAKE_STAGE_SIZE)
        self._pos = 0
        self._end = 0
        # A frame whose body is being received straight into a caller's buffer.
        self._sink: memoryview | None = None
        self._sink_filled = 0
        self._sink_head: tuple[type[Frame], dict[str, Any]] | None = None
        # Whether the frame at _pos was offered (or cannot be offered) as a
        # BodyStart; cleared when that frame is returned.
        self._sink_declined = False
        # The BodyStart offered last, while the caller has not answered it:
        # (frame class, fields, head length, body length).
        self._offer: tuple[type[Frame], dict[str, Any], int, int] | None = None
        self._eof = False
        self._error: RemoteProtocolError | None = None
        #: Whether ``next_event`` returns a :class:`BodyStart` when a large
        #: DATA, CHUNK or REPLY body starts to arrive (see the module docstring).
        self.announce_bodies = False
        #: State of the peer -> us direction.
        self.their_state = ProtocolState.HANDSHAKE
        #: State of the us -> peer direction.
        self.our_state = ProtocolState.HANDSHAKE
        #: The peer's HELLO once received.
        self.their_hello: Hello | None = None
        #: The largest frame the peer accepts (from its HELLO).
        self.peer_max_frame_size = HANDSHAKE_FRAME_LIMIT

    # ------------------------------------------------------------------ receiving

    @property
    def receive_limit(self) -> int:
        """The largest frame accepted right now."""
        if self.their_state is ProtocolState.HANDSHAKE:
            return min(HANDSHAKE_FRAME_LIMIT, self.max_frame_size)
        return self.max_frame_size

    @property
    def buffered(self) -> int:
        """Bytes received and held by the protocol, not yet returned as frames."""
        return self._end - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() called after EOF")
            return
        if self._error is not None:
            return  # the connection is dead; keep nothing
        self._offer = None  # bytes without an answer: that body is staged
        if not data:
            self._eof = True
            return
        view = memoryview(data).cast("B")
        if self._sink is not None:
            n = min(len(view), len(self._sink) - self._sink_filled)
            self._sink[self._sink_filled : self._sink_filled + n] = view[:n]
            self._sink_filled += n
            view = view[n:]
            if not view:
                return
        self._make_room(len(view))
        self._buf[self._end : self._end + len(view)] = view
        self._end += len(view)

    def get_buffer(self, sizehint: int = _STAGE_SIZE) -> memoryview:
        """A writable view to receive the next bytes into (zero-copy receiving).

        Write at most ``len(view)`` bytes into it, release the view, then call
        :meth:`buffer_updated` with the count. While a large body is being
        received into a caller's view (:meth:`receive_body_into`), the view
        is the rest of that one. Report EOF with ``receive_data(b"")``.
        """
        self._offer = None  # asked for room without an answer: that body is staged
        if self._sink is not None:
            return self._sink[self._sink_filled :]
        self._make_room(max(sizehint, 1))
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer` view."""
        if nbytes < 0:
            raise LocalProtocolError("buffer_updated() needs a non-negative count")
        if self._sink is not None:
            if self._sink_filled + nbytes > len(self._sink):
                raise LocalProtocolError("buffer_updated() overran the buffer")
            self._sink_filled += nbytes
        else:
            if self._end + nbytes > len(self._buf):
                raise LocalProtocolError("buffer_updated() overran the buffer")
            self._end += nbytes

    def _make_room(self, nbytes: int) -> None:
        """Ensure ``nbytes`` of free room after ``_end`` (moving or growing the buffer)."""
        if len(self._buf) - self._end >= nbytes:
            return
        live = self._end - self._pos
        if self._pos:
            self._buf[:live] = self._buf[self._pos : self._end]
            self._pos, self._end = 0, live
        need = live + nbytes
        if len(self._buf) < need:
            self._buf.extend(bytes(need - len(self._buf)))

    def next_event(self) -> Frame | BodyStart | Literal[_Marker.NEED_DATA, _Marker.CLOSED]:
        """Return the next complete frame, :data:`NEED_DATA` or :data:`CLOSED`
        (or, with ``announce_bodies``, a :class:`BodyStart`).

        Raises:
            RemoteProtocolError: the peer broke the protocol. The connection
                must be closed; every later call raises the same error.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            self.their_state = ProtocolState.ERROR
            self._buf = bytearray()
            self._pos = self._end = 0
            self._sink = None
            self._offer = None
            raise

    def _next_event(self) -> Frame | BodyStart | Literal[_Marker.NEED_DATA, _Marker.CLOSED]:
        if self._sink is not None:
            return self._finish_sink()
        self._offer = None  # not answered: the body is staged
        if self.their_state is ProtocolState.CLOSED:
            if self.buffered:
                raise RemoteProtocolError(
                    "data received after GOAWAY", error_code=ErrorCode.PROTOCOL_ERROR
                )
            return CLOSED
        available = self.buffered
        if available < _LEN.size:
            return self._need_data(available)
        (length,) = _LEN.unpack_from(self._buf, self._pos)
        limit = self.receive_limit
        if length > limit:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the limit of {limit}",
                error_code=ErrorCode.FRAME_TOO_LARGE,
            )
        if length == 0:
            raise RemoteProtocolError("empty frame")
        start = self._pos + _LEN.size
        end = start + length
        if self._end < end:
            if length >= _SINK_MIN and self.announce_bodies and not self._sink_declined:
                offer = self._offer_body(length)
                if offer is not None:
                    return offer
            return self._need_data(available)
        with memoryview(self._buf) as view:
            data = bytes(view[start:end])
        self._consume_stage(end)
        self._sink_declined = False
        frame = decode_head(data)
        self._after_receive(frame)
        return frame

    def _consume_stage(self, upto: int) -> None:
        self._pos = upto
        if self._pos == self._end:
            self._pos = self._end = 0
            if len(self._buf) > _STAGE_SIZE:
                self._buf = bytearray(_STAGE_SIZE)  # give back a grown buffer

    def _offer_body(self, length: int) -> BodyStart | None:
        """A :class:`BodyStart` for the frame at ``_pos``, if it has a large body."""
        if self.their_state is not ProtocolState.OPEN:
            return None
        start = self._pos + _LEN.size
        staged = self._end - start
        if staged < min(_HEAD_PEEK_MIN, length):
            return None  # not even a small head yet: wait for more
        with memoryview(self._buf) as view:
            peek = bytes(view[start : start + min(staged, _HEAD_PEEK_MAX)])
        try:
            cls, kwargs, head_len = _parse_head(peek, length)
        except cbor2.CBORDecodeEOF:
            if len(peek) >= _HEAD_PEEK_MAX:
                self._sink_declined = True  # a huge head: take the slow path
            return None
        self._sink_declined = True  # offered once; staged unless answered
        body_len = length - head_len
        if not cls.HAS_BODY or body_len < _SINK_MIN:
            return None
        self._offer = (cls, kwargs, head_len, body_len)
        return BodyStart(cls(**kwargs), body_len)

    def receive_body_into(self, target: memoryview) -> None:
        """Receive the body the last :class:`BodyStart` announced into ``target``.

        ``target`` must be a writable view of exactly the announced length.
        Call it right after ``next_event`` returned the BodyStart, before
        feeding more bytes or asking for the next event (either stages the
        body instead).

        Raises:
            LocalProtocolError: no BodyStart is waiting for an answer, or
                ``target`` does not fit.
        """
        offer = self._offer
        if offer is None:
            raise LocalProtocolError("no body is waiting to be received")
        cls, kwargs, head_len, body_len = offer
        target = target.cast("B") if target.format != "B" else target
        if len(target) != body_len or target.readonly:
            raise LocalProtocolError(
                "receive_body_into needs a writable view of the body size "
                f"({body_len} bytes), not {len(target)} bytes"
            )
        self._offer = None
        self._sink_declined = False
        start = self._pos + _LEN.size
        staged_body = self._end - start - head_len
        with memoryview(self._buf) as view:
            target[:staged_body] = view[start + head_len : self._end]
        self._consume_stage(self._end)
        self._sink = target
        self._sink_filled = staged_body
        self._sink_head = (cls, kwargs)

    def _finish_sink(self) -> Frame | Literal[_Marker.NEED_DATA, _Marker.CLOSED]:
        sink = self._sink
        assert sink is not None
        assert self._sink_head is not None
        if self._sink_filled < len(sink):
            if self._eof:
                raise RemoteProtocolError("connection closed inside a frame")
            return NEED_DATA
        cls, kwargs = self._sink_head
        self._sink = None
        self._sink_head = None
        kwargs["body"] = sink
        frame = cls(**kwargs)
        _check_semantics(frame, RemoteProtocolError)
        self._after_receive(frame)
        return frame

    def _need_data(self, available: int) -> Literal[_Marker.NEED_DATA, _Marker.CLOSED]:
        if not self._eof:
            return NEED_DATA
        if available:
            raise RemoteProtocolError(f"connection closed inside a frame ({available} bytes)")
        self.their_state = ProtocolState.CLOSED
        return CLOSED

    def _after_receive(self, frame: Frame) -> None:
        if self.their_state is ProtocolState.HANDSHAKE:
            if isinstance(frame, GoAway):
                # A refusal: the peer answered our HELLO with GOAWAY instead of its own.
                self.their_state = ProtocolState.CLOSED
                return
            if not isinstance(frame, Hello):
                raise RemoteProtocolError(
                    f"expected HELLO, got {type(frame).__name__}",
                    error_code=ErrorCode.PROTOCOL_ERROR,
                )
            if frame.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"peer speaks protocol version {frame.version}, we speak {PROTOCOL_VERSION}",
                    error_code=ErrorCode.VERSION_MISMATCH,
                )
            peer_max = frame.limits.get("max_frame_size", MIN_MAX_FRAME_SIZE)
            if not MIN_MAX_FRAME_SIZE <= peer_max <= _U32_MAX:
                raise RemoteProtocolError(f"peer announced max_frame_size {peer_max}")
            self.their_hello = frame
            self.peer_max_frame_size = peer_max
            self.their_state = ProtocolState.OPEN
        elif isinstance(frame, Hello):
            raise RemoteProtocolError("second HELLO on one connection")
        elif isinstance(frame, GoAway):
            self.their_state = ProtocolState.CLOSED

    # -------------------------------------------------------------------- sending

    def send(self, frame: Frame) -> bytes:
        """Return the bytes that put ``frame`` on the wire."""
        head, body = self.send_parts(frame)
        return head if body is None else head + body

    def send_parts(self, frame: Frame) -> tuple[bytes, memoryview | None]:
        """Like :meth:`send`, but return ``(prefix + head, body)`` so a large
        body can be written without being copied.

        Raises:
            LocalProtocolError: the frame is invalid, too large for the peer,
                or not allowed in the current state.
        """
        if self.our_state is ProtocolState.CLOSED:
            raise LocalProtocolError(f"cannot send {type(frame).__name__} after GOAWAY")
        if self.our_state is ProtocolState.HANDSHAKE and not isinstance(frame, (Hello, GoAway)):
            raise LocalProtocolError(
                f"the first frame sent must be HELLO or GOAWAY, not {type(frame).__name__}"
            )
        if self.our_state is ProtocolState.OPEN and isinstance(frame, Hello):
            raise LocalProtocolError("HELLO was already sent")
        head, body = encode_frame(frame)
        length = len(head) - _LEN.size + (len(body) if body is not None else 0)
        limit = self.peer_max_frame_size
        if length > limit:
            raise LocalProtocolError(
                f"{type(frame).__name__} frame of {length} bytes exceeds "
                f"the peer's limit of {limit}"
            )
        if isinstance(frame, Hello):
            self.our_state = ProtocolState.OPEN
        elif isinstance(frame, GoAway):
            self.our_state = ProtocolState.CLOSED
        return head, body

    def hello(
        self, site: str, *, limits: dict[str, int] | None = None, features: list[str] | None = None
    ) -> Hello:
        """Build our HELLO, announcing ``max_frame_size`` along with ``limits``."""
        all_limits = {"max_frame_size": self.max_frame_size, **(limits or {})}
        return Hello(PROTOCOL_VERSION, site, all_limits, list(features or []))
