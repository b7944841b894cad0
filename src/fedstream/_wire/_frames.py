"""Typed, immutable frame records: the vocabulary of the fedstream wire.

A frame on the wire is ``u32 length | CBOR head | tail``. The head is a CBOR
array whose first element is the frame type and whose other elements are the
frame's fields in declaration order. Only the frames that carry object bytes
(DATA, CHUNK, REPLY) have a tail; for the others the head fills the frame.

Each record class lists its wire fields in ``_wire_fields`` as
``(name, accepted types, may be null)``. The codec in ``_protocol`` checks a
received head against that list before it builds a record, and checks an
outgoing record the same way before it encodes one, so the two directions
cannot drift apart.

This module is sans-io: it never imports trio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

__all__ = [
    "FRAME_TYPES",
    "PROTOCOL_VERSION",
    "Abort",
    "Chunk",
    "Credit",
    "Data",
    "Done",
    "End",
    "ErrorCode",
    "Frame",
    "FrameType",
    "GoAway",
    "Hello",
    "Ping",
    "Pong",
    "Reply",
]

#: The wire protocol version this implementation speaks (2: replies are
#: flow-controlled like objects; version 1 peers are refused).
PROTOCOL_VERSION: Final = 2
#: A REPLY whose encoded reply is at most this long and travels whole in that
#: one frame uses no reply credit (acknowledgements, error replies).
FREE_REPLY_MAX: Final = 4096

Body = bytes | bytearray | memoryview

_UINT: Final = (int,)
_STR: Final = (str,)
_MAP: Final = (dict,)
_LIST: Final = (list,)
_BOOL: Final = (bool,)
_ANY: Final = (object,)


class FrameType(enum.IntEnum):
    """The first element of every frame head."""

    HELLO = 0x01
    GOAWAY = 0x02
    PING = 0x03
    PONG = 0x04
    DATA = 0x10
    CHUNK = 0x11
    REPLY = 0x12
    END = 0x13
    ABORT = 0x14
    DONE = 0x15
    CREDIT = 0x16


class ErrorCode(enum.IntEnum):
    """Reasons carried by GOAWAY."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    VERSION_MISMATCH = 3
    DUPLICATE_SITE = 4
    INTERNAL_ERROR = 5
    HANDSHAKE_TIMEOUT = 6
    HEARTBEAT_TIMEOUT = 7
    SHUTDOWN = 8
    IDENTITY_MISMATCH = 9


@dataclass(frozen=True, slots=True)
class Frame:
    """Base class of all frame records."""

    TYPE: ClassVar[FrameType]
    #: ``(field name, accepted Python types, may be null)`` in wire order.
    _wire_fields: ClassVar[tuple[tuple[str, tuple[type, ...], bool], ...]] = ()
    #: Whether a tail of raw bytes may follow the head.
    HAS_BODY: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """First frame in each direction: who I am and what I accept.

    ``limits`` maps limit names (``"max_frame_size"``, ``"max_object_size"``,
    ``"window"``, ``"heartbeat_ms"``) to unsigned integers; unknown names are
    ignored. ``features`` lists optional capabilities by name.
    """

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    _wire_fields: ClassVar = (
        ("version", _UINT, False),
        ("site", _STR, False),
        ("limits", _MAP, False),
        ("features", _LIST, False),
    )
    version: int
    site: str
    limits: dict[str, int] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GoAway(Frame):
    """Connection-level close: the sender will send nothing more."""

    TYPE: ClassVar[FrameType] = FrameType.GOAWAY
    _wire_fields: ClassVar = (("code", _UINT, False), ("message", _STR, False))
    code: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ping(Frame):
    """Liveness probe; the peer answers with a PONG carrying the same ``opaque``."""

    TYPE: ClassVar[FrameType] = FrameType.PING
    _wire_fields: ClassVar = (("opaque", _UINT, False),)
    opaque: int


@dataclass(frozen=True, slots=True)
class Pong(Frame):
    """Answer to a PING."""

    TYPE: ClassVar[FrameType] = FrameType.PONG
    _wire_fields: ClassVar = (("opaque", _UINT, False),)
    opaque: int


