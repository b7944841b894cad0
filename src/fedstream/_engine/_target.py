"""The sender's view of one target's session: :class:`TargetLink`.

A link holds that target's state on its connection: its sans-io
:class:`~fedstream._wire._stream.OpenerStream` (seq, credit both ways,
replies in order, END, ABORT, DONE), which every frame of the stream goes
through, the reply being reassembled, and how the target's session ended.
:meth:`TargetLink.deliver` sends one object and waits for its reply under a
*no-progress* deadline; :class:`~._sender.StreamSession` drives one link per
target.

Each delivery's deadline is pushed back by ``timeout`` every time a chunk is
handed to the connection, so a large object that keeps moving is never
killed, while a target that stops granting credit or does not reply within
``timeout`` of the last progress gets a ``TIMEOUT`` reply and its session is
aborted with ``TIMEOUT``; the other targets carry on.

A pipelined stream (``max_in_flight`` above 1) sends up to that many
objects before the oldest one's replies are in: each link keeps the replies
that arrive, by sequence number, until the producer loop collects them in
order (:meth:`TargetLink.await_reply`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from .._errors import ConnectionLostError, RemoteProtocolError
from .._shareable import ReservedHeaderKey, ReturnCode, Shareable, make_reply
from .._wire import (
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    EncodedObject,
    End,
    ObjectAssembler,
    RawObject,
    Reply,
    decode_object,
    encode_object,
)
from .._wire._stream import DROPPED, OpenerStream, StreamState, StreamViolation
from ._budget import ObjectHolds
from ._stats import StreamStats

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["END_RESULT", "FLARE_END_RESULT", "TargetLink"]

logger = logging.getLogger(__name__)

#: Reply header carrying a target's truthy ``stream_done_cb`` result, on the
#: last reply of a session the receiver ended itself.
END_RESULT: Final = "__end_result__"
#: The same result under the header FLARE's ``ObjectStreamer`` uses.
FLARE_END_RESULT: Final = "ObjectStreamer.END_RESULT"

#: The encoding of the plain OK reply (``make_reply(OK)``), the most common one.
_PLAIN_OK_BYTES: Final = encode_object(make_reply(ReturnCode.OK)).to_bytes()
_PLAIN_OK_SIZE: Final = len(_PLAIN_OK_BYTES)


#: A part this small is sent in one write with the part after it.
_PAIR_MAX: Final = 4096


class TargetLink:
    """The sender's view of one target's session."""

    def __init__(self, conn: Connection, name: str, channel: str = "", topic: str = "") -> None:
        self.conn = conn
        self.name = name
        self.channel = channel
        self.topic = topic
        self.started = trio.current_time()
        self.sid = conn.new_sid()
        options = conn.options
        # Replies are flow-controlled and budgeted like objects: the target
        # may send the reply bytes our window and CREDITs allow; a large
        # reply counts in the connection's receive budget, and one that
        # waits for it keeps only the bytes that arrived, with credit withheld.
        self.stream = OpenerStream(
            self.sid,
            window=conn.peer_window,
            reply_window=options.window,
            credit_step=options.credit_step,
            max_reply_size=options.max_object_size,
        )
        #: rc of the target's session once it ended (reply ``last``, ABORT, DONE, loss).
        self.ended_rc: str | None = None
        self.done = trio.Event()
        self.done_rc: str | None = None
        self.done_result: Any = None
        #: With several objects in flight (:meth:`deliver` with
        #: ``wait_reply=False``, then :meth:`await_reply`):
        #: replies that arrived, by seq, with their ``last`` flag.
        self.pipelined = False
        self._replies: dict[int, tuple[Shareable, bool]] = {}
        #: When the reply to expect next started to count down: the later of
        #: the previous reply's arrival and its own object's last byte sent.
        self._reply_clock = 0.0
        self._sent_at: dict[int, float] = {}
        self._reply: Shareable | None = None
        self._reply_seq = 0
        self._reply_last = False
        self._assembler: ObjectAssembler | None = None
        self._holds = ObjectHolds(conn.receive_budget, options.max_object_size, self._admitted)
        self._staged: list[bytes] | None = None
        self._staged_len = 0
        self._reply_size = 0
        self._changed = trio.Event()
        #: Whether a delivery waits on ``_changed`` for credit (:meth:`_room`).
        self._awaiting_credit = False
        self.objects_sent = 0
        #: Object bytes handed to the connection, and credit granted back.
        self.bytes_sent = 0
        self.credited = 0
        #: ``bytes_sent`` when the object being sent started.
        self._object_start = 0
        conn.senders[self.sid] = self

    @property
    def opened(self) -> bool:
        """Whether seq 0 went out, i.e. the target has (or had) a session to finalize."""
        return self.stream.next_seq > 0

    @property
    def on_wire(self) -> bool:
        """Whether the peer knows this stream now: seq 0 went out and the
        target's session has not ended (see :meth:`Connection.shared`)."""
        return self.ended_rc is None and self.stream.next_seq > 0

    def stats(self) -> StreamStats:
        window = self.stream.credit
        return StreamStats(
            peer=self.name,
            sid=self.sid,
            sending=True,
            channel=self.channel,
            topic=self.topic,
            objects=self.objects_sent,
            bytes=self.bytes_sent,
            credit=None if math.isinf(window) else int(window),
            started=self.started,
            queued=self.conn.pending(self.sid),
            unacknowledged=None if math.isinf(window) else self.bytes_sent - self.credited,
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    # ------------------------------------------------ called by the reader

    def on_reply(self, frame: Reply) -> None:
        try:
            event = self.stream.on_reply(frame)
        except StreamViolation as exc:
            self._violation(exc)
            return
        if event is DROPPED:  # it crossed our END or ABORT
            self._grant_reply()
            return
        self._reply_seq = frame.seq
        self._reply_last = frame.last
        if event is not None:
            self._grant_reply()
            self._decode_reply(frame.body)  # the whole reply in one frame
            return
        self._reply_size = frame.size
        if not self._holds.add(frame.size):
            # Nothing sized by the claim before the budget admits the reply.
            self._staged = [bytes(frame.body)]
            self._staged_len = len(frame.body)
            self._grant_reply()
            return
        self._assembler = ObjectAssembler(frame.size, max_size=self.conn.options.max_object_size)
        self._feed(0, frame.body)

    def on_chunk(self, frame: Chunk) -> None:
        """A CHUNK of the reply being received. One that cannot be placed
        raises :class:`StreamViolation` for the reader: the connection closes."""
        event = self.stream.on_reply_chunk(frame)
        if event is DROPPED:
            self._grant_reply()  # late: dropped, its credit given back
        elif self._staged is not None:
            self._staged.append(bytes(frame.body))
            self._staged_len += len(frame.body)
            self._grant_reply()
            if event is not None:
                self._assemble_staged()
        elif self._assembler is not None:
            self._feed(frame.offset, frame.body)
        else:
            self._grant_reply()

    def _violation(self, error: StreamViolation) -> None:
        """The target broke this stream's rules: end this link (only it) with
        BAD_REQUEST_DATA, or, for bytes that cannot be placed, the connection."""
        if error.connection:
            raise error
        logger.warning("protocol error from %s: %s", self.name, error)
        self.release()
        if self.ended_rc is None:
            self.ended_rc = error.rc
            if not self.conn.closed.is_set():
                self.conn.send_control(Abort(self.sid, error.rc, str(error)[:200], ""))
        self._notify()

    def _feed(self, offset: int, body: memoryview | bytes | bytearray) -> None:
        assembler = self._assembler
        assert assembler is not None
        complete = assembler.feed(offset, body)
        self._grant_reply()
        if not complete:
            return
        self._assembler = None
        self._holds.take()
        self._decode_reply(assembler.take())

    def _grant_reply(self) -> None:
        """Give reply credit back every credit_step bytes taken in, unless a
        reply of ours waits for the receive budget."""
        credit = self.stream.grant_reply(self._holds.withholding)
        if credit is not None and not self.conn.closed.is_set():
            self.conn.send_control(credit)

    def _admitted(self) -> None:
        """The budget let our waiting reply in (or nothing of ours waits any more)."""
        if self._staged is not None:
            self._assemble_staged()
        self._grant_reply()

    def _assemble_staged(self) -> None:
        pieces, self._staged = self._staged or [], None
        assembler = ObjectAssembler(self._reply_size, max_size=self.conn.options.max_object_size)
        offset = 0
        complete = False
        try:
            for piece in pieces:
                complete = assembler.feed(offset, piece)
                offset += len(piece)
        except RemoteProtocolError as exc:
            self._holds.release()
            self._set_reply(
                make_reply(ReturnCode.BAD_REQUEST_DATA, {ReservedHeaderKey.ERROR: str(exc)}),
                last=self._reply_last,
            )
            return
        if complete:
            self._holds.take()
            self._decode_reply(assembler.take())
        else:
            self._assembler = assembler

    def release(self) -> None:
        """The stream is over: drop any reply still held in the receive budget."""
        self._assembler = None
        self._staged = None
        self._holds.release()

    def _decode_reply(self, raw: RawObject) -> None:
        if len(raw) == _PLAIN_OK_SIZE and raw == _PLAIN_OK_BYTES:
            # The usual acknowledgement: no need to run a decoder for it.
            self._set_reply(make_reply(ReturnCode.OK), last=self._reply_last)
            return
        try:
            reply = decode_object(raw)
        except RemoteProtocolError as exc:
            reply = make_reply(ReturnCode.BAD_REQUEST_DATA, {ReservedHeaderKey.ERROR: str(exc)})
        self._set_reply(reply, last=self._reply_last)

    def _set_reply(self, reply: Shareable, *, last: bool) -> None:
        if self.pipelined:
            self._replies[self._reply_seq] = (reply, last)
            self._reply_clock = trio.current_time()
        else:
            self._reply = reply
        if last:
            self.ended_rc = self.ended_rc or str(reply.get_return_code(ReturnCode.OK))
        self._notify()

    def on_abort(self, frame: Abort) -> None:
        if self.stream.on_abort(frame) is DROPPED:
            return
        logger.info("target %s ended stream %d: %s %s", self.name, self.sid, frame.rc, frame.reason)
        self.ended_rc = self.ended_rc or frame.rc
        self._notify()

    def on_done(self, frame: Done) -> None:
        if self.stream.on_done(frame) is DROPPED:
            return
        self.done_rc = frame.rc
        self.done_result = frame.result
        # DONE is the receiver's own word on how its session ended.
        self.ended_rc = frame.rc
        self.done.set()
        self._notify()

    def on_credit(self, frame: Credit) -> None:
        self.stream.on_credit(frame)
        self.credited += frame.increment
        if self._awaiting_credit:
            # Only a delivery waiting for room wants to know; a task waiting
            # for a reply is not woken for nothing (once per target per grant).
            self._notify()

    def _room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more object bytes may go out now.

        The window always bounds them. On a connection that other streams
        share, so does :attr:`Connection.shared_in_flight`: what this stream
        has sent and not had credited back is queued in front of everyone
        else's next frame. It cannot stall by itself: the peer grants credit
        every ``credit_step`` bytes it takes in, and while we wait more than
        that is unacknowledged, so a grant is on its way, unless the peer
        withholds credit on purpose (an object of this stream waits for its
        receive budget). Then we wait with fewer bytes sent than the window
        would allow, until the object is admitted. Until the first grant for
        an object's own bytes arrives, the same bound holds on any connection.
        """
        window = self.stream.credit
        if window < nbytes:
            return False
        if window == math.inf:
            return True
        start = self._object_start
        # Nothing of this object credited back yet: the receiver may be
        # holding it back for its receive budget, and every byte sent now
        # would wait there as an early byte (bounded site-wide,
        # docs/semantics.md). Send no more than a credit step and a frame of
        # it until a grant shows it was admitted.
        if (
            self.credited <= start < self.bytes_sent
            and self.bytes_sent - start + nbytes > self.conn.shared_in_flight
        ):
            return False
        if not self.conn.shared():
            return True
        unacknowledged = self.bytes_sent - self.credited
        return unacknowledged <= 0 or unacknowledged + nbytes <= self.conn.shared_in_flight

    def on_connection_lost(self) -> None:
        self.ended_rc = self.ended_rc or ReturnCode.COMMUNICATION_ERROR
        self.done.set()
        self._notify()

    # ------------------------------------------------------ the delivery

    async def deliver(
        self,
        seq: int,
        encoded: EncodedObject,
        no_progress: float,
        channel: str,
        topic: str,
        ctx: dict[str, Any] | None,
        *,
        wait_reply: bool = True,
    ) -> Shareable | None:
        """Send object ``seq`` and return this target's reply (or a failure reply).

        With ``wait_reply=False`` (a pipelined stream) return None once the
        object is handed to the connection (or a failure reply at once); its
        reply is collected by :meth:`await_reply`.
        """
        if self.ended_rc is not None:
            return make_reply(self.ended_rc)
        if encoded.size > self.conn.peer_max_object_size:
            self.ended_rc = ReturnCode.BAD_REQUEST_DATA
            message = (
                f"object of {encoded.size} bytes exceeds {self.name}'s "
                f"max_object_size {int(self.conn.peer_max_object_size)}"
            )
            self.conn.send_control(self.abort_frame(ReturnCode.BAD_REQUEST_DATA, message))
            return make_reply(ReturnCode.BAD_REQUEST_DATA, {ReservedHeaderKey.ERROR: message})
        if not self.pipelined:
            self._reply = None
            if self._assembler is not None or self._staged is not None:
                self.release()  # an earlier object's reply that never completed
        conn = self.conn
        offset = 0
        self._object_start = self.bytes_sent
        written: trio.Event | None = None
        armed = False  # whether the consumer's own deadline has started
        starved = False  # whether we are waiting for the peer's credit (not for the connection)
        deadline = trio.current_time() + no_progress
        while True:
            with trio.move_on_at(deadline) as scope:
                if ctx is not None and offset == 0 and not self.opened:
                    # The context rides alone in the first DATA (its head may be
                    # large); the object's bytes all follow in CHUNKs.
                    head = Data(self.sid, seq, encoded.size, channel, topic, ctx, b"")
                    await conn.send_data(head)
                    self.stream.sent_data(head)
                body = conn.max_body
                views = list(encoded.chunks(body, offset))
                index = 0
                # Whether we awaited since ``body`` was read: only then can
                # another stream have come or gone.
                stale = False
                while index < len(views):
                    if stale and conn.max_body != body:
                        # Another stream came or went: the rest goes in the
                        # connection's frame size now.
                        body = conn.max_body
                        views = list(encoded.chunks(body, offset))
                        index = 0
                    stale = False
                    view = views[index]
                    size = len(view)
                    # A small part (the object's head) goes out together
                    # with the next one: one write, one wake-up at the peer.
                    pair = (
                        size <= _PAIR_MAX
                        and index + 1 < len(views)
                        and self._room(size + len(views[index + 1]))
                    )
                    while not self._room(size) and not self._ended():
                        starved = stale = True
                        self._awaiting_credit = True
                        try:
                            await self._changed.wait()
                        finally:
                            self._awaiting_credit = False
                    starved = False
                    if self._ended():
                        break
                    if stale and conn.max_body != body:
                        continue  # re-sliced at the top of the loop
                    if offset == 0 and not (ctx is not None and seq == 0):
                        frame: Data | Chunk = Data(
                            self.sid, seq, encoded.size, channel, topic, None, view
                        )
                    else:
                        frame = Chunk(self.sid, seq, offset, view)
                    follow: Chunk | None = None
                    stale = True
                    if pair:
                        index += 1
                        follow = Chunk(self.sid, seq, offset + size, views[index])
                        size += len(views[index])
                        await conn.send_data(frame, follow)
                    else:
                        await conn.send_data(frame)
                    # Recorded once queued: a cancelled send queued nothing.
                    if isinstance(frame, Data):
                        self.stream.sent_data(frame)
                    else:
                        self.stream.sent_chunk(frame)
                    if follow is not None:
                        self.stream.sent_chunk(follow)
                    index += 1
                    self.bytes_sent += size
                    offset += size
                    if offset < encoded.size:
                        deadline = scope.deadline = trio.current_time() + no_progress
                    else:
                        self.objects_sent += 1
                if not wait_reply and not self._ended():
                    self._sent_at[seq] = trio.current_time()
                    return None
                if written is None and not armed and not self._ended():
                    if not conn.pending(self.sid):
                        armed = True  # written at once: the consumer's time starts now
                    else:
                        written = conn.flushed_event(self.sid)
                    deadline = scope.deadline = trio.current_time() + no_progress
                if written is not None and not armed:
                    await written.wait()
                    # The consumer's time starts when the object has left.
                    armed = True
                    deadline = scope.deadline = trio.current_time() + no_progress
                await self._wait(self._answered)
            if not scope.cancelled_caught:
                break
            # Our chunks may still be waiting behind others in the connection's
            # queue: as long as that queue moves, this object is making progress.
            now = trio.current_time()
            if written is not None and written.is_set() and not armed:
                # The last bytes left just as the old deadline fell due.
                armed = True
                deadline = now + no_progress
                continue
            # Waiting for the peer's credit once all we queued is written is
            # no progress, however busy the connection is otherwise.
            queued = conn.pending(self.sid) > 0 or not starved
            if not armed and queued and conn.last_write + no_progress > now:
                deadline = conn.last_write + no_progress
                continue
            logger.warning(
                "no progress on stream %d to %s for %s s: TIMEOUT", self.sid, self.name, no_progress
            )
            self.ended_rc = ReturnCode.TIMEOUT
            await self._tell(
                self.abort_frame(ReturnCode.TIMEOUT, f"no progress for {no_progress} s")
            )
            return make_reply(ReturnCode.TIMEOUT)
        reply = self._reply
        if reply is not None:
            if self._reply_last:
                await self._attach_end_result(reply)
            return reply
        return make_reply(self.ended_rc or ReturnCode.COMMUNICATION_ERROR)

    def pipeline(self, max_in_flight: int) -> None:
        """Take replies for up to ``max_in_flight`` objects in flight (before
        the first is sent)."""
        self.pipelined = True
        self.stream.max_in_flight = max_in_flight
        self._reply_clock = trio.current_time()

    def replies_waiting(self) -> bool:
        """Whether replies arrived that a pipelined stream has not collected yet."""
        return bool(self._replies)

    async def await_reply(self, seq: int, no_progress: float) -> Shareable:
        """A pipelined stream's reply to object ``seq`` (or a failure reply).

        The reply times out ``no_progress`` after the later of the reply
        before it arriving and the object's last byte being handed over,
        pushed back while this stream's bytes are still being written: the
        receiver consumes one object at a time, so that is the consumer's
        own time for it.
        """
        conn = self.conn
        deadline = max(self._reply_clock, self._sent_at.get(seq, 0.0)) + no_progress
        while True:
            with trio.move_on_at(deadline) as scope:
                await self._wait(lambda: seq in self._replies or self.ended_rc is not None)
            if not scope.cancelled_caught:
                break
            now = trio.current_time()
            later = max(self._reply_clock, self._sent_at.get(seq, 0.0)) + no_progress
            if conn.pending(self.sid) and conn.last_write + no_progress > now:
                later = max(later, conn.last_write + no_progress)
            if later > now:
                deadline = later
                continue
            logger.warning(
                "no reply to object %d on stream %d from %s for %s s: TIMEOUT",
                seq,
                self.sid,
                self.name,
                no_progress,
            )
            self.ended_rc = ReturnCode.TIMEOUT
            await self._tell(
                self.abort_frame(ReturnCode.TIMEOUT, f"no progress for {no_progress} s")
            )
            break
        self._sent_at.pop(seq, None)
        entry = self._replies.pop(seq, None)
        if entry is None:
            return make_reply(self.ended_rc or ReturnCode.COMMUNICATION_ERROR)
        reply, last = entry
        if last:
            await self._attach_end_result(reply)
        return reply

    def abort_frame(self, rc: str, reason: str, by: str = "") -> Abort:
        """The ABORT that ends this stream with ``rc`` (one of ``ABORT_RCS``)."""
        if self.stream.state is StreamState.OPEN:
            return self.stream.abort(rc, reason, by)
        return Abort(self.sid, rc, reason, by)  # told again (a shutdown, then the ending)

    def end_frame(self) -> End | Abort:
        """The END that closes this stream normally (ABORT if it cannot end now)."""
        if self.stream.state is StreamState.OPEN and self.stream.cur_seq < 0:
            return self.stream.end()
        return self.abort_frame(ReturnCode.TASK_ABORTED, "object cut short")

    async def _tell(self, frame: Abort | End) -> None:
        """Send END or ABORT in order behind this stream's data (bounded, shielded)."""
        if self.conn.closed.is_set():
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.conn.options.finalize_timeout):
            try:
                await self.conn.send_data(frame)
            except ConnectionLostError:
                pass

    def _answered(self) -> bool:
        return self._reply is not None or self.ended_rc is not None

    def _ended(self) -> bool:
        # A method, not an inline test: the state changes while we await.
        return self.ended_rc is not None

    async def _attach_end_result(self, reply: Shareable) -> None:
        with trio.move_on_after(self.conn.options.finalize_timeout):
            await self.done.wait()
        if self.done_result:
            reply.set_header(END_RESULT, self.done_result)
            reply.set_header(FLARE_END_RESULT, self.done_result)
