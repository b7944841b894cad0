"""Large objects, long streams and fairness between streams on one connection.

Over real loopback TCP (``@pytest.mark.slow``):

* a 256 MiB object, and 2 GiB as a stream of 1 MiB objects, arrive intact
  (SHA-256 of what the consumer saw against what the producer sent; the
  consumer hashes as it goes, nothing keeps the 2 GiB);
* while one stream moves a 256 MiB object, a stream of 1 KiB objects on the
  same connection keeps flowing, with a per-object latency within a
  generous multiple of its latency on an idle connection;
* an object above the receiver's ``max_object_size`` gets an error reply
  within seconds and the receiver's memory does not grow by its size,
  whether the sender checks the limit itself or lies about it (a raw peer).

Without sockets, under the mock clock (fast, not ``slow``): objects whose
sizes sit on and around chunk boundaries, with several out-of-band buffers,
on several concurrent streams in both directions, reassemble exactly; and a
Hypothesis-chosen interleaving of several objects' DATA/CHUNK frames, cut at
random read boundaries, reassembles each object.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import fedstream
from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    Site,
)
from fedstream._wire import (
    CLOSED,
    NEED_DATA,
    OUT_OF_BAND_MIN,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    Frame,
    FrameProtocol,
    Hello,
    ObjectAssembler,
    Ping,
    Pong,
    Reply,
    decode_object,
    encode_object,
)
from strategies import at_most

LOOP = "tcp://127.0.0.1:0"
CHANNEL = "large"
KIB = 1024
MIB = 1024 * KIB
OK = ReturnCode.OK
BAD = ReturnCode.BAD_REQUEST_DATA

#: Engine minimum chunk size is 1 KiB; 4 KiB makes a 100 KiB object 25 frames.
SMALL_CHUNK = 4 * KIB


# ------------------------------------------------------------------ payloads


@functools.lru_cache(maxsize=256)
def _block(seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(MIB)


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes; in longer ones every 1 MiB block differs."""
    block = _block(seed)
    if size <= MIB:
        return block[:size]
    blocks = (i.to_bytes(8, "big") + block[8:] for i in range(-(-size // MIB)))
    return b"".join(blocks)[:size]


def rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


needs_proc = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/status"
)


class RssSampler:
    """Peak resident set size while it runs, sampled every couple of milliseconds."""

    def __init__(self) -> None:
        self.peak = rss()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.peak = max(self.peak, rss())
            await trio.sleep(0.002)


# ------------------------------------------------------------ producers etc.


class Producer(ObjectProducer):
    """``count`` objects from ``make(i)``; records each object's round-trip time.

    With ``until``, keeps producing until that event is set instead.
    """

    def __init__(
        self,
        make: Callable[[int], Shareable],
        count: int = 1_000_000,
        *,
        until: trio.Event | None = None,
        started: trio.Event | None = None,
    ) -> None:
        self.make = make
        self.count = count
        self.until = until
        self.started = started
        self.sent = 0
        self._t0 = 0.0
        #: ``(start, end)`` of each object: produce returned -> process_replies called.
        self.spans: list[tuple[float, float]] = []
        self.replies: list[dict[str, Shareable]] = []

    async def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        if self.sent >= self.count or (self.until is not None and self.until.is_set()):
            return None
        obj = self.make(self.sent)
        self.sent += 1
        if self.started is not None:
            self.started.set()
        self._t0 = time.perf_counter()
        return obj, 120.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.spans.append((self._t0, time.perf_counter()))
        self.replies.append(dict(replies))
        return None

    def rcs(self, target: str) -> list[Any]:
        return [r[target].get_return_code() for r in self.replies]


@dataclass
class StreamLog:
    """What one receiving session saw: object count, bytes, running SHA-256, problems."""

    objects: int = 0
    nbytes: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    problems: list[str] = field(default_factory=list)
    rc: str | None = None


class HashingConsumer(ObjectConsumer):
    """Hashes ``data`` of each object in order; checks ``seq`` runs 0, 1, 2, ..."""

    def __init__(self, log: StreamLog, in_thread: bool) -> None:
        self.log = log
        self.in_thread = in_thread

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        log = self.log
        if shareable.get("seq") != log.objects:
            log.problems.append(f"object {log.objects} has seq {shareable.get('seq')!r}")
        data = shareable["data"]
        if self.in_thread:  # keep the event loop free while a large object is hashed
            await trio.to_thread.run_sync(log.sha.update, data)
        else:
            log.sha.update(data)
        log.objects += 1
        log.nbytes += len(data)
        return True, None

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.log.rc = stream_ctx["__RC__"]


class HashingFactory(ConsumerFactory):
    """One :class:`StreamLog` per topic."""

    def __init__(self, in_thread: bool = False) -> None:
        self.logs: dict[str, StreamLog] = {}
        self.in_thread = in_thread

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        log = self.logs.setdefault(stream_ctx["__topic__"], StreamLog())
        return HashingConsumer(log, self.in_thread)

    async def return_consumer(  # type: ignore[override]
        self, consumer: ObjectConsumer, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> None:
        return None


@asynccontextmanager
async def site_pair(**rx_options: Any) -> AsyncIterator[tuple[Site, Site, HashingFactory]]:
    """``tx`` dialed ``rx`` over loopback TCP; ``rx`` hashes every object it gets."""
    factory = HashingFactory(in_thread=True)
    async with fedstream.open_site("rx", listen=LOOP, **rx_options) as rx:
        rx.register_stream_processing(CHANNEL, "*", factory)
        assert rx.address is not None
        async with fedstream.open_site("tx", connect=[rx.address]) as tx:
            yield tx, rx, factory


def digest_of(data: bytes, times: int = 1) -> bytes:
    sha = hashlib.sha256()
    for _ in range(times):
        sha.update(data)
    return sha.digest()


# ------------------------------------------------------------- bulk over TCP


@pytest.mark.slow
async def test_256_mib_object_over_tcp() -> None:
    data = payload(256 * MIB, seed=1)
    want = digest_of(data)
    with trio.fail_after(60):
        async with site_pair() as (tx, _, factory):
            producer = Producer(lambda i: Shareable({"seq": i, "data": data}), 1)
            result = await tx.stream_objects(CHANNEL, "big", {}, ["rx"], producer, None)
    assert result == (OK, None)
    assert producer.rcs("rx") == [OK]
    log = factory.logs["big"]
    assert (log.objects, log.nbytes, log.problems, log.rc) == (1, 256 * MIB, [], OK)
    assert log.sha.digest() == want


@pytest.mark.slow
async def test_2_gib_as_1_mib_objects_over_tcp() -> None:
    count = 2048
    data = payload(MIB, seed=2)  # one payload, sent 2048 times; nothing keeps 2 GiB
    want: list[bytes] = []
    with trio.fail_after(110):
        async with site_pair() as (tx, _, factory), trio.open_nursery() as nursery:

            async def expected() -> None:
                # In a worker thread, meanwhile: hashlib releases the GIL.
                want.append(await trio.to_thread.run_sync(digest_of, data, count))

            nursery.start_soon(expected)
            producer = Producer(lambda i: Shareable({"seq": i, "data": data}), count)
            result = await tx.stream_objects(CHANNEL, "stream", {}, ["rx"], producer, None)
    assert result == (OK, None)
    assert producer.rcs("rx") == [OK] * count
    log = factory.logs["stream"]
    assert (log.objects, log.nbytes, log.problems, log.rc) == (count, count * MIB, [], OK)
    assert log.sha.digest() == want[0]


class KeepingConsumer(ObjectConsumer):
    def __init__(self, kept: list[Shareable]) -> None:
        self.kept = kept

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.kept.append(shareable)
        return True, None


class KeepingFactory(ConsumerFactory):
    def __init__(self) -> None:
        self.kept: list[Shareable] = []

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        return KeepingConsumer(self.kept)


async def test_delivered_payloads_stay_intact_while_later_objects_arrive() -> None:
    """Payloads received in place are the consumer's to keep: nothing writes them again.

    Sizes go around the one-frame, paired-head and chunked paths, and the
    consumer keeps every object while the next ones arrive over the same
    connection; all are compared (and hashed) only at the end.
    """
    sizes = [40_000, 130_000, 300_000, MIB, 3 * MIB + 5, 40_000, 3 * MIB + 5, MIB]
    objects = [
        Shareable({"seq": i, "a": payload(n, seed=20 + i), "b": [payload(OUT_OF_BAND_MIN, seed=i)]})
        for i, n in enumerate(sizes)
    ]
    factory = KeepingFactory()
    with trio.fail_after(60):
        async with fedstream.open_site("rx", listen=LOOP, chunk_size=256 * KIB) as rx:
            rx.register_stream_processing(CHANNEL, "keep", factory)
            assert rx.address is not None
            async with fedstream.open_site("tx", connect=[rx.address]) as tx:
                producer = Producer(lambda i: objects[i], len(objects))
                result = await tx.stream_objects(CHANNEL, "keep", {}, ["rx"], producer, None)
    assert result == (OK, None)
    assert len(factory.kept) == len(objects)
    for sent, got in zip(objects, factory.kept, strict=True):
        assert got["seq"] == sent["seq"]
        assert type(got["a"]) is bytes
        # Digests, not the bytes themselves: a failure must not diff megabytes.
        assert digest_of(got["a"]) == digest_of(sent["a"]), f"object {sent['seq']}"
        assert hash(got["a"]) == hash(bytes(sent["a"]))
        assert [digest_of(b) for b in got["b"]] == [digest_of(b) for b in sent["b"]]


# --------------------------------------------------------- head-of-line blocking


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@pytest.mark.slow
async def test_small_stream_keeps_flowing_beside_a_256_mib_object() -> None:
    """A 1 KiB-object stream is not stuck behind a 256 MiB object on the same connection."""
    big_data = payload(256 * MIB, seed=3)
    small_data = payload(KIB, seed=4)

    def small(i: int) -> Shareable:
        return Shareable({"seq": i, "data": small_data})

    with trio.fail_after(90):
        async with site_pair() as (tx, _, factory):
            # 1. Idle connection.
            idle = Producer(small, 200)
            assert await tx.stream_objects(CHANNEL, "idle", {}, ["rx"], idle, None) == (OK, None)
            idle_p50 = p50([end - start for start, end in idle.spans[20:]])

            # 2. The same, while the big object is in flight.
            big_started, big_done = trio.Event(), trio.Event()
            big = Producer(
                lambda i: Shareable({"seq": i, "data": big_data}), 1, started=big_started
            )
            loaded = Producer(small, until=big_done)
            results: dict[str, Any] = {}

            async def run_big() -> None:
                results["big"] = await tx.stream_objects(CHANNEL, "big", {}, ["rx"], big, None)
                big_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_big)
                await big_started.wait()
                results["loaded"] = await tx.stream_objects(
                    CHANNEL, "loaded", {}, ["rx"], loaded, None
                )
    assert results == {"big": (OK, None), "loaded": (OK, None)}
    (big_start, big_end) = big.spans[0]
    during = [end - start for start, end in loaded.spans if big_start <= start and end <= big_end]
    bound = max(20 * idle_p50, 0.050)
    summary = (
        f"idle p50 {idle_p50 * 1e3:.2f} ms; {len(during)} small objects during the "
        f"{(big_end - big_start):.2f} s big transfer, p50 {p50(during) * 1e3 if during else 0:.2f} "
        f"ms, max {max(during, default=0) * 1e3:.1f} ms; bound {bound * 1e3:.1f} ms"
    )
    print(summary)
    assert len(during) >= 20, summary
    assert p50(during) < bound, summary
    assert factory.logs["big"].sha.digest() == digest_of(big_data)
    assert factory.logs["loaded"].objects == len(loaded.spans)
    assert factory.logs["loaded"].sha.digest() == digest_of(small_data, len(loaded.spans))
    assert all(not log.problems for log in factory.logs.values())


# ------------------------------------------------------------------ oversize


@needs_proc
@pytest.mark.slow
async def test_oversized_object_is_refused_promptly_without_receiver_memory() -> None:
    data = payload(64 * MIB, seed=5)
    with trio.fail_after(30):
        async with site_pair(max_object_size=MIB) as (tx, _, factory):
            producer = Producer(lambda i: Shareable({"seq": i, "data": data}), 1)
            sampler = RssSampler()
            before = sampler.peak
            async with trio.open_nursery() as nursery:
                await nursery.start(sampler.run)
                with trio.fail_after(5):
                    rc, _ = await tx.stream_objects(CHANNEL, "huge", {}, ["rx"], producer, None)
                nursery.cancel_scope.cancel()
    assert rc == BAD
    assert producer.rcs("rx") == [BAD]
    assert "max_object_size" in producer.replies[0]["rx"].get_header("__error__", "")
    assert "huge" not in factory.logs
    assert sampler.peak - before < 16 * MIB, f"RSS grew by {(sampler.peak - before) >> 20} MiB"


class RawPeer:
    """A dialer that speaks the wire protocol frame by frame, and may lie."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.protocol = FrameProtocol()

    async def send(self, frame: Frame) -> None:
        await self.stream.send_all(self.protocol.send(frame))

    async def next_frame(self) -> Frame:
        """The next frame that is not CREDIT or PING (PINGs are answered)."""
        while True:
            event = self.protocol.next_event()
            if event is NEED_DATA:
                self.protocol.receive_data(await self.stream.receive_some(65536))
                continue
            assert event is not CLOSED, "the site closed the connection"
            assert isinstance(event, Frame)
            if isinstance(event, Ping):
                await self.send(Pong(event.opaque))
            elif not isinstance(event, Credit):
                return event


@needs_proc
@pytest.mark.slow
async def test_lying_sender_gets_an_error_reply_and_the_rest_is_discarded() -> None:
    """A peer that ignores ``max_object_size``: the receiver checks the size itself."""
    declared = 64 * MIB
    body = payload(declared, seed=6)
    encoded = memoryview(body)
    chunk = MIB
    factory = HashingFactory()
    with trio.fail_after(30):
        async with fedstream.open_site("rx", listen=LOOP, max_object_size=MIB) as rx:
            rx.register_stream_processing(CHANNEL, "*", factory)
            assert rx.address is not None
            port = int(rx.address.rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream, trio.open_nursery() as nursery:
                peer = RawPeer(stream)
                limits = {"max_object_size": 1 << 30, "window": 0, "heartbeat_ms": 5000}
                await peer.send(peer.protocol.hello("liar", limits=limits))
                hello = await peer.next_frame()
                assert isinstance(hello, Hello)
                assert hello.limits["max_object_size"] == MIB

                sampler = RssSampler()
                before = sampler.peak
                await nursery.start(sampler.run)
                start = time.perf_counter()
                await peer.send(Data(1, 0, declared, CHANNEL, "liar", {}, encoded[:chunk]))
                with trio.fail_after(5):
                    reply = await peer.next_frame()
                elapsed = time.perf_counter() - start
                assert isinstance(reply, Reply), reply
                assert (reply.sid, reply.seq, reply.last) == (1, 0, True)
                assert decode_object(reply.body).get_return_code() == BAD
                done = await peer.next_frame()
                assert isinstance(done, Done), done
                assert (done.sid, done.rc) == (1, BAD)
                # Keep lying: the other 63 MiB arrive and are dropped, not stored.
                for offset in range(chunk, declared, chunk):
                    await peer.send(Chunk(1, 0, offset, encoded[offset : offset + chunk]))
                await peer.send(End(1, 1))
                await peer.send(Ping(7))
                with trio.fail_after(5):
                    frame = await peer.next_frame()
                assert isinstance(frame, Pong), frame
                assert rx.peers == ["liar"], "the connection survived"
                nursery.cancel_scope.cancel()
    assert elapsed < 5
    # The session (if the consumer was made before the rejection) consumed nothing.
    log = factory.logs.get("liar", StreamLog(rc=BAD))
    assert (log.objects, log.rc) == (0, BAD)
    assert sampler.peak - before < 16 * MIB, f"RSS grew by {(sampler.peak - before) >> 20} MiB"


# ---------------------------------------------------- chunk boundaries (mock clock)


#: ``(kind, size, out-of-band buffer sizes)``: kind ``"encoded"`` makes the whole
#: encoding ``size`` bytes long, ``"payload"`` makes the inline ``data`` that long.
ObjectSpec = tuple[str, int, list[int]]


def sized_object(seq: int, spec: ObjectSpec, seed: int) -> Shareable:
    """The object ``spec`` describes, with deterministic contents.

    For ``"encoded"``, a ``data`` byte string takes up the difference; where
    the encoding cannot be exactly ``size`` long (too small for the rest, or
    a length header that grows at 24, 256 or 65536 bytes) the nearest larger
    size is used.
    """
    kind, size, buffers = spec
    blobs = [payload(n, seed=seed * 16 + i) for i, n in enumerate(buffers)]

    def build(pad: int) -> Shareable:
        return Shareable({"seq": seq, "blobs": blobs, "data": payload(pad, seed=seed)})

    if kind == "payload":
        return build(size)
    pad = 0
    for _ in range(8):
        encoded_size = encode_object(build(pad)).size
        if encoded_size >= size:
            break
        pad += size - encoded_size
    while pad > 0 and encode_object(build(pad - 1)).size >= size:
        pad -= 1
    return build(pad)


def boundary_sizes(chunk: int) -> st.SearchStrategy[int]:
    """Sizes on and around multiples of ``chunk`` and of ``OUT_OF_BAND_MIN``."""
    return st.one_of(
        st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1]),
        st.builds(
            lambda k, d: max(0, k * chunk + d), st.integers(1, 24), st.sampled_from([-1, 0, 1])
        ),
        st.sampled_from([OUT_OF_BAND_MIN - 1, OUT_OF_BAND_MIN, OUT_OF_BAND_MIN + 1]),
        st.integers(0, 40 * chunk),
    )


oob_sizes = st.one_of(
    st.sampled_from([OUT_OF_BAND_MIN, OUT_OF_BAND_MIN + 1, 9 * SMALL_CHUNK - 1, 9 * SMALL_CHUNK]),
    st.integers(OUT_OF_BAND_MIN, 3 * OUT_OF_BAND_MIN),
)


@st.composite
def object_specs(draw: st.DrawFn) -> ObjectSpec:
    kind = draw(st.sampled_from(["encoded", "payload"]))
    return kind, draw(boundary_sizes(SMALL_CHUNK)), draw(st.lists(oob_sizes, max_size=3))


@dataclass
class StreamPlan:
    topic: str
    from_rx: bool
    objects: list[ObjectSpec]


@st.composite
def stream_plans(draw: st.DrawFn) -> list[StreamPlan]:
    n = draw(st.integers(1, 4))
    return [
        StreamPlan(
            topic=f"s{i}",
            from_rx=draw(st.booleans()),
            objects=draw(st.lists(object_specs(), min_size=1, max_size=4)),
        )
        for i in range(n)
    ]


def object_digest(obj: Shareable) -> tuple[Any, ...]:
    return (
        obj["seq"],
        hashlib.sha256(obj["data"]).hexdigest(),
        tuple(hashlib.sha256(b).hexdigest() for b in obj["blobs"]),
    )


class RecordingConsumer(ObjectConsumer):
    def __init__(self, seen: list[tuple[Any, ...]]) -> None:
        self.seen = seen

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        self.seen.append(object_digest(shareable))
        return True, None


class RecordingFactory(ConsumerFactory):
    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[Any, ...]]] = {}

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        return RecordingConsumer(self.seen.setdefault(stream_ctx["__topic__"], []))

    async def return_consumer(  # type: ignore[override]
        self, consumer: ObjectConsumer, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> None:
        return None


async def run_plans(
    plans: list[StreamPlan],
    window: int,
    *,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, list[Any]]]:
    """Run every planned stream concurrently over one memory connection.

    ``sizes`` may give a site (``"rx"``, ``"tx"``) its own ``(chunk_size, window)``.
    """

    def options(site: str) -> dict[str, Any]:
        chunk, site_window = (sizes or {}).get(site, (SMALL_CHUNK, window))
        return {
            "chunk_size": chunk,
            "window": site_window,
            "sync_callbacks": "inline",  # no worker threads under the mock clock
        }

    factories = {"rx": RecordingFactory(), "tx": RecordingFactory()}
    sent: dict[str, list[Any]] = {}
    results: dict[str, Any] = {}
    with trio.fail_after(600):
        async with fedstream.open_site("rx", listen="memory://0", **options("rx")) as rx:
            assert rx.address is not None
            async with fedstream.open_site("tx", connect=[rx.address], **options("tx")) as tx:
                for site in (rx, tx):
                    site.register_stream_processing(CHANNEL, "*", factories[site.name])
                await rx.wait_for_peers(["tx"])

                async def one(plan: StreamPlan, index: int) -> None:
                    objects = [
                        sized_object(seq, spec, seed=index * 100 + seq)
                        for seq, spec in enumerate(plan.objects)
                    ]
                    sent[plan.topic] = [object_digest(o) for o in objects]
                    source, target = (rx, "tx") if plan.from_rx else (tx, "rx")
                    producer = Producer(lambda i: objects[i], len(objects))
                    results[plan.topic] = await source.stream_objects(
                        CHANNEL, plan.topic, {}, [target], producer, None
                    )

                async with trio.open_nursery() as nursery:
                    for index, plan in enumerate(plans):
                        nursery.start_soon(one, plan, index)
    received = {
        plan.topic: factories["tx" if plan.from_rx else "rx"].seen.get(plan.topic, [])
        for plan in plans
    }
    return results, sent, received


@given(plans=stream_plans(), window_chunks=st.sampled_from([1, 3, 16]))
@at_most(25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_objects_around_chunk_boundaries_on_concurrent_streams(
    plans: list[StreamPlan], window_chunks: int
) -> None:
    results, sent, received = trio.run(
        run_plans,
        plans,
        window_chunks * SMALL_CHUNK,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    for plan in plans:
        assert results[plan.topic] == (OK, None), plan.topic
        assert received[plan.topic] == sent[plan.topic], plan.topic


@st.composite
def site_sizes(draw: st.DrawFn) -> tuple[int, int]:
    """A site's (chunk_size, window): chunks from the 1 KiB minimum up, windows of 1 to 5 chunks."""
    chunk = draw(st.sampled_from([1024, SMALL_CHUNK, 3 * SMALL_CHUNK + 512]))
    return chunk, chunk * draw(st.sampled_from([1, 2, 5]))


@given(plans=stream_plans(), tx=site_sizes(), rx=site_sizes())
@at_most(25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sites_with_different_chunks_and_windows_never_stall_shared_streams(
    plans: list[StreamPlan], tx: tuple[int, int], rx: tuple[int, int]
) -> None:
    """Streams that share a connection keep at most a credit step and a chunk
    unacknowledged; whatever each side's chunk size, window and credit step,
    every object still gets through (the mock clock would jump any stall to a
    TIMEOUT)."""
    results, sent, received = trio.run(
        functools.partial(run_plans, plans, 0, sizes={"tx": tx, "rx": rx}),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    for plan in plans:
        assert results[plan.topic] == (OK, None), plan.topic
        assert received[plan.topic] == sent[plan.topic], plan.topic


EDGE_SPECS: list[ObjectSpec] = [
    *(("payload", n, []) for n in (0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1)),
    *(("encoded", k * SMALL_CHUNK + d, []) for k in (1, 2, 7, 20) for d in (-1, 0, 1)),
    *(
        ("encoded", k * SMALL_CHUNK + d, buffers)
        for buffers in ([OUT_OF_BAND_MIN], [OUT_OF_BAND_MIN + 1, 9 * SMALL_CHUNK - 1])
        for k in (20, 21)
        for d in (-1, 0, 1)
    ),
    ("payload", 3 * SMALL_CHUNK, [OUT_OF_BAND_MIN, 9 * SMALL_CHUNK, OUT_OF_BAND_MIN + 1]),
]


@pytest.mark.parametrize("spec", EDGE_SPECS, ids=str)
def test_sized_objects_are_exactly_the_size_asked(spec: ObjectSpec) -> None:
    """The helper above really produces those sizes, so the tests below hit the edges."""
    kind, size, buffers = spec
    obj = sized_object(0, spec, seed=1)
    encoded = encode_object(obj)
    assert [len(p) for p in encoded.parts[1:]][: len(buffers)] == buffers
    if kind == "encoded":
        assert encoded.size == size
    else:
        assert len(obj["data"]) == size


def test_exact_boundary_objects_through_a_site_pair() -> None:
    plans = [
        StreamPlan(topic="edges", from_rx=False, objects=EDGE_SPECS),
        StreamPlan(topic="back", from_rx=True, objects=EDGE_SPECS[::-1]),
    ]
    results, sent, received = trio.run(
        run_plans, plans, SMALL_CHUNK, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    for plan in plans:
        assert results[plan.topic] == (OK, None)
        assert received[plan.topic] == sent[plan.topic]


# --------------------------------------------- interleaved frames (sans-io)


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[list[Shareable], int, list[int], list[int]]:
    """Objects, a frame body size, an interleaving of their frames and read sizes."""
    specs = draw(st.lists(object_specs(), min_size=2, max_size=4))
    objects = [sized_object(i, spec, seed=i) for i, spec in enumerate(specs)]
    body = draw(st.sampled_from([1024, SMALL_CHUNK, 5000, 64 * KIB]))
    counts = [len(frames_of(obj, 1, body)) for obj in objects]
    order = draw(st.permutations([i for i, n in enumerate(counts) for _ in range(n)]))
    reads = draw(
        st.lists(
            st.one_of(st.integers(1, 64), st.integers(1000, 300_000)), min_size=1, max_size=20
        ).filter(lambda r: sum(r) >= 2000 * len(r))
    )
    return objects, body, list(order), reads


def frames_of(obj: Shareable, sid: int, body: int) -> list[Frame]:
    encoded = encode_object(obj)
    frames: list[Frame] = []
    offset = 0
    views = list(encoded.chunks(body)) or [memoryview(b"")]
    for view in views:
        if offset == 0:
            frames.append(Data(sid, 0, encoded.size, CHANNEL, "t", {}, view))
        else:
            frames.append(Chunk(sid, 0, offset, view))
        offset += len(view)
    return frames


@given(case=interleavings())
@at_most(100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_interleaved_chunks_of_several_objects_reassemble(
    case: tuple[list[Shareable], int, list[int], list[int]],
) -> None:
    objects, body, order, reads = case
    sender = FrameProtocol(max_frame_size=1 << 20)
    receiver = FrameProtocol(max_frame_size=1 << 20)
    wire = bytearray(sender.send(sender.hello("a")))
    receiver_hello = receiver.send(receiver.hello("b"))
    sender.receive_data(receiver_hello)
    assert isinstance(sender.next_event(), Hello)

    queues = [frames_of(obj, 2 * i + 1, body) for i, obj in enumerate(objects)]
    assert sorted(order) == sorted(i for i, q in enumerate(queues) for _ in q)
    for index in order:
        wire += sender.send(queues[index].pop(0))

    assemblers: dict[int, ObjectAssembler] = {}
    decoded: dict[int, Shareable] = {}
    position = 0
    read_sizes = itertools.cycle(reads)
    while position < len(wire):
        step = next(read_sizes)
        receiver.receive_data(bytes(wire[position : position + step]))
        position += step
        while (event := receiver.next_event()) is not NEED_DATA:
            if isinstance(event, Hello):
                continue
            if isinstance(event, Data):
                assert event.sid not in assemblers
                assemblers[event.sid] = ObjectAssembler(event.size, max_size=event.size)
                complete = assemblers[event.sid].feed(0, event.body)
            else:
                assert isinstance(event, Chunk)
                complete = assemblers[event.sid].feed(event.offset, event.body)
            if complete:
                decoded[event.sid] = decode_object(assemblers.pop(event.sid).take())
    assert not assemblers
    assert {sid: object_digest(obj) for sid, obj in decoded.items()} == {
        2 * i + 1: object_digest(obj) for i, obj in enumerate(objects)
    }
