"""One connection to one peer site: handshake, reader, writer, heartbeat, routing.

Three tasks run per connection, in the connection's own nursery:

* the **reader** feeds received bytes to the sans-io :class:`FrameProtocol`
  and dispatches every frame *synchronously* to the session it belongs to.
  It never awaits anything but the socket, so a slow consumer can never stop
  it from reading (which is what would let two sites deadlock on full socket
  buffers);
* the **writer** owns ``send_all``. Sessions hand it frames through an
  :class:`_Outbox`: one queue of *control* frames (credit, pong, done,
  rejections: small, produced by the reader, never waited for, written
  first) and one queue of *data* frames per stream (object and reply chunks,
  each bounded in bytes: a session waits for room in its own queue, which is
  the connection-level backpressure). The writer takes one data frame per
  stream in turn, so a small stream's object waits behind at most one frame
  of a large transfer; it coalesces small frames into one ``send_all`` and
  writes large bodies without copying them. (What the large transfer has in
  the kernel's buffers is bounded too, by :attr:`Connection.shared_in_flight`.)
* the **heartbeat** sends PING when idle and declares the peer lost when
  nothing at all was received for ``peer_timeout`` seconds.

Receiver sessions opened by the peer also run in this nursery, so losing the
connection cancels exactly them (their ``finalize`` still runs, shielded).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .._errors import (
    ConnectionLostError,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from .._wire import (
    CLOSED,
    NEED_DATA,
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
    Pong,
    Reply,
)
from .._wire._frames import OPENER_ABORT_RCS
from ._budget import ReceiveBudget, SiteBudget
from ._stats import ConnectionStats, StreamStats

if TYPE_CHECKING:
    from typing import TypeAlias

    from ._options import SiteOptions

    #: The frames that belong to one stream's ordered data.
    StreamFrame: TypeAlias = Data | Chunk | Reply | Done | End | Abort

__all__ = ["Connection", "ReceiveHandler", "SendHandler", "accept_handshake", "dial_handshake"]

logger = logging.getLogger(__name__)

_RECEIVE_SIZE = 256 * 1024
#: Bytes read at a time until the peer's HELLO is in: a pending handshake
#: holds a few KiB, not a whole receive buffer.
_HANDSHAKE_RECEIVE_SIZE = 4 * 1024
#: Frames smaller than this are copied into one coalesced ``send_all``.
_COALESCE_BODY = 64 * 1024
#: Bytes of small frames gathered into one ``send_all``.
_COALESCE_LIMIT = 256 * 1024
#: A peer that makes us queue this many control frames without reading is dropped.
_MAX_CONTROL_QUEUE = 100_000
#: ABORTs for not-yet-seen streams remembered per connection.
_MAX_EARLY_ABORTS = 1024
#: Time the writer gets to flush a closing GOAWAY.
_DRAIN_TIMEOUT = 1.0
#: At most one warning per this many seconds about streams refused over
#: ``max_streams_per_peer`` (the peer decides how many it opens).
_REFUSAL_LOG_INTERVAL = 60.0
#: Room for a frame head on top of ``max_body`` when a whole frame goes out in one write.
_UNSENT_SLACK = 64 * 1024


class ReceiveHandler(Protocol):
    """What the connection needs from a peer-opened (receiving) session."""

    def on_data(self, frame: Data) -> None: ...
    def on_chunk(self, frame: Chunk) -> None: ...
    def on_end(self, frame: End) -> None: ...
    def on_abort(self, frame: Abort) -> None: ...
    def on_connection_lost(self) -> None: ...
    def body_target(self, frame: Chunk, nbytes: int) -> memoryview | None: ...
    def on_credit(self, frame: Credit) -> None: ...
    def progress_deadline(self) -> float: ...
    def reap(self) -> None: ...
    def stats(self) -> StreamStats: ...


class SendHandler(Protocol):
    """What the connection needs from a locally opened (sending) link."""

    def on_reply(self, frame: Reply) -> None: ...
    def on_chunk(self, frame: Chunk) -> None: ...
    def on_abort(self, frame: Abort) -> None: ...
    def on_done(self, frame: Done) -> None: ...
    def on_credit(self, frame: Credit) -> None: ...
    def on_connection_lost(self) -> None: ...
    def stats(self) -> StreamStats: ...


class _StreamQueue:
    """One stream's data frames waiting for the writer, in order."""

    __slots__ = ("flushed", "items", "pending", "scheduled", "sid", "space")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.items: collections.deque[tuple[bytes, memoryview | None]] = collections.deque()
        #: Bytes of this stream handed to the connection and not yet written
        #: (queued, taken by the writer, or left over from a direct write).
        self.pending = 0
        #: Tasks of this stream waiting for its queue to have room (made
        #: when the first one waits: most queues never fill).
        self.space: trio.lowlevel.ParkingLot | None = None
        #: Events to set once ``pending`` is back to zero.
        self.flushed: list[trio.Event] = []
        #: Whether the queue is in the writer's rotation.
        self.scheduled = False


