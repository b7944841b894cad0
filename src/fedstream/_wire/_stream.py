"""Sans-io state of one stream session: sequence numbers, credit, END, ``last``, DONE.

The frame codec (:mod:`._protocol`) knows what a frame *is*; this module
knows what a frame *means for its stream*: whether object ``seq`` may start
now, whether a CHUNK continues the object (or reply) where it left off,
whether either side stays within the credit it was granted, whether END
counts the objects actually sent, whether an ABORT's return code is one the
protocol defines, and when the stream is over. Each side of a stream has one
object here (:class:`OpenerStream` on the site that opened it,
:class:`ReceiverStream` on the other). The engine feeds it every frame of
its ``sid`` and acts on what comes back, h11 style: nothing here calls up.

What a ``receive``-type method returns:

* an event (:class:`ObjectComplete`, :class:`StreamEnded`,
  :class:`StreamAborted`, :class:`ReplyComplete`, :class:`StreamDone`):
  something the engine must act on;
* ``None``: the frame was valid and there is nothing to act on yet (part of
  an object or reply);
* :data:`DROPPED`: the frame came behind this side's own ending (END,
  ABORT, ``last`` or DONE crossed it on the wire) and is ignored. On the
  opening side the reply bytes it carried still count against the reply
  credit, and are granted back (the connection lives on); on the receiving
  side the session has ended and its credit no longer matters.

The engine also builds the frames it sends through these objects (or
reports them, :meth:`OpenerStream.sent_data`), so the same rules hold in
both directions: replies in order, credit never overdrawn, at most
``max_in_flight`` objects unanswered, DONE exactly once.

Nothing here does I/O, reads a clock or touches object bytes beyond their
lengths, so a Hypothesis state machine drives both sides of whole sessions
without trio (``tests/test_wire_stream.py``). The calls are cheap enough for
the per-frame path: plain attributes, no per-frame allocation, one return
value.

Error handling: a frame from the peer that breaks the stream's rules raises
:class:`StreamViolation` (a :class:`~fedstream.RemoteProtocolError` with
``rc = BAD_REQUEST_DATA``) and ends that side's stream. When
``violation.connection`` is true the frame's bytes cannot be placed at all
(a CHUNK at the wrong offset, beyond its object, of no object; bytes
beyond the credit): the connection must close (GOAWAY ``PROTOCOL_ERROR``).
Otherwise only the session ends, with ``BAD_REQUEST_DATA``. Misuse by the
local caller (sending beyond credit, replying out of order, a second DONE)
raises :class:`~fedstream.LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

from .._errors import LocalProtocolError, RemoteProtocolError
from ._frames import (
    ABORT_RCS,
    FREE_REPLY_MAX,
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    ErrorCode,
    Reply,
)

__all__ = [
    "ABORT_RCS",
    "DROPPED",
    "MAX_IN_FLIGHT",
    "ObjectComplete",
    "OpenerStream",
    "ReceiverStream",
    "ReplyComplete",
    "StreamAborted",
    "StreamDone",
    "StreamEnded",
    "StreamState",
    "StreamViolation",
    "abort_rc",
]

#: The most objects of one stream that may be unanswered (sent, reply not
#: yet received); ``max_in_flight`` of a pipelined stream is at most this.
MAX_IN_FLIGHT: Final = 64

_BAD: Final = "BAD_REQUEST_DATA"
_OK: Final = "OK"


class StreamViolation(RemoteProtocolError):
    """The peer broke this stream's rules; that side's stream ends with ``rc``.

    ``connection`` is true when the frame cannot be placed at all: the
    connection that carried it must close, not just the session.
    """

    def __init__(self, message: str, *, connection: bool = False) -> None:
        super().__init__(message, error_code=ErrorCode.PROTOCOL_ERROR)
        self.rc = _BAD
        self.connection = connection


class StreamState(enum.Enum):
    #: Objects may flow.
    OPEN = "open"
    #: The stream's outcome is decided (END, ABORT, ``last`` or a violation);
    #: replies still due and DONE may follow.
    ENDED = "ended"
    #: DONE was sent (receiver) or received (opener): nothing more for this sid.
    DONE = "done"


_OPEN: Final = StreamState.OPEN
_ENDED: Final = StreamState.ENDED
_DONE: Final = StreamState.DONE


class _Dropped(enum.Enum):
    DROPPED = "DROPPED"

    def __repr__(self) -> str:
        return self.value


#: A frame behind this side's ending: valid to receive, nothing to act on.
DROPPED: Final = _Dropped.DROPPED


# ------------------------------------------------------------------ events


@dataclass(slots=True)
class ObjectComplete:
    """All ``size`` bytes of object ``seq`` arrived (receiver side)."""

    seq: int
    size: int


@dataclass(slots=True)
class StreamEnded:
    """A valid END: the opener sent exactly ``count`` whole objects."""

    count: int


@dataclass(slots=True)
class StreamAborted:
    """The peer aborted the stream with ``rc``."""

    rc: str
    reason: str
    by: str


@dataclass(slots=True)
class ReplyComplete:
    """All ``size`` bytes of the reply to object ``seq`` arrived (opener side)."""

    seq: int
    size: int
    last: bool


@dataclass(slots=True)
class StreamDone:
    """The receiver finalized its session with ``rc`` (opener side)."""

    rc: str
    result: Any = None


Event = ObjectComplete | StreamEnded | StreamAborted | ReplyComplete | StreamDone
Dropped = Literal[_Dropped.DROPPED]


def abort_rc(rc: str) -> str | None:
    """``rc`` if an opener's ABORT may carry it (:data:`ABORT_RCS`), else None."""
    return rc if rc in ABORT_RCS else None


