"""BlockingSite: FLARE's synchronous engine on a trio site in its own thread.

These tests are plain (non-async) functions: they use the blocking API from
the test's own thread and from threads they start, as FLARE code would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedstream
from engine_helpers import (
    CHANNEL,
    STOP,
    TOPIC,
    AcceptingFactory,
    Recorder,
    RecordingFactory,
    SyncRecordingProducer,
    block_until_triggered,
    make_done_cb,
)
from fedstream import (
    BlockingSite,
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ReturnCode,
    Shareable,
    SiteClosedError,
    make_reply,
)

OK = ReturnCode.OK


@pytest.fixture
def pair() -> Iterator[tuple[BlockingSite, BlockingSite]]:
    with BlockingSite("server", listen="tcp://127.0.0.1:0", finalize_timeout=5.0) as server:
        assert server.address is not None
        with BlockingSite("site-1", connect=[server.address], finalize_timeout=5.0) as client:
            server.wait_for_peers(["site-1"], timeout=10.0)
            yield server, client


def test_blocking_site_streams_and_runs_every_end_step_once(
    pair: tuple[BlockingSite, BlockingSite],
) -> None:
    server, client = pair
    rec = Recorder()
    contexts: dict[str, list[Any]] = {"finalize": [], "done": []}

    class Factory(RecordingFactory):
        def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
            consumer = super().get_consumer(stream_ctx, fl_ctx)
            finalize = consumer.finalize

            def finalize_and_note(stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
                contexts["finalize"].append(fl_ctx)
                finalize(stream_ctx, fl_ctx)

            consumer.finalize = finalize_and_note  # type: ignore[method-assign]
            return consumer

    done = make_done_cb(False)

    def done_and_note(stream_ctx: dict[str, Any], fl_ctx: FLContext, **kw: Any) -> None:
        contexts["done"].append(fl_ctx)
        done(stream_ctx, fl_ctx, **kw)

    client.register_stream_processing(
        CHANNEL, TOPIC, Factory(rec, "site-1"), done_and_note, recorder=rec, site="site-1"
    )
    producer = SyncRecordingProducer("s1", [10, 100_000, 3], end_mode="truthy")
    rc, result = server.stream_objects(
        CHANNEL, TOPIC, {"stream": "s1"}, ["site-1"], producer, server.new_context()
    )
    assert (rc, result) == (OK, producer.TRUTHY)
    assert rec.all_problems() == []
    log = rec.sessions[("site-1", "s1")]
    assert log.seqs == [0, 1, 2]
    assert [e for e in log.events if e[0] in ("finalize", "stream_done_cb", "return_consumer")] == [
        ("finalize", OK),
        ("stream_done_cb", OK),
        ("return_consumer", OK),
    ]
    # One context per session, the same for finalize and stream_done_cb, with FLARE's surface.
    (ctx,) = contexts["finalize"]
    assert contexts["done"] == [ctx]
    assert ctx.get_engine() is client
    assert ctx.get_identity_name() == "site-1"
    assert ctx.get_peer_context().get_identity_name() == "server"


def test_blocking_site_is_a_streamable_engine_and_makes_contexts() -> None:
    with BlockingSite("solo") as site:
        assert isinstance(site, fedstream.StreamableEngine)
        ctx = site.new_context()
        assert ctx.get_engine() is site
        assert ctx.get_identity_name() == "solo"
        assert site.peers == []
        with pytest.raises(fedstream.FedstreamError, match="not listening"):
            site.address  # noqa: B018
        with pytest.raises(TimeoutError, match="nobody"):
            site.wait_for_peers(["nobody"], timeout=0.05)
    assert site.closed
    with pytest.raises(SiteClosedError):
        site.stream_objects(CHANNEL, TOPIC, {}, ["x"], SyncRecordingProducer("s", []), ctx)


def test_a_site_that_cannot_start_raises_and_leaves_no_thread() -> None:
    before = threading.active_count()
    with pytest.raises(fedstream.ConnectionLostError):
        BlockingSite("lonely", connect=["tcp://127.0.0.1:1"], handshake_timeout=2.0)
    assert threading.active_count() == before


class _CallingBack(ObjectConsumer):
    """Calls the engine's blocking methods from inside consume (a worker thread)."""

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable]:
        engine = fl_ctx.get_engine()
        peer = fl_ctx.get_peer_context().get_identity_name()
        replies = engine.send_aux_request(
            [peer], "ping", Shareable({"n": shareable["n"]}), 5.0, fl_ctx
        )
        reply = make_reply(OK)
        reply["pong"] = replies[peer]["pong"]
        reply["peers"] = engine.peers
        return True, reply