class _Outbox:
    """Frames waiting for the writer.

    Control frames wait in one unbounded queue and go first. Data frames wait
    in one queue per stream, each bounded in bytes (a stream waits for room
    in its own queue: that is the connection-level backpressure), and the
    writer takes them one frame per stream in turn, so that a small stream's
    object never waits behind more than one frame of a large transfer.
    """

    def __init__(self, data_limit: int) -> None:
        self.control: collections.deque[tuple[bytes, memoryview | None]] = collections.deque()
        #: Per-stream queues with bytes pending, by sid.
        self.queues: dict[int, _StreamQueue] = {}
        #: Queues with frames to write, in turn order.
        self.ready: collections.deque[_StreamQueue] = collections.deque()
        #: Bytes one stream may have pending before it waits.
        self.data_limit = data_limit
        self.wakeup = trio.Event()
        self.closed = False
        #: What is left of a frame that a direct write could not finish; it
        #: goes out before anything else. ``partial_owner`` is its stream's
        #: queue and the bytes pending there until it is written.
        self.partial: list[memoryview] = []
        self.partial_owner: tuple[_StreamQueue, int] | None = None
        #: The closing GOAWAY: written only after everything queued before it.
        self.final: list[tuple[bytes, memoryview | None]] = []

    def __bool__(self) -> bool:
        return bool(self.partial or self.control or self.ready or self.final)

    def queue(self, sid: int) -> _StreamQueue:
        queue = self.queues.get(sid)
        if queue is None:
            queue = self.queues[sid] = _StreamQueue(sid)
        return queue

    def written(self, queue: _StreamQueue, nbytes: int) -> None:
        """``nbytes`` of ``queue``'s stream have been written."""
        queue.pending -= nbytes
        if queue.pending == 0:
            # Every waiter may go: the first may write straight to the socket
            # and so pass no turn on. The queue goes; they make a new one.
            if queue.space:
                queue.space.unpark_all()
            for event in queue.flushed:
                event.set()
            queue.flushed.clear()
            if self.queues.get(queue.sid) is queue:
                del self.queues[queue.sid]
        elif queue.space and queue.pending < self.data_limit:
            queue.space.unpark()


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


def _size(item: tuple[bytes, memoryview | None]) -> int:
    return len(item[0]) + (len(item[1]) if item[1] is not None else 0)


async def _read_frame(stream: trio.abc.Stream, protocol: FrameProtocol) -> Frame | None:
    """Read until one frame arrives; ``None`` if the peer closed first."""
    while True:
        event = protocol.next_event()
        if event is CLOSED:
            return None
        if event is not NEED_DATA:
            return event
        protocol.receive_data(await stream.receive_some(_HANDSHAKE_RECEIVE_SIZE))