def _free(size: int, nbytes: int) -> bool:
    """Whether a REPLY of ``size`` with a tail of ``nbytes`` uses no reply credit."""
    return size <= FREE_REPLY_MAX and nbytes == size


def _window(window: float) -> float:
    return math.inf if window == 0 else float(window)


# ------------------------------------------------------------------ receiver


class ReceiverStream:
    """The receiving side of stream ``sid``.

    ``window`` is the initial credit this side announced (0: no flow
    control), ``credit_step`` how many received bytes it lets accumulate
    before it grants them back. ``reply_window`` is the window the opener
    announced, which bounds reply bytes (0: none). At most
    ``max_in_flight`` objects may be unanswered at once.
    """

    __slots__ = (
        "_end_received",
        "_reply_got",
        "_reply_size",
        "_ungranted",
        "completed",
        "credit",
        "credit_step",
        "cur_got",
        "cur_seq",
        "cur_size",
        "max_in_flight",
        "max_object_size",
        "next_reply",
        "next_seq",
        "rc",
        "reply_credit",
        "sid",
        "state",
        "window",
    )

    def __init__(
        self,
        sid: int,
        *,
        window: int,
        max_object_size: int,
        reply_window: int = 0,
        credit_step: int | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.sid = sid
        self.state = _OPEN
        #: The stream's outcome once decided (None while open, or while a
        #: ``last`` reply waits for the consumer's rc that DONE carries).
        self.rc: str | None = None
        self.max_object_size = max_object_size
        self.max_in_flight = max_in_flight
        self.window = window
        #: Object bytes the opener may still send (``inf`` without flow control).
        self.credit: float = _window(window)
        self.credit_step = credit_step or max(1, window // 2)
        self._ungranted = 0
        #: Reply bytes this side may still send.
        self.reply_credit: float = _window(reply_window)
        #: The seq the next DATA must carry (objects started so far).
        self.next_seq = 0
        #: The object being received (``cur_seq`` -1: none).
        self.cur_seq = -1
        self.cur_size = 0
        self.cur_got = 0
        #: Objects received whole, and the seq of the next reply due.
        self.completed = 0
        self.next_reply = 0
        #: The reply being sent (``_reply_size`` -1: none).
        self._reply_size = -1
        self._reply_got = 0
        self._end_received = False

    @property
    def ungranted(self) -> int:
        """Bytes received and not granted back yet."""
        return self._ungranted

    @property
    def end_received(self) -> bool:
        return self._end_received

    # ---- frames from the opener

    def receive(
        self, frame: Data | Chunk | End | Abort | Credit
    ) -> ObjectComplete | StreamEnded | StreamAborted | Dropped | None:
        """Any frame of this sid from the opener (the typed methods are cheaper)."""
        if isinstance(frame, Data):
            return self.on_data(frame)
        if isinstance(frame, Chunk):
            return self.on_chunk(frame)
        if isinstance(frame, End):
            return self.on_end(frame)
        if isinstance(frame, Abort):
            return self.on_abort(frame)
        self.on_credit(frame)
        return None

    def on_data(self, frame: Data) -> ObjectComplete | Dropped | None:
        if self.state is not _OPEN:
            return DROPPED
        seq = frame.seq
        if self.cur_seq >= 0:
            self._violate(f"object {seq} started before object {self.cur_seq} was whole")
        if seq != self.next_seq:
            self._violate(f"expected object {self.next_seq}, got {seq}")
        if frame.size > self.max_object_size:
            self._violate(
                f"object of {frame.size} bytes exceeds max_object_size {self.max_object_size}"
            )
        if seq - self.next_reply >= self.max_in_flight:
            self._violate(
                f"object {seq} sent with {seq - self.next_reply} objects waiting for replies "
                f"(at most {self.max_in_flight})"
            )
        nbytes = len(frame.body)
        self._spend(nbytes)
        self.next_seq = seq + 1
        if nbytes == frame.size:
            self.completed += 1
            return ObjectComplete(seq, nbytes)
        self.cur_seq = seq
        self.cur_size = frame.size
        self.cur_got = nbytes
        return None

    def on_chunk(self, frame: Chunk) -> ObjectComplete | Dropped | None:
        if self.state is not _OPEN:
            return DROPPED
        seq = frame.seq
        if seq != self.cur_seq:
            self._violate(
                f"CHUNK for object {seq} of stream {self.sid}, which is not being sent",
                connection=True,
            )
        if frame.offset != self.cur_got:
            self._violate(
                f"chunk at offset {frame.offset}, expected {self.cur_got}", connection=True
            )
        got = self.cur_got + len(frame.body)
        if got > self.cur_size:
            self._violate(f"chunk overruns the object size {self.cur_size}", connection=True)
        self._spend(len(frame.body))
        if got == self.cur_size:
            self.cur_seq = -1
            self.completed += 1
            return ObjectComplete(seq, got)
        self.cur_got = got
        return None

    def _spend(self, nbytes: int) -> None:
        if nbytes > self.credit:
            self._violate(
                f"{nbytes} object bytes on stream {self.sid} beyond the credit granted "
                f"({int(self.credit)} left)",
                connection=True,
            )
        self.credit -= nbytes
        self._ungranted += nbytes

    def on_end(self, frame: End) -> StreamEnded | Dropped:
        if self.state is not _OPEN:
            return DROPPED
        if self.cur_seq >= 0:
            self._violate(f"END in the middle of object {self.cur_seq}")
        if frame.count != self.next_seq:
            self._violate(f"END after {frame.count} objects, but {self.next_seq} were sent")
        self._end_received = True
        self.end(_OK)
        return StreamEnded(frame.count)

    def on_abort(self, frame: Abort) -> StreamAborted | Dropped:
        # An ABORT may follow END (the opener shuts down while this side
        # still consumes): it still decides the outcome.
        if self.state is _DONE or (self.state is _ENDED and not self._end_received):
            return DROPPED
        if frame.rc not in ABORT_RCS:
            self._violate(f"ABORT with rc {frame.rc!r:.80}, not one of {sorted(ABORT_RCS)}")
        self.state = _ENDED
        self.rc = frame.rc
        self._end_received = False
        return StreamAborted(frame.rc, frame.reason, frame.by)

    def on_credit(self, frame: Credit) -> None:
        """The opener lets this side send ``increment`` more reply bytes."""
        self.reply_credit += frame.increment

    def _violate(self, message: str, *, connection: bool = False) -> None:
        if self.state is _OPEN:
            self.state = _ENDED
            self.rc = _BAD
        self._end_received = False
        raise StreamViolation(f"stream {self.sid}: {message}", connection=connection)

    # ---- frames to the opener

    def grant(self, withhold: bool = False) -> Credit | None:
        """The CREDIT owed for bytes received, once a whole step is due.

        ``withhold``: grant nothing now (the bytes stay owed), as while an
        object of this stream waits for room in a receive budget.
        """
        if (
            withhold
            or self._ungranted < self.credit_step
            or self.window == 0
            or self.state is not _OPEN
        ):
            return None
        increment, self._ungranted = self._ungranted, 0
        self.credit += increment
        return Credit(self.sid, increment)

    def reply(self, size: int, *, last: bool, body: Any = b"") -> Reply:
        """The REPLY to the oldest object not answered yet, with its first
        ``len(body)`` bytes; ``last`` ends the stream. Its seq is :attr:`next_reply`."""
        if self.state is _DONE:
            raise LocalProtocolError(f"stream {self.sid} is done")
        if self.next_reply >= self.next_seq:
            raise LocalProtocolError(f"no object of stream {self.sid} is waiting for a reply")
        if self._reply_size >= 0:
            raise LocalProtocolError(f"the reply to object {self.next_reply} is still being sent")
        nbytes = len(body)
        if nbytes > size:
            raise LocalProtocolError(f"reply tail of {nbytes} bytes exceeds its size {size}")
        if not _free(size, nbytes):
            self._spend_reply(nbytes)
        seq = self.next_reply
        if nbytes < size:
            self._reply_size = size
            self._reply_got = nbytes
        else:
            self.next_reply = seq + 1
        if last and self.state is _OPEN:
            self.state = _ENDED  # the rc is the consumer's, given with DONE
        return Reply(self.sid, seq, size, last, body)

    def reply_chunk(self, body: Any) -> Chunk:
        """The next bytes of the reply being sent."""
        if self._reply_size < 0:
            raise LocalProtocolError(f"stream {self.sid} is not sending a reply")
        nbytes = len(body)
        got = self._reply_got + nbytes
        if got > self._reply_size:
            raise LocalProtocolError(f"reply of {self._reply_size} bytes; {got} requested")
        self._spend_reply(nbytes)
        frame = Chunk(self.sid, self.next_reply, self._reply_got, body)
        if got == self._reply_size:
            self._reply_size = -1
            self.next_reply += 1
        else:
            self._reply_got = got
        return frame

    def _spend_reply(self, nbytes: int) -> None:
        if nbytes > self.reply_credit:
            raise LocalProtocolError(
                f"{nbytes} reply bytes exceed the {self.reply_credit} bytes of reply credit"
            )
        self.reply_credit -= nbytes

    def abort(self, rc: str, reason: str = "", by: str = "") -> Abort:
        """This side ends the stream early with ``rc``: whatever its consumer
        ended the session with (``END_STREAM`` outside ``consume`` may say OK)."""
        if self.state is not _OPEN:
            raise LocalProtocolError(f"stream {self.sid} has already ended")
        self.end(rc)
        return Abort(self.sid, rc, reason, by)

    def end(self, rc: str) -> None:
        """The stream's outcome is decided locally (first cause wins); no frame."""
        if self.state is _OPEN:
            self.state = _ENDED
            self.rc = rc

    def done(self, rc: str, result: Any = None) -> Done:
        """DONE, exactly once, after the stream ended (the consumer finalized)."""
        if self.state is _DONE:
            raise LocalProtocolError(f"DONE for stream {self.sid} was already sent")
        if self.state is _OPEN:
            raise LocalProtocolError(f"stream {self.sid} has not ended")
        self.state = _DONE
        self.rc = rc
        return Done(self.sid, rc, result)


# ------------------------------------------------------------------ opener


class OpenerStream:
    """The opening (sending) side of stream ``sid``.

    ``window`` is the initial window the receiver announced (0: no flow
    control); ``reply_window`` the one this side announced, which bounds
    the reply bytes the receiver may send (0: none), given back every
    ``credit_step`` bytes. Up to ``max_in_flight`` objects may be sent
    before the oldest one's reply is complete (1: stop-and-wait). A reply
    longer than ``max_reply_size`` is a violation.
    """

    __slots__ = (
        "_reply_got",
        "_reply_last",
        "_reply_size",
        "_reply_ungranted",
        "credit",
        "credit_step",
        "cur_sent",
        "cur_seq",
        "cur_size",
        "max_in_flight",
        "max_reply_size",
        "next_reply",
        "next_seq",
        "rc",
        "reply_credit",
        "reply_window",
        "sid",
        "state",
    )

    def __init__(
        self,
        sid: int,
        *,
        window: float,
        reply_window: int = 0,
        credit_step: int | None = None,
        max_in_flight: int = 1,
        max_reply_size: float = math.inf,
    ) -> None:
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT:
            raise LocalProtocolError(f"max_in_flight must be from 1 to {MAX_IN_FLIGHT}")
        self.sid = sid
        self.state = _OPEN
        self.rc: str | None = None
        #: Object bytes this side may still send.
        self.credit: float = math.inf if window in (0, math.inf) else float(window)
        #: Reply bytes the receiver may still send.
        self.reply_window = reply_window
        self.reply_credit: float = _window(reply_window)
        self.credit_step = credit_step or max(1, reply_window // 2)
        self._reply_ungranted = 0
        self.max_in_flight = max_in_flight
        self.max_reply_size = max_reply_size
        #: Objects started (their DATA sent); the next one's seq.
        self.next_seq = 0
        #: The object being sent (``cur_seq`` -1: none).
        self.cur_seq = -1
        self.cur_size = 0
        self.cur_sent = 0
        #: The seq of the reply expected next, and the reply under way
        #: (``_reply_size`` -1: none).
        self.next_reply = 0
        self._reply_size = -1
        self._reply_got = 0
        self._reply_last = False

    # ---- frames to the receiver

    def can_start(self) -> bool:
        """Whether a new object may start now (stream open, the previous one
        whole, fewer than ``max_in_flight`` replies outstanding)."""
        return (
            self.state is _OPEN
            and self.cur_seq < 0
            and self.next_seq - self.next_reply < self.max_in_flight
        )

    def room(self) -> float:
        """Object bytes that may be sent now (the rest of the object, within credit)."""
        if self.cur_seq < 0 or self.state is not _OPEN:
            return 0
        return min(self.cur_size - self.cur_sent, self.credit)

    def data(
        self, size: int, body: Any = b"", channel: str = "", topic: str = "", ctx: Any = None
    ) -> Data:
        """Start the next object with its first ``len(body)`` bytes."""
        if self.state is not _OPEN:
            raise LocalProtocolError(f"stream {self.sid} has ended")
        frame = Data(self.sid, self.next_seq, size, channel, topic, ctx, body)
        self.sent_data(frame)
        return frame

    def chunk(self, body: Any) -> Chunk:
        """The next bytes of the object being sent."""
        if self.cur_seq < 0:
            raise LocalProtocolError(f"stream {self.sid} is not sending an object")
        frame = Chunk(self.sid, self.cur_seq, self.cur_sent, body)
        self.sent_chunk(frame)
        return frame

    def sent_data(self, frame: Data) -> None:
        """Record a DATA handed to the connection (built by the caller).

        Like :meth:`sent_chunk`, allowed after the stream ended: the caller
        checked :meth:`can_start` before it waited for room to send it.
        """
        if self.cur_seq >= 0 or self.next_seq - self.next_reply >= self.max_in_flight:
            raise LocalProtocolError(f"stream {self.sid} cannot start an object now")
        if frame.seq != self.next_seq:
            raise LocalProtocolError(f"object {frame.seq} sent, {self.next_seq} is next")
        self.next_seq += 1
        self.cur_seq = frame.seq
        self.cur_size = frame.size
        self.cur_sent = 0
        self._spend(len(frame.body))

    def sent_chunk(self, frame: Chunk) -> None:
        """Record a CHUNK of the object being sent, handed to the connection.

        Allowed after the stream ended (a ``last`` reply or ABORT may cross
        the frames already on their way), never beyond the credit.
        """
        if frame.seq != self.cur_seq or frame.offset != self.cur_sent:
            raise LocalProtocolError(
                f"CHUNK of object {frame.seq} at {frame.offset}, expected object "
                f"{self.cur_seq} at {self.cur_sent}"
            )
        self._spend(len(frame.body))

    def _spend(self, nbytes: int) -> None:
        sent = self.cur_sent + nbytes
        if sent > self.cur_size:
            raise LocalProtocolError(
                f"object {self.cur_seq} has {self.cur_size} bytes; {sent} sent"
            )
        if nbytes > self.credit:
            raise LocalProtocolError(f"{nbytes} bytes exceed the {self.credit} bytes of credit")
        self.credit -= nbytes
        if sent == self.cur_size:
            self.cur_seq = -1
        else:
            self.cur_sent = sent

    def end(self) -> End:
        """END after every object was sent whole (replies may still be on their way)."""
        if self.state is not _OPEN or self.cur_seq >= 0:
            raise LocalProtocolError(f"stream {self.sid} cannot end now")
        self.state = _ENDED
        self.rc = _OK
        return End(self.sid, self.next_seq)

    def abort(self, rc: str, reason: str = "", by: str = "") -> Abort:
        """This side gives up on the stream with ``rc`` (one of :data:`ABORT_RCS`)."""
        if rc not in ABORT_RCS:
            raise LocalProtocolError(f"cannot abort with return code {rc!r}")
        self.end_with(rc)
        return Abort(self.sid, rc, reason, by)

    def end_with(self, rc: str) -> None:
        """The stream's outcome is decided locally (first cause wins); no frame."""
        if self.state is _OPEN:
            self.state = _ENDED
            self.rc = rc

    def grant_reply(self, withhold: bool = False) -> Credit | None:
        """The CREDIT owed for reply bytes taken in, once a whole step is due."""
        if withhold or self._reply_ungranted < self.credit_step or self.reply_window == 0:
            return None
        increment, self._reply_ungranted = self._reply_ungranted, 0
        self.reply_credit += increment
        return Credit(self.sid, increment)

    # ---- frames from the receiver

    def receive(
        self, frame: Reply | Chunk | Credit | Abort | Done
    ) -> ReplyComplete | StreamAborted | StreamDone | Dropped | None:
        """Any frame of this sid from the receiver (the typed methods are cheaper)."""
        if isinstance(frame, Reply):
            return self.on_reply(frame)
        if isinstance(frame, Chunk):
            return self.on_reply_chunk(frame)
        if isinstance(frame, Abort):
            return self.on_abort(frame)
        if isinstance(frame, Done):
            return self.on_done(frame)
        self.on_credit(frame)
        return None

    def on_credit(self, frame: Credit) -> None:
        self.credit += frame.increment

    def on_reply(self, frame: Reply) -> ReplyComplete | Dropped | None:
        nbytes = len(frame.body)
        if not _free(frame.size, nbytes):
            self._use_reply_credit(nbytes)
        if self.state is not _OPEN:
            return DROPPED  # it crossed our END or ABORT
        seq = frame.seq
        if self._reply_size >= 0:
            self._violate(f"REPLY to object {seq} inside the reply to object {self.next_reply}")
        if seq != self.next_reply or seq >= self.next_seq:
            self._violate(f"REPLY to object {seq}; the reply to object {self.next_reply} is due")
        if frame.size > self.max_reply_size:
            self._violate(
                f"reply of {frame.size} bytes exceeds max_object_size {int(self.max_reply_size)}"
            )
        if nbytes == frame.size:
            return self._reply_complete(seq, nbytes, frame.last)
        self._reply_size = frame.size
        self._reply_got = nbytes
        self._reply_last = frame.last
        return None

    def on_reply_chunk(self, frame: Chunk) -> ReplyComplete | Dropped | None:
        nbytes = len(frame.body)
        self._use_reply_credit(nbytes)
        if self.state is not _OPEN:
            return DROPPED
        if self._reply_size < 0 or frame.seq != self.next_reply:
            self._violate(
                f"reply CHUNK for object {frame.seq}, whose reply is not being sent",
                connection=True,
            )
        if frame.offset != self._reply_got:
            self._violate(
                f"reply chunk at offset {frame.offset}, expected {self._reply_got}",
                connection=True,
            )
        got = self._reply_got + nbytes
        if got > self._reply_size:
            self._violate(f"reply chunk overruns its size {self._reply_size}", connection=True)
        if got == self._reply_size:
            self._reply_size = -1
            return self._reply_complete(frame.seq, got, self._reply_last)
        self._reply_got = got
        return None

    def _reply_complete(self, seq: int, size: int, last: bool) -> ReplyComplete:
        self.next_reply = seq + 1
        if last:
            self.state = _ENDED  # the rc comes with DONE
        return ReplyComplete(seq, size, last)

    def _use_reply_credit(self, nbytes: int) -> None:
        if nbytes > self.reply_credit:
            self._violate(
                f"reply bytes on stream {self.sid} beyond the credit granted", connection=True
            )
        self.reply_credit -= nbytes
        self._reply_ungranted += nbytes

    def on_abort(self, frame: Abort) -> StreamAborted | Dropped:
        """The receiver ended its session (``rc``: its consumer's outcome)."""
        if self.state is _DONE:
            return DROPPED
        if self.state is _OPEN:
            self.state = _ENDED
            self.rc = frame.rc
        return StreamAborted(frame.rc, frame.reason, frame.by)

    def on_done(self, frame: Done) -> StreamDone | Dropped:
        """The receiver finalized: its rc is the session's outcome."""
        if self.state is _DONE:
            return DROPPED
        self.state = _DONE
        self.rc = frame.rc
        self._reply_size = -1
        return StreamDone(frame.rc, frame.result)

    def _violate(self, message: str, *, connection: bool = False) -> None:
        if self.state is _OPEN:
            self.state = _ENDED
            self.rc = _BAD
        raise StreamViolation(f"stream {self.sid}: {message}", connection=connection)