class _CallingBackFactory(ConsumerFactory):
    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _CallingBack()


class _Counter(fedstream.ObjectProducer):
    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = 0
        self.replies: list[Shareable] = []

    def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        if self.sent == self.n:
            return None, 1.0
        self.sent += 1
        return Shareable({"n": self.sent}), 10.0

    def process_replies(self, replies: dict[str, Shareable], stream_ctx: Any, fl_ctx: Any) -> Any:
        self.replies.extend(replies.values())
        return None


def test_callbacks_call_back_into_the_site_from_many_threads_at_once(
    pair: tuple[BlockingSite, BlockingSite],
) -> None:
    server, client = pair
    server.register_aux_message_handler(
        "ping", lambda topic, request, fl_ctx: make_reply(OK, {"x": 1}) | {"pong": request["n"]}
    )
    client.register_stream_processing(CHANNEL, TOPIC, _CallingBackFactory())
    results: dict[int, Any] = {}
    producers = {i: _Counter(3) for i in range(8)}

    def run(i: int) -> None:
        results[i] = server.stream_objects(
            CHANNEL, TOPIC, {}, ["site-1"], producers[i], server.new_context()
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not t.is_alive() for t in threads)
    assert results == {i: (OK, None) for i in range(8)}
    for producer in producers.values():
        assert [r["pong"] for r in producer.replies] == [1, 2, 3]
        assert all(r["peers"] == ["server"] for r in producer.replies)


def test_stream_no_wait_returns_a_future(pair: tuple[BlockingSite, BlockingSite]) -> None:
    server, client = pair
    client.register_stream_processing(CHANNEL, TOPIC, _CallingBackFactory())
    server.register_aux_message_handler("ping", lambda t, r, c: Shareable({"pong": r["n"]}))
    futures = [
        server.stream_no_wait(CHANNEL, TOPIC, {}, ["site-1"], _Counter(2), server.new_context())
        for _ in range(3)
    ]
    assert [f.result(30) for f in futures] == [(OK, None)] * 3
    bad = server.stream_no_wait(CHANNEL, TOPIC, {}, ["nobody"], _Counter(1), None)  # type: ignore[arg-type]
    with pytest.raises(fedstream.UnknownTargetError):
        bad.result(10)


