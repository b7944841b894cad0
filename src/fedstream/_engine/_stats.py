"""Statistics records: a frozen snapshot of a site's connections and streams."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConnectionStats", "StreamStats"]


@dataclass(frozen=True, slots=True)
class StreamStats:
    """One stream session on one connection, as seen from this site.

    Attributes:
        peer: the site at the other end.
        sid: the stream id on that connection.
        sending: True if this site sends the objects (the producer's side).
        channel: the stream's app channel.
        topic: the stream's app topic.
        objects: objects sent (sending) or received (receiving) so far.
        bytes: encoded object bytes sent or received so far.
        credit: sending: bytes the peer still lets us send before it grants
            more (``None`` if it does not use flow control); receiving: bytes
            received and not yet granted back.
        started: ``trio.current_time()`` when the session started.
        queued: bytes of this stream's frames (objects when sending, replies
            when receiving) handed to the connection and not yet written.
        unacknowledged: sending: object bytes handed to the connection that
            the peer has not granted back as credit yet, whether still
            ``queued``, in flight or held by the peer (``None`` if it does
            not use flow control); receiving: ``None``.
    """

    peer: str
    sid: int
    sending: bool
    channel: str
    topic: str
    objects: int
    bytes: int
    credit: int | None
    started: float
    queued: int = 0
    unacknowledged: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    """One connection to a peer site.

    Attributes:
        peer: the peer site's name.
        url: the URL dialed, or ``""`` for a connection the peer dialed.
        dialer: True if this site dialed.
        bytes_sent: bytes written to the connection, frames and all.
        bytes_received: bytes read from it.
        bytes_queued: bytes handed to the connection and not yet written.
        connected: ``trio.current_time()`` when the handshake completed.
        last_receive: when bytes last arrived.
        last_write: when bytes were last written.
        streams: the stream sessions on this connection, both directions.
        receive_buffered: announced bytes of the peer's objects this site
            holds (being reassembled or waiting for their consumer), counted
            against ``max_receive_buffer_per_peer``.
        receive_buffered_peak: the largest ``receive_buffered`` so far.
        objects_waiting: the peer's objects waiting for room in that budget;
            their streams get no credit meanwhile.
    """

    peer: str
    url: str
    dialer: bool
    bytes_sent: int
    bytes_received: int
    bytes_queued: int
    connected: float
    last_receive: float
    last_write: float
    streams: tuple[StreamStats, ...]
    receive_buffered: int = 0
    receive_buffered_peak: int = 0
    objects_waiting: int = 0
