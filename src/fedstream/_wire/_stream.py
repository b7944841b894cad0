"""Sans-io state of one stream session: sequence numbers, credit, END, ``last``, DONE.

The frame codec (:mod:`._protocol`) knows what a frame *is*; this module
knows what a frame *means for its stream*: whether object ``seq`` may start
now, whether a CHUNK continues the object where it left off, whether the
sender stays within the credit it was granted, whether END counts the
objects actually sent, whether an ABORT's return code is one the protocol
defines. Each side of a stream has one object here
(:class:`OpenerStream` on the site that opened it, :class:`ReceiverStream`
on the other), fed frames of its ``sid`` and asked for the frames to send,
h11 style: the caller asks what happens next, nothing calls back up.

Nothing here does I/O, reads a clock or touches object bytes beyond their
lengths, so a Hypothesis state machine can drive both sides of a whole
session without trio (``tests/test_wire_stream.py``).

Error handling: a frame from the peer that breaks the stream's rules
raises :class:`StreamViolation` (a :class:`~fedstream.RemoteProtocolError`
carrying ``rc = BAD_REQUEST_DATA``) and ends that side's stream with that
rc; the caller answers the peer (REPLY or ABORT) and finalizes. Misuse by
the local caller (sending beyond credit, a second DONE) raises
:class:`~fedstream.LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

from .._errors import LocalProtocolError, RemoteProtocolError
from .._shareable import ReturnCode
from ._frames import Abort, Chunk, Credit, Data, Done, End, Reply

__all__ = [
    "ABORT_RCS",
    "ObjectComplete",
    "OpenerStream",
    "ReceiverStream",
    "ReplyComplete",
    "StreamAborted",
    "StreamDone",
    "StreamEnded",
    "StreamState",
    "StreamViolation",
]

#: Return codes an ABORT may carry; anything else is a violation. (A
#: receiver's ``END_STREAM(rc)`` outside ``consume`` also travels as ABORT,
#: so the set is the ReturnCode vocabulary, minus ``OK``: an abort is never
#: a success.)
ABORT_RCS: Final[frozenset[str]] = frozenset(
    value
    for name, value in vars(ReturnCode).items()
    if name.isupper() and isinstance(value, str) and value != ReturnCode.OK
)


class StreamViolation(RemoteProtocolError):
    """The peer broke this stream's rules; the stream ends with ``rc``."""

    def __init__(self, message: str, rc: str = ReturnCode.BAD_REQUEST_DATA) -> None:
        super().__init__(message)
        self.rc = rc


class StreamState(enum.Enum):
    #: Objects may flow.
    OPEN = "open"
    #: The stream's outcome is decided (END, ABORT, ``last`` or a violation);
    #: only DONE is still to come.
    ENDED = "ended"
    #: DONE was sent (receiver) or received (opener): nothing more for this sid.
    DONE = "done"


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class ObjectComplete:
    """All ``size`` bytes of object ``seq`` arrived (receiver side)."""

    seq: int
    size: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """A valid END: the opener sent exactly ``count`` whole objects."""

    count: int


@dataclass(frozen=True, slots=True)
class StreamAborted:
    """The peer aborted the stream."""

    rc: str
    reason: str
    by: str


@dataclass(frozen=True, slots=True)
class ReplyComplete:
    """All bytes of the reply to object ``seq`` arrived (opener side)."""

    seq: int
    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class StreamDone:
    """The receiver finalized its session with ``rc`` (opener side)."""

    rc: str


Event = ObjectComplete | StreamEnded | StreamAborted | ReplyComplete | StreamDone


def _check_abort(frame: Abort) -> None:
    if frame.rc not in ABORT_RCS:
        raise StreamViolation(f"ABORT with return code {frame.rc[:64]!r}, not one of ABORT_RCS")


# ------------------------------------------------------------------ receiver


