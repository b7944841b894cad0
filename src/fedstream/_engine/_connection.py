"""One connection to one peer site: the object that ties its parts together.

A connection is three tasks in the connection's own nursery, each in its
own module:

* the **reader** (:mod:`._reader`) reads the stream and dispatches every
  frame synchronously to the session it belongs to;
* the **writer** (:mod:`._writer`) owns writing: per-stream queues, one data
  frame per stream in turn, control frames first;
* the **heartbeat** (here) sends PING when idle, declares the peer lost when
  nothing at all was received for ``peer_timeout`` seconds, and reaps
  receiving sessions whose object stopped making progress.

A fourth task sends the credit a receiving session holds for its reply
(:meth:`Connection.hold_credit`) once it has held it for ``_CREDIT_HOLD``.

The HELLO exchange that comes before is in :mod:`._handshake`. Receiver
sessions opened by the peer also run in this nursery, so losing the
connection cancels exactly them (their ``finalize`` still runs, shielded).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .._errors import ConnectionLostError, LocalProtocolError, RemoteProtocolError
from .._wire import (
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    ErrorCode,
    Frame,
    FrameProtocol,
    GoAway,
    Hello,
    Ping,
    Reply,
)
from ._budget import ReceiveBudget, SiteBudget
from ._handshake import accept_handshake, dial_handshake
from ._reader import Reader, ReceiveHandler, SendHandler
from ._stats import ConnectionStats
from ._writer import Writer, frame_size

if TYPE_CHECKING:
    from typing import TypeAlias

    from ._options import SiteOptions

    #: The frames that belong to one stream's ordered data (a CREDIT only
    #: where it rides with the reply it belongs to).
    StreamFrame: TypeAlias = Data | Chunk | Reply | Done | End | Abort | Credit

__all__ = ["Connection", "ReceiveHandler", "SendHandler", "accept_handshake", "dial_handshake"]

logger = logging.getLogger(__name__)

#: Time the writer gets to flush a closing GOAWAY.
_DRAIN_TIMEOUT = 1.0
#: Room for a frame head on top of ``max_body`` when a whole frame goes out in one write.
_UNSENT_SLACK = 64 * 1024
#: Seconds after another stream's last data frame during which a stream
#: sending on the connection counts it as contended (see
#: :meth:`Connection.contended`).
_CONTENTION_WINDOW = 0.05
#: Longest a receiving session may hold the credit for an object's last bytes
#: to send it in one write with the object's reply (see
#: :meth:`Connection.hold_credit`).
_CREDIT_HOLD = 0.01


class Connection:
    """An established connection to the peer named ``peer``.

    Create it after a successful handshake and run :meth:`run` in a nursery.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: FrameProtocol,
        peer_hello: Hello,
        *,
        local: str,
        dialer: bool,
        options: SiteOptions,
        url: str,
        site_budget: SiteBudget | None = None,
    ) -> None:
        self.stream = stream
        self.protocol = protocol
        self.peer = peer_hello.site
        self.local = local
        self.url = url
        self.options = options
        self.peer_limits = dict(peer_hello.limits)
        self.dialer = dialer
        self._sids = itertools.count(1 if dialer else 2, 2)
        self._parity = 1 if dialer else 0
        #: Sessions the peer opened (we receive), by sid.
        self.receivers: dict[int, ReceiveHandler] = {}
        #: Bytes of objects the peer makes us hold, against max_receive_buffer_per_peer.
        #: Admissions must also fit ``site_budget``, the site's across all peers.
        self.receive_budget = ReceiveBudget(options.max_receive_buffer_per_peer, site_budget)
        #: Links we opened (we send), by sid.
        self.senders: dict[int, SendHandler] = {}
        self._writer = Writer(
            stream,
            max(2 * options.chunk_size, 1 << 20),
            on_broken=self.lose,
            on_drained=self._cancel,
        )
        self._writer.take_whole_frames(
            self._body_limit(options.chunk_size) + _UNSENT_SLACK, self.peer
        )
        self._outbox = self._writer.outbox
        self._reader = Reader(self)
        self._pings = itertools.count()
        self.closed = trio.Event()
        #: Set once run() has returned and the stream is closed.
        self.finished = trio.Event()
        # Set once nothing more will be written (drained after GOAWAY, or cancelled).
        self._flushed = trio.Event()
        self.close_reason = ""
        self._cancel_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        #: Bytes handed to the connection to send.
        self.bytes_queued = 0
        #: The stream that sent the last data frame and when, and when another
        #: stream last sent one.
        self._last_data_sid = 0
        self._last_data_at = -math.inf
        self._other_data_at = -math.inf
        self.connected_at = trio.current_time()
        #: Called (once, synchronously) when the connection is lost.
        self.on_lost: Callable[[Connection], None] = lambda c: None
        #: Called from the reader for a DATA frame with seq 0 on an unknown sid.
        self.on_open: Callable[[Connection, Data], ReceiveHandler | None] = lambda c, f: None
        #: Receiving sessions holding credit for their reply, and by when it
        #: must go (in the order they began holding it).
        self._held: dict[ReceiveHandler, float] = {}
        self._hold_scope: trio.CancelScope | None = None

    # ----------------------------------------------------------------- identity

    @property
    def peer_window(self) -> float:
        """Initial per-stream send window the peer grants (inf if it does not use credit)."""
        window = self.peer_limits.get("window", 0)
        return math.inf if window == 0 else float(window)

    @property
    def peer_max_object_size(self) -> float:
        size = self.peer_limits.get("max_object_size", 0)
        return math.inf if size == 0 else float(size)

    @property
    def max_body(self) -> int:
        """The largest frame body we may send to this peer now.

        ``chunk_size``, or ``shared_chunk_size`` while the connection is
        :meth:`contended`: a frame in the kernel cannot be overtaken, and the
        smaller frame also keeps :attr:`shared_in_flight` small. At most half
        the peer's window, so that a peer that grants credit in batches of
        half a window never leaves us stuck mid-object.
        """
        options = self.options
        chunk = options.shared_chunk_size if self.contended() else options.chunk_size
        return self._body_limit(chunk)

    def _body_limit(self, chunk: int) -> int:
        limit = min(chunk, self.protocol.peer_max_frame_size - 4096)
        window = self.peer_limits.get("window", 0)
        if window:
            limit = min(limit, window // 2)
        return max(1, limit)

    @property
    def peer_credit_step(self) -> int:
        """How many object bytes the peer takes in before it grants credit back."""
        half = self.peer_limits.get("window", 0) // 2
        step = self.peer_limits.get("credit_step", 0) or half
        return max(1, min(step, half) if half else step)

    @property
    def shared_in_flight(self) -> int:
        """The most object bytes one stream keeps unacknowledged while it shares
        the connection with other streams.

        Every byte a stream has in flight lies between a small stream's next
        frame and the peer, so a large transfer that shares the connection
        keeps no more than one frame (:attr:`max_body`) beyond the peer's
        credit step: the peer grants credit every step, so the stream still
        always gets its next frame out (see :meth:`TargetLink._room
        <._sender.TargetLink._room>`). With fedstream's defaults on both sides
        that is 512 KiB while another stream is sending too (the connection is
        :meth:`contended`), and 1.25 MiB beside idle streams, which the first
        object of a stream that wakes up waits behind. A larger frame of an
        object begun before the contention goes out once everything before
        it is credited.
        """
        return self.peer_credit_step + self.max_body

    def shared(self) -> bool:
        """Whether more than one stream (either way) uses the connection.

        Streams of ours count once their first DATA went out and until their
        session ended (:attr:`SendHandler.on_wire`): the peer sees only those,
        and it decides from the same count whether it may hold a credit for
        a reply (:meth:`hold_credit`), so both sides must agree on it.
        """
        receivers = len(self.receivers)
        if receivers + len(self.senders) <= 1:
            return False
        if receivers > 1:
            return True
        for link in self.senders.values():
            if link.on_wire:
                receivers += 1
                if receivers > 1:
                    return True
        return False

    def contended(self) -> bool:
        """Whether more than one stream is sending: the connection is shared and
        a stream other than the one that sent the last data frame sent one
        within the last ``_CONTENTION_WINDOW`` seconds. A stream beside idle
        ones keeps whole chunks (:attr:`max_body`)."""
        return self.shared() and trio.current_time() - self._other_data_at < _CONTENTION_WINDOW

    def stats(self) -> ConnectionStats:
        """A snapshot of this connection and its streams."""
        streams = [r.stats() for r in self.receivers.values()]
        streams += [s.stats() for s in self.senders.values()]
        return ConnectionStats(
            peer=self.peer,
            url=self.url,
            dialer=self.dialer,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            bytes_queued=self.bytes_queued - self.bytes_sent,
            connected=self.connected_at,
            last_receive=self.last_receive,
            last_write=self.last_write,
            streams=tuple(sorted(streams, key=lambda s: s.sid)),
            receive_buffered=self.receive_budget.held,
            receive_buffered_peak=self.receive_budget.peak,
            objects_waiting=self.receive_budget.waiting,
        )

    def new_sid(self) -> int:
        return next(self._sids)

    def is_ours(self, sid: int) -> bool:
        return sid % 2 == self._parity

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    # ------------------------------------------------------------------ sending

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the stream so far."""
        return self._writer.bytes_sent

    @property
    def last_write(self) -> float:
        """When bytes were last written to the stream."""
        return self._writer.last_write

    def send_control(self, frame: Frame) -> None:
        """Send a small frame without waiting (safe from the reader)."""
        if self._outbox.closed:
            return
        item = self.protocol.send_parts(frame)
        self.bytes_queued += frame_size(item)
        if not self._writer.send_control(item):
            self.lose("peer does not read what we send")

    async def send_data(self, frame: StreamFrame, *more: StreamFrame) -> None:
        """Queue a data frame of one stream (and ``more`` of the same stream
        right behind it), waiting while that stream's queue is full.

        Frames passed together are written with one system call when the
        socket takes them at once (an object's small head frame and its first
        chunk, say), which also spares the peer a wake-up.

        Raises:
            ConnectionLostError: the connection is closed.
        """
        writer = self._writer
        if not writer.has_room(frame.sid) and not await writer.wait_for_room(frame.sid):
            raise ConnectionLostError(f"connection to {self.peer} is closed: {self.close_reason}")
        if self._held and self.is_ours(frame.sid):
            # A stream of ours sends: the peer now counts the connection as
            # shared, and its streams may need the credit we hold.
            self.release_held_credit()
        send_parts = self.protocol.send_parts
        items = [send_parts(frame)]
        if more:
            items += [send_parts(f) for f in more]
        size = 0
        for item in items:
            size += frame_size(item)
        self.bytes_queued += size
        if frame.sid != self._last_data_sid:
            self._other_data_at = self._last_data_at
            self._last_data_sid = frame.sid
        self._last_data_at = trio.current_time()
        writer.send_data(frame.sid, items, size)

    def pending(self, sid: int) -> int:
        """Bytes of stream ``sid`` handed to the connection and not yet written."""
        return self._writer.pending(sid)

    def flushed_event(self, sid: int) -> trio.Event:
        """An event set once nothing of stream ``sid`` waits to be written
        (or the connection is lost)."""
        return self._writer.flushed_event(sid)

    # ---------------------------------------------------------------- receiving

    def hold_credit(self, handler: ReceiveHandler) -> None:
        """``handler`` holds the credit for its object's last bytes, to send
        it with the object's reply in one write.

        It goes on its own (``handler.release_credit()``) after at most
        ``_CREDIT_HOLD`` seconds, or as soon as another stream starts on the
        connection: whatever the session assumed about its sender's need
        for it, the wait is bounded.
        """
        due = trio.current_time() + _CREDIT_HOLD
        self._held.pop(handler, None)  # keep the dict in order of due time
        self._held[handler] = due
        scope = self._hold_scope
        if scope is not None and due < scope.deadline:
            scope.deadline = due

    def unhold_credit(self, handler: ReceiveHandler) -> None:
        """``handler`` sent (or no longer owes) the credit it held."""
        self._held.pop(handler, None)

    def release_held_credit(self) -> None:
        """Every receiving session sends the credit it holds, now."""
        held = self._held
        while held:
            handler = next(iter(held))
            del held[handler]
            handler.release_credit()

    async def _release_late_credit(self) -> None:
        """Send each held credit once it has been held ``_CREDIT_HOLD`` seconds."""
        held = self._held
        while True:
            deadline = next(iter(held.values())) if held else math.inf
            with trio.CancelScope(deadline=deadline) as scope:
                self._hold_scope = scope
                await trio.sleep_forever()
            self._hold_scope = None
            now = trio.current_time()
            while held:
                handler, due = next(iter(held.items()))
                if due > now:
                    break
                del held[handler]
                handler.release_credit()

    @property
    def bytes_received(self) -> int:
        """Bytes read from the stream so far."""
        return self._reader.bytes_received

    @property
    def last_receive(self) -> float:
        """When bytes were last read from the stream."""
        return self._reader.last_receive

    def reject(self, sid: int, seq: int, rc: str, message: str, *, quiet: bool = False) -> None:
        """Answer object ``seq`` of ``sid`` with an error reply that ends the stream.

        Logged as a warning, or with ``quiet`` (the caller rate-limits its own
        warning) at debug level.
        """
        from .._shareable import ReservedHeaderKey, make_reply
        from .._wire import encode_object

        message = message[:500]  # it may quote what the peer sent
        logger.log(
            logging.DEBUG if quiet else logging.WARNING,
            "rejecting object %d of stream %d from %s: %s",
            seq,
            sid,
            self.peer,
            message,
        )
        encoded = encode_object(make_reply(rc, {ReservedHeaderKey.ERROR: message})).to_bytes()
        self.send_control(Reply(sid, seq, len(encoded), True, encoded))

    # ---------------------------------------------------------------- lifecycle

    async def _heartbeat(self) -> None:
        """PING when idle, declare the peer lost exactly ``peer_timeout`` after
        the last received byte, and reap receiving sessions whose object
        stopped making progress.

        It sleeps until the earliest of those deadlines (never longer than
        ``heartbeat_interval``, so a session's reaping is late by at most
        that), instead of polling on a fixed beat.
        """
        interval = self.options.heartbeat_interval
        timeout = self.options.peer_timeout
        last_ping = -math.inf
        while True:
            # Deadlines are compared as computed, never as differences, so
            # that rounding cannot leave a deadline that is due but not met.
            now = trio.current_time()
            last = self.last_receive
            lost_at = last + timeout
            if now >= lost_at:
                message = f"nothing received from {self.peer} for {now - last:.1f} s"
                self.lose(message, goaway=GoAway(ErrorCode.HEARTBEAT_TIMEOUT, message))
                return
            ping_at = max(last, last_ping) + interval
            if now >= ping_at:
                self.send_control(Ping(next(self._pings)))
                last_ping = now
                ping_at = now + interval
            wake = min(lost_at, ping_at)
            for receiver in list(self.receivers.values()):
                deadline = receiver.progress_deadline()
                if deadline <= now:
                    receiver.reap()
                elif deadline < wake:
                    wake = deadline
            await trio.sleep_until(wake)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it is lost or closed; always closes the stream."""
        # Receiver sessions run in the outer nursery, the I/O tasks in the
        # inner one: when the connection is lost the stream is closed at once,
        # while sessions may still be finalizing.
        try:
            async with trio.open_nursery() as sessions:
                self._nursery = sessions
                try:
                    async with trio.open_nursery() as io:
                        self._cancel_scope = io.cancel_scope
                        io.start_soon(self._guard, self._writer.run)
                        io.start_soon(self._guard, self._reader.run)
                        io.start_soon(self._heartbeat)
                        io.start_soon(self._release_late_credit)
                        task_status.started()
                finally:
                    self.lose("connection closed")
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await self.stream.aclose()
        finally:
            self.finished.set()

    async def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except RemoteProtocolError as exc:
            logger.warning("protocol error from %s: %s", self.peer, exc)
            self.lose(f"protocol error: {exc}", goaway=GoAway(exc.error_code, str(exc)[:200]))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.lose(f"connection broke: {exc!r}")
            self._cancel()  # nothing more can be written, even when draining
        except Exception as exc:
            # A bug of ours, or a resource limit (MemoryError) a peer ran us
            # into: lose this connection, never the site.
            logger.exception("internal error on the connection to %s", self.peer)
            self.lose(
                f"internal error: {exc!r}",
                goaway=GoAway(ErrorCode.INTERNAL_ERROR, "internal error"),
            )

    async def aclose(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Say GOAWAY, flush what is queued (bounded), and close."""
        self.lose(message or "closed locally", goaway=GoAway(code, message[:200]))
        with trio.move_on_after(_DRAIN_TIMEOUT):
            await self._flushed.wait()

    def lose(self, reason: str, *, goaway: GoAway | None = None) -> None:
        """Mark the connection gone and tell every session; idempotent, never awaits.

        With ``goaway``, that frame is queued last and the writer gets up to
        :data:`_DRAIN_TIMEOUT` seconds to flush what is queued before the
        connection's tasks are cancelled; without, they are cancelled now.
        """
        if self.closed.is_set():
            return
        self.close_reason = reason
        logger.info("connection %s -> %s closed: %s", self.local, self.peer, reason)
        final = None
        if goaway is not None:
            try:
                final = self.protocol.send_parts(goaway)
            except LocalProtocolError:  # we already said GOAWAY
                goaway = None
        self._writer.close(final)
        self.closed.set()
        self.on_lost(self)
        for handler in list(self.receivers.values()):
            handler.on_connection_lost()
        for link in list(self.senders.values()):
            link.on_connection_lost()
        if goaway is None:
            self._cancel()
        elif self._cancel_scope is not None:
            self._cancel_scope.deadline = min(
                self._cancel_scope.deadline, trio.current_time() + _DRAIN_TIMEOUT
            )

    def _cancel(self) -> None:
        self._flushed.set()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
