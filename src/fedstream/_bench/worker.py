"""Worker processes of the benchmark: one role per OS process.

Run as ``python -m fedstream._bench.worker ROLE CONFIG_JSON``, or with ``-``
for CONFIG_JSON to read it as the first line of stdin. A worker
writes JSON lines to stdout and nothing else:

* ``{"event": "ready", "address": URL}`` once a receiving worker listens
  (always on ``127.0.0.1`` port 0, so the address is only known then);
* exactly one final ``{"event": "result", ...}`` or ``{"event": "error", ...}``.

Receiving workers keep running until their stdin reaches EOF: the driver
closes it once the sender has reported, so a receiver's figures (peak RSS,
objects seen) cover the whole exchange, and a receiver never has to guess
when the sender is finished. Every worker bounds its own run with
``config["timeout"]``; the driver kills it after that plus a grace period.
``config["cpus"]``, if given, pins the worker to those CPUs.

Roles:

``raw-recv`` / ``raw-send``
    The throughput ceiling: trio ``send_all`` of 1 MiB chunks, ``receive_some``
    into a byte count, a one-byte acknowledgement once everything arrived.
    The sender times from its first ``send_all`` to the acknowledgement; with
    several addresses it sends to all of them concurrently (fan-out ceiling).
    With ``config["tls"]`` (``cert``, ``key``, ``ca`` paths) both sides wrap
    the connection in a mutually authenticated ``trio.SSLStream`` and finish
    the TLS handshake before the clock starts (the TLS ceiling).
``ping-server`` / ``ping-client``
    The round-trip ceiling: a 64-byte message echoed back, one at a time.
``tws-recv`` / ``tws-send``
    The WebSocket ceiling: ``trio-websocket`` alone, binary messages of
    1 MiB (the WebSocket transport's message size, with its limits) counted
    by the receiver, a one-byte message as acknowledgement; over TLS
    (mutual, with ``config["tls"]``'s certificates) for ``wss://``.
``fs-recv`` / ``fs-send``
    fedstream sites. ``config["path"]`` is ``"default"`` (plain methods on
    producer, consumer and factory, default site options: plain callbacks run
    in worker threads) or ``"async"`` (``async def`` callbacks and
    ``sync_callbacks="inline"``); ``config["tls"]`` (``cert``, ``key``, ``ca``
    paths) gives a site its certificates, and the receiver listens on
    ``tls://`` with them (``tcp://`` without) unless ``config["listen"]``
    names its URL (``ws://`` or ``wss://``, say). The sender streams a few
    warm-up objects first (``warmup_size`` bytes at most, 64 KiB by
    default), then times from the first ``produce`` of the measured streams
    until every ``stream_objects`` call has returned. The measured streams
    pass ``config["max_in_flight"]`` (default 1, stop-and-wait) to
    ``stream_objects``; the warm-up is always stop-and-wait.
``fs-recv`` / ``fs-hol``
    Head-of-line blocking on one connection: a stream of small objects runs
    alone for ``idle_objects`` objects, then carries on while a second stream
    on the same connection sends one ``big_size`` object, and stops once that
    object's reply is in. Each small object's latency is the time from
    ``produce`` returning to ``process_replies`` being called.
``relay``
    A user-space stand-in for a long-distance link, between a sender and a
    receiver: for each address in ``config["upstreams"]`` it listens, and
    forwards every accepted connection to that address and back, each
    direction capped at ``config["rate"]`` bytes/s and delayed by
    ``config["delay"]`` seconds, with at most ``config["queue_bytes"]``
    (plus one piece) queued per direction.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import trio

from .. import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReservedHeaderKey,
    ReturnCode,
    Shareable,
    Site,
    StreamContextKey,
    TLSConfig,
    open_site,
)
from .._transport import _ws as ws
from ._common import KIB, MB, MIB, BenchError, current_rss, peak_rss, percentile

__all__ = ["ASYNC_PATH", "DEFAULT_PATH", "PATHS", "ROLES", "main"]

logger = logging.getLogger(__name__)

#: App channel of every benchmark stream; the topic tells warm-up from measurement.
CHANNEL: Final = "bench"
WARMUP_TOPIC: Final = "warmup"
MEASURE_TOPIC: Final = "measure"
#: Topic of the large object that shares the connection in ``fs-hol``.
BULK_TOPIC: Final = "bulk"
#: Bytes per ``send_all`` in the raw ceiling.
RAW_CHUNK: Final = MIB
#: ``receive_some`` size in the raw ceiling (the engine's reader uses 256 KiB).
RAW_RECEIVE_SIZE: Final = 256 * KIB
#: Warm-up objects are at most this large.
WARMUP_OBJECT_MAX: Final = 64 * KIB
#: The relay reads (and queues as one piece) what its link carries in this
#: time, at least RELAY_READ_MIN and at most RELAY_READ_MAX bytes.
RELAY_PIECE_TIME: Final = 0.002
RELAY_READ_MIN: Final = 64 * KIB
RELAY_READ_MAX: Final = MIB
#: The callback paths of the fedstream workers (see "fedstream" below).
DEFAULT_PATH: Final = "default"
ASYNC_PATH: Final = "async"
PATHS: Final = (DEFAULT_PATH, ASYNC_PATH)

Config = dict[str, Any]
Result = dict[str, Any]


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _split(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    if parts.hostname is None or parts.port is None:
        raise BenchError(f"bad address {address!r}")
    return parts.hostname, parts.port


async def _stdin_eof() -> None:
    """Return when the driver closes our stdin."""
    await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes | bytearray:
    data = await stream.receive_some(size)
    if len(data) == size:
        return data
    buf = bytearray(data)
    while len(buf) < size:
        more = await stream.receive_some(size - len(buf))
        if not more:
            raise BenchError(f"peer closed after {len(buf)} of {size} bytes")
        buf += more
    return buf


def _rss_fields(prefix: str, baseline: int) -> Result:
    peak = peak_rss()
    return {
        f"{prefix}rss_baseline": baseline,
        f"{prefix}rss_peak": peak,
        f"{prefix}rss_increase": max(0, peak - baseline),
    }


# ------------------------------------------------------------------ raw trio


def _tls_config(config: Config) -> TLSConfig | None:
    tls = config.get("tls")
    if not tls:
        return None
    return TLSConfig(tls["cert"], tls["key"], tls["ca"])


async def _secure(
    stream: trio.SocketStream, tls: TLSConfig | None, *, server_host: str | None
) -> trio.abc.Stream:
    """``stream`` itself without ``tls``; else wrapped and handshaken, as a
    ``tls://`` site would (``server_host`` is None on the listening side)."""
    if tls is None:
        return stream
    if server_host is None:
        wrapped = trio.SSLStream(stream, tls.server_context(), server_side=True)
    else:
        wrapped = trio.SSLStream(stream, tls.client_context(), server_hostname=server_host)
    await wrapped.do_handshake()
    return wrapped


