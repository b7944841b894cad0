"""The sans-io wire protocol: frames, framing and object encoding.

Nothing in this package does I/O or imports trio; the transports and the
engine drive it. See ``docs/protocol.md`` for the format.
"""

from ._frames import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    ErrorCode,
    Frame,
    FrameType,
    GoAway,
    Hello,
    Ping,
    Pong,
    Reply,
)
from ._payload import (
    OUT_OF_BAND_MIN,
    TAG_BUFFER,
    TAG_SHAREABLE,
    EncodedObject,
    ObjectAssembler,
    decode_object,
    encode_object,
)
from ._protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_FRAME_LIMIT,
    MIN_MAX_FRAME_SIZE,
    NEED_DATA,
    FrameProtocol,
    ProtocolState,
    decode_head,
    encode_frame,
)

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_TYPES",
    "HANDSHAKE_FRAME_LIMIT",
    "MIN_MAX_FRAME_SIZE",
    "NEED_DATA",
    "OUT_OF_BAND_MIN",
    "PROTOCOL_VERSION",
    "TAG_BUFFER",
    "TAG_SHAREABLE",
    "Abort",
    "Chunk",
    "Credit",
    "Data",
    "Done",
    "EncodedObject",
    "End",
    "ErrorCode",
    "Frame",
    "FrameProtocol",
    "FrameType",
    "GoAway",
    "Hello",
    "ObjectAssembler",
    "Ping",
    "Pong",
    "ProtocolState",
    "Reply",
    "decode_head",
    "decode_object",
    "encode_frame",
    "encode_object",
]