class ReceiverStream:
    """The receiving side of stream ``sid``.

    ``window`` is the initial credit this side announced (0: no flow
    control); ``credit_step`` how many bytes it lets accumulate before it
    grants them back.
    """

    def __init__(
        self, sid: int, *, window: int, max_object_size: int, credit_step: int | None = None
    ) -> None:
        self.sid = sid
        self.state = StreamState.OPEN
        self.rc: str | None = None
        self.max_object_size = max_object_size
        self.window = window
        #: Bytes the opener may still send (``inf`` without flow control).
        self.credit: float = math.inf if window == 0 else float(window)
        self.credit_step = credit_step or max(1, window // 2)
        self._ungranted = 0
        #: The seq the next DATA must carry.
        self.next_seq = 0
        #: The object being received: ``(seq, size, received)``.
        self.current: tuple[int, int, int] | None = None
        #: Objects received whole, and the seq of the next reply due.
        self.completed = 0
        self.next_reply = 0

    # ---- frames from the opener

    def receive(self, frame: Data | Chunk | End | Abort) -> list[Event]:
        if self.state is not StreamState.OPEN:
            return []  # frames behind our own ending are dropped
        try:
            return self._receive(frame)
        except StreamViolation as exc:
            self._end(exc.rc)
            raise

    def _receive(self, frame: Data | Chunk | End | Abort) -> list[Event]:
        if isinstance(frame, Abort):
            _check_abort(frame)
            self._end(frame.rc)
            return [StreamAborted(frame.rc, frame.reason, frame.by)]
        if isinstance(frame, End):
            if self.current is not None:
                raise StreamViolation(f"END in the middle of object {self.current[0]}")
            if frame.count != self.completed:
                raise StreamViolation(
                    f"END counts {frame.count} objects, {self.completed} were sent"
                )
            self._end(ReturnCode.OK)
            return [StreamEnded(frame.count)]
        if isinstance(frame, Data):
            if self.current is not None:
                raise StreamViolation(
                    f"object {frame.seq} started before object {self.current[0]} was whole"
                )
            if frame.seq != self.next_seq:
                raise StreamViolation(f"expected object {self.next_seq}, got {frame.seq}")
            if self.next_reply < self.completed:
                raise StreamViolation(f"object {frame.seq} sent before the reply to the last one")
            if frame.size > self.max_object_size:
                raise StreamViolation(
                    f"object of {frame.size} bytes exceeds max_object_size {self.max_object_size}"
                )
            self.next_seq += 1
            self.current = (frame.seq, frame.size, 0)
            return self._take(frame.seq, 0, len(frame.body))
        # CHUNK
        if self.current is None or frame.seq != self.current[0]:
            raise StreamViolation(f"CHUNK for object {frame.seq}, which is not being sent")
        if frame.offset != self.current[2]:
            raise StreamViolation(
                f"CHUNK of object {frame.seq} at offset {frame.offset}, expected {self.current[2]}"
            )
        return self._take(frame.seq, frame.offset, len(frame.body))

    def _take(self, seq: int, offset: int, nbytes: int) -> list[Event]:
        assert self.current is not None
        _, size, _ = self.current
        if offset + nbytes > size:
            raise StreamViolation(f"object {seq} has {size} bytes; {offset + nbytes} were sent")
        if nbytes > self.credit:
            raise StreamViolation(
                f"{nbytes} bytes sent on stream {self.sid} with {self.credit} credit"
            )
        self.credit -= nbytes
        self._ungranted += nbytes
        if offset + nbytes == size:
            self.current = None
            self.completed += 1
            return [ObjectComplete(seq, size)]
        self.current = (seq, size, offset + nbytes)
        return []

    # ---- frames to the opener

    def grant(self) -> Credit | None:
        """The CREDIT owed for bytes received, once a whole step is due."""
        if self.window == 0 or self.state is not StreamState.OPEN:
            return None
        if self._ungranted < self.credit_step:
            return None
        increment, self._ungranted = self._ungranted, 0
        self.credit += increment
        return Credit(self.sid, increment)

    def reply(self, size: int, *, last: bool, body: bytes = b"") -> Reply:
        """The REPLY to the oldest object not answered yet; ``last`` ends the stream."""
        if self.state is StreamState.DONE:
            raise LocalProtocolError(f"stream {self.sid} is done")
        if self.next_reply >= self.completed:
            raise LocalProtocolError(f"no object of stream {self.sid} is waiting for a reply")
        seq = self.next_reply
        self.next_reply += 1
        if last and self.state is StreamState.OPEN:
            self.state = StreamState.ENDED
        return Reply(self.sid, seq, size, last, body)

    def abort(self, rc: str, reason: str = "", by: str = "") -> Abort:
        """This side ends the stream abnormally."""
        if rc not in ABORT_RCS:
            raise LocalProtocolError(f"cannot abort with return code {rc!r}")
        if self.state is not StreamState.OPEN:
            raise LocalProtocolError(f"stream {self.sid} has already ended")
        self._end(rc)
        return Abort(self.sid, rc, reason, by)

    def done(self, rc: str) -> Done:
        """DONE, exactly once, after the stream ended (the consumer finalized)."""
        if self.state is StreamState.DONE:
            raise LocalProtocolError(f"DONE for stream {self.sid} was already sent")
        if self.state is StreamState.OPEN:
            raise LocalProtocolError(f"stream {self.sid} has not ended")
        self.state = StreamState.DONE
        if self.rc is None:  # ended by a ``last`` reply: the consumer's rc
            self.rc = rc
        return Done(self.sid, rc)

    def _end(self, rc: str) -> None:
        if self.state is StreamState.OPEN:
            self.state = StreamState.ENDED
            self.rc = rc


# ------------------------------------------------------------------ opener


class OpenerStream:
    """The opening (sending) side of stream ``sid``.

    ``window`` is the initial window the peer announced (0: no flow
    control). In protocol version 1 object ``seq + 1`` starts only after the
    whole reply to object ``seq`` arrived.
    """

    def __init__(self, sid: int, *, window: int) -> None:
        self.sid = sid
        self.state = StreamState.OPEN
        self.rc: str | None = None
        self.credit: float = math.inf if window == 0 else float(window)
        self.next_seq = 0
        #: The object being sent: ``(seq, size, sent)``.
        self.current: tuple[int, int, int] | None = None
        #: The object whose reply is awaited, and that reply so far: ``(seq, size, got, last)``.
        self.awaiting: int | None = None
        self._reply: tuple[int, int, int, bool] | None = None
        self.replies = 0

    # ---- frames to the receiver

    def can_start(self) -> bool:
        return self.state is StreamState.OPEN and self.current is None and self.awaiting is None

    def room(self) -> int:
        """Object bytes that may be sent now (the rest of the object, within credit)."""
        if self.current is None or self.state is not StreamState.OPEN:
            return 0
        _, size, sent = self.current
        return int(min(size - sent, self.credit))

    def data(self, size: int, body: bytes, channel: str = "", topic: str = "") -> Data:
        """Start the next object with its first ``len(body)`` bytes."""
        if not self.can_start():
            raise LocalProtocolError(f"stream {self.sid} cannot start an object now")
        seq = self.next_seq
        self.next_seq += 1
        self.current = (seq, size, 0)
        self.awaiting = seq
        self._spend(len(body))
        return Data(self.sid, seq, size, channel, topic, {} if seq == 0 else None, body)

    def chunk(self, body: bytes) -> Chunk:
        """The next bytes of the object being sent."""
        if self.current is None or self.state is not StreamState.OPEN:
            raise LocalProtocolError(f"stream {self.sid} is not sending an object")
        seq, _, sent = self.current
        self._spend(len(body))
        return Chunk(self.sid, seq, sent, body)

    def _spend(self, nbytes: int) -> None:
        assert self.current is not None
        seq, size, sent = self.current
        if sent + nbytes > size:
            raise LocalProtocolError(f"object {seq} has {size} bytes; {sent + nbytes} requested")
        if nbytes > self.credit:
            raise LocalProtocolError(f"{nbytes} bytes exceed the {self.credit} bytes of credit")
        self.credit -= nbytes
        self.current = None if sent + nbytes == size else (seq, size, sent + nbytes)

    def end(self) -> End:
        """END after every object was sent and answered."""
        if (
            self.state is not StreamState.OPEN
            or self.current is not None
            or self.awaiting is not None
        ):
            raise LocalProtocolError(f"stream {self.sid} cannot end now")
        self.state = StreamState.ENDED
        self.rc = ReturnCode.OK
        return End(self.sid, self.next_seq)

    def abort(self, rc: str, reason: str = "", by: str = "") -> Abort:
        if rc not in ABORT_RCS:
            raise LocalProtocolError(f"cannot abort with return code {rc!r}")
        if self.state is not StreamState.OPEN:
            raise LocalProtocolError(f"stream {self.sid} has already ended")
        self.state = StreamState.ENDED
        self.rc = rc
        return Abort(self.sid, rc, reason, by)

    # ---- frames from the receiver

    def receive(self, frame: Reply | Chunk | Credit | Abort | Done) -> list[Event]:
        if self.state is StreamState.DONE:
            raise StreamViolation(f"{type(frame).__name__} for stream {self.sid} after DONE")
        if isinstance(frame, Done):
            # The rc the consumer finalized with is the session's outcome.
            self.state = StreamState.DONE
            self.rc = frame.rc
            return [StreamDone(frame.rc)]
        if isinstance(frame, Credit):
            self.credit += frame.increment
            return []
        if isinstance(frame, Abort):
            _check_abort(frame)
            if self.state is StreamState.OPEN:
                self.state = StreamState.ENDED
                self.rc = frame.rc
            return [StreamAborted(frame.rc, frame.reason, frame.by)]
        if self.state is not StreamState.OPEN:
            return []  # a reply that crossed our END or ABORT
        if isinstance(frame, Reply):
            if self._reply is not None or frame.seq != self.awaiting:
                raise StreamViolation(f"REPLY to object {frame.seq}, not awaited")
            if self.current is not None:
                raise StreamViolation(f"REPLY to object {frame.seq} before it was whole")
            self._reply = (frame.seq, frame.size, 0, frame.last)
            return self._reply_bytes(frame.seq, 0, len(frame.body))
        if self._reply is None or frame.seq != self._reply[0]:
            raise StreamViolation(f"CHUNK of a reply to object {frame.seq}, not being sent")
        if frame.offset != self._reply[2]:
            raise StreamViolation(
                f"reply CHUNK at offset {frame.offset}, expected {self._reply[2]}"
            )
        return self._reply_bytes(frame.seq, frame.offset, len(frame.body))

    def _reply_bytes(self, seq: int, offset: int, nbytes: int) -> list[Event]:
        assert self._reply is not None
        _, size, _, last = self._reply
        if offset + nbytes > size:
            raise StreamViolation(f"reply to object {seq} has {size} bytes; got {offset + nbytes}")
        if offset + nbytes < size:
            self._reply = (seq, size, offset + nbytes, last)
            return []
        self._reply = None
        self.awaiting = None
        self.replies += 1
        if last:
            self.state = StreamState.ENDED  # the rc comes with DONE
        return [ReplyComplete(seq, size, last)]
