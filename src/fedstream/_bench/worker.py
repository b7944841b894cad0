"""Worker processes of the benchmark: one role per OS process.

Run as ``python -m fedstream._bench.worker ROLE CONFIG_JSON``. A worker
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
``ping-server`` / ``ping-client``
    The round-trip ceiling: a 64-byte message echoed back, one at a time.
``fs-recv`` / ``fs-send``
    fedstream sites with async (trio-native) producers and consumers and
    ``sync_callbacks="inline"``. The sender streams a few small warm-up
    objects first, then times from the first ``produce`` of the measured
    streams until every ``stream_objects`` call has returned.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
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
    StreamContextKey,
    open_site,
)
from ._common import KIB, MIB, BenchError, current_rss, peak_rss, percentile

__all__ = ["ROLES", "main"]

logger = logging.getLogger(__name__)

#: App channel of every benchmark stream; the topic tells warm-up from measurement.
CHANNEL: Final = "bench"
WARMUP_TOPIC: Final = "warmup"
MEASURE_TOPIC: Final = "measure"
#: Bytes per ``send_all`` in the raw ceiling.
RAW_CHUNK: Final = MIB
#: ``receive_some`` size in the raw ceiling (the engine's reader uses 256 KiB).
RAW_RECEIVE_SIZE: Final = 256 * KIB
#: Warm-up objects are at most this large.
WARMUP_OBJECT_MAX: Final = 64 * KIB

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


async def raw_recv(config: Config) -> Result:
    total = int(config["total"])
    receive_size = int(config.get("receive_size", RAW_RECEIVE_SIZE))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    _emit({"event": "ready", "address": f"tcp://127.0.0.1:{port}"})
    async with listener:
        stream = await listener.accept()
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
    streams = [await trio.open_tcp_stream(*_split(a)) for a in config["addresses"]]
    baseline = current_rss()

    async def send_one(stream: trio.SocketStream) -> None:
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


# ----------------------------------------------------------------- fedstream


class _RecvStats:
    def __init__(self) -> None:
        self.objects = 0
        self.bytes = 0
        self.streams_ok = 0
        self.streams_failed: dict[str, int] = {}
        self.baseline = current_rss()


class _Consumer(ObjectConsumer):
    def __init__(self, stats: _RecvStats | None) -> None:
        self._stats = stats

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        if self._stats is not None:
            data = shareable.get("data")
            self._stats.objects += 1
            self._stats.bytes += len(data) if isinstance(data, (bytes, bytearray)) else 0
        return True, None


class _Factory(ConsumerFactory):
    def __init__(self, stats: _RecvStats | None) -> None:
        self._stats = stats

    async def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _Consumer(self._stats)


class _Producer(ObjectProducer):
    """Sends ``count`` objects that all share one preallocated payload."""

    def __init__(
        self, payload: bytes, count: int, timeout: float, latencies: list[float] | None
    ) -> None:
        self._payload = payload
        self._count = count
        self._timeout = timeout
        self._latencies = latencies
        self._produced_at = 0.0
        #: ``perf_counter()`` when the first ``produce`` was entered.
        self.first: float | None = None
        self.sent = 0
        self.acknowledged = 0
        self.error: str | None = None

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.first is None:
            self.first = time.perf_counter()
        if self.sent >= self._count:
            return None, self._timeout
        self.sent += 1
        shareable = Shareable(data=self._payload)
        self._produced_at = time.perf_counter()
        return shareable, self._timeout

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        if self._latencies is not None:
            self._latencies.append(time.perf_counter() - self._produced_at)
        for name, reply in replies.items():
            rc = reply.get_return_code()
            if rc != ReturnCode.OK:
                self.error = f"{name} replied {rc}: {reply.get_header(ReservedHeaderKey.ERROR)}"
                return False
        self.acknowledged += 1
        return None


def _site_options(config: Config) -> dict[str, Any]:
    options: dict[str, Any] = {"sync_callbacks": "inline"}
    options.update(config.get("site", {}))
    return options


async def fs_recv(config: Config) -> Result:
    stats = _RecvStats()

    async def warmup_done(stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        stats.baseline = current_rss()

    async def measure_done(stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        rc = str(stream_ctx.get(StreamContextKey.RC))
        if rc == ReturnCode.OK:
            stats.streams_ok += 1
        else:
            stats.streams_failed[rc] = stats.streams_failed.get(rc, 0) + 1

    async with open_site(
        str(config["name"]), listen="tcp://127.0.0.1:0", **_site_options(config)
    ) as site:
        site.register_stream_processing(
            CHANNEL, WARMUP_TOPIC, _Factory(None), stream_done_cb=warmup_done
        )
        site.register_stream_processing(
            CHANNEL, MEASURE_TOPIC, _Factory(stats), stream_done_cb=measure_done
        )
        _emit({"event": "ready", "address": site.address})
        await _stdin_eof()
    return {
        "objects": stats.objects,
        "bytes": stats.bytes,
        "streams_ok": stats.streams_ok,
        "streams_failed": stats.streams_failed,
        **_rss_fields("", stats.baseline),
    }


async def fs_send(config: Config) -> Result:
    size = int(config["object_size"])
    per_stream = int(config["objects"])
    streams = int(config.get("streams", 1))
    timeout = float(config.get("object_timeout") or config["timeout"])
    payload = b"\xa5" * size
    warm_payload = payload[: min(size, WARMUP_OBJECT_MAX)]
    latencies: list[float] | None = [] if config.get("latency") else None

    async with open_site("sender", **_site_options(config)) as site:
        targets = [await site.connect(address) for address in config["addresses"]]
        warm = _Producer(warm_payload, int(config.get("warmup_objects", 4)), timeout, None)
        rc, _ = await site.stream_objects(CHANNEL, WARMUP_TOPIC, {}, targets, warm, None)
        if rc != ReturnCode.OK or warm.error:
            raise BenchError(f"warm-up stream failed: {rc} {warm.error or ''}")
        baseline = current_rss()

        producers = [_Producer(payload, per_stream, timeout, latencies) for _ in range(streams)]
        outcomes: list[tuple[str, Any]] = []

        async def run_one(producer: _Producer) -> None:
            outcomes.append(
                await site.stream_objects(CHANNEL, MEASURE_TOPIC, {}, targets, producer, None)
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


# ---------------------------------------------------------------------- main

ROLES: Final[dict[str, Callable[[Config], Awaitable[Result]]]] = {
    "raw-recv": raw_recv,
    "raw-send": raw_send,
    "ping-server": ping_server,
    "ping-client": ping_client,
    "fs-recv": fs_recv,
    "fs-send": fs_send,
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
        config = json.loads(args[1])
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