class _UntilAborted(fedstream.ObjectProducer):
    """Sends one object, then blocks in produce until the stream's abort signal fires."""

    def __init__(self) -> None:
        self.sent = False
        self.released = threading.Event()

    def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        if not self.sent:
            self.sent = True
            return Shareable({"n": 1}), 10.0
        block_until_triggered(fl_ctx.get_run_abort_signal(), 20.0)
        self.released.set()
        return None, 1.0

    def process_replies(self, replies: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
        return None


def test_close_ends_live_streams_and_joins_the_thread() -> None:
    with BlockingSite("server", listen="tcp://127.0.0.1:0", finalize_timeout=2.0) as server:
        assert server.address is not None
        with BlockingSite("site-1", connect=[server.address], finalize_timeout=2.0) as client:
            server.wait_for_peers(["site-1"], timeout=10.0)
            rec = Recorder()
            client.register_stream_processing(
                CHANNEL,
                TOPIC,
                RecordingFactory(rec, "site-1"),
                make_done_cb(False),
                recorder=rec,
                site="site-1",
            )
            server.register_aux_message_handler("ping", lambda t, r, c: make_reply(OK))
            future = server.stream_no_wait(
                CHANNEL,
                TOPIC,
                {"stream": "s"},
                ["site-1"],
                SyncRecordingProducer("s", [10] * 10_000),
                server.new_context(),
            )
            while ("site-1", "s") not in rec.sessions:
                time.sleep(0.01)
            client.close()
            assert not client._thread.is_alive()
            rc, _ = future.result(10)
            assert rc != OK
            assert rec.all_problems() == []
            log = rec.sessions[("site-1", "s")]
            assert [n for n in log.names() if n != "consume" and n != "get_consumer"] == [
                "finalize",
                "stream_done_cb",
                "return_consumer",
            ]
            assert log.rcs("finalize") == [ReturnCode.SERVICE_UNAVAILABLE]
    assert server.closed


def test_close_is_bounded_even_while_a_plain_producer_blocks() -> None:
    """A thread cannot be interrupted: close() gives up after close_timeout, and the
    thread ends once the producer returns."""
    with BlockingSite("server", listen="tcp://127.0.0.1:0", finalize_timeout=1.0) as peer:
        assert peer.address is not None
        sender = BlockingSite(
            "site-1", connect=[peer.address], finalize_timeout=1.0, close_timeout=1.0
        )
        peer.register_stream_processing(CHANNEL, TOPIC, AcceptingFactory())
        producer = _UntilAborted()
        ctx = sender.new_context()
        future = sender.stream_no_wait(CHANNEL, TOPIC, {}, ["server"], producer, ctx)
        while not producer.sent:
            time.sleep(0.01)
        time.sleep(0.2)  # let produce start blocking
        started = time.monotonic()
        sender.close()
        assert time.monotonic() - started < 8
        assert sender.closed
        ctx.get_run_abort_signal().trigger(True)
        assert producer.released.wait(5)
        sender._thread.join(10)
        assert not sender._thread.is_alive()
        assert future.result(1)[0] == ReturnCode.SERVICE_UNAVAILABLE


def test_blocking_from_the_sites_own_trio_thread_is_refused_not_a_deadlock() -> None:
    errors: list[BaseException] = []

    class Inline(ObjectConsumer):
        def consume(self, shareable: Shareable, stream_ctx: Any, fl_ctx: FLContext) -> Any:
            try:
                fl_ctx.get_engine().send_aux_request(["server"], "x", Shareable(), 1.0, fl_ctx)
            except RuntimeError as exc:
                errors.append(exc)
            return True, None

    class InlineFactory(ConsumerFactory):
        def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> ObjectConsumer:
            return Inline()

    with BlockingSite("server", listen="tcp://127.0.0.1:0") as server:
        assert server.address is not None
        with BlockingSite("site-1", connect=[server.address], sync_callbacks="inline") as client:
            client.register_stream_processing(CHANNEL, TOPIC, InlineFactory())
            server.wait_for_peers(["site-1"], timeout=10.0)
            rc, _ = server.stream_objects(CHANNEL, TOPIC, {}, ["site-1"], _Counter(1), None)  # type: ignore[arg-type]
    assert rc == OK
    assert len(errors) == 1
    assert "own trio thread" in str(errors[0])


# ------------------------------------------------- the finalize guarantee


@st.composite
def _scenarios(draw: st.DrawFn) -> list[dict[str, Any]]:
    streams = []
    for i in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 4))
        streams.append(
            {
                "stream": f"s{i}",
                "sizes": draw(st.lists(st.sampled_from([0, 10, 70_000]), min_size=n, max_size=n)),
                "stop_at": draw(st.none() | st.integers(0, n)),
                "raise_at": draw(st.none() | st.integers(0, n)),
                "abort_at": draw(st.none() | st.integers(0, n)),
                "factory_raises": draw(st.booleans()),
            }
        )
    return streams


