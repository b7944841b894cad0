"""FLARE's own streamers and a FLARE-style user pair, run unchanged on BlockingSite.

Needs ``nvflare`` (the ``flare`` extra; CI installs it). Nothing in these tests
adapts FLARE code: it gets a ``BlockingSite`` from ``fl_ctx.get_engine()``
exactly as it would get FLARE's engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

nvflare = pytest.importorskip("nvflare")

from nvflare.apis.event_type import EventType  # noqa: E402
from nvflare.apis.fl_constant import ReservedKey  # noqa: E402
from nvflare.apis.fl_context import FLContext as NvFLContext  # noqa: E402
from nvflare.apis.shareable import Shareable as NvShareable  # noqa: E402
from nvflare.apis.shareable import make_reply as nv_make_reply  # noqa: E402
from nvflare.apis.signal import Signal as NvSignal  # noqa: E402
from nvflare.apis.streaming import (  # noqa: E402
    ConsumerFactory as NvConsumerFactory,
)
from nvflare.apis.streaming import (  # noqa: E402
    ObjectConsumer as NvObjectConsumer,
)
from nvflare.apis.streaming import (  # noqa: E402
    ObjectProducer as NvObjectProducer,
)
from nvflare.apis.streaming import (  # noqa: E402
    StreamableEngine as NvStreamableEngine,
)
from nvflare.apis.streaming import StreamContextKey as NvKey  # noqa: E402
from nvflare.app_common.streamers.container_retriever import ContainerRetriever  # noqa: E402
from nvflare.app_common.streamers.container_streamer import ContainerStreamer  # noqa: E402
from nvflare.app_common.streamers.file_retriever import FileRetriever  # noqa: E402
from nvflare.app_common.streamers.file_streamer import FileStreamer  # noqa: E402
from nvflare.app_common.streamers.log_streamer import LogStreamer  # noqa: E402

from fedstream import END_RESULT, BlockingSite, ReturnCode  # noqa: E402

OK = ReturnCode.OK
CH = "app"


@pytest.fixture
def sites() -> Iterator[tuple[BlockingSite, BlockingSite]]:
    with BlockingSite("server", listen="tcp://127.0.0.1:0", finalize_timeout=5.0) as server:
        assert server.address is not None
        with BlockingSite("site-1", connect=[server.address], finalize_timeout=5.0) as client:
            server.wait_for_peers(["site-1"], timeout=10.0)
            yield server, client


def _wait(predicate: Any, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def nv_context(engine: BlockingSite) -> NvFLContext:
    """A context made the FLARE way, with FLARE's own (poll-only) abort signal."""
    ctx = NvFLContext()
    ctx.put(key=ReservedKey.ENGINE, value=engine, private=True, sticky=False)
    ctx.put(key=ReservedKey.IDENTITY_NAME, value=engine.name, private=False, sticky=False)
    ctx.put(key=ReservedKey.RUN_ABORT_SIGNAL, value=NvSignal(), private=True, sticky=False)
    return ctx


def test_blocking_site_passes_flares_engine_check_and_contexts_are_flares() -> None:
    with BlockingSite("solo") as site:
        assert isinstance(site, NvStreamableEngine)
        ctx = site.new_context()
        assert isinstance(ctx, NvFLContext)
        assert ctx.get_engine() is site
        with ctx as same:
            assert same is ctx
        ctx.set_custom_prop("k", 1)
        assert ctx.clone().get_custom_prop("k") == 1
        assert "__identity_name__" in ctx.get_prop_keys()