def _dialer_gone(stream: trio.abc.Stream) -> bool:
    """Whether the peer of a TCP stream has already closed or reset it.

    A dial that waited in the listen backlog (say while file descriptors ran
    out) may be accepted after its dialer gave up: its HELLO is still in the
    kernel, followed by EOF. Registering its name would refuse the dialer's
    retry as a duplicate. Peeks without consuming or blocking; streams that
    are not plain sockets are taken as alive.
    """
    if not isinstance(stream, trio.SocketStream):
        return False
    sock = socket.socket(fileno=stream.socket.fileno())
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.detach()


async def dial_handshake(
    stream: trio.abc.Stream, protocol: FrameProtocol, hello: Hello, *, limit: float
) -> Hello:
    """The dialer's half: send our HELLO, then expect HELLO (accepted) or GOAWAY (refused)."""
    with trio.move_on_after(limit) as scope:
        try:
            await stream.send_all(protocol.send(hello))
            frame = await _read_frame(stream, protocol)
        except RemoteProtocolError as exc:
            raise HandshakeError(f"invalid handshake from peer: {exc}") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise HandshakeError(f"connection broke during handshake: {exc}") from exc
    if scope.cancelled_caught:
        raise HandshakeError(f"no HELLO from peer within {limit} s")
    if isinstance(frame, GoAway):
        raise HandshakeError(
            f"peer refused the connection: {_code_name(frame.code)}: {frame.message}",
            code=frame.code,
        )
    if not isinstance(frame, Hello):
        raise HandshakeError("peer closed the connection during the handshake")
    return frame


async def accept_handshake(
    stream: trio.abc.Stream,
    protocol: FrameProtocol,
    make_hello: Callable[[Hello], Hello | GoAway],
    *,
    limit: float,
) -> Hello:
    """The acceptor's half: read the dialer's HELLO, then answer HELLO or GOAWAY.

    ``make_hello`` decides: it returns our HELLO to accept or a GOAWAY to refuse.
    """
    with trio.move_on_after(limit):
        try:
            frame = await _read_frame(stream, protocol)
        except RemoteProtocolError as exc:
            await _refuse(stream, protocol, GoAway(exc.error_code, str(exc)))
            raise HandshakeError(f"invalid handshake from peer: {exc}") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise HandshakeError(f"connection broke during handshake: {exc}") from exc
        if not isinstance(frame, Hello):
            raise HandshakeError("peer closed the connection during the handshake")
        if _dialer_gone(stream):
            raise HandshakeError(f"{frame.site!r} closed the connection before it was accepted")
        answer = make_hello(frame)
        if isinstance(answer, GoAway):
            await _refuse(stream, protocol, answer)
            raise HandshakeError(f"refused {frame.site!r}: {answer.message}")
        try:
            await stream.send_all(protocol.send(answer))
        except (trio.BrokenResourceError, OSError) as exc:
            raise HandshakeError(f"connection broke during handshake: {exc}") from exc
        return frame
    await _refuse(
        stream, protocol, GoAway(ErrorCode.HANDSHAKE_TIMEOUT, f"no HELLO within {limit} s")
    )
    raise HandshakeError(f"no HELLO from peer within {limit} s") from None