@pytest.fixture(scope="module")
def shared_pair() -> Iterator[tuple[BlockingSite, BlockingSite]]:
    with BlockingSite("server", listen="tcp://127.0.0.1:0", finalize_timeout=5.0) as server:
        assert server.address is not None
        with BlockingSite("site-1", connect=[server.address], finalize_timeout=5.0) as client:
            server.wait_for_peers(["site-1"], timeout=10.0)
            yield server, client


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scenario=_scenarios())
def test_blocking_site_keeps_the_finalize_guarantee(
    shared_pair: tuple[BlockingSite, BlockingSite], scenario: list[dict[str, Any]]
) -> None:
    """Whatever ends each stream, every receiving session with a consumer runs
    finalize, stream_done_cb and return_consumer exactly once, in that order, with
    one rc; a session without one still runs stream_done_cb; and concurrent
    streams from several threads do not disturb one another."""
    server, client = shared_pair
    rec = Recorder()
    by_stream = {s["stream"]: s for s in scenario}

    def consume_hook(site: str, stream: str, seq: int, stream_ctx: Any, fl_ctx: Any) -> Any:
        spec = by_stream[stream]
        if spec["raise_at"] == seq:
            raise RuntimeError("consumer failed")
        return STOP if spec["stop_at"] == seq else None

    def factory_hook(site: str, stream: str) -> None:
        if by_stream[stream]["factory_raises"]:
            raise RuntimeError("no consumer")

    client.register_stream_processing(
        CHANNEL,
        TOPIC,
        RecordingFactory(rec, "site-1", consume_hook=consume_hook, get_consumer_hook=factory_hook),
        make_done_cb(False),
        recorder=rec,
        site="site-1",
    )
    outcomes: dict[str, Any] = {}

    def run(spec: dict[str, Any]) -> None:
        ctx = server.new_context()

        def hook(phase: str, seq: int) -> None:
            if phase == "produce" and spec["abort_at"] == seq:
                ctx.get_run_abort_signal().trigger(True)

        producer = SyncRecordingProducer(spec["stream"], spec["sizes"], timeout=20.0, hook=hook)
        outcomes[spec["stream"]] = server.stream_objects(
            CHANNEL, TOPIC, {"stream": spec["stream"]}, ["site-1"], producer, ctx
        )

    threads = [threading.Thread(target=run, args=(spec,)) for spec in scenario]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not t.is_alive() for t in threads)
    assert set(outcomes) == set(by_stream)
    assert rec.all_problems() == []
    for name, spec in by_stream.items():
        log = rec.sessions.get(("site-1", name))
        if log is None:  # aborted before the first object went out
            assert spec["abort_at"] == 0
            continue
        ends = [n for n in log.names() if n in ("finalize", "stream_done_cb", "return_consumer")]
        if spec["factory_raises"]:
            assert ends == ["stream_done_cb"]
        else:
            assert ends == ["finalize", "stream_done_cb", "return_consumer"]


def test_a_callback_may_shut_its_own_site_down() -> None:
    closed = threading.Event()

    class Closer(ObjectConsumer):
        def consume(self, shareable: Shareable, stream_ctx: Any, fl_ctx: FLContext) -> Any:
            return False, None

    class CloserFactory(ConsumerFactory):
        def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> ObjectConsumer:
            return Closer()

    def done(stream_ctx: Any, fl_ctx: FLContext) -> None:
        fl_ctx.get_engine().shutdown_streamer()  # from a worker thread of that very site
        closed.set()

    with BlockingSite("server", listen="tcp://127.0.0.1:0", finalize_timeout=2.0) as server:
        assert server.address is not None
        with BlockingSite("site-1", connect=[server.address]) as client:
            server.register_stream_processing(CHANNEL, TOPIC, CloserFactory(), done)
            client.wait_for_peers(["server"], timeout=10.0)
            rc, _ = client.stream_objects(CHANNEL, TOPIC, {}, ["server"], _Counter(3), None)  # type: ignore[arg-type]
            assert closed.wait(10)
            assert server.closed
            server._thread.join(10)
            assert not server._thread.is_alive()
            assert rc == OK
            with pytest.raises(SiteClosedError):
                server.register_stream_processing(CHANNEL, TOPIC, CloserFactory())


def test_files_and_containers_through_the_blocking_site(
    pair: tuple[BlockingSite, BlockingSite], tmp_path: Any
) -> None:
    server, client = pair
    received: list[fedstream.ReceivedFile] = []
    containers: list[fedstream.ReceivedContainer] = []
    client.register_file_receiver("files", "*", tmp_path / "in", on_file=received.append)
    client.register_container_receiver("state", "*", containers.append)
    source = tmp_path / "model.bin"
    source.write_bytes(bytes(range(256)) * 5000)
    result = server.stream_file("files", "up", [client.name], source, chunk_size=64 * 1024)
    assert result.ok
    assert (tmp_path / "in" / "model.bin").read_bytes() == source.read_bytes()
    assert [(r.name, r.rc) for r in received] == [("model.bin", ReturnCode.OK)]
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "a.txt").write_bytes(b"a")
    results = server.stream_directory("files", "up", [client.name], tmp_path / "tree")
    assert [r.ok for r in results] == [True]
    assert (tmp_path / "in" / "tree" / "sub" / "a.txt").read_bytes() == b"a"
    sent = server.stream_container("state", "t", [client.name], {"lr": 0.1, "layers": [1, 2]})
    assert sent.ok
    assert [c.container for c in containers] == [{"lr": 0.1, "layers": [1, 2]}]