async def raw_recv(config: Config) -> Result:
    total = int(config["total"])
    receive_size = int(config.get("receive_size", RAW_RECEIVE_SIZE))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    _emit({"event": "ready", "address": f"tcp://127.0.0.1:{port}"})
    async with listener:
        stream = await _secure(await listener.accept(), _tls_config(config), server_host=None)
    baseline = current_rss()
    received = 0
    async with stream:
        while received < total:
            data = await stream.receive_some(receive_size)
            if not data:
                raise BenchError(f"sender closed after {received} of {total} bytes")
            received += len(data)
        await stream.send_all(b"k")
        await _stdin_eof()
    return {"bytes": received, **_rss_fields("", baseline)}


async def raw_send(config: Config) -> Result:
    total = int(config["total"])
    chunk = b"\xa5" * RAW_CHUNK
    view = memoryview(chunk)
    tls = _tls_config(config)
    streams: list[trio.abc.Stream] = []
    for address in config["addresses"]:
        host, port = _split(address)
        streams.append(await _secure(await trio.open_tcp_stream(host, port), tls, server_host=host))
    baseline = current_rss()

    async def send_one(stream: trio.abc.Stream) -> None:
        left = total
        while left:
            n = min(left, RAW_CHUNK)
            await stream.send_all(chunk if n == RAW_CHUNK else view[:n])
            left -= n
        if await stream.receive_some(1) != b"k":
            raise BenchError("receiver did not acknowledge")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(send_one, stream)
    elapsed = time.perf_counter() - start
    for stream in streams:
        await stream.aclose()
    return {"elapsed": elapsed, "bytes": total * len(streams), **_rss_fields("", baseline)}


