"""Recording producers, consumers and factories for the engine tests.

Everything here records what the engine did to it into a :class:`Recorder`,
so a test can run a whole scenario first and check it afterwards, outside
the trio run (which keeps failures plain ``AssertionError``s rather than
exception groups, and lets Hypothesis shrink them).

Behaviour is injected through *hooks*: small callables the test passes in and
the recording classes call at fixed points (before a consumer replies, at the
start of ``produce`` and ``process_replies``, in ``get_consumer``). A hook may
sleep, raise, trigger an abort signal or cut a connection; the recording
classes never need to know which. Each class comes in an ``async def``
flavour (awaited in the trio task, the one to use under ``MockClock``) and a
plain ``def`` flavour (run by the engine in a worker thread by default).

Session bookkeeping is keyed by ``(receiving site, stream tag)``: every stream
a test starts carries its tag in ``stream_ctx["stream"]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import fedstream
from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    StreamContextKey,
    make_reply,
)
from fedstream._wire import Ping

__all__ = [
    "CHANNEL",
    "STOP",
    "TOPIC",
    "AsyncRecordingConsumer",
    "AsyncRecordingFactory",
    "AsyncRecordingProducer",
    "Recorder",
    "RecordingFactory",
    "SessionLog",
    "SyncRecordingConsumer",
    "SyncRecordingProducer",
    "blackhole",
    "block_until_triggered",
    "count_tasks",
    "engine_leaks",
    "hold_writes",
    "make_done_cb",
    "make_factory",
    "make_object",
    "payload_bytes",
    "reply_rc",
    "slow_writes",
    "start_site",
    "wait_until",
]

CHANNEL = "props"
TOPIC = "objects"

#: Returned by a consumer hook to make ``consume`` answer ``(False, OK reply)``.
STOP = "stop"

#: Keys of the per-session event list, in the only order the engine may use.
END_STEPS = ("finalize", "stream_done_cb", "return_consumer")


# ------------------------------------------------------------------ payloads


def payload_bytes(stream: str, seq: int, size: int) -> bytes:
    """``size`` deterministic bytes that differ for every ``(stream, seq)``."""
    block = hashlib.blake2b(f"{stream}/{seq}".encode(), digest_size=64).digest()
    return (block * (size // len(block) + 1))[:size]


def make_object(stream: str, seq: int, size: int) -> Shareable:
    obj = Shareable({"stream": stream, "seq": seq, "data": payload_bytes(stream, seq, size)})
    obj.set_header("seq", seq)
    return obj


def reply_rc(reply: Shareable) -> str:
    return str(reply.get_return_code(ReturnCode.OK))


# ----------------------------------------------------------------- recording


@dataclass
class SessionLog:
    """What happened to one receiving session (one target of one stream)."""

    site: str
    stream: str
    #: ``("get_consumer",)``, ``("consume", seq, size)``, ``("finalize", rc)``,
    #: ``("stream_done_cb", rc)``, ``("return_consumer", rc)``, in call order.
    events: list[tuple[Any, ...]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    active_consumes: int = 0

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e[0] == name)

    def rcs(self, name: str) -> list[str]:
        return [e[1] for e in self.events if e[0] == name]

    @property
    def seqs(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "consume"]

    @property
    def sizes(self) -> list[int]:
        return [e[2] for e in self.events if e[0] == "consume"]

    def end_order_problems(self) -> list[str]:
        """Problems with the finalize -> stream_done_cb -> return_consumer sequence."""
        problems = []
        names = self.names()
        ends = [n for n in names if n in END_STEPS]
        if ends != [n for n in END_STEPS if n in ends]:
            problems.append(f"end steps out of order: {ends}")
        if any(names.count(n) > 1 for n in END_STEPS):
            problems.append(f"an end step ran more than once: {ends}")
        if ends:
            first_end = names.index(ends[0])
            later = [n for n in names[first_end:] if n in ("consume", "get_consumer")]
            if later:
                problems.append(f"{later} after the session started ending: {names}")
        rcs = {e[1] for e in self.events if e[0] in END_STEPS}
        if len(rcs) > 1:
            problems.append(f"end steps saw different RCs: {self.events}")
        return problems


class Recorder:
    """Thread-safe store of :class:`SessionLog` objects, plus free-form problems."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sessions: dict[tuple[str, str], SessionLog] = {}
        self.problems: list[str] = []

    def session(self, site: str, stream: str) -> SessionLog:
        with self._lock:
            log = self.sessions.get((site, stream))
            if log is None:
                log = self.sessions[(site, stream)] = SessionLog(site, stream)
            return log

    def event(self, site: str, stream: str, *event: Any) -> SessionLog:
        log = self.session(site, stream)
        with self._lock:
            log.events.append(event)
        return log

    def problem(self, message: str) -> None:
        with self._lock:
            self.problems.append(message)

    @contextlib.contextmanager
    def consuming(self, log: SessionLog) -> Iterator[None]:
        with self._lock:
            if any(e[0] in END_STEPS for e in log.events):
                log.problems.append("consume called after the session started ending")
            log.active_consumes += 1
            if log.active_consumes > 1:
                log.problems.append("two consume calls overlapped")
        try:
            yield
        finally:
            with self._lock:
                log.active_consumes -= 1

    def end_step(self, site: str, stream: str, name: str, stream_ctx: dict[str, Any]) -> None:
        rc = stream_ctx.get(StreamContextKey.RC)
        log = self.event(site, stream, name, rc)
        with self._lock:
            if log.active_consumes:
                log.problems.append(f"{name} ran while consume was running")
            if rc is None:
                log.problems.append(f"{name} saw no {StreamContextKey.RC} in stream_ctx")

    def all_problems(self) -> list[str]:
        found = list(self.problems)
        for (site, stream), log in sorted(self.sessions.items()):
            found += [f"{site}/{stream}: {p}" for p in log.problems + log.end_order_problems()]
        return found


