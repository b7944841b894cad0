"""The receiving side of a connection: the reader task and frame dispatch.

The reader feeds received bytes to the sans-io :class:`FrameProtocol` and
dispatches every frame *synchronously* to the session it belongs to. It
never awaits anything but the stream, so a slow consumer can never stop it
from reading (which is what would let two sites deadlock on full socket
buffers). On a plain ``trio.SocketStream`` it reads straight into the
protocol's buffers with ``readv`` (and, for large object chunks, into the
object's own buffer); every other stream is read through ``receive_some``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Protocol

import trio

from .._errors import RemoteProtocolError
from .._wire import (
    CLOSED,
    NEED_DATA,
    Abort,
    BodyStart,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    Frame,
    GoAway,
    Ping,
    Pong,
    Reply,
)
from .._wire._stream import abort_rc
from ._handshake import code_name

if TYPE_CHECKING:
    from ._connection import Connection
    from ._stats import StreamStats

__all__ = ["Reader", "ReceiveHandler", "SendHandler"]

logger = logging.getLogger(__name__)

_RECEIVE_SIZE = 256 * 1024
#: ABORTs for not-yet-seen streams remembered per connection.
_MAX_EARLY_ABORTS = 1024
#: At most one warning per this many seconds about streams refused over
#: ``max_streams_per_peer`` (the peer decides how many it opens).
_REFUSAL_LOG_INTERVAL = 60.0


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
    def release_credit(self) -> None: ...
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
    @property
    def on_wire(self) -> bool:
        """Whether the peer knows the stream: its first DATA went out and its
        session has not ended."""
        ...


class Reader:
    """Reads one connection's stream and routes each frame to its session."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stream = conn.stream
        self.protocol = conn.protocol
        #: When bytes were last received, and how many so far.
        self.last_receive = trio.current_time()
        self.bytes_received = 0
        #: ABORTs for streams whose first object has not arrived, by sid.
        self._early_aborts: dict[int, str] = {}
        #: Streams refused over max_streams_per_peer since the last warning, and when that was.
        self._refused = 0
        self._refusal_logged = -math.inf

    async def run(self) -> None:
        """The reader task: read and dispatch until the connection is done."""
        stream = self.stream
        protocol = self.protocol
        protocol.announce_bodies = True
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
            self.last_receive = trio.current_time()
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
                self.conn.lose("peer closed the connection")
                return False
            if isinstance(event, BodyStart):
                target = self._body_target(event.frame, event.length)
                if target is not None:
                    protocol.receive_body_into(target)
                continue
            self._dispatch(event)
            if self.conn.closed.is_set():
                return False

    def _body_target(self, frame: Frame, nbytes: int) -> memoryview | None:
        """Where a large CHUNK body for an object being received should land."""
        if isinstance(frame, Chunk) and not self.conn.is_ours(frame.sid):
            receiver = self.conn.receivers.get(frame.sid)
            if receiver is not None:
                return receiver.body_target(frame, nbytes)
        return None

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, (Data, Chunk, End)) or (
            isinstance(frame, Abort) and not self.conn.is_ours(frame.sid)
        ):
            self._dispatch_receiving(frame)
        elif isinstance(frame, Credit) and not self.conn.is_ours(frame.sid):
            # The opener lets the receiver send more reply bytes.
            receiver = self.conn.receivers.get(frame.sid)
            if receiver is not None:
                receiver.on_credit(frame)
        elif isinstance(frame, (Reply, Done, Credit, Abort)):
            if not self.conn.is_ours(frame.sid):
                raise RemoteProtocolError(f"{type(frame).__name__} on a stream we did not open")
            sender = self.conn.senders.get(frame.sid)
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
            self.conn.send_control(Pong(frame.opaque))
        elif isinstance(frame, GoAway):
            code = frame.code
            self.conn.lose(f"peer said goodbye ({code_name(code)}: {frame.message})")
        # PONG needs nothing: any received byte already counts as liveness.

    def _dispatch_receiving(self, frame: Data | Chunk | End | Abort) -> None:
        sid = frame.sid
        if isinstance(frame, Chunk) and self.conn.is_ours(sid):
            sender = self.conn.senders.get(sid)
            if sender is not None:
                sender.on_chunk(frame)
            return
        if self.conn.is_ours(sid):
            raise RemoteProtocolError(f"{type(frame).__name__} on a stream id of ours")
        receiver = self.conn.receivers.get(sid)
        if receiver is None:
            if isinstance(frame, Abort):
                # An ABORT may arrive before the stream's first object (frames
                # of different priority can pass each other): remember it, so
                # that object opens no session.
                rc = abort_rc(frame.rc)
                if rc is None:
                    logger.warning(
                        "protocol error from %s: ABORT of stream %d with rc %.80r",
                        self.conn.peer,
                        sid,
                        frame.rc,
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
                        self.conn.send_control(Done(sid, early_rc, None))
                        return
                    if len(self.conn.receivers) >= self.conn.options.max_streams_per_peer:
                        self._refuse_stream(sid)
                        return
                    # Another stream shares the connection now: the peer's
                    # streams may need the credit held for replies.
                    self.conn.release_held_credit()
                    receiver = self.conn.on_open(self.conn, frame)
                    if receiver is not None:
                        self.conn.receivers[sid] = receiver
                        receiver.on_data(frame)
                    return
                self.conn.reject(
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

    def _refuse_stream(self, sid: int) -> None:
        """Refuse a new stream over ``max_streams_per_peer``: error reply and DONE, no session."""
        from .._shareable import ReturnCode

        limit = self.conn.options.max_streams_per_peer
        self._refused += 1
        now = trio.current_time()
        if now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:
            logger.warning(
                "%s has max_streams_per_peer (%d) streams open to %s: refusing new ones "
                "(%d refused since the last such warning)",
                self.conn.peer,
                limit,
                self.conn.local,
                self._refused,
            )
            self._refused = 0
            self._refusal_logged = now
        rc = ReturnCode.SERVICE_UNAVAILABLE
        message = (
            f"{self.conn.local!r} accepts at most {limit} open streams from {self.conn.peer!r} "
            f"(max_streams_per_peer); try again when one has ended"
        )
        self.conn.reject(sid, 0, rc, message, quiet=True)
        self.conn.send_control(Done(sid, rc, None))
