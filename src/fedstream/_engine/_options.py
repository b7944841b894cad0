"""Site options: every bound and timer in one frozen record, with named defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from .._tls import TLSConfig
from .._wire import DEFAULT_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE
from ._callbacks import SyncMode

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_FINALIZE_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_MAX_OBJECT_SIZE",
    "DEFAULT_MAX_PENDING_HANDSHAKES",
    "DEFAULT_MAX_RECEIVE_BUFFER",
    "DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER",
    "DEFAULT_MAX_STREAMS_PER_PEER",
    "DEFAULT_MAX_THREADS",
    "DEFAULT_PEER_TIMEOUT",
    "DEFAULT_RECEIVE_PROGRESS_TIMEOUT",
    "DEFAULT_RECONNECT_MAX_DELAY",
    "DEFAULT_RECONNECT_MIN_DELAY",
    "DEFAULT_WINDOW",
    "SiteOptions",
]

#: Largest object a site accepts (16 GiB).
DEFAULT_MAX_OBJECT_SIZE: Final = 16 * 1024**3
#: Object bytes per frame.
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
#: Object bytes per frame while other streams on the connection are sending
#: too, and the most a receiving stream takes in before it grants credit back
#: (both at most ``chunk_size``). Whatever a stream has in flight lies between
#: every other stream's next frame and the peer, and such a stream keeps about
#: one credit step and one frame in flight (``Connection.shared_in_flight``).
SHARED_CHUNK_SIZE: Final = 256 * 1024
#: Bytes a sender may have in flight per stream before the receiver grants
#: more. Credit returns as bytes arrive, so one stream moves at most about
#: ``window / round trip``: 32 MiB keeps a 450 MB/s link with 50 ms of round
#: trip (22.5 MB in flight) full, and leaves a pipelined stream of 16 objects
#: of 1 MiB held back by its replies, not by credit (benchmarks/README.md,
#: ``wan``). The window allocates nothing: memory is bounded by the receive
#: budgets and their bound on early bytes (``_budget``). What it does bound is
#: what a pipelined stream whose object waits for its receive budget can make
#: the receiver hold as early bytes (at most the window, and at most about
#: ``shared_in_flight`` per object in flight: ``TargetLink._room``), and what
#: a large reply that waits for this site's budget can hold (the window).
DEFAULT_WINDOW: Final = 32 * 1024 * 1024
#: Idle time after which a PING is sent.
DEFAULT_HEARTBEAT_INTERVAL: Final = 5.0
#: Silence after which the peer counts as lost (COMMUNICATION_ERROR).
DEFAULT_PEER_TIMEOUT: Final = 20.0
#: Time a partly received object may go without a byte of it arriving (while
#: it has credit) before its session ends with TIMEOUT.
DEFAULT_RECEIVE_PROGRESS_TIMEOUT: Final = 60.0
#: Time allowed for the HELLO exchange.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
#: Worker threads a site runs plain callbacks in at once (trio's own default
#: thread limit). A session waiting for a thread holds none.
DEFAULT_MAX_THREADS: Final = 40
#: Incoming connections whose HELLO is not in yet, at once; more are refused.
DEFAULT_MAX_PENDING_HANDSHAKES: Final = 128
#: Receiving sessions one peer may have open at once on this site.
DEFAULT_MAX_STREAMS_PER_PEER: Final = 4096
#: Bytes of objects one peer may have under reassembly or waiting for their
#: consumers on this site (1 GiB) before its streams stop getting credit.
DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER: Final = 1024**3
#: Bytes of objects all peers together may have under reassembly or waiting
#: for their consumers on this site (2 GiB): site names cost nothing, so the
#: per-peer budget alone does not bound a site.
DEFAULT_MAX_RECEIVE_BUFFER: Final = 2 * 1024**3
#: Bound on each end-of-stream step (finalize, stream_done_cb, return_consumer,
#: and the sender's wait for receivers to confirm they finalized).
DEFAULT_FINALIZE_TIMEOUT: Final = 30.0
#: Delay before the first re-dial of a lost link this site dialed; it doubles
#: (with jitter) after every failed attempt, up to the maximum.
DEFAULT_RECONNECT_MIN_DELAY: Final = 0.1
#: Longest delay between two re-dials of a lost link.
DEFAULT_RECONNECT_MAX_DELAY: Final = 30.0


@dataclass(frozen=True, slots=True)
class SiteOptions:
    """Tunables of a site; see :func:`fedstream.open_site` for their meaning."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_object_size: int = DEFAULT_MAX_OBJECT_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    window: int = DEFAULT_WINDOW
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    peer_timeout: float = DEFAULT_PEER_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    finalize_timeout: float = DEFAULT_FINALIZE_TIMEOUT
    receive_progress_timeout: float = DEFAULT_RECEIVE_PROGRESS_TIMEOUT
    sync_callbacks: SyncMode = SyncMode.THREAD
    max_threads: float = DEFAULT_MAX_THREADS
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER
    max_receive_buffer_per_peer: int = DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER
    tls: TLSConfig | None = None
    reconnect: bool = True
    reconnect_min_delay: float = DEFAULT_RECONNECT_MIN_DELAY
    reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY
    max_receive_buffer: int = DEFAULT_MAX_RECEIVE_BUFFER
    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES

    def __post_init__(self) -> None:
        if not MIN_MAX_FRAME_SIZE <= self.max_frame_size <= 0xFFFF_FFFF:
            raise ValueError(f"max_frame_size must be in [{MIN_MAX_FRAME_SIZE}, 2**32-1]")
        if self.max_object_size < 1:
            raise ValueError("max_object_size must be positive")
        if not 1024 <= self.chunk_size <= self.max_frame_size - 4096:
            raise ValueError("chunk_size must be in [1024, max_frame_size - 4096]")
        if self.window < self.chunk_size:
            raise ValueError("window must be at least chunk_size")
        for name in (
            "heartbeat_interval",
            "peer_timeout",
            "handshake_timeout",
            "finalize_timeout",
            "receive_progress_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_threads != math.inf:
            _check_positive_int("max_threads", self.max_threads)
        for name in (
            "max_streams_per_peer",
            "max_receive_buffer_per_peer",
            "max_receive_buffer",
            "max_pending_handshakes",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.tls is not None and not isinstance(self.tls, TLSConfig):
            raise TypeError(f"tls must be a fedstream.TLSConfig or None, not {self.tls!r}")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay < math.inf:
            raise ValueError(
                "reconnect delays must be finite and satisfy 0 < reconnect_min_delay <= max"
            )
        if self.peer_timeout <= self.heartbeat_interval:
            raise ValueError("peer_timeout must be longer than heartbeat_interval")
        object.__setattr__(self, "sync_callbacks", SyncMode(self.sync_callbacks))

    @property
    def shared_chunk_size(self) -> int:
        """Object bytes per frame while other streams on the connection are sending too."""
        return min(self.chunk_size, SHARED_CHUNK_SIZE)

    @property
    def credit_step(self) -> int:
        """Object bytes a receiving stream takes in before it grants them back
        as credit: a shared-connection chunk, or half the window if that is less.

        A sender that shares its connection keeps about this much in flight,
        so the step is what a small stream's frames wait behind; granting
        every 256 KiB instead of every chunk costs a 12-byte CREDIT each time.
        """
        return max(1, min(self.window // 2, self.shared_chunk_size))

    def limits(self) -> dict[str, int]:
        """The limits announced in our HELLO."""
        return {
            "max_frame_size": self.max_frame_size,
            "max_object_size": self.max_object_size,
            "window": self.window,
            "credit_step": self.credit_step,
            "heartbeat_ms": int(self.heartbeat_interval * 1000),
        }


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