def _check_ctx(recorder: Recorder, site: str, stream_ctx: dict[str, Any], where: str) -> str:
    stream = stream_ctx.get("stream")
    if not isinstance(stream, str):
        recorder.problem(f"{site}: {where} got stream_ctx without the app's 'stream' key")
        return "?"
    if stream_ctx.get(StreamContextKey.CHANNEL) != CHANNEL:
        recorder.problem(f"{site}/{stream}: {where}: wrong channel in stream_ctx")
    if stream_ctx.get(StreamContextKey.TOPIC) != TOPIC:
        recorder.problem(f"{site}/{stream}: {where}: wrong topic in stream_ctx")
    return stream


# ----------------------------------------------------------------- consumers

#: ``hook(site, stream, seq, stream_ctx, fl_ctx)``; may return :data:`STOP`.
ConsumerHook = Callable[[str, str, int, dict[str, Any], FLContext], Any]


class _ConsumerBase:
    def __init__(self, recorder: Recorder, site: str, stream: str, hook: ConsumerHook | None):
        self.recorder = recorder
        self.site = site
        self.stream = stream
        self.hook = hook
        self.log = recorder.session(site, stream)

    def _check(self, shareable: Shareable, stream_ctx: dict[str, Any]) -> int:
        seq = shareable.get("seq")
        data = shareable.get("data")
        size = len(data) if isinstance(data, bytes) else -1
        self.recorder.event(self.site, self.stream, "consume", seq, size)
        if not isinstance(shareable, Shareable):
            self.log.problems.append(f"consume got a {type(shareable).__name__}")
        if stream_ctx.get("stream") != self.stream or shareable.get("stream") != self.stream:
            self.log.problems.append(f"object of stream {shareable.get('stream')!r} delivered here")
        if shareable.get_header("seq") != seq:
            self.log.problems.append(f"object {seq}: header seq {shareable.get_header('seq')!r}")
        if not isinstance(data, bytes):
            self.log.problems.append(f"object {seq}: data is a {type(data).__name__}, not bytes")
        elif data != payload_bytes(self.stream, seq, size):
            self.log.problems.append(f"object {seq}: payload bytes differ from what was sent")
        return seq if isinstance(seq, int) else -1

    def _reply(self, seq: int, action: Any) -> tuple[bool, Shareable]:
        reply = make_reply(ReturnCode.OK)
        reply["ack"] = seq
        reply["site"] = self.site
        return action != STOP, reply

    def _end(self, name: str, stream_ctx: dict[str, Any]) -> None:
        self.recorder.end_step(self.site, self.stream, name, stream_ctx)