def test_file_streamer_moves_a_multi_mib_file_byte_identical(
    sites: tuple[BlockingSite, BlockingSite], tmp_path: Path
) -> None:
    server, client = sites
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 123))
    dest = tmp_path / "dest"
    dest.mkdir()
    done: list[tuple[str, str]] = []
    chunks: list[Any] = []

    def stream_done(stream_ctx: dict[str, Any], fl_ctx: Any, **kwargs: Any) -> None:
        assert kwargs == {"tag": "t"}
        done.append((stream_ctx[NvKey.RC], FileStreamer.get_file_location(stream_ctx)))

    def chunk_consumed(result: Any, stream_ctx: Any, fl_ctx: Any, **kwargs: Any) -> None:
        chunks.append(result)

    FileStreamer.register_stream_processing(
        fl_ctx=server.new_context(),
        channel=CH,
        topic="file",
        dest_dir=str(dest),
        stream_done_cb=stream_done,
        chunk_consumed_cb=chunk_consumed,
        tag="t",
    )
    rc, result = FileStreamer.stream_file(
        channel=CH,
        topic="file",
        stream_ctx={},
        targets=["server"],
        file_name=str(source),
        fl_ctx=client.new_context(),
    )
    assert rc == OK
    assert set(result) == {"server"}
    assert result["server"].get_return_code() == OK
    assert isinstance(result["server"], NvShareable)
    _wait(lambda: done, "stream_done_cb")
    ((done_rc, location),) = done
    assert done_rc == OK
    assert Path(location).read_bytes() == source.read_bytes()
    assert len(chunks) == 6
    assert [keep_going for keep_going, _ in chunks] == [True] * 5 + [False]


def test_file_streamer_aborted_mid_stream_is_task_aborted_on_both_sides(
    sites: tuple[BlockingSite, BlockingSite], tmp_path: Path
) -> None:
    server, client = sites
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024))
    sender_ctx = nv_context(client)
    signal = sender_ctx.get_run_abort_signal()
    done: list[str] = []
    consumed = []

    def chunk_consumed(result: Any, stream_ctx: Any, fl_ctx: Any) -> None:
        consumed.append(result)
        if len(consumed) == 2:
            signal.trigger(True)  # FLARE's own poll-only signal, from a receiver thread

    FileStreamer.register_stream_processing(
        fl_ctx=server.new_context(),
        channel=CH,
        topic="abort",
        dest_dir=str(tmp_path),
        stream_done_cb=lambda stream_ctx, fl_ctx: done.append(stream_ctx[NvKey.RC]),
        chunk_consumed_cb=chunk_consumed,
    )
    started = time.monotonic()
    rc, _ = FileStreamer.stream_file(
        channel=CH,
        topic="abort",
        stream_ctx={},
        targets=["server"],
        file_name=str(source),
        fl_ctx=sender_ctx,
        chunk_size=512 * 1024,
    )
    assert rc == ReturnCode.TASK_ABORTED
    assert time.monotonic() - started < 10
    _wait(lambda: done, "stream_done_cb")
    assert done == [ReturnCode.TASK_ABORTED]
    assert len(consumed) < 16
    assert isinstance(signal, NvSignal)


@pytest.mark.parametrize(
    "container",
    [
        {"a": 1, "b": [1, 2], "c": {"x": "y"}},
        {1: "one", 2: "two"},
        ["x", 2, 3.5, None, b"bytes"],
        {"s", "e", "t"},
    ],
    ids=["dict", "int-key-dict", "list", "set"],
)
def test_container_streamer(sites: tuple[BlockingSite, BlockingSite], container: Any) -> None:
    server, client = sites
    got: list[Any] = []
    ContainerStreamer.register_stream_processing(
        fl_ctx=server.new_context(),
        channel=CH,
        topic="container",
        stream_done_cb=lambda stream_ctx, fl_ctx: got.append(
            (stream_ctx[NvKey.RC], ContainerStreamer.get_result(stream_ctx))
        ),
    )
    rc, result = ContainerStreamer.stream_container(
        channel=CH,
        topic="container",
        stream_ctx={},
        targets=["server"],
        container=container,
        fl_ctx=client.new_context(),
    )
    assert (rc, result) == (OK, True)
    _wait(lambda: got, "stream_done_cb")
    assert got == [(OK, container)]
    assert type(got[0][1]) is type(container)


def _stream_log_in_thread(
    client: BlockingSite, topic: str, log: Path, stop: threading.Event, liveness_interval: float
) -> tuple[threading.Thread, list[Any]]:
    """FLARE's ``LogStreamer.stream_log`` tailing ``log`` to ``server`` on a thread of its own.

    It returns once ``stop`` is set; its ``(rc, result)`` then is the only item of the list.
    """
    outcome: list[Any] = []
    sender = threading.Thread(
        target=lambda: outcome.append(
            LogStreamer.stream_log(
                channel=CH,
                topic=topic,
                stream_ctx={},
                targets=["server"],
                file_name=str(log),
                fl_ctx=client.new_context(),
                stop_event=stop,
                poll_interval=0.05,
                liveness_interval=liveness_interval,
            )
        )
    )
    sender.start()
    return sender, outcome