async def ping_server(config: Config) -> Result:
    size = int(config["size"])
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    _emit({"event": "ready", "address": f"tcp://127.0.0.1:{port}"})
    async with listener:
        stream = await listener.accept()
    echoed = 0
    async with stream:
        while True:
            data = await stream.receive_some(size)
            if not data:
                break
            if len(data) < size:
                data += await _receive_exactly(stream, size - len(data))
            await stream.send_all(data)
            echoed += 1
    await _stdin_eof()
    return {"echoed": echoed}


async def ping_client(config: Config) -> Result:
    size = int(config["size"])
    count = int(config["count"])
    message = b"p" * size
    stream = await trio.open_tcp_stream(*_split(config["address"]))
    async with stream:
        for _ in range(int(config.get("warmup", 200))):
            await stream.send_all(message)
            await _receive_exactly(stream, size)
        rtts: list[float] = []
        clock = time.perf_counter
        start = clock()
        for _ in range(count):
            sent = clock()
            await stream.send_all(message)
            await _receive_exactly(stream, size)
            rtts.append(clock() - sent)
        elapsed = clock() - start
    return {
        "elapsed": elapsed,
        "round_trips": count,
        "rtt_mean": elapsed / count,
        "rtt_p50": percentile(rtts, 50),
        "rtt_p99": percentile(rtts, 99),
    }


# ---------------------------------------------------------- trio-websocket


async def tws_recv(config: Config) -> Result:
    import trio_websocket

    total = int(config["total"])
    tls = _tls_config(config)
    finished = trio.Event()
    counts: Result = {}

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        connection = await request.accept()
        counts["baseline"] = current_rss()
        received = 0
        while received < total:
            received += len(await connection.get_message())
        await connection.send_message(b"k")
        counts["bytes"] = received
        finished.set()
        await _stdin_eof()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket,
                handler,
                "127.0.0.1",
                0,
                None if tls is None else tls.server_context(),
                message_queue_size=ws.MESSAGE_QUEUE_SIZE,
                max_message_size=ws.MESSAGE_SIZE,
                receive_buffer_size=ws.RECEIVE_SIZE,
            )
        )
        scheme = "ws" if tls is None else "wss"
        _emit({"event": "ready", "address": f"{scheme}://127.0.0.1:{server.port}/"})
        await finished.wait()
        await _stdin_eof()
        nursery.cancel_scope.cancel()
    return {"bytes": counts["bytes"], **_rss_fields("", counts["baseline"])}


async def tws_send(config: Config) -> Result:
    import trio_websocket

    total = int(config["total"])
    tls = _tls_config(config)
    message = b"\xa5" * ws.MESSAGE_SIZE
    (address,) = config["addresses"]
    host, port = _split(address)
    baseline = current_rss()
    async with trio_websocket.open_websocket(
        host,
        port,
        "/",
        use_ssl=False if tls is None else tls.client_context(),
        message_queue_size=ws.MESSAGE_QUEUE_SIZE,
        max_message_size=ws.MESSAGE_SIZE,
        receive_buffer_size=ws.RECEIVE_SIZE,
    ) as connection:
        start = time.perf_counter()
        left = total
        while left:
            n = min(left, len(message))
            await connection.send_message(message if n == len(message) else message[:n])
            left -= n
        if await connection.get_message() != b"k":
            raise BenchError("receiver did not acknowledge")
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "bytes": total, **_rss_fields("", baseline)}


# ----------------------------------------------------------------- fedstream
#
# Two callback paths (``config["path"]``):
#
# * ``default``: plain (non-async) methods on producer, consumer and factory,
#   a plain ``stream_done_cb``, and the site's default options (so plain
#   callbacks run in worker threads). This is what a port of FLARE code does.
# * ``async``: ``async def`` callbacks and ``sync_callbacks="inline"``.
#
# The callbacks' bodies are the same on both paths (``_Objects``,
# ``_SmallObjects``, ``_RecvStats``); only the adapters differ.