class AsyncRecordingConsumer(_ConsumerBase, ObjectConsumer):
    """Consumer whose callbacks are coroutines (awaited in the session's task)."""

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable]:
        with self.recorder.consuming(self.log):
            seq = self._check(shareable, stream_ctx)
            action = None
            if self.hook is not None:
                action = await self.hook(self.site, self.stream, seq, stream_ctx, fl_ctx)
            return self._reply(seq, action)

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self._end("finalize", stream_ctx)


class SyncRecordingConsumer(_ConsumerBase, ObjectConsumer):
    """Consumer with plain ``def`` callbacks (worker threads unless ``sync_callbacks="inline"``)."""

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable]:
        with self.recorder.consuming(self.log):
            seq = self._check(shareable, stream_ctx)
            action = None
            if self.hook is not None:
                action = self.hook(self.site, self.stream, seq, stream_ctx, fl_ctx)
            return self._reply(seq, action)

    def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self._end("finalize", stream_ctx)


#: ``hook(site, stream)``, called in ``get_consumer``; it may raise.
FactoryHook = Callable[[str, str], Any]


class RecordingFactory(ConsumerFactory):
    """Hands out one :class:`SyncRecordingConsumer` per stream (plain ``def`` callbacks)."""

    consumer_class: type[_ConsumerBase] = SyncRecordingConsumer

    def __init__(
        self,
        recorder: Recorder,
        site: str,
        *,
        consume_hook: ConsumerHook | None = None,
        get_consumer_hook: FactoryHook | None = None,
    ) -> None:
        self.recorder = recorder
        self.site = site
        self.consume_hook = consume_hook
        self.get_consumer_hook = get_consumer_hook

    def _new(self, stream_ctx: dict[str, Any]) -> ObjectConsumer:
        stream = _check_ctx(self.recorder, self.site, stream_ctx, "get_consumer")
        self.recorder.event(self.site, stream, "get_consumer")
        if self.get_consumer_hook is not None:
            self.get_consumer_hook(self.site, stream)
        consumer = self.consumer_class(self.recorder, self.site, stream, self.consume_hook)
        assert isinstance(consumer, ObjectConsumer)
        return consumer

    def _give_back(self, consumer: ObjectConsumer, stream_ctx: dict[str, Any]) -> None:
        stream = _check_ctx(self.recorder, self.site, stream_ctx, "return_consumer")
        if not isinstance(consumer, _ConsumerBase) or consumer.stream != stream:
            self.recorder.problem(f"{self.site}/{stream}: return_consumer got the wrong consumer")
        self.recorder.end_step(self.site, stream, "return_consumer", stream_ctx)

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return self._new(stream_ctx)

    def return_consumer(
        self, consumer: ObjectConsumer, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> None:
        self._give_back(consumer, stream_ctx)


class AsyncRecordingFactory(RecordingFactory):
    """Hands out one :class:`AsyncRecordingConsumer` per stream (coroutine callbacks)."""

    consumer_class = AsyncRecordingConsumer

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        return self._new(stream_ctx)

    async def return_consumer(  # type: ignore[override]
        self, consumer: ObjectConsumer, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> None:
        self._give_back(consumer, stream_ctx)


def make_factory(
    recorder: Recorder, site: str, *, is_async: bool, **hooks: Any
) -> RecordingFactory:
    cls = AsyncRecordingFactory if is_async else RecordingFactory
    return cls(recorder, site, **hooks)


def make_done_cb(is_async: bool) -> Callable[..., Any]:
    """A ``stream_done_cb`` that records into ``recorder`` (passed as a cb_kwarg with ``site``)."""

    def record(stream_ctx: dict[str, Any], recorder: Recorder, site: str) -> None:
        stream = _check_ctx(recorder, site, stream_ctx, "stream_done_cb")
        recorder.end_step(site, stream, "stream_done_cb", stream_ctx)

    if is_async:

        async def done_async(
            stream_ctx: dict[str, Any], fl_ctx: FLContext, *, recorder: Recorder, site: str
        ) -> None:
            record(stream_ctx, recorder, site)

        return done_async

    def done_sync(
        stream_ctx: dict[str, Any], fl_ctx: FLContext, *, recorder: Recorder, site: str
    ) -> None:
        record(stream_ctx, recorder, site)

    return done_sync


# ----------------------------------------------------------------- producers

#: ``hook(phase, seq)`` with phase ``"produce"`` or ``"process_replies"``.
ProducerHook = Callable[[str, int], Any]


class _ProducerBase:
    """Sends ``len(sizes)`` objects; ends as ``end_mode`` says.

    ``end_mode``: ``"none"`` (produce returns ``None``), ``"truthy"``
    (process_replies returns :attr:`TRUTHY` after the last object) or
    ``"falsy"`` (returns ``0`` there).
    """

    TRUTHY = {"finished": True}

    def __init__(
        self,
        stream: str,
        sizes: Sequence[int],
        *,
        timeout: float | Sequence[float] = 60.0,
        end_mode: str = "none",
        hook: ProducerHook | None = None,
    ) -> None:
        self.stream = stream
        self.sizes = list(sizes)
        self.timeouts = (
            [float(timeout)] * len(self.sizes) if isinstance(timeout, (int, float)) else timeout
        )
        self.end_mode = end_mode
        self.hook = hook
        self.next_seq = 0
        #: One ``{target: reply}`` dict per process_replies call.
        self.replies: list[dict[str, Shareable]] = []
        self.problems: list[str] = []

    def _produce(self, stream_ctx: dict[str, Any]) -> tuple[Shareable, float] | None:
        if stream_ctx.get("stream") != self.stream:
            self.problems.append("produce got a foreign stream_ctx")
        seq = self.next_seq
        if seq >= len(self.sizes):
            return None
        self.next_seq += 1
        return make_object(self.stream, seq, self.sizes[seq]), self.timeouts[seq]

    def _process(self, replies: dict[str, Shareable]) -> Any:
        seq = len(self.replies)
        self.replies.append(dict(replies))
        for target, reply in replies.items():
            if not isinstance(reply, Shareable):
                self.problems.append(f"object {seq}: reply from {target} is not a Shareable")
            elif (
                reply_rc(reply) == ReturnCode.OK
                and "ack" in reply
                and (reply.get("ack") != seq or reply.get("site") != target)
            ):
                self.problems.append(
                    f"object {seq}: {target}'s reply acks {reply.get('ack')!r} "
                    f"from {reply.get('site')!r}"
                )
        if seq == len(self.sizes) - 1:
            if self.end_mode == "truthy":
                return self.TRUTHY
            if self.end_mode == "falsy":
                return 0
        return None

    def rcs(self, target: str) -> list[str | None]:
        """``target``'s reply rc for every object so far (None where absent)."""
        return [reply_rc(r[target]) if target in r else None for r in self.replies]


class AsyncRecordingProducer(_ProducerBase, ObjectProducer):
    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable, float] | None:
        if self.hook is not None:
            await self.hook("produce", self.next_seq)
        return self._produce(stream_ctx)

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        if self.hook is not None:
            await self.hook("process_replies", len(self.replies))
        return self._process(replies)


class SyncRecordingProducer(_ProducerBase, ObjectProducer):
    def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable, float] | None:
        if self.hook is not None:
            self.hook("produce", self.next_seq)
        return self._produce(stream_ctx)

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        if self.hook is not None:
            self.hook("process_replies", len(self.replies))
        return self._process(replies)


