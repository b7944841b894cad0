"""The sending side of a connection: per-stream queues and the writer.

Sessions hand frames to the :class:`Writer` through an :class:`Outbox`: one
queue of *control* frames (credit, pong, done, rejections: small, produced
by the reader, never waited for, written first) and one queue of *data*
frames per stream (object and reply chunks, each bounded in bytes: a session
waits for room in its own queue, which is the connection-level
backpressure; a CREDIT held for a reply rides in that queue, right before
the reply). The writer takes one data frame per stream in turn and
coalesces small frames into one ``send_all``; large bodies go out without
being copied, at most one per write and after the small frames taken with
it, so a small stream's object never waits behind more than the large frame
already being written.

On a plain ``trio.SocketStream`` frames go straight to the socket's
descriptor when nothing is queued (one non-blocking ``writev``); every other
stream (TLS included) is written through ``send_all``. On TCP, TLS or not,
the kernel may take a whole frame at once (``TCP_NOTSENT_LOWAT``).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from collections.abc import Callable

import trio

__all__ = ["Item", "Outbox", "StreamQueue", "Writer", "frame_size"]

logger = logging.getLogger(__name__)

#: One encoded frame: its head, and its body when that is sent without copying.
Item = tuple[bytes, "memoryview | None"]

#: Frames smaller than this are copied into one coalesced ``send_all``.
_COALESCE_BODY = 64 * 1024
#: Bytes of small frames gathered into one ``send_all``.
_COALESCE_LIMIT = 256 * 1024
#: Streams whose next frame is large that one batch passes over, looking for
#: small frames to write before its own large frame.
_MAX_PASSED = 32
#: Control frames queued without being written before the peer counts as not reading.
_MAX_CONTROL_QUEUE = 100_000


def frame_size(item: Item) -> int:
    return len(item[0]) + (len(item[1]) if item[1] is not None else 0)


class StreamQueue:
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


class Outbox:
    """Frames waiting for the writer.

    Control frames wait in one unbounded queue and go first. Data frames wait
    in one queue per stream, each bounded in bytes (a stream waits for room
    in its own queue: that is the connection-level backpressure), and the
    writer takes them one frame per stream in turn, so that a small stream's
    object never waits behind more than one frame of a large transfer (the
    one being written: a batch writes its small frames before its large one).
    """

    def __init__(self, data_limit: int) -> None:
        self.control: collections.deque[tuple[bytes, memoryview | None]] = collections.deque()
        #: Per-stream queues with bytes pending, by sid.
        self.queues: dict[int, StreamQueue] = {}
        #: Queues with frames to write, in turn order.
        self.ready: collections.deque[StreamQueue] = collections.deque()
        #: Bytes one stream may have pending before it waits.
        self.data_limit = data_limit
        self.wakeup = trio.Event()
        self.closed = False
        #: What is left of a frame that a direct write could not finish; it
        #: goes out before anything else. ``partial_owner`` is its stream's
        #: queue and the bytes pending there until it is written.
        self.partial: list[memoryview] = []
        self.partial_owner: tuple[StreamQueue, int] | None = None
        #: The closing GOAWAY: written only after everything queued before it.
        self.final: list[tuple[bytes, memoryview | None]] = []

    def __bool__(self) -> bool:
        return bool(self.partial or self.control or self.ready or self.final)

    def queue(self, sid: int) -> StreamQueue:
        queue = self.queues.get(sid)
        if queue is None:
            queue = self.queues[sid] = StreamQueue(sid)
        return queue

    def written(self, queue: StreamQueue, nbytes: int) -> None:
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


class Writer:
    """Writes a connection's frames: the direct path, the queues and the writer task.

    ``on_broken(reason)`` is called when a direct write finds the connection
    broken; ``on_drained()`` when the outbox is closed and everything it held
    is written.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        data_limit: int,
        *,
        on_broken: Callable[[str], None],
        on_drained: Callable[[], None],
    ) -> None:
        self.stream = stream
        self.outbox = Outbox(data_limit)
        self._on_broken = on_broken
        self._on_drained = on_drained
        # The socket's descriptor for direct writes (-1 for non-socket streams).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        #: True while the writer task is inside a write.
        self._writing = False
        #: Bytes written so far, and when bytes were last written.
        self.bytes_sent = 0
        self.last_write = trio.current_time()

    def take_whole_frames(self, frame_bytes: int, peer: str) -> None:
        """Let the kernel take a whole frame of up to ``frame_bytes`` in one write.

        trio limits the unsent bytes of its sockets to 16 KiB
        (``TCP_NOTSENT_LOWAT``), so a 1 MiB chunk went out in pieces as the
        peer drained its window, the writer task and the peer's reader waking
        for each piece. A whole frame in the kernel cannot be overtaken by
        another stream's frame, but what a flow-controlled stream that shares
        the connection has in flight, wherever it waits, is bounded anyway
        (:attr:`Connection.shared_in_flight <._connection.Connection.shared_in_flight>`),
        so the kernel may take a whole frame whatever the number of streams.
        Replies, and objects to a peer that announced window 0, are not
        bounded that way: for them this limit is what keeps the kernel to
        about one frame unsent (trio's kept it to 16 KiB).

        Under a TLS stream the TCP socket beneath gets the same limit (plus
        the records' overhead): with trio's, each encrypted chunk went out in
        16 KiB pieces too, three times the sends and waits of a whole-frame
        write. Only the descriptor path (``writev``) is plain TCP's alone.
        """
        raw = self.stream
        if isinstance(raw, trio.SSLStream):
            # TLS adds a few bytes per 16 KiB record to the frame.
            raw = raw.transport_stream
            frame_bytes += frame_bytes // 256
        if not (isinstance(raw, trio.SocketStream) and hasattr(socket, "TCP_NOTSENT_LOWAT")):
            return
        whole = min(frame_bytes, 0x7FFF_FFFF)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, whole)
        except OSError:  # keep trio's limit
            logger.debug("could not set TCP_NOTSENT_LOWAT on the connection to %s", peer)

    def write_now(self, sid: int, *items: Item) -> bool:
        """Write frames straight to the socket when nothing is queued or being written.

        A non-blocking ``writev`` with no await in between, so it cannot be
        cancelled halfway. Whatever the socket does not take right away is
        left in ``partial`` for the writer task, pending on stream ``sid``
        (0 for control frames). Returns False (nothing written) when the
        frames have to wait their turn in the queue.
        """
        outbox = self.outbox
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
            self._on_broken(f"connection broke: {exc!r}")
            return True  # the connection is gone; the frame with it
        self.bytes_sent += written
        if written:
            self.last_write = trio.current_time()
        left = sum(frame_size(item) for item in items) - written
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

    def send_control(self, item: Item) -> bool:
        """Write or queue a control frame; False if the peer has left too many unread."""
        if self.write_now(0, item):
            return True
        self.outbox.control.append(item)
        self.outbox.wakeup.set()
        return len(self.outbox.control) <= _MAX_CONTROL_QUEUE

    def has_room(self, sid: int) -> bool:
        """Whether stream ``sid``'s queue takes more now (no wait, open outbox)."""
        outbox = self.outbox
        if outbox.closed:
            return False
        queue = outbox.queues.get(sid)
        return queue is None or queue.pending < outbox.data_limit

    async def wait_for_room(self, sid: int) -> bool:
        """Wait while stream ``sid``'s queue is full; False once the outbox is closed."""
        outbox = self.outbox
        while True:
            if outbox.closed:
                return False
            queue = outbox.queues.get(sid)
            if queue is None or queue.pending < outbox.data_limit:
                return True
            if queue.space is None:
                queue.space = trio.lowlevel.ParkingLot()
            try:
                await queue.space.park()
            except BaseException:
                # Pass the turn on to the stream's next waiter, if there is room.
                if queue.pending < outbox.data_limit:
                    queue.space.unpark()
                raise

    def send_data(self, sid: int, items: list[Item], size: int) -> None:
        """Write or queue data frames of stream ``sid`` (``size`` bytes in all)."""
        if self.write_now(sid, *items):
            return
        outbox = self.outbox
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
        """Bytes of stream ``sid`` handed to the writer and not yet written."""
        queue = self.outbox.queues.get(sid)
        return 0 if queue is None else queue.pending

    def flushed_event(self, sid: int) -> trio.Event:
        """An event set once nothing of stream ``sid`` waits to be written
        (or the outbox is closed)."""
        event = trio.Event()
        queue = self.outbox.queues.get(sid)
        if queue is None or queue.pending == 0 or self.outbox.closed:
            event.set()
        else:
            queue.flushed.append(event)
        return event

    def close(self, final: Item | None) -> None:
        """Take no more frames; ``final`` (a GOAWAY) goes out after what is queued.

        Every stream waiting for room or for its frames to be written is woken.
        """
        outbox = self.outbox
        if final is not None:
            outbox.final.append(final)
        outbox.closed = True
        for queue in outbox.queues.values():
            if queue.space:
                queue.space.unpark_all()
            for event in queue.flushed:
                event.set()
            queue.flushed.clear()
        outbox.wakeup.set()

    async def run(self) -> None:
        """The writer task: write what is queued until the outbox is closed and drained."""
        outbox = self.outbox
        stream = self.stream
        while True:
            while not outbox:
                if outbox.closed:
                    # Draining after close(final): all written, finish now.
                    self._on_drained()
                    return
                outbox.wakeup = trio.Event()
                await outbox.wakeup.wait()
            self._writing = True
            try:
                await self._write_batch(outbox, stream)
            finally:
                self._writing = False

    async def _write_batch(self, outbox: Outbox, stream: trio.abc.Stream) -> None:
        """Write what is queued: a direct write's leftover, then control frames,
        then one data frame per stream in turn, coalesced.

        A batch holds at most one large frame (body of ``_COALESCE_BODY`` or
        more), written last: once it has one, the turn passes over streams
        whose next frame is large too (they keep their place for the next
        batch), so small frames of other streams queued at the same time go
        out first, and the large frame's own stream sits out the rest of the
        batch so that its frames stay in order.
        """
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
        taken: list[tuple[StreamQueue, int]] = []
        ready = outbox.ready
        # Streams whose next frame is large, passed over once this batch has
        # its large frame, and the stream that large frame came from.
        passed: list[StreamQueue] = []
        large_owner: StreamQueue | None = None
        large_head = b""
        while ready and len(batch) < _COALESCE_LIMIT and len(passed) < _MAX_PASSED:
            queue = ready.popleft()
            head, body = queue.items[0]
            is_large = body is not None and len(body) >= _COALESCE_BODY
            if is_large and large is not None:
                passed.append(queue)
                continue
            queue.items.popleft()
            taken.append((queue, frame_size((head, body))))
            if is_large:
                # Written after everything else in the batch, so the stream
                # sits out the rest of it to keep its own frames in order.
                large, large_head, large_owner = body, head, queue
                continue
            if queue.items:
                ready.append(queue)  # its next frame waits for the others' turn
            else:
                queue.scheduled = False
            batch += head
            if body is not None:
                batch += body
        ready.extendleft(reversed(passed))  # they keep their turn
        if large_owner is not None:
            batch += large_head
            if large_owner.items:
                ready.append(large_owner)
            else:
                large_owner.scheduled = False
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