def test_log_streamer_tails_a_growing_file(
    sites: tuple[BlockingSite, BlockingSite], tmp_path: Path
) -> None:
    server, client = sites
    log = tmp_path / "run.log"
    log.write_bytes(b"")
    received: list[bytes] = []
    done: list[str] = []
    LogStreamer.register_stream_processing(
        fl_ctx=server.new_context(),
        channel=CH,
        topic="log",
        chunk_received_cb=lambda data, stream_ctx, fl_ctx: received.append(data),
        stream_done_cb=lambda stream_ctx, fl_ctx: done.append(stream_ctx[NvKey.RC]),
        idle_timeout=5.0,
    )
    stop = threading.Event()
    sender, outcome = _stream_log_in_thread(client, "log", log, stop, liveness_interval=1.0)
    lines = [f"line {i}\n".encode() for i in range(20)]
    for line in lines:
        with log.open("ab") as f:
            f.write(line)
        time.sleep(0.01)
    _wait(lambda: b"".join(received) == b"".join(lines), "the tail to arrive")
    stop.set()
    sender.join(20)
    assert not sender.is_alive()
    ((rc, _result),) = outcome
    assert rc == OK
    _wait(lambda: done, "stream_done_cb")
    assert done == [OK]


def test_log_streamer_receiver_ends_an_idle_stream_with_timeout(
    sites: tuple[BlockingSite, BlockingSite], tmp_path: Path
) -> None:
    server, client = sites
    log = tmp_path / "quiet.log"
    log.write_bytes(b"first\n")
    done: list[str] = []
    LogStreamer.register_stream_processing(
        fl_ctx=server.new_context(),
        channel=CH,
        topic="idle",
        stream_done_cb=lambda stream_ctx, fl_ctx: done.append(stream_ctx[NvKey.RC]),
        idle_timeout=0.5,
    )
    stop = threading.Event()
    # liveness_interval: the sender stays silent past the idle timeout
    sender, outcome = _stream_log_in_thread(client, "idle", log, stop, liveness_interval=30.0)
    _wait(lambda: done, "the idle timeout")
    assert done == [ReturnCode.TIMEOUT]
    stop.set()
    sender.join(20)
    assert not sender.is_alive()
    ((rc, _result),) = outcome
    assert rc != OK