# --------------------------------------------------------------- trio helpers


class AcceptingConsumer(ObjectConsumer):
    """Takes every object and replies OK, recording nothing."""

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        return True, None


class AcceptingFactory(ConsumerFactory):
    """Hands out an :class:`AcceptingConsumer` for every stream."""

    async def get_consumer(  # type: ignore[override]
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer:
        return AcceptingConsumer()


async def start_site(nursery: trio.Nursery, name: str, **kwargs: Any) -> fedstream.Site:
    """Run a site in its own task of ``nursery`` (so shutting it down cancels only it)."""

    async def run(task_status: trio.TaskStatus[fedstream.Site] = trio.TASK_STATUS_IGNORED) -> None:
        await fedstream.serve_site(name, task_status=task_status, **kwargs)

    site: fedstream.Site = await nursery.start(run)
    return site


async def wait_until(predicate: Callable[[], bool], sites: Sequence[fedstream.Site]) -> None:
    """Wait, without polling, until ``predicate()`` holds; re-checked on every site change.

    Bound it with ``trio.fail_after``.
    """
    while not predicate():
        async with trio.open_nursery() as nursery:

            async def one(site: fedstream.Site) -> None:
                await site._changed.wait()
                nursery.cancel_scope.cancel()

            for site in sites:
                nursery.start_soon(one, site)


def engine_leaks(sites: Sequence[fedstream.Site]) -> list[str]:
    """Sessions the engine still tracks on any of ``sites``."""
    leaks = []
    for site in sites:
        if site._senders:
            leaks.append(f"{site.name}: {len(site._senders)} sending sessions")
        for peer, conn in site._connections.items():
            if conn.senders:
                leaks.append(f"{site.name}->{peer}: sender links {sorted(conn.senders)}")
            if conn.receivers:
                leaks.append(f"{site.name}<-{peer}: receivers {sorted(conn.receivers)}")
    return leaks


def count_tasks() -> int:
    """Tasks alive in this trio run."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def blackhole(conn: Any) -> None:
    """Make a ``memory://`` connection silently drop everything it writes from now on."""
    send_stream = conn.stream.send_stream

    async def drop() -> None:
        send_stream.get_data_nowait()

    send_stream.send_all_hook = drop


def slow_writes(conn: Any, delay: float) -> None:
    """Make every write of a ``memory://`` connection take ``delay`` seconds.

    The delay is shielded, so a write that started always completes (no bytes
    are left behind in the memory stream when the connection is torn down).
    """
    send_stream = conn.stream.send_stream
    pump = send_stream.send_all_hook

    async def slow() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(delay)
        await pump()

    send_stream.send_all_hook = slow


def hold_writes(conn: Any) -> trio.Event:
    """Hold a ``memory://`` connection's writer inside a write until the event is set.

    A PING is queued first, so the writer is stuck from the next checkpoint on
    and everything queued after it waits in the connection's outbox, in
    whatever order the writer will pick it.
    """
    send_stream = conn.stream.send_stream
    pump = send_stream.send_all_hook
    gate = trio.Event()

    async def held() -> None:
        await gate.wait()
        await pump()

    send_stream.send_all_hook = held
    conn.send_control(Ping(0))
    return gate


def block_until_triggered(signal: fedstream.Signal, cap: float) -> bool:
    """From a worker thread: wait until ``signal`` fires (at most ``cap`` real seconds)."""
    fired = threading.Event()
    unregister = signal.add_listener(lambda _s: fired.set())
    try:
        return fired.wait(cap)
    finally:
        unregister()