@dataclass(frozen=True, slots=True)
class Data(Frame):
    """Start of object ``seq`` of stream ``sid``, sent by the stream's opener.

    ``size`` is the object's encoded length; the ``body`` tail holds its first
    bytes and CHUNK frames carry the rest. ``ctx`` (the stream context) is
    present on seq 0 only and null otherwise.
    """

    TYPE: ClassVar[FrameType] = FrameType.DATA
    HAS_BODY: ClassVar[bool] = True
    _wire_fields: ClassVar = (
        ("sid", _UINT, False),
        ("seq", _UINT, False),
        ("size", _UINT, False),
        ("channel", _STR, False),
        ("topic", _STR, False),
        ("ctx", _MAP, True),
    )
    sid: int
    seq: int
    size: int
    channel: str
    topic: str
    ctx: dict[str, Any] | None = None
    body: Body = b""


@dataclass(frozen=True, slots=True)
class Chunk(Frame):
    """Continuation bytes of the object (DATA) or reply (REPLY) being sent on ``sid``.

    A CHUNK from the stream's opener continues its DATA; a CHUNK from the
    other side continues its REPLY. ``offset`` is where ``body`` starts in the
    encoded object and must equal the number of bytes already received.
    """

    TYPE: ClassVar[FrameType] = FrameType.CHUNK
    HAS_BODY: ClassVar[bool] = True
    _wire_fields: ClassVar = (
        ("sid", _UINT, False),
        ("seq", _UINT, False),
        ("offset", _UINT, False),
    )
    sid: int
    seq: int
    offset: int
    body: Body = b""


@dataclass(frozen=True, slots=True)
class Reply(Frame):
    """The receiver's reply to object ``seq``; ``last`` means its session has ended."""

    TYPE: ClassVar[FrameType] = FrameType.REPLY
    HAS_BODY: ClassVar[bool] = True
    _wire_fields: ClassVar = (
        ("sid", _UINT, False),
        ("seq", _UINT, False),
        ("size", _UINT, False),
        ("last", _BOOL, False),
    )
    sid: int
    seq: int
    size: int
    last: bool = False
    body: Body = b""


@dataclass(frozen=True, slots=True)
class End(Frame):
    """The opener ended the stream normally after ``count`` objects."""

    TYPE: ClassVar[FrameType] = FrameType.END
    _wire_fields: ClassVar = (("sid", _UINT, False), ("count", _UINT, False))
    sid: int
    count: int


#: The return codes an ABORT from a stream's opener may carry: why a sender
#: gives up on a stream. Anything else is a stream-level protocol error (see
#: :mod:`._stream`). An ABORT from the receiving side carries the rc its
#: consumer ended the session with (any but ``OK``).
ABORT_RCS: Final = frozenset(
    {"TASK_ABORTED", "TIMEOUT", "EXECUTION_EXCEPTION", "BAD_REQUEST_DATA", "SERVICE_UNAVAILABLE"}
)
#: Alias of :data:`ABORT_RCS`.
OPENER_ABORT_RCS: Final = ABORT_RCS


@dataclass(frozen=True, slots=True)
class Abort(Frame):
    """Either side ended the stream abnormally (distinct from END).

    ``rc`` is a ReturnCode string (from the opener, one of
    :data:`ABORT_RCS`), ``by`` the site that aborted.
    """

    TYPE: ClassVar[FrameType] = FrameType.ABORT
    _wire_fields: ClassVar = (
        ("sid", _UINT, False),
        ("rc", _STR, False),
        ("reason", _STR, False),
        ("by", _STR, False),
    )
    sid: int
    rc: str
    reason: str = ""
    by: str = ""


@dataclass(frozen=True, slots=True)
class Done(Frame):
    """The receiver has finalized its session for ``sid``.

    Sent once per session, after finalize, ``stream_done_cb`` and
    ``return_consumer`` ran. ``rc`` is the RC the consumer saw; ``result`` is
    the ``stream_done_cb`` result (null if none or falsy).
    """

    TYPE: ClassVar[FrameType] = FrameType.DONE
    _wire_fields: ClassVar = (
        ("sid", _UINT, False),
        ("rc", _STR, False),
        ("result", _ANY, True),
    )
    sid: int
    rc: str
    result: Any = None


@dataclass(frozen=True, slots=True)
class Credit(Frame):
    """The receiver grants ``increment`` more bytes of send window on ``sid``."""

    TYPE: ClassVar[FrameType] = FrameType.CREDIT
    _wire_fields: ClassVar = (("sid", _UINT, False), ("increment", _UINT, False))
    sid: int
    increment: int


#: Frame type number -> record class.
FRAME_TYPES: Final[dict[int, type[Frame]]] = {
    cls.TYPE: cls
    for cls in (Hello, GoAway, Ping, Pong, Data, Chunk, Reply, End, Abort, Done, Credit)
}