def test_file_retriever_fetches_a_file_over_aux_and_a_stream(
    sites: tuple[BlockingSite, BlockingSite], tmp_path: Path
) -> None:
    server, client = sites
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    dest_dir = tmp_path / "dst"
    dest_dir.mkdir()
    (source_dir / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    owner = FileRetriever(source_dir=str(source_dir), dest_dir=str(dest_dir))
    requester = FileRetriever(source_dir=str(source_dir), dest_dir=str(dest_dir))
    owner.handle_event(EventType.START_RUN, server.new_context())
    requester.handle_event(EventType.START_RUN, client.new_context())
    rc, location = requester.retrieve_file(
        from_site="server", fl_ctx=client.new_context(), timeout=20.0, file_name="weights.bin"
    )
    assert rc == OK
    assert Path(location).read_bytes() == (source_dir / "weights.bin").read_bytes()
    rc, location = requester.retrieve_file(
        from_site="server", fl_ctx=client.new_context(), timeout=5.0, file_name="../escape"
    )
    assert (rc, location) == (ReturnCode.BAD_REQUEST_DATA, None)


def test_container_retriever(sites: tuple[BlockingSite, BlockingSite]) -> None:
    server, client = sites
    owner = ContainerRetriever()
    owner.add_container("params", {"lr": 0.1, "layers": [3, 4]})
    requester = ContainerRetriever()
    owner.handle_event(EventType.START_RUN, server.new_context())
    requester.handle_event(EventType.START_RUN, client.new_context())
    rc, container = requester.retrieve_container(
        from_site="server", fl_ctx=client.new_context(), timeout=20.0, name="params"
    )
    assert (rc, container) == (OK, {"lr": 0.1, "layers": [3, 4]})


# ------------------------------------------------- a FLARE-style user pair


class _NvProducer(NvObjectProducer):
    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = 0
        self.seen: list[dict[str, NvShareable]] = []

    def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
        if self.sent == self.n:
            return None, 1.0
        obj = NvShareable()
        obj["i"] = self.sent
        obj.set_header("round", self.sent)
        self.sent += 1
        return obj, 5.0

    def process_replies(self, replies: dict[str, NvShareable], stream_ctx: Any, fl_ctx: Any) -> Any:
        self.seen.append(replies)
        return {"done": True} if len(self.seen) == self.n else None


class _NvConsumer(NvObjectConsumer):
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def consume(self, shareable: NvShareable, stream_ctx: Any, fl_ctx: Any) -> Any:
        assert isinstance(shareable, NvShareable)
        assert isinstance(fl_ctx, NvFLContext)
        self.log.append(("consume", shareable["i"], shareable.get_header("round")))
        reply = nv_make_reply(ReturnCode.OK, headers={"echo": shareable.get_header("round")})
        reply["seen"] = shareable["i"]
        return shareable["i"] < 2, reply  # the consumer ends the stream at the last object

    def finalize(self, stream_ctx: Any, fl_ctx: Any) -> None:
        self.log.append(("finalize", stream_ctx[NvKey.RC], id(fl_ctx)))


class _NvFactory(NvConsumerFactory):
    def __init__(self) -> None:
        self.log: list[Any] = []

    def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> Any:
        return _NvConsumer(self.log)

    def return_consumer(self, consumer: Any, stream_ctx: Any, fl_ctx: Any) -> None:
        assert isinstance(consumer, _NvConsumer)
        self.log.append(("return_consumer", stream_ctx[NvKey.RC]))


def test_a_flare_style_user_pair_runs_unchanged(sites: tuple[BlockingSite, BlockingSite]) -> None:
    server, client = sites
    factory = _NvFactory()

    def done(stream_ctx: Any, fl_ctx: Any, **kwargs: Any) -> Any:
        factory.log.append(("done", stream_ctx[NvKey.RC], id(fl_ctx)))
        return "got it"

    server.register_stream_processing(CH, "pair", factory, stream_done_cb=done)
    producer = _NvProducer(3)
    rc, result = client.stream_objects(CH, "pair", {}, ["server"], producer, nv_context(client))
    assert (rc, result) == (OK, {"done": True})
    assert [r["server"]["seen"] for r in producer.seen] == [0, 1, 2]
    assert [r["server"].get_header("echo") for r in producer.seen] == [0, 1, 2]
    # The receiver ended the stream: its stream_done_cb result rides on the last
    # reply, under FLARE's header as well as fedstream's.
    last = producer.seen[-1]["server"]
    assert last.get_header("ObjectStreamer.END_RESULT") == "got it"
    assert last.get_header(END_RESULT) == "got it"
    _wait(lambda: any(e[0] == "return_consumer" for e in factory.log), "return_consumer")
    consumes = [e for e in factory.log if e[0] == "consume"]
    assert consumes == [("consume", 0, 0), ("consume", 1, 1), ("consume", 2, 2)]
    ends = [e for e in factory.log if e[0] != "consume"]
    assert [e[:2] for e in ends] == [("finalize", OK), ("done", OK), ("return_consumer", OK)]
    assert ends[0][2] == ends[1][2]  # one context for finalize and stream_done_cb


# ------------------------------------------------- across two processes


@contextlib.contextmanager
def remote_server(
    tmp_path: Path, *options: str
) -> Iterator[tuple[BlockingSite, Callable[[], dict[str, Any]]]]:
    """``tests/flare_proc_site.py`` as ``server`` in its own OS process, ``site-1`` here.

    The remote site serves ``tmp_path/"owner"`` to FileRetriever requests and
    writes what it receives under ``tmp_path/"received"``; ``options`` go to
    its command line. Yields the connected local site and a function that
    reads the remote site's next JSON record. On a normal exit the remote
    process must exit 0 once its stdin is closed; a hang guard kills it after
    120 s (its blocking reads then fail instead of hanging the test).
    """
    source_dir = tmp_path / "owner"
    dest_dir = tmp_path / "received"
    source_dir.mkdir(exist_ok=True)
    dest_dir.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent / "flare_proc_site.py"),
            str(source_dir),
            str(dest_dir),
            *options,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    stdout = proc.stdout

    def next_record() -> dict[str, Any]:
        line = stdout.readline()
        assert line, "the server process ended"
        record: dict[str, Any] = json.loads(line)
        return record

    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        first = stdout.readline()
        assert first.startswith("listening "), first
        with BlockingSite("site-1", connect=[first.split()[1]], finalize_timeout=5.0) as client:
            client.wait_for_peers(["server"], timeout=10.0)
            yield client, next_record
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_flare_streamers_and_retrievers_across_two_processes(tmp_path: Path) -> None:
    mine = tmp_path / "mine.bin"
    mine.write_bytes(os.urandom(3 * 1024 * 1024 + 1))
    with remote_server(tmp_path) as (client, next_record):
        shard = tmp_path / "owner" / "shard.bin"
        shard.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
        rc, _ = FileStreamer.stream_file(
            channel=CH,
            topic="file",
            stream_ctx={},
            targets=["server"],
            file_name=str(mine),
            fl_ctx=client.new_context(),
        )
        assert rc == OK
        record = next_record()
        assert record["rc"] == OK
        assert record["peer"] == "site-1"
        assert Path(record["file"]).read_bytes() == mine.read_bytes()

        rc, ok = ContainerStreamer.stream_container(
            channel=CH,
            topic="container",
            stream_ctx={},
            targets=["server"],
            container={"a": 1, "b": [2, 3]},
            fl_ctx=client.new_context(),
        )
        assert (rc, ok) == (OK, True)
        assert next_record() == {"container": [["a", 1], ["b", [2, 3]]]}

        files = FileRetriever(source_dir=str(tmp_path), dest_dir=str(tmp_path / "received"))
        containers = ContainerRetriever()
        files.handle_event(EventType.START_RUN, client.new_context())
        containers.handle_event(EventType.START_RUN, client.new_context())
        rc, location = files.retrieve_file(
            from_site="server", fl_ctx=client.new_context(), timeout=20.0, file_name="shard.bin"
        )
        assert rc == OK
        assert Path(location).read_bytes() == shard.read_bytes()
        rc, params = containers.retrieve_container(
            from_site="server", fl_ctx=client.new_context(), timeout=20.0, name="params"
        )
        assert (rc, params) == (OK, {"lr": 0.5, "rounds": 3})


