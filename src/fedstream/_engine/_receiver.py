"""The receiving side of one stream: a consumer session scoped by a cancel scope.

The connection's reader feeds frames in synchronously (``on_data`` and
friends). The stream's protocol state (sequence numbers, offsets, credit,
END, ABORT, replies in order, DONE) is a sans-io
:class:`~fedstream._wire._stream.ReceiverStream`: each frame goes to it
first, and the session acts on what it answers. The session reassembles
each object into its buffer (within the connection's receive budget),
grants the credit the stream owes, and hands complete objects to the
session task through a small inbox. The grant due when an object completes
may wait for that object's reply and go in the same write, when the sender
cannot need it sooner (see :meth:`ReceiverSession._hold_credit`).
The session task asks the factory for a consumer, runs ``consume`` for each
object in order and sends the replies.

However the session ends, its ``finally`` block runs ``finalize``, then
``stream_done_cb``, then ``return_consumer``, each exactly once, each isolated
from the others' errors, each shielded from cancellation and bounded by
``finalize_timeout``, and then tells the sender with a DONE frame.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from .._api import ConsumerFactory, ObjectConsumer, StreamContextKey
from .._context import FLContext
from .._errors import (
    ConnectionLostError,
    LocalProtocolError,
    ObjectTooLargeError,
    RemoteProtocolError,
)
from .._flare import from_flare
from .._shareable import ReservedHeaderKey, ReturnCode, Shareable, make_reply
from .._wire import (
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    ObjectAssembler,
    RawObject,
    decode_object_views,
    encode_object,
)
from .._wire._frames import FREE_REPLY_MAX
from .._wire._stream import DROPPED, ReceiverStream, StreamState, StreamViolation
from ._budget import ObjectHolds
from ._callbacks import current_session, not_awaitable
from ._stats import StreamStats

if TYPE_CHECKING:
    from ._callbacks import CallbackRunner
    from ._connection import Connection

__all__ = ["ReceiverSession", "Registration"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Registration:
    """A factory registered for a (channel, topic) pair, with its callbacks."""

    factory: ConsumerFactory
    stream_done_cb: Callable[..., Any] | None = None
    consumed_cb: Callable[..., Any] | None = None
    cb_kwargs: dict[str, Any] = field(default_factory=dict)


_PLAIN_OK: Final = make_reply(ReturnCode.OK)
_PLAIN_OK_ENCODED: Final = encode_object(_PLAIN_OK)
_PLAIN_OK_VIEW: Final = memoryview(_PLAIN_OK_ENCODED.to_bytes())


class ReceiverSession:
    """One peer-opened stream on this site."""

    def __init__(
        self,
        conn: Connection,
        first: Data,
        registration: Registration,
        *,
        site_name: str,
        runner: CallbackRunner,
        on_finished: Callable[[ReceiverSession], None],
    ) -> None:
        self.conn = conn
        self.sid = first.sid
        self.channel = first.channel
        self.topic = first.topic
        self.registration = registration
        self.runner = runner
        self._on_finished = on_finished
        self.stream_ctx: dict[str, Any] = dict(first.ctx or {})
        self.stream_ctx[StreamContextKey.CHANNEL] = first.channel
        self.stream_ctx[StreamContextKey.TOPIC] = first.topic
        self.stream_ctx[StreamContextKey.END_STREAM] = self._end_stream
        self.fl_ctx = FLContext(identity_name=site_name)
        self.fl_ctx.set_peer_context(FLContext(identity_name=conn.peer))
        self.abort_signal = self.fl_ctx.get_run_abort_signal()
        self.site_name = site_name
        #: How the session ended; the first cause wins.
        self.rc: str | None = None
        #: The stream's protocol state; the inbox holds at most its
        #: ``max_in_flight`` objects (their bytes are bounded by the budget).
        self.stream = ReceiverStream(
            first.sid,
            window=conn.options.window,
            max_object_size=conn.options.max_object_size,
            reply_window=conn.peer_limits.get("window", 0),
            credit_step=conn.options.credit_step,
        )
        self._assembler: ObjectAssembler | None = None
        self._assembling_seq = -1
        #: Bytes received so far of an object that waits for the receive
        #: budget (its buffer is made only once it is admitted), and its size.
        self._staged: list[bytes] | None = None
        self._staged_len = 0
        self._staged_size = 0
        #: When a byte of the object being received last arrived.
        self._progressed = trio.current_time()
        #: Set when the opener grants reply credit.
        self._reply_credit_changed = trio.Event()
        self._inbox: collections.deque[RawObject] = collections.deque()
        self._inbox_event = trio.Event()
        #: The last object's buffer, when nothing references it any more.
        self._spare: bytearray | mmap.mmap | None = None
        #: This session's objects in the connection's receive budget.
        self._holds = ObjectHolds(conn.receive_budget, conn.options.max_object_size, self._admitted)
        #: True while the credit for the last object's bytes waits to go
        #: with its reply (see ``_hold_credit``); never again once the stream
        #: showed it is pipelined.
        self._credit_held = False
        self._pipelined = False
        #: True while consume or consumed_cb runs.
        self._busy = False
        #: rc passed to END_STREAM from inside consume, applied when it returns.
        self._end_requested: str | None = None
        self.scope = trio.CancelScope()
        self.finished = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.objects_received = 0
        self.bytes_received = 0
        self.started = trio.current_time()

    def stats(self) -> StreamStats:
        return StreamStats(
            peer=self.conn.peer,
            sid=self.sid,
            sending=False,
            channel=self.channel,
            topic=self.topic,
            objects=self.objects_received,
            bytes=self.bytes_received,
            credit=self.stream.ungranted,
            started=self.started,
            queued=self.conn.pending(self.sid),
        )

    # ---------------------------------------------------- called by the reader

    def on_data(self, frame: Data) -> None:
        if self._credit_held:
            # The next object came before the last one's reply: the stream is
            # pipelined, and its credit goes as its bytes arrive from now on.
            self._pipelined = True
            self.release_credit()
        try:
            event = self.stream.on_data(frame)
        except StreamViolation as exc:
            if exc.connection:
                raise
            self.conn.reject(self.sid, frame.seq, exc.rc, str(exc))
            self.end(exc.rc)
            return
        if event is DROPPED:
            return
        self._assembling_seq = frame.seq
        admitted = self._holds.add(frame.size)
        if not admitted and not self._holds.hold_early(len(frame.body)):
            self._refuse_early()
            return
        if event is not None:
            # The whole object came in this one frame: no reassembly needed.
            body = frame.body
            self._hold_credit()
            self._grant()
            # A frame body is read-only; an object with out-of-band buffers
            # (senders put objects of up to 128 KiB in one frame) gets a
            # writable copy, so its arrays are writable like any others.
            # (A head starting with 0x80 has no out-of-band buffers: no copy.)
            has_buffers = len(body) > 4 and body[4] != 0x80
            self._deliver(bytearray(body) if has_buffers else body)
            return
        if not admitted:
            # Nothing sized by the peer's claim before the budget admits the
            # object: keep only the bytes that actually arrive (what the
            # stream's credit allows), and grant no credit meanwhile.
            self._staged = [bytes(frame.body)]
            self._staged_len = len(frame.body)
            self._staged_size = frame.size
            self._progressed = trio.current_time()
            self._grant()
            return
        try:
            self._assembler = ObjectAssembler(
                frame.size, max_size=self.conn.options.max_object_size, buffer=self._spare
            )
            self._spare = None
        except ObjectTooLargeError as exc:
            self.conn.reject(self.sid, frame.seq, ReturnCode.BAD_REQUEST_DATA, str(exc))
            self.end(ReturnCode.BAD_REQUEST_DATA)
            return
        self._feed(0, frame.body)

    def body_target(self, frame: Chunk, nbytes: int) -> memoryview | None:
        """The part of the object buffer where this chunk's body belongs."""
        if self._assembler is None or frame.seq != self._assembling_seq or self.rc is not None:
            return None
        return self._assembler.target(frame.offset, nbytes)

    def on_chunk(self, frame: Chunk) -> None:
        """A CHUNK of the object being received. One that cannot be placed
        raises :class:`StreamViolation` for the reader: the connection closes."""
        event = self.stream.on_chunk(frame)
        if event is DROPPED:
            return
        if self._staged is not None:
            # Keep a CHUNK of an object that waits for admission.
            if not self._holds.hold_early(len(frame.body)):
                self._refuse_early()
                return
            self._staged.append(bytes(frame.body))
            self._staged_len += len(frame.body)
            self._progressed = trio.current_time()
            self._grant()
            if event is not None:
                # All of it came within the credit the stream had: assemble it
                # now, while it still waits its turn in the budget.
                self._assemble_staged()
        elif self._assembler is not None:
            self._feed(frame.offset, frame.body)

    def _refuse_early(self) -> None:
        """Too many bytes wait for admission on this connection (or site-wide):
        refuse this session and drop what it holds (see ``_budget``)."""
        budget = self.conn.receive_budget
        suppressed = budget.refusal_log.allow()
        if suppressed is not None:
            logger.warning(
                "%s sent more bytes for objects waiting for the receive budget than "
                "max_receive_buffer_per_peer (%d) or max_receive_buffer "
                "allows: refusing its stream %d (%d refused since the last such warning)",
                self.conn.peer,
                budget.limit,
                self.sid,
                suppressed,
            )
        self._staged = None
        # An ABORT, not an error reply: with objects in flight (a pipelined
        # stream) a reply to this one would overtake the replies still due.
        self.end(
            ReturnCode.SERVICE_UNAVAILABLE,
            tell_sender=True,
            reason=f"{self.site_name!r} holds too many bytes of objects waiting for its "
            "receive budget; try again when fewer streams wait",
        )

    def _admitted(self) -> None:
        """The budget let our waiting object in (or nothing of ours waits any more)."""
        if self._staged is not None and self.rc is None:
            self._assemble_staged()
        self._grant()

    def _assemble_staged(self) -> None:
        """Make the object's buffer and move the staged bytes into it.

        Runs from the reader, or from whichever task freed the budget: a
        malformed object ends this session only.
        """
        pieces, self._staged = self._staged or [], None
        try:
            assembler = ObjectAssembler(
                self._staged_size, max_size=self.conn.options.max_object_size, buffer=self._spare
            )
            self._spare = None
            offset = 0
            complete = False
            for piece in pieces:
                complete = assembler.feed(offset, piece)
                offset += len(piece)
            del pieces
        except (RemoteProtocolError, ObjectTooLargeError) as exc:
            self.conn.reject(self.sid, self._assembling_seq, ReturnCode.BAD_REQUEST_DATA, str(exc))
            self.end(ReturnCode.BAD_REQUEST_DATA)
            return
        if complete:
            self._deliver(assembler.take())
        else:
            self._assembler = assembler

    def _feed(self, offset: int, body: memoryview | bytes | bytearray) -> None:
        assembler = self._assembler
        assert assembler is not None
        complete = assembler.feed(offset, body)
        self._progressed = trio.current_time()
        if complete:
            self._hold_credit()
        self._grant()
        if complete:
            self._assembler = None
            self._deliver(assembler.take())

    def progress_deadline(self) -> float:
        """When the object being received times out if no more of it arrives
        (``inf`` when nothing is expected from the sender: no object under
        way, or its credit withheld by the receive budget)."""
        if self.rc is not None or self._holds.withholding:
            return math.inf
        if self._assembler is None and self._staged is None:
            return math.inf
        return self._progressed + self.conn.options.receive_progress_timeout

    def reap(self) -> None:
        """The object under way made no progress for its bound: end with TIMEOUT."""
        bound = self.conn.options.receive_progress_timeout
        logger.warning(
            "object %d of stream %d from %s made no progress for %s s: ending the session",
            self._assembling_seq,
            self.sid,
            self.conn.peer,
            bound,
        )
        self.end(ReturnCode.TIMEOUT, tell_sender=True)

    def _grant(self) -> None:
        # The stream owes credit every credit_step bytes (announced in our
        # HELLO, at most half a window): the sender keeps its chunks to at
        # most half a window, so it can always make progress, and a sender
        # that shares the connection can bound what it has in flight
        # (TargetLink._room). None is granted while our object waits for
        # the receive budget, or while the credit is held for the reply.
        if self._credit_held:
            return
        credit = self.stream.grant(self._holds.withholding)
        if credit is not None:
            self.conn.send_control(credit)

    def _hold_credit(self) -> None:
        """The object is complete: keep the credit its last bytes earn for
        its reply, to go in the same write, when the sender cannot need it
        before then.

        A stop-and-wait sender starts nothing before the reply. A pipelined
        one may, so the credit is held only while the sender can still send
        a whole frame without it: its credit left is at least half a window
        (no frame is larger), and no other stream shares the connection
        (which would bound the sender's unacknowledged bytes to about a
        credit step, see ``TargetLink._room``). The next object's DATA
        arriving first releases it and marks the stream pipelined (never
        held again); so do another stream starting on the connection, and
        the connection's bound on how long a credit may be held, whatever
        happens.
        """
        stream = self.stream
        if (
            self._pipelined
            or stream.ungranted < stream.credit_step
            or stream.credit < stream.window // 2
            or self._holds.withholding
            or self.conn.shared()
        ):
            return
        self._credit_held = True
        self.conn.hold_credit(self)

    def _take_credit(self) -> Credit | None:
        """The held credit, as a frame to send now (None when none is owed)."""
        if not self._credit_held:
            return None
        self._credit_held = False
        self.conn.unhold_credit(self)
        return self.stream.grant(self._holds.withholding)

    def release_credit(self) -> None:
        """Send the credit held for the reply now, on its own."""
        credit = self._take_credit()
        if credit is not None:
            self.conn.send_control(credit)

    def _deliver(self, raw: RawObject) -> None:
        """Hand a complete object to the session task (the stream bounds
        how many may wait: its ``max_in_flight``)."""
        self._inbox.append(raw)
        self._inbox_event.set()

    def on_end(self, frame: End) -> None:
        try:
            event = self.stream.on_end(frame)
        except StreamViolation as exc:
            self._violation(exc)
            return
        if event is not DROPPED:
            self._inbox_event.set()

    def on_abort(self, frame: Abort) -> None:
        try:
            event = self.stream.on_abort(frame)
        except StreamViolation as exc:
            self._violation(exc)
            return
        if event is not DROPPED:
            self.end(frame.rc, tell_sender=False)

    def _violation(self, error: StreamViolation) -> None:
        """The sender broke this stream's rules: end it (only it) with BAD_REQUEST_DATA."""
        logger.warning("protocol error from %s: %s", self.conn.peer, error)
        self.end(error.rc, tell_sender=False)

    def on_connection_lost(self) -> None:
        self.end(ReturnCode.COMMUNICATION_ERROR, tell_sender=False)

    def on_credit(self, frame: Credit) -> None:
        """The opener lets us send ``increment`` more reply bytes."""
        self.stream.on_credit(frame)
        self._reply_credit_changed.set()

    async def _reserve_reply(self, nbytes: int) -> None:
        """Wait until the stream has ``nbytes`` of reply credit (spent when
        the stream builds the frame)."""
        while self.stream.reply_credit < nbytes:
            self._reply_credit_changed = trio.Event()
            await self._reply_credit_changed.wait()

    # ------------------------------------------------------------ ending

    def end(self, rc: str, *, tell_sender: bool = False, reason: str = "ended by receiver") -> None:
        """End the session with ``rc`` (first call wins) and cancel its work."""
        if self.rc is not None:
            return
        self.rc = rc
        self._forget_credit()
        stream = self.stream
        if tell_sender and stream.state is StreamState.OPEN and not self.conn.closed.is_set():
            # Tell the sender now, not after finalize: it stops sending at once.
            self.conn.send_control(stream.abort(rc, reason, self.site_name))
        stream.end(rc)
        self.abort_signal.trigger(rc)
        self.scope.cancel()

    def _forget_credit(self) -> None:
        """The session ends: the stream owes no more credit."""
        if self._credit_held:
            self._credit_held = False
            self.conn.unhold_credit(self)

    def _end_stream(self, rc: str = ReturnCode.OK, fl_ctx: FLContext | None = None) -> None:
        """``stream_ctx[END_STREAM](rc, fl_ctx)``: the consumer ends its own session.

        Safe to call from the consumer's worker thread.
        """
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            self._token.run_sync_soon(self._request_end, rc)
        else:
            self._request_end(rc)

    def _request_end(self, rc: str) -> None:
        # Inside consume (or consumed_cb) the session ends once it returns, and
        # its reply goes out as the last one; otherwise it ends now.
        if self.rc is not None or self._end_requested is not None:
            return
        if self._busy:
            self._end_requested = rc
        else:
            self.end(rc, tell_sender=True)

    # ------------------------------------------------------------ the task

    async def run(self) -> None:
        consumer: ObjectConsumer | None = None
        factory = self.registration.factory
        unregister = self.abort_signal.add_listener(self._on_abort_signal)
        current_session.set(self)  # this task runs only this session
        try:
            with self.scope:
                try:
                    made = await self.runner(factory.get_consumer, self.stream_ctx, self.fl_ctx)
                    if not isinstance(made, ObjectConsumer):
                        raise TypeError(
                            f"get_consumer returned {type(made).__name__}, not an ObjectConsumer"
                        )
                    consumer = made
                    await self._consume_all(consumer)
                except Exception as exc:
                    if self.rc is not None:
                        logger.debug("stream %d raised while ending", self.sid, exc_info=True)
                        return
                    logger.exception("stream %d from %s failed", self.sid, self.conn.peer)
                    self.rc = ReturnCode.EXECUTION_EXCEPTION
                    await self._reply_error(
                        ReturnCode.EXECUTION_EXCEPTION, f"{type(exc).__name__}: {exc}"
                    )
        finally:
            unregister()
            await self._finish(consumer)

    def _on_abort_signal(self, signal: Any) -> None:
        # Called in whichever thread triggered the signal.
        if self.rc is None:
            self._token.run_sync_soon(
                functools.partial(self.end, ReturnCode.TASK_ABORTED, tell_sender=True)
            )

    async def _consume_all(self, consumer: ObjectConsumer) -> None:
        reg = self.registration
        # Plain consume and consumed_cb share one worker-thread hop per object.
        callbacks = [consumer.consume]
        if reg.consumed_cb is not None:
            callbacks.append(reg.consumed_cb)
        one_hop = self.runner.one_hop(*callbacks)
        while True:
            while not self._inbox:
                if self.stream.end_received:
                    self.rc = ReturnCode.OK
                    return
                self._inbox_event = trio.Event()
                await self._inbox_event.wait()
            raw = self._inbox.popleft()
            self._holds.take()
            self.objects_received += 1
            self.bytes_received += len(raw)
            try:
                shareable, holds_views = decode_object_views(raw)
            except RemoteProtocolError as exc:
                await self._reply_error(ReturnCode.BAD_REQUEST_DATA, str(exc))
                self.rc = ReturnCode.BAD_REQUEST_DATA
                return
            # The session owns the buffer; keep it for the next object unless
            # the decoded values view it (NumPy arrays; bytes are copies).
            if isinstance(raw, (bytearray, mmap.mmap)) and not holds_views:
                self._spare = raw
            del raw
            self._busy = True
            try:
                if one_hop:
                    keep_going, reply = await self.runner.call_plain(
                        self._consume_in_thread, consumer, shareable
                    )
                else:
                    result = await self.runner(
                        consumer.consume, shareable, self.stream_ctx, self.fl_ctx
                    )
                    keep_going, reply = _check_consume_result(result)
                    if reg.consumed_cb is not None:
                        await self.runner(  # FLARE's convention: the consume result first
                            reg.consumed_cb,
                            (keep_going, reply),
                            self.stream_ctx,
                            self.fl_ctx,
                            **reg.cb_kwargs,
                        )
            except Exception as exc:
                if self.rc is not None:  # already ending; the error is a consequence
                    logger.debug(
                        "consume raised while stream %d was ending", self.sid, exc_info=True
                    )
                    return
                logger.exception("consume failed on stream %d from %s", self.sid, self.conn.peer)
                self.rc = ReturnCode.EXECUTION_EXCEPTION
                await self._reply_error(
                    ReturnCode.EXECUTION_EXCEPTION, f"{type(exc).__name__}: {exc}"
                )
                return
            finally:
                self._busy = False
            if self.rc is not None:
                return  # ended while consume ran (abort, shutdown): no reply
            end_rc = self._end_requested
            if reply is None and end_rc is None and keep_going:
                # The plain acknowledgement, encoded once for all.
                body = _PLAIN_OK_VIEW
                credit = self._take_credit()
                frame = self.stream.reply(len(body), last=False, body=body)
                if credit is None:
                    await self.conn.send_data(frame)
                else:
                    await self.conn.send_data(credit, frame)
                continue
            if reply is None:
                reply = make_reply(end_rc or ReturnCode.OK)
            if end_rc is not None:
                keep_going = False
            await self._send_reply(reply, last=not keep_going)
            if not keep_going:
                self.rc = end_rc or str(reply.get_return_code(ReturnCode.OK))
                return

    def _consume_in_thread(
        self, consumer: ObjectConsumer, shareable: Shareable
    ) -> tuple[bool, Shareable | None]:
        """In a worker thread: ``consume``, then ``consumed_cb``."""
        reg = self.registration
        checked = _check_consume_result(
            not_awaitable(consumer.consume(shareable, self.stream_ctx, self.fl_ctx))
        )
        if reg.consumed_cb is not None:  # FLARE's convention: the consume result first
            not_awaitable(reg.consumed_cb(checked, self.stream_ctx, self.fl_ctx, **reg.cb_kwargs))
        return checked

    async def _send_reply(self, reply: Shareable, *, last: bool) -> None:
        try:
            await self._send_object(reply, last=last)
        except LocalProtocolError as exc:
            seq = self.stream.next_reply
            logger.error(
                "reply to object %d of stream %d cannot be encoded: %s", seq, self.sid, exc
            )
            await self._reply_error(ReturnCode.EXECUTION_EXCEPTION, str(exc), last=last)

    async def _send_object(self, reply: Shareable, *, last: bool) -> None:
        """Send ``reply`` to the oldest unanswered object: a REPLY plus CHUNKs.

        Each frame's tail first waits for that much reply credit, unless the
        whole reply is small enough to go free in one frame
        (:data:`FREE_REPLY_MAX`).
        """
        # Most replies are the plain OK acknowledgement: encode that one once.
        encoded = _PLAIN_OK_ENCODED if reply == _PLAIN_OK else encode_object(reply)
        conn = self.conn
        stream = self.stream
        max_body = conn.max_body
        free = encoded.size <= FREE_REPLY_MAX and encoded.size <= max_body
        if not free:
            self.release_credit()  # not behind a wait for reply credit
        first = True
        for view in encoded.chunks(max_body):
            if not free:
                await self._reserve_reply(len(view))
            if first:
                first = False
                # The credit held for the object's last bytes goes in the same write.
                credit = self._take_credit()
                frame = stream.reply(encoded.size, last=last, body=view)
                if credit is None:
                    await conn.send_data(frame)
                else:
                    await conn.send_data(credit, frame)
            else:
                await conn.send_data(stream.reply_chunk(view))

    async def _reply_error(self, rc: str, message: str, *, last: bool = True) -> None:
        """Answer the oldest unanswered object with an error (if there is one)."""
        stream = self.stream
        if stream.next_reply >= stream.next_seq or self.conn.closed.is_set():
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.conn.options.finalize_timeout):
            reply = make_reply(rc, {ReservedHeaderKey.ERROR: message[:1000]})
            try:
                await self._send_object(reply, last=last)
            except LocalProtocolError:
                logger.debug("no error reply on stream %d", self.sid, exc_info=True)

    async def _finish(self, consumer: ObjectConsumer | None) -> None:
        """Run the end-of-session steps exactly once, shielded and bounded."""
        rc = self.rc or ReturnCode.EXECUTION_EXCEPTION
        self.rc = rc
        self._forget_credit()
        self._assembler = None  # release what the session held
        self._staged = None
        self._inbox.clear()
        self._holds.release()
        self.stream.end(rc)
        self.stream_ctx[StreamContextKey.RC] = rc
        reg = self.registration
        timeout = self.conn.options.finalize_timeout
        result: Any = None
        try:
            with trio.CancelScope(shield=True):
                # The ABCs' default finalize/return_consumer do nothing: skip
                # the call (and, for plain callbacks, a worker-thread hop).
                if consumer is not None and _overridden(consumer.finalize, ObjectConsumer.finalize):
                    await self._step(
                        "finalize", timeout, consumer.finalize, self.stream_ctx, self.fl_ctx
                    )
                if reg.stream_done_cb is not None:
                    result = await self._step(
                        "stream_done_cb",
                        timeout,
                        reg.stream_done_cb,
                        self.stream_ctx,
                        self.fl_ctx,
                        **reg.cb_kwargs,
                    )
                if consumer is not None and _overridden(
                    reg.factory.return_consumer, ConsumerFactory.return_consumer
                ):
                    await self._step(
                        "return_consumer",
                        timeout,
                        reg.factory.return_consumer,
                        consumer=consumer,  # by keyword, as FLARE calls it
                        stream_ctx=self.stream_ctx,
                        fl_ctx=self.fl_ctx,
                    )
                await self._send_done(rc, result)
        finally:
            self.finished.set()
            self._on_finished(self)

    async def _step(
        self, what: str, limit: float, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        with trio.move_on_after(limit) as scope:
            try:
                # Nothing can overlap this step any more, so a plain callback
                # that overstays may be left running in its thread.
                return await self.runner(fn, *args, abandon_on_cancel=True, **kwargs)
            except Exception:
                logger.exception("%s failed for stream %d from %s", what, self.sid, self.conn.peer)
                return None
        if scope.cancelled_caught:
            logger.error("%s did not finish within %s s for stream %d", what, limit, self.sid)
        return None

    async def _send_done(self, rc: str, result: Any) -> None:
        """DONE goes in order behind this stream's replies (bounded)."""
        if self.conn.closed.is_set():
            return
        try:
            value = result if result else None
        except Exception:  # an object with no truth value (an array, a frame)
            value = result
        with trio.move_on_after(self.conn.options.finalize_timeout):
            try:
                try:
                    await self.conn.send_data(self.stream.done(rc, value))
                except LocalProtocolError:
                    logger.warning("stream_done_cb result %r cannot be sent; sending none", result)
                    await self.conn.send_data(Done(self.sid, rc, None))
            except ConnectionLostError:
                pass


def _overridden(bound: Callable[..., Any], default: Callable[..., Any]) -> bool:
    return getattr(bound, "__func__", None) is not default


def _check_consume_result(result: Any) -> tuple[bool, Shareable | None]:
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"consume must return (continue, reply), not {result!r:.100}")
    keep_going, reply = result
    reply = from_flare(reply)  # an nvflare Shareable, headers kept
    if reply is not None and not isinstance(reply, Shareable):
        raise TypeError(f"consume reply must be a Shareable or None, not {type(reply).__name__}")
    return bool(keep_going), reply