def _site_options(config: Config) -> dict[str, Any]:
    path = config.get("path", DEFAULT_PATH)
    if path not in PATHS:
        raise BenchError(f"unknown callback path {path!r}; choose from {', '.join(PATHS)}")
    options: dict[str, Any] = {"sync_callbacks": "inline"} if path == ASYNC_PATH else {}
    options.update(config.get("site", {}))
    tls = _tls_config(config)
    if tls is not None:
        options["tls"] = tls
    return options


def _is_async(config: Config) -> bool:
    return bool(config.get("path", DEFAULT_PATH) == ASYNC_PATH)


class _RecvStats:
    """What a receiving worker saw; updated from worker threads on the default path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.objects = 0
        self.bytes = 0
        self.streams_ok = 0
        self.streams_failed: dict[str, int] = {}
        self.baseline = current_rss()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.objects += 1
            self.bytes += nbytes

    def stream_done(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        rc = str(stream_ctx.get(StreamContextKey.RC))
        with self._lock:
            if rc == ReturnCode.OK:
                self.streams_ok += 1
            else:
                self.streams_failed[rc] = self.streams_failed.get(rc, 0) + 1

    def to_json(self) -> Result:
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "streams_ok": self.streams_ok,
            "streams_failed": self.streams_failed,
        }


def _nbytes(data: Any) -> int:
    """Size of a payload the engine delivered (``bytes`` or another buffer), else 0."""
    try:
        return memoryview(data).nbytes
    except TypeError:
        return 0


class _PlainConsumer(ObjectConsumer):
    def __init__(self, stats: _RecvStats | None) -> None:
        self._stats = stats

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        if self._stats is not None:
            self._stats.add(_nbytes(shareable.get("data")))
        return True, None


class _AsyncConsumer(ObjectConsumer):
    def __init__(self, stats: _RecvStats | None) -> None:
        self._stats = stats

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        if self._stats is not None:
            self._stats.add(_nbytes(shareable.get("data")))
        return True, None


class _PlainFactory(ConsumerFactory):
    def __init__(self, stats: _RecvStats | None) -> None:
        self._stats = stats

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _PlainConsumer(self._stats)


class _AsyncFactory(ConsumerFactory):
    def __init__(self, stats: _RecvStats | None) -> None:
        self._stats = stats

    async def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _AsyncConsumer(self._stats)


def _register(
    site: Site,
    config: Config,
    topic: str,
    stats: _RecvStats | None,
    done: Callable[[dict[str, Any], FLContext], None],
) -> None:
    """Register ``topic`` with the factory and ``stream_done_cb`` of the worker's path."""
    if _is_async(config):

        async def done_async(stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
            done(stream_ctx, fl_ctx)

        site.register_stream_processing(
            CHANNEL, topic, _AsyncFactory(stats), stream_done_cb=done_async
        )
    else:
        site.register_stream_processing(CHANNEL, topic, _PlainFactory(stats), stream_done_cb=done)


class _Steps(Protocol):
    """The body of a producer, shared by the plain and the async adapter."""

    def produce(self) -> tuple[Shareable | None, float]: ...

    def process_replies(self, replies: dict[str, Shareable]) -> Any: ...


class _PlainProducer(ObjectProducer):
    def __init__(self, steps: _Steps) -> None:
        self._steps = steps

    def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        return self._steps.produce()

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return self._steps.process_replies(replies)


class _AsyncProducer(ObjectProducer):
    def __init__(self, steps: _Steps) -> None:
        self._steps = steps

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        return self._steps.produce()

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return self._steps.process_replies(replies)


def _producer(config: Config, steps: _Steps) -> ObjectProducer:
    return _AsyncProducer(steps) if _is_async(config) else _PlainProducer(steps)


def _reply_error(replies: dict[str, Shareable]) -> str | None:
    for name, reply in replies.items():
        rc = reply.get_return_code()
        if rc != ReturnCode.OK:
            return f"{name} replied {rc}: {reply.get_header(ReservedHeaderKey.ERROR)}"
    return None


class _Objects:
    """Sends ``count`` objects that all share one preallocated payload."""

    def __init__(
        self, payload: bytes, count: int, timeout: float, latencies: list[float] | None
    ) -> None:
        self._payload = payload
        self._count = count
        self._timeout = timeout
        self._latencies = latencies
        #: ``perf_counter()`` when the first ``produce`` was entered.
        self.first: float | None = None
        #: ``perf_counter()`` just before the last ``produce`` returned an object.
        self.produced_at = 0.0
        #: ``perf_counter()`` when ``process_replies`` was last entered.
        self.replied_at = 0.0
        self.sent = 0
        self.acknowledged = 0
        self.error: str | None = None

    def produce(self) -> tuple[Shareable | None, float]:
        if self.first is None:
            self.first = time.perf_counter()
        if self.sent >= self._count:
            return None, self._timeout
        self.sent += 1
        shareable = Shareable({"data": self._payload})
        self.produced_at = time.perf_counter()
        return shareable, self._timeout

    def process_replies(self, replies: dict[str, Shareable]) -> Any:
        self.replied_at = time.perf_counter()
        if self._latencies is not None:
            self._latencies.append(self.replied_at - self.produced_at)
        self.error = _reply_error(replies)
        if self.error is not None:
            return False
        self.acknowledged += 1
        return None


def _listen_url(config: Config) -> str:
    """``config["listen"]`` if given (a ``ws://`` or ``wss://`` URL, say),
    else ``tls://`` with certificates and ``tcp://`` without."""
    if "listen" in config:
        return str(config["listen"])
    return "tls://127.0.0.1:0" if config.get("tls") else "tcp://127.0.0.1:0"


async def fs_recv(config: Config) -> Result:
    """Count the measured objects (and, separately, ``fs-hol``'s large one)."""
    stats = _RecvStats()
    bulk = _RecvStats()

    def warmup_done(stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        stats.baseline = current_rss()

    async with open_site(
        str(config["name"]), listen=_listen_url(config), **_site_options(config)
    ) as site:
        _register(site, config, WARMUP_TOPIC, None, warmup_done)
        _register(site, config, MEASURE_TOPIC, stats, stats.stream_done)
        _register(site, config, BULK_TOPIC, bulk, bulk.stream_done)
        _emit({"event": "ready", "address": site.address})
        await _stdin_eof()
    return {**stats.to_json(), "bulk": bulk.to_json(), **_rss_fields("", stats.baseline)}


async def _warm_up(
    site: Site,
    config: Config,
    targets: list[str],
    payload: bytes,
    count: int,
    object_timeout: float,
) -> None:
    warm = _Objects(payload, count, object_timeout, None)
    rc, _ = await site.stream_objects(
        CHANNEL, WARMUP_TOPIC, {}, targets, _producer(config, warm), None
    )
    if rc != ReturnCode.OK or warm.error:
        raise BenchError(f"warm-up stream failed: {rc} {warm.error or ''}")


async def fs_send(config: Config) -> Result:
    size = int(config["object_size"])
    per_stream = int(config["objects"])
    streams = int(config.get("streams", 1))
    timeout = float(config.get("object_timeout") or config["timeout"])
    payload = b"\xa5" * size
    # Memory cases warm up with small objects, so their baseline holds no
    # large buffer; throughput cases warm up at full size (``warmup_size``),
    # so the first objects' page faults and TCP buffer growth are not timed.
    warm_payload = payload[: min(size, int(config.get("warmup_size", WARMUP_OBJECT_MAX)))]
    latencies: list[float] | None = [] if config.get("latency") else None
    # 1: stop-and-wait (the FLARE contract); more: a pipelined stream.
    max_in_flight = int(config.get("max_in_flight", 1))

    async with open_site("sender", **_site_options(config)) as site:
        targets = [await site.connect(address) for address in config["addresses"]]
        warmups = int(config.get("warmup_objects", 4))
        await _warm_up(site, config, targets, warm_payload, warmups, timeout)
        baseline = current_rss()

        producers = [_Objects(payload, per_stream, timeout, latencies) for _ in range(streams)]
        outcomes: list[tuple[str, Any]] = []

        async def run_one(producer: _Objects) -> None:
            outcomes.append(
                await site.stream_objects(
                    CHANNEL,
                    MEASURE_TOPIC,
                    {},
                    targets,
                    _producer(config, producer),
                    None,
                    max_in_flight=max_in_flight,
                )
            )

        async with trio.open_nursery() as nursery:
            for producer in producers:
                nursery.start_soon(run_one, producer)
        end = time.perf_counter()

    starts = [p.first for p in producers if p.first is not None]
    failures = [
        f"rc={rc} result={result!r}" for rc, result in outcomes if rc != ReturnCode.OK or result
    ]
    failures += [p.error for p in producers if p.error]
    incomplete = sum(1 for p in producers if p.acknowledged != per_stream)
    result: Result = {
        "elapsed": end - min(starts) if starts else 0.0,
        "targets": len(targets),
        "streams": streams,
        "streams_ok": streams - incomplete,
        "objects": sum(p.acknowledged for p in producers),
        "object_size": size,
        "failures": failures[:5],
        **_rss_fields("", baseline),
    }
    if latencies is not None:
        result.update(
            latency_p50=percentile(latencies, 50),
            latency_p99=percentile(latencies, 99),
            latency_mean=sum(latencies) / len(latencies) if latencies else 0.0,
            latency_count=len(latencies),
        )
    return result


class _SmallObjects:
    """Small objects back to back until :meth:`stop`; records every object's
    (``produce`` returned, ``process_replies`` called) times."""

    def __init__(
        self, payload: bytes, timeout: float, idle_objects: int, on_idle: Callable[[], None]
    ) -> None:
        self._payload = payload
        self._timeout = timeout
        self._idle_objects = idle_objects
        self._on_idle = on_idle
        self._stopped = False
        self._produced_at = 0.0
        self.times: list[tuple[float, float]] = []
        self.error: str | None = None

    def stop(self) -> None:
        """End the stream before the next object."""
        self._stopped = True

    def produce(self) -> tuple[Shareable | None, float]:
        if self._stopped:
            return None, self._timeout
        shareable = Shareable({"data": self._payload})
        self._produced_at = time.perf_counter()
        return shareable, self._timeout

    def process_replies(self, replies: dict[str, Shareable]) -> Any:
        self.times.append((self._produced_at, time.perf_counter()))
        if len(self.times) == self._idle_objects:
            self._on_idle()
        self.error = _reply_error(replies)
        return False if self.error is not None else None


def _latency_fields(prefix: str, latencies: Sequence[float]) -> Result:
    return {
        f"{prefix}p50": percentile(latencies, 50),
        f"{prefix}p99": percentile(latencies, 99),
        f"{prefix}count": len(latencies),
    }


async def fs_hol(config: Config) -> Result:
    """Small-object latency on one connection, idle and beside one large object.

    The large object's transfer runs from its ``produce`` returning (``t0``)
    to its ``process_replies`` (``t1``). A small object counts as *loaded* if
    its flight overlaps that interval (reply after ``t0``, produced before
    ``t1``); it *completed during* the transfer if its reply came in it.
    """
    small_size = int(config["small_size"])
    idle_objects = int(config["idle_objects"])
    big_size = int(config["big_size"])
    timeout = float(config.get("object_timeout") or config["timeout"])
    idle_done = trio.Event()
    # The callbacks may run in a worker thread, which must not touch the event.
    token = trio.lowlevel.current_trio_token()
    small = _SmallObjects(
        b"\xa5" * small_size, timeout, idle_objects, lambda: token.run_sync_soon(idle_done.set)
    )
    big = _Objects(b"\x5a" * big_size, 1, timeout, None)
    outcomes: dict[str, tuple[str, Any]] = {}

    async with open_site("sender", **_site_options(config)) as site:
        (address,) = config["addresses"]
        targets = [await site.connect(address)]
        warm_payload = b"\xa5" * min(small_size, WARMUP_OBJECT_MAX)
        await _warm_up(site, config, targets, warm_payload, 4, timeout)
        baseline = current_rss()

        async def run_small() -> None:
            try:
                outcomes["small"] = await site.stream_objects(
                    CHANNEL, MEASURE_TOPIC, {}, targets, _producer(config, small), None
                )
            finally:
                idle_done.set()  # a stream that ended early must not leave us waiting

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_small)
            await idle_done.wait()
            try:
                if "small" not in outcomes:
                    outcomes["big"] = await site.stream_objects(
                        CHANNEL, BULK_TOPIC, {}, targets, _producer(config, big), None
                    )
            finally:
                small.stop()
        if len(connections := site.stats()) != 1:
            raise BenchError(f"expected one connection, the sender has {len(connections)}")

    t0, t1 = big.produced_at, big.replied_at
    idle = [replied - produced for produced, replied in small.times[:idle_objects]]
    loaded = [
        replied - produced for produced, replied in small.times if replied >= t0 and produced <= t1
    ]
    failures = [
        f"{name} stream: rc={rc} result={res!r}"
        for name, (rc, res) in outcomes.items()
        if rc != ReturnCode.OK or res
    ]
    failures += [p.error for p in (small, big) if p.error]
    if big.acknowledged != 1 or t1 <= t0:
        failures.append(f"the {big_size}-byte object was not acknowledged")
    return {
        "small_objects": len(small.times),
        "small_size": small_size,
        "big_size": big_size,
        "big_elapsed": t1 - t0,
        "big_mb_per_s": big_size / (t1 - t0) / MB if t1 > t0 else 0.0,
        "during_big": sum(1 for _, replied in small.times if t0 <= replied <= t1),
        **_latency_fields("idle_", idle),
        **_latency_fields("loaded_", loaded),
        "failures": failures[:5],
        **_rss_fields("", baseline),
    }


# --------------------------------------------------------------------- relay


class _Direction:
    """One direction of a relayed connection: a link with a bandwidth cap and a
    fixed propagation delay, and a bounded queue of what is on the wire.

    The reader stamps each piece it reads (at most ``read_size`` bytes) with
    the time it leaves the far end of the link: it starts being sent once the
    link is free (``link_free``), takes ``len / rate`` seconds on it, and
    arrives ``delay`` later. The writer delivers it at that time. A piece is
    delivered whole (store and forward), so its last byte arrives when a real
    link's would and its first byte up to ``read_size / rate`` late; the
    caller keeps that small against the delay (``relay_piece_size``). While
    ``max_bytes`` or more are queued the reader stops reading, so TCP pushes
    back on the sender: at most ``max_bytes + read_size`` bytes are held.
    """

    def __init__(self, delay: float, rate: float, max_bytes: int, read_size: int) -> None:
        self.delay = delay
        self.rate = rate
        self.max_bytes = max_bytes
        self.read_size = read_size
        # Bounded by bytes (``queued``), not by items.
        self.send_channel, self.receive_channel = trio.open_memory_channel[
            tuple[float, bytes | bytearray | None]
        ](math.inf)
        self.link_free = 0.0
        self.bytes = 0
        self.queued = 0
        self._room = trio.lowlevel.ParkingLot()

    async def read(self, source: trio.abc.ReceiveStream) -> None:
        async with self.send_channel:
            while True:
                while self.queued >= self.max_bytes:
                    await self._room.park()
                data = await source.receive_some(self.read_size)
                now = trio.current_time()
                if not data:
                    self.send_channel.send_nowait((max(now, self.link_free) + self.delay, None))
                    return
                self.link_free = max(now, self.link_free) + len(data) / self.rate
                self.bytes += len(data)
                self.queued += len(data)
                self.send_channel.send_nowait((self.link_free + self.delay, data))

    async def write(self, sink: trio.abc.HalfCloseableStream) -> None:
        async with self.receive_channel:
            async for due, data in self.receive_channel:
                if due > trio.current_time():
                    await trio.sleep_until(due)
                if data is None:
                    await sink.send_eof()
                    return
                await sink.send_all(data)
                self.queued -= len(data)
                self._room.unpark_all()


def relay_piece_size(rate: float) -> int:
    """Bytes the relay reads at a time for a link of ``rate`` bytes/s: what
    the link carries in :data:`RELAY_PIECE_TIME`, within
    [:data:`RELAY_READ_MIN`, :data:`RELAY_READ_MAX`]. Larger pieces cost the
    relay fewer wake-ups per byte (it sustained about 150 MB/s with 64 KiB
    pieces and 420 MB/s with 1 MiB ones on a loaded 2-core machine); the
    time bound keeps the store-and-forward error small against the delay."""
    return int(min(RELAY_READ_MAX, max(RELAY_READ_MIN, rate * RELAY_PIECE_TIME)))


async def relay(config: Config) -> Result:
    """Forward each connection to its upstream through two :class:`_Direction`s.

    One listener per address in ``config["upstreams"]``; the ready message
    lists the relay's own addresses in the same order. Runs until stdin
    closes; a connection whose peer breaks it is dropped on both sides.
    """
    upstreams = [str(a) for a in config["upstreams"]]
    delay = float(config["delay"])
    rate = float(config["rate"])
    max_bytes = int(config["queue_bytes"])
    read_size = relay_piece_size(rate)
    directions: list[_Direction] = []

    async def link(client: trio.SocketStream, upstream: str) -> None:
        up = _Direction(delay, rate, max_bytes, read_size)
        down = _Direction(delay, rate, max_bytes, read_size)
        directions.extend((up, down))
        try:
            server = await trio.open_tcp_stream(*_split(upstream))
        except OSError as exc:
            logger.warning("relay cannot reach %s: %s", upstream, exc)
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:

            async def guarded(step: Callable[[Any], Awaitable[None]], stream: Any) -> None:
                try:
                    await step(stream)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    logger.debug("relayed connection to %s ended: %r", upstream, exc)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(guarded, up.read, client)
            nursery.start_soon(guarded, up.write, server)
            nursery.start_soon(guarded, down.read, server)
            nursery.start_soon(guarded, down.write, client)

    async with trio.open_nursery() as nursery:
        addresses = []
        for upstream in upstreams:
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            addresses.append(f"tcp://127.0.0.1:{listener.socket.getsockname()[1]}")

            async def serve(listener: trio.SocketListener, upstream: str) -> None:
                async with listener:
                    while True:
                        nursery.start_soon(link, await listener.accept(), upstream)

            nursery.start_soon(serve, listener, upstream)
        _emit({"event": "ready", "address": addresses[0], "addresses": addresses})
        await _stdin_eof()
        nursery.cancel_scope.cancel()
    return {"connections": len(directions) // 2, "bytes": [d.bytes for d in directions]}


# ---------------------------------------------------------------------- main

ROLES: Final[dict[str, Callable[[Config], Awaitable[Result]]]] = {
    "raw-recv": raw_recv,
    "raw-send": raw_send,
    "ping-server": ping_server,
    "ping-client": ping_client,
    "tws-recv": tws_recv,
    "tws-send": tws_send,
    "fs-recv": fs_recv,
    "fs-send": fs_send,
    "fs-hol": fs_hol,
    "relay": relay,
}


async def _run_role(role: Callable[[Config], Awaitable[Result]], config: Config) -> Result:
    timeout = float(config["timeout"])
    try:
        with trio.fail_after(timeout):
            return await role(config)
    except trio.TooSlowError:
        raise BenchError(f"did not finish within its {timeout:g} s timeout") from None


def _describe(exc: BaseException) -> str:
    inner = getattr(exc, "exceptions", None)  # an exception group (no builtin on 3.10)
    if isinstance(inner, tuple) and inner:
        return "; ".join(_describe(e) for e in inner)
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one role; the exit status is 0 when it reported a result."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ROLES:
        sys.stderr.write(f"usage: python -m fedstream._bench.worker {{{','.join(ROLES)}}} JSON\n")
        return 2
    role = args[0]
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format=f"[{role}] %(levelname)s %(message)s"
    )
    try:
        text = sys.stdin.buffer.readline() if args[1] == "-" else args[1]
        if not text:
            raise BenchError("no config on stdin")
        config = json.loads(text)
        cpus = config.get("cpus")
        if cpus:
            os.sched_setaffinity(0, cpus)
        result = trio.run(_run_role, ROLES[role], config)
    except Exception as exc:
        _emit(
            {
                "event": "error",
                "role": role,
                "message": _describe(exc),
                "traceback": traceback.format_exc(limit=8),
            }
        )
        return 1
    _emit({"event": "result", "role": role, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