@pytest.mark.slow
def test_log_streamer_tails_and_times_out_across_two_processes(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_bytes(b"")
    quiet = tmp_path / "quiet.log"
    quiet.write_bytes(b"first\n")
    lines = [f"line {i}\n" for i in range(20)]
    with remote_server(tmp_path) as (client, next_record):
        stop = threading.Event()
        sender, outcome = _stream_log_in_thread(client, "log", log, stop, liveness_interval=1.0)
        try:
            # Each half arrives at the remote site while the file is still open and growing.
            for half in (lines[:10], lines[10:]):
                for line in half:
                    with log.open("a") as f:
                        f.write(line)
                    time.sleep(0.01)
                tailed = ""
                while len(tailed) < len("".join(half)):
                    tailed += next_record()["log"]
                assert tailed == "".join(half)
        finally:
            stop.set()
            sender.join(20)
        assert not sender.is_alive()
        ((rc, _result),) = outcome
        assert rc == OK
        assert next_record() == {"log-done": OK}

        # The remote receiver ends a stream that stays silent past its idle timeout.
        stop = threading.Event()
        sender, outcome = _stream_log_in_thread(client, "idle", quiet, stop, liveness_interval=30.0)
        try:
            assert next_record() == {"idle-done": ReturnCode.TIMEOUT}
        finally:
            stop.set()
            sender.join(20)
        assert not sender.is_alive()
        ((rc, _result),) = outcome
        assert rc != OK


# ------------------------------------------------- the tensor streamer


def _sample_tensors(torch: Any) -> dict[str, Any]:
    return {
        "encoder": {
            "weight": torch.randn(256, 128),
            "bias": torch.zeros(128, dtype=torch.bfloat16),
        },
        "head": torch.arange(1000, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same_tensors(torch: Any, got: dict[str, Any], sent: dict[str, Any]) -> None:
    assert got.keys() == sent.keys()
    for key, want in sent.items():
        if isinstance(want, dict):
            _assert_same_tensors(torch, got[key], want)
        else:
            assert type(got[key]) is torch.Tensor, key
            assert got[key].dtype == want.dtype, key
            assert torch.equal(got[key], want), key


def _stream_tensors(client: BlockingSite, tensors: dict[str, Any], task_id: str) -> str:
    """FLARE's TensorProducer sends ``tensors`` to ``server``; returns the rc."""
    from nvflare.app_opt.tensor_stream.producer import TensorProducer
    from nvflare.app_opt.tensor_stream.types import TENSORS_CHANNEL, TensorTopics

    from fedstream import FLContext

    ctx = client.new_context()
    ctx.set_peer_context(FLContext(identity_name="server"))  # as a FLARE task context has
    rc, _ = client.stream_objects(
        TENSORS_CHANNEL,
        TensorTopics.TASK_RESULT,
        {},
        ["server"],
        TensorProducer(tensors, task_id, 10.0),
        ctx,
    )
    return str(rc)


def test_flares_tensor_streamer_runs_unchanged(sites: tuple[BlockingSite, BlockingSite]) -> None:
    torch = pytest.importorskip("torch")
    from nvflare.app_opt.tensor_stream.consumer import TensorConsumerFactory
    from nvflare.app_opt.tensor_stream.types import TENSORS_CHANNEL, TensorCustomKeys, TensorTopics

    server, client = sites
    got: list[Any] = []

    def done(stream_ctx: Any, fl_ctx: Any) -> None:
        got.append(
            (
                stream_ctx[NvKey.RC],
                fl_ctx.get_custom_prop(TensorCustomKeys.SAFE_TENSORS_PROP_KEY),
                fl_ctx.get_custom_prop(TensorCustomKeys.TASK_ID),
            )
        )

    server.register_stream_processing(
        TENSORS_CHANNEL, TensorTopics.TASK_RESULT, TensorConsumerFactory(), stream_done_cb=done
    )
    tensors = _sample_tensors(torch)
    assert _stream_tensors(client, tensors, "task-1") == OK
    _wait(lambda: got, "stream_done_cb")
    ((done_rc, params, task_id),) = got
    assert (done_rc, task_id) == (OK, "task-1")
    _assert_same_tensors(torch, params, tensors)


@pytest.mark.slow
def test_flares_tensor_streamer_across_two_processes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensors = _sample_tensors(torch)
    with remote_server(tmp_path, "--tensors") as (client, next_record):
        assert _stream_tensors(client, tensors, "task-2") == OK
        record = next_record()
    saved = tmp_path / "received" / "task-2.pt"
    assert record == {"tensors": str(saved), "rc": OK, "task_id": "task-2"}
    _assert_same_tensors(torch, torch.load(saved, weights_only=True), tensors)


def test_fedstream_classes_may_produce_and_reply_with_nvflare_shareables(
    sites: tuple[BlockingSite, BlockingSite],
) -> None:
    import fedstream

    server, client = sites

    class Producer(fedstream.ObjectProducer):
        def __init__(self) -> None:
            self.replies: list[Any] = []

        def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            if self.replies:
                return None, 1.0
            obj = NvShareable({"x": 1})
            obj.set_header("h", "kept")
            return obj, 5.0

        def process_replies(self, replies: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            self.replies.append(replies)
            return None

    class Consumer(fedstream.ObjectConsumer):
        def consume(self, shareable: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            reply = nv_make_reply(ReturnCode.OK, {"saw": shareable.get_header("h")})
            return True, reply

    class Factory(fedstream.ConsumerFactory):
        def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            return Consumer()

    server.register_stream_processing(CH, "mixed", Factory())
    producer = Producer()
    rc, _ = client.stream_objects(CH, "mixed", {}, ["server"], producer, client.new_context())
    assert rc == OK
    assert producer.replies[0]["server"].get_header("saw") == "kept"