async def _refuse(stream: trio.abc.Stream, protocol: FrameProtocol, goaway: GoAway) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(protocol.send(goaway))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # the refusal itself is best effort
            logger.debug("could not send GOAWAY", exc_info=True)


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
        self._early_aborts: dict[int, str] = {}
        #: Bytes of objects the peer makes us hold, against max_receive_buffer_per_peer.
        #: Admissions must also fit ``site_budget``, the site's across all peers.
        self.receive_budget = ReceiveBudget(options.max_receive_buffer_per_peer, site_budget)
        #: Streams refused over max_streams_per_peer since the last warning, and when that was.
        self._refused = 0
        self._refusal_logged = -math.inf
        #: Links we opened (we send), by sid.
        self.senders: dict[int, SendHandler] = {}
        self._outbox = _Outbox(max(2 * options.chunk_size, 1 << 20))
        # The socket's descriptor for direct writes (-1 for non-socket streams).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._take_whole_frames()
        #: True while the writer task is inside a write.
        self._writing = False
        self._pings = itertools.count()
        self._last_receive = trio.current_time()
        self.closed = trio.Event()
        #: Set once run() has returned and the stream is closed.
        self.finished = trio.Event()
        # Set once nothing more will be written (drained after GOAWAY, or cancelled).
        self._flushed = trio.Event()
        self.close_reason = ""
        self._cancel_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        #: Bytes handed to the connection to send, and bytes written so far.
        self.bytes_queued = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        #: When bytes were last written to the stream.
        self.last_write = trio.current_time()
        self.connected_at = trio.current_time()
        #: Called (once, synchronously) when the connection is lost.
        self.on_lost: Callable[[Connection], None] = lambda c: None
        #: Called from the reader for a DATA frame with seq 0 on an unknown sid.
        self.on_open: Callable[[Connection, Data], ReceiveHandler | None] = lambda c, f: None

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
        """The largest frame body we may send to this peer.

        At most half the peer's window, so that a peer that grants credit in
        batches of half a window never leaves us stuck mid-object.
        """
        limit = min(self.options.chunk_size, self.protocol.peer_max_frame_size - 4096)
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
        keeps no more than one chunk beyond the peer's credit step: the peer
        grants credit every step, so the stream still always gets its next
        chunk out (see :meth:`TargetLink._room <._sender.TargetLink._room>`).
        """
        return self.peer_credit_step + self.max_body

    def shared(self) -> bool:
        """Whether more than one stream (either way) uses the connection."""
        return len(self.senders) + len(self.receivers) > 1

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
            last_receive=self._last_receive,
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

    def _take_whole_frames(self) -> None:
        """Let the kernel take a whole frame in one write.

        trio limits the unsent bytes of its sockets to 16 KiB
        (``TCP_NOTSENT_LOWAT``), so a 1 MiB chunk went out in pieces as the
        peer drained its window, the writer task and the peer's reader waking
        for each piece. A whole frame in the kernel cannot be overtaken by
        another stream's frame, but what a flow-controlled stream that shares
        the connection has in flight, wherever it waits, is bounded anyway
        (:attr:`shared_in_flight`), so the kernel may take a whole frame
        whatever the number of streams. Replies, and objects to a peer that
        announced window 0, are not bounded that way: for them this limit is
        what keeps the kernel to about one frame unsent (trio's kept it to
        16 KiB).
        """
        if not (
            isinstance(self.stream, trio.SocketStream) and hasattr(socket, "TCP_NOTSENT_LOWAT")
        ):
            return
        whole = min(self.max_body + _UNSENT_SLACK, 0x7FFF_FFFF)
        try:
            self.stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, whole)
        except OSError:  # keep trio's limit
            logger.debug("could not set TCP_NOTSENT_LOWAT on the connection to %s", self.peer)

    def _write_now(self, sid: int, *items: tuple[bytes, memoryview | None]) -> bool:
        """Write frames straight to the socket when nothing is queued or being written.

        A non-blocking ``writev`` with no await in between, so it cannot be
        cancelled halfway. Whatever the socket does not take right away is
        left in ``partial`` for the writer task, pending on stream ``sid``
        (0 for control frames). Returns False (nothing written) when the
        frames have to wait their turn in the queue.
        """
        outbox = self._outbox
        if self._fd < 0 or self._writing or outbox:
            return False
        parts: list[bytes | memoryview] = []
        for head, body in items:
            parts.append(head)
            if body is not None:
                parts.append(body)
        try:
            written = os.writev(self._fd, parts)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self.lose(f"connection broke: {exc!r}")
            return True  # the connection is gone; the frame with it
        self.bytes_sent += written
        if written:
            self.last_write = trio.current_time()
        left = sum(_size(item) for item in items) - written
        if left > 0:
            rest: list[memoryview] = []
            for part in parts:
                view = memoryview(part)
                if written >= len(view):
                    written -= len(view)
                    continue
                rest.append(view[written:])
                written = 0
            outbox.partial = rest
            if sid:
                queue = outbox.queue(sid)
                queue.pending += left
                outbox.partial_owner = (queue, left)
            outbox.wakeup.set()
        return True

    def send_control(self, frame: Frame) -> None:
        """Send a small frame without waiting (safe from the reader)."""
        if self._outbox.closed:
            return
        item = self.protocol.send_parts(frame)
        self.bytes_queued += _size(item)
        if self._write_now(0, item):
            return
        self._outbox.control.append(item)
        if len(self._outbox.control) > _MAX_CONTROL_QUEUE:
            self.lose("peer does not read what we send")
            return
        self._outbox.wakeup.set()

    async def send_data(self, frame: StreamFrame, *more: StreamFrame) -> None:
        """Queue a data frame of one stream (and ``more`` of the same stream
        right behind it), waiting while that stream's queue is full.

        Frames passed together are written with one system call when the
        socket takes them at once (an object's small head frame and its first
        chunk, say), which also spares the peer a wake-up.

        Raises:
            ConnectionLostError: the connection is closed.
        """
        outbox = self._outbox
        sid = frame.sid
        while True:
            if outbox.closed:
                raise ConnectionLostError(
                    f"connection to {self.peer} is closed: {self.close_reason}"
                )
            queue = outbox.queues.get(sid)
            if queue is None or queue.pending < outbox.data_limit:
                break
            if queue.space is None:
                queue.space = trio.lowlevel.ParkingLot()
            try:
                await queue.space.park()
            except BaseException:
                # Pass the turn on to the stream's next waiter, if there is room.
                if queue.pending < outbox.data_limit:
                    queue.space.unpark()
                raise
        items = [self.protocol.send_parts(frame)]
        items += [self.protocol.send_parts(f) for f in more]
        size = 0
        for item in items:
            size += _size(item)
        self.bytes_queued += size
        if self._write_now(sid, *items):
            return
        queue = outbox.queue(sid)
        queue.items.extend(items)
        queue.pending += size
        if not queue.scheduled:
            queue.scheduled = True
            outbox.ready.append(queue)
        outbox.wakeup.set()
        if queue.space and queue.pending < outbox.data_limit:
            queue.space.unpark()

    def pending(self, sid: int) -> int:
        """Bytes of stream ``sid`` handed to the connection and not yet written."""
        queue = self._outbox.queues.get(sid)
        return 0 if queue is None else queue.pending

    def flushed_event(self, sid: int) -> trio.Event:
        """An event set once nothing of stream ``sid`` waits to be written
        (or the connection is lost)."""
        event = trio.Event()
        queue = self._outbox.queues.get(sid)
        if queue is None or queue.pending == 0 or self.closed.is_set():
            event.set()
        else:
            queue.flushed.append(event)
        return event

    async def _writer(self) -> None:
        outbox = self._outbox
        stream = self.stream
        while True:
            while not outbox:
                if outbox.closed:
                    # Draining after lose(..., goaway=...): all written, finish now.
                    self._cancel()
                    return
                outbox.wakeup = trio.Event()
                await outbox.wakeup.wait()
            self._writing = True
            try:
                await self._write_batch(outbox, stream)
            finally:
                self._writing = False

    async def _write_batch(self, outbox: _Outbox, stream: trio.abc.Stream) -> None:
        """Write what is queued: a direct write's leftover, then coalesced frames,
        taking one data frame per stream in turn."""
        if outbox.partial:
            while outbox.partial:
                piece = outbox.partial.pop(0)
                await stream.send_all(piece)
                self._wrote(len(piece))
            owner, outbox.partial_owner = outbox.partial_owner, None
            if owner is not None:
                outbox.written(*owner)
        batch = bytearray()
        large: memoryview | None = None
        while outbox.control and len(batch) < _COALESCE_LIMIT:
            head, body = outbox.control.popleft()
            batch += head
            if body is not None:
                batch += body
        taken: list[tuple[_StreamQueue, int]] = []
        ready = outbox.ready
        while ready and len(batch) < _COALESCE_LIMIT and large is None:
            queue = ready.popleft()
            head, body = queue.items.popleft()
            if queue.items:
                ready.append(queue)  # its next frame waits for the others' turn
            else:
                queue.scheduled = False
            taken.append((queue, _size((head, body))))
            batch += head
            if body is not None:
                if len(body) < _COALESCE_BODY:
                    batch += body
                else:
                    large = body
        if batch:
            await stream.send_all(batch)
            self._wrote(len(batch))
        if large is not None:
            await stream.send_all(large)
            self._wrote(len(large))
        for queue, size in taken:
            outbox.written(queue, size)
        if outbox.final and not (outbox.partial or outbox.control or outbox.ready):
            head, _ = outbox.final.pop()
            await stream.send_all(head)
            self._wrote(len(head))

    def _wrote(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.last_write = trio.current_time()

    # ---------------------------------------------------------------- receiving

    async def _reader(self) -> None:
        stream = self.stream
        protocol = self.protocol
        protocol.body_target = self._body_target
        # On a plain TCP stream, receive straight into the protocol's buffers
        # (and, for large object chunks, into the object's own buffer).
        sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        # Frames that came in with the peer's HELLO are already buffered.
        if not self._drain_events():
            return
        fd = sock.fileno() if sock is not None else -1
        more = False  # whether the last read filled its buffer (more is likely waiting)
        while True:
            if sock is not None:
                # Wait first, then read: one syscall per read instead of
                # trio's try-fail-wait-retry, and one scheduler pass.
                if more:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(fd)
                with protocol.get_buffer() as buf:
                    try:
                        count = os.readv(fd, (buf,))
                    except BlockingIOError:
                        more = False
                        continue
                    except OSError as exc:
                        raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
                    more = count == len(buf)
                if count:
                    protocol.buffer_updated(count)
                else:
                    protocol.receive_data(b"")
            else:
                data = await stream.receive_some(_RECEIVE_SIZE)
                count = len(data)
                protocol.receive_data(data)
            self._last_receive = trio.current_time()
            self.bytes_received += count
            if not self._drain_events():
                return

    def _drain_events(self) -> bool:
        """Dispatch every complete frame; False once the connection is done."""
        protocol = self.protocol
        while True:
            event = protocol.next_event()
            if event is NEED_DATA:
                return True
            if event is CLOSED:
                self.lose("peer closed the connection")
                return False
            self._dispatch(event)
            if self._outbox.closed:
                return False

    def _body_target(self, frame: Frame, nbytes: int) -> memoryview | None:
        """Where a large CHUNK body for an object being received should land."""
        if isinstance(frame, Chunk) and not self.is_ours(frame.sid):
            receiver = self.receivers.get(frame.sid)
            if receiver is not None:
                return receiver.body_target(frame, nbytes)
        return None

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, (Data, Chunk, End)) or (
            isinstance(frame, Abort) and not self.is_ours(frame.sid)
        ):
            self._dispatch_receiving(frame)
        elif isinstance(frame, Credit) and not self.is_ours(frame.sid):
            # The opener lets the receiver send more reply bytes.
            receiver = self.receivers.get(frame.sid)
            if receiver is not None:
                receiver.on_credit(frame)
        elif isinstance(frame, (Reply, Done, Credit, Abort)):
            if not self.is_ours(frame.sid):
                raise RemoteProtocolError(f"{type(frame).__name__} on a stream we did not open")
            sender = self.senders.get(frame.sid)
            if sender is None:
                return  # late frame for a finished stream
            if isinstance(frame, Reply):
                sender.on_reply(frame)
            elif isinstance(frame, Done):
                sender.on_done(frame)
            elif isinstance(frame, Credit):
                sender.on_credit(frame)
            else:
                sender.on_abort(frame)
        elif isinstance(frame, Ping):
            self.send_control(Pong(frame.opaque))
        elif isinstance(frame, GoAway):
            code = frame.code
            self.lose(f"peer said goodbye ({_code_name(code)}: {frame.message})")
        # PONG needs nothing: any received byte already counts as liveness.

    def _dispatch_receiving(self, frame: Data | Chunk | End | Abort) -> None:
        sid = frame.sid
        if isinstance(frame, Chunk) and self.is_ours(sid):
            sender = self.senders.get(sid)
            if sender is not None:
                sender.on_chunk(frame)
            return
        if self.is_ours(sid):
            raise RemoteProtocolError(f"{type(frame).__name__} on a stream id of ours")
        receiver = self.receivers.get(sid)
        if receiver is None:
            if isinstance(frame, Abort):
                # An ABORT may arrive before the stream's first object (frames
                # of different priority can pass each other): remember it, so
                # that object opens no session.
                rc = frame.rc
                if rc not in OPENER_ABORT_RCS:
                    logger.warning(
                        "protocol error from %s: ABORT of stream %d with rc %.80r",
                        self.peer,
                        sid,
                        rc,
                    )
                    rc = "BAD_REQUEST_DATA"
                self._early_aborts[sid] = rc
                if len(self._early_aborts) > _MAX_EARLY_ABORTS:
                    del self._early_aborts[next(iter(self._early_aborts))]
                return
            if isinstance(frame, Data):
                if frame.seq == 0:
                    early_rc = self._early_aborts.pop(sid, None)
                    if early_rc is not None:
                        self.send_control(Done(sid, early_rc, None))
                        return
                    if len(self.receivers) >= self.options.max_streams_per_peer:
                        self._refuse_stream(sid)
                        return
                    receiver = self.on_open(self, frame)
                    if receiver is not None:
                        self.receivers[sid] = receiver
                        receiver.on_data(frame)
                    return
                self.reject(
                    sid,
                    frame.seq,
                    "BAD_REQUEST_DATA",
                    f"object {frame.seq} for unknown stream {sid}",
                )
            return  # chunk, end or abort for a finished or rejected stream
        if isinstance(frame, Data):
            receiver.on_data(frame)
        elif isinstance(frame, Chunk):
            receiver.on_chunk(frame)
        elif isinstance(frame, End):
            receiver.on_end(frame)
        else:
            receiver.on_abort(frame)

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

    def _refuse_stream(self, sid: int) -> None:
        """Refuse a new stream over ``max_streams_per_peer``: error reply and DONE, no session."""
        from .._shareable import ReturnCode

        limit = self.options.max_streams_per_peer
        self._refused += 1
        now = trio.current_time()
        if now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:
            logger.warning(
                "%s has max_streams_per_peer (%d) streams open to %s: refusing new ones "
                "(%d refused since the last such warning)",
                self.peer,
                limit,
                self.local,
                self._refused,
            )
            self._refused = 0
            self._refusal_logged = now
        rc = ReturnCode.SERVICE_UNAVAILABLE
        message = (
            f"{self.local!r} accepts at most {limit} open streams from {self.peer!r} "
            f"(max_streams_per_peer); try again when one has ended"
        )
        self.reject(sid, 0, rc, message, quiet=True)
        self.send_control(Done(sid, rc, None))

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
            last = self._last_receive
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
                        io.start_soon(self._guard, self._writer)
                        io.start_soon(self._guard, self._reader)
                        io.start_soon(self._heartbeat)
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
        outbox = self._outbox
        if goaway is not None:
            try:
                outbox.final.append(self.protocol.send_parts(goaway))
            except LocalProtocolError:  # we already said GOAWAY
                goaway = None
        outbox.closed = True
        for queue in outbox.queues.values():
            if queue.space:
                queue.space.unpark_all()
            for event in queue.flushed:
                event.set()
            queue.flushed.clear()
        outbox.wakeup.set()
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
