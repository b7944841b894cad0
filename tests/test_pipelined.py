"""Pipelined streams: ``stream_objects(..., max_in_flight=N)``.

Up to N objects are sent ahead of their replies; each target still consumes
them one at a time in order, ``process_replies`` is still called once per
object in order, and every ending finalizes each receiving session exactly
once. What happens to the objects in flight when the stream ends early is
the table in docs/semantics.md ("Pipelined streams"); each row has a test.
Sites run over ``memory://`` (timing tests on the autojump clock).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from engine_helpers import (
    CHANNEL,
    STOP,
    TOPIC,
    AsyncRecordingProducer,
    Recorder,
    SyncRecordingProducer,
    engine_leaks,
    make_done_cb,
    make_factory,
)
from fedstream import FLContext, ReturnCode, Site, open_site

_ids = itertools.count()

#: Small windows and chunks, so objects span several frames and credit matters.
_OPTIONS = {"window": 64 * 1024, "chunk_size": 16 * 1024}


@asynccontextmanager
async def _sites(
    recorder: Recorder, targets: int = 1, *, is_async: bool = True, consume_hook: Any = None
) -> AsyncIterator[tuple[Site, list[Site]]]:
    urls = [f"memory://pipelined-{next(_ids)}" for _ in range(targets)]
    async with AsyncExitStack() as stack:
        receivers = []
        for index, url in enumerate(urls):
            rx = await stack.enter_async_context(open_site(f"rx{index}", listen=url, **_OPTIONS))
            rx.register_stream_processing(
                CHANNEL,
                TOPIC,
                make_factory(recorder, rx.name, is_async=is_async, consume_hook=consume_hook),
                stream_done_cb=make_done_cb(is_async),
                recorder=recorder,
                site=rx.name,
            )
            receivers.append(rx)
        tx = await stack.enter_async_context(open_site("tx", connect=urls, **_OPTIONS))
        for rx in receivers:
            await rx.wait_for_peers(["tx"])
        yield tx, receivers
        assert engine_leaks([tx, *receivers]) == []


class _Producer(AsyncRecordingProducer):
    """Records how many objects were unanswered at each ``produce``, and may
    end the stream from ``process_replies`` at object ``end_at``."""

    def __init__(self, stream: str, sizes: Sequence[int], end_at: int = -1, **kw: Any) -> None:
        super().__init__(stream, sizes, **kw)
        self.end_at = end_at
        self.in_flight_at_produce: list[int] = []

    def _produce(self, stream_ctx: dict[str, Any]) -> Any:
        self.in_flight_at_produce.append(self.next_seq - len(self.replies))
        return super()._produce(stream_ctx)

    def _process(self, replies: dict[str, Any]) -> Any:
        outcome = super()._process(replies)
        if len(self.replies) - 1 == self.end_at:
            return "enough"
        return outcome


class _SyncProducer(SyncRecordingProducer):
    def __init__(self, stream: str, sizes: Sequence[int], **kw: Any) -> None:
        super().__init__(stream, sizes, **kw)
        self.in_flight_at_produce: list[int] = []

    def _produce(self, stream_ctx: dict[str, Any]) -> Any:
        self.in_flight_at_produce.append(self.next_seq - len(self.replies))
        return super()._produce(stream_ctx)


def _acks(producer: Any, target: str) -> list[Any]:
    return [r[target].get("ack") for r in producer.replies]


SIZES = [10, 70_000, 5, 300_000, 0, 33_000, 1_000, 150_000, 64, 20_000, 7, 90_000]


@pytest.mark.parametrize("is_async", [True, False])
@pytest.mark.parametrize("window", [2, 5])
async def test_objects_arrive_in_order_and_process_replies_runs_once_each_in_order(
    is_async: bool, window: int
) -> None:
    recorder = Recorder()
    producer = (_Producer if is_async else _SyncProducer)("s", SIZES)
    with trio.fail_after(20):
        async with _sites(recorder, targets=2, is_async=is_async) as (tx, _):
            rc, result = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0", "rx1"], producer, None,
                max_in_flight=window,
            )  # fmt: skip
    assert (rc, result) == (ReturnCode.OK, None)
    assert recorder.all_problems() == []
    assert producer.problems == []
    for target in ("rx0", "rx1"):
        log = recorder.session(target, "s")
        assert log.seqs == list(range(len(SIZES)))
        assert log.sizes == SIZES
        assert log.rcs("finalize") == [ReturnCode.OK]
        assert _acks(producer, target) == list(range(len(SIZES)))
    # The window was used, and never exceeded.
    assert max(producer.in_flight_at_produce) == window - 1


async def test_a_window_of_one_is_stop_and_wait() -> None:
    recorder = Recorder()
    producer = _Producer("s", SIZES[:5])
    with trio.fail_after(20):
        async with _sites(recorder) as (tx, _):
            rc, _ = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0"], producer, None, max_in_flight=1
            )
    assert rc == ReturnCode.OK
    assert producer.in_flight_at_produce == [0] * 6


async def test_process_replies_ending_the_stream_lets_objects_in_flight_be_consumed() -> None:
    """Ended by process_replies at object 2 with a window of 4: objects 3-5
    were sent; every target consumes them (END follows them), and
    process_replies is not called for them."""
    recorder = Recorder()
    producer = _Producer("s", [1000] * 10, end_at=2)
    with trio.fail_after(20):
        async with _sites(recorder, targets=2) as (tx, _):
            rc, result = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0", "rx1"], producer, None, max_in_flight=4
            )
    assert (rc, result) == (ReturnCode.OK, "enough")
    assert len(producer.replies) == 3
    assert producer.next_seq == 6
    for target in ("rx0", "rx1"):
        log = recorder.session(target, "s")
        assert log.seqs == [0, 1, 2, 3, 4, 5]
        assert log.rcs("finalize") == [ReturnCode.OK]
    assert recorder.all_problems() == []


async def test_a_consumer_that_stops_drops_the_objects_in_flight_behind_it() -> None:
    async def stop_at_2(site: str, stream: str, seq: int, *args: Any) -> Any:
        return STOP if seq == 2 else None

    recorder = Recorder()
    producer = _Producer("s", [1000] * 10)
    with trio.fail_after(20):
        async with _sites(recorder, consume_hook=stop_at_2) as (tx, _):
            rc, result = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0"], producer, None, max_in_flight=4
            )
    # Every target ended (with OK): the stream ends after object 2.
    assert (rc, result) == (ReturnCode.OK, None)
    assert _acks(producer, "rx0") == [0, 1, 2]
    log = recorder.session("rx0", "s")
    assert log.seqs == [0, 1, 2]
    assert log.rcs("finalize") == [ReturnCode.OK]
    assert recorder.all_problems() == []


async def test_a_target_that_stops_beside_a_live_one_gets_its_end_rc_for_each_later_object() -> (
    None
):
    async def rx0_stops_at_2(site: str, stream: str, seq: int, *args: Any) -> Any:
        return STOP if site == "rx0" and seq == 2 else None

    recorder = Recorder()
    producer = _Producer("s", [1000] * 8)
    with trio.fail_after(20):
        async with _sites(recorder, targets=2, consume_hook=rx0_stops_at_2) as (tx, _):
            rc, _ = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0", "rx1"], producer, None, max_in_flight=4
            )
    assert rc == ReturnCode.OK
    assert len(producer.replies) == 8
    assert _acks(producer, "rx0") == [0, 1, 2] + [None] * 5
    assert producer.rcs("rx0") == [ReturnCode.OK] * 8
    assert _acks(producer, "rx1") == list(range(8))
    assert recorder.session("rx0", "s").seqs == [0, 1, 2]
    assert recorder.session("rx1", "s").seqs == list(range(8))
    assert recorder.all_problems() == []


async def test_abort_signal_with_objects_in_flight_aborts_every_target_once() -> None:
    fl_ctx = FLContext(identity_name="tx")

    async def abort_at_2(phase: str, seq: int) -> None:
        if phase == "process_replies" and seq == 2:
            fl_ctx.get_run_abort_signal().trigger("stop")

    recorder = Recorder()
    producer = _Producer("s", [1000] * 10, hook=abort_at_2)
    with trio.fail_after(20):
        async with _sites(recorder, targets=2) as (tx, _):
            rc, _ = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0", "rx1"], producer, fl_ctx,
                max_in_flight=4,
            )  # fmt: skip
    assert rc == ReturnCode.TASK_ABORTED
    assert len(producer.replies) == 3
    for target in ("rx0", "rx1"):
        log = recorder.session(target, "s")
        assert log.rcs("finalize") == [ReturnCode.TASK_ABORTED]
        assert log.seqs == list(range(len(log.seqs)))  # a prefix, in order
        assert len(log.seqs) <= producer.next_seq
    assert recorder.all_problems() == []


async def test_a_consumer_that_times_out_with_objects_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The reply to object 1 does not come within its timeout: TIMEOUT for
    it, the target's session aborted with TIMEOUT, finalized once."""

    async def stall_at_1(site: str, stream: str, seq: int, *args: Any) -> Any:
        if seq == 1:
            await trio.sleep(1000)
        return None

    recorder = Recorder()
    producer = _Producer("s", [1000] * 8, timeout=5.0)
    with trio.fail_after(200):
        async with _sites(recorder, consume_hook=stall_at_1) as (tx, _):
            start = trio.current_time()
            rc, _ = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0"], producer, None, max_in_flight=4
            )
            took = trio.current_time() - start
    assert rc == ReturnCode.TIMEOUT
    assert producer.rcs("rx0") == [ReturnCode.OK, ReturnCode.TIMEOUT]
    assert 5.0 <= took < 20.0
    log = recorder.session("rx0", "s")
    assert log.rcs("finalize") == [ReturnCode.TIMEOUT]
    assert recorder.all_problems() == []


async def test_peer_loss_with_objects_in_flight_finalizes_once() -> None:
    cut: list[Site] = []

    async def lose_at_2(site: str, stream: str, seq: int, *args: Any) -> Any:
        if seq == 2:
            cut[0]._connections["tx"].lose("cut by the test")
        return None

    recorder = Recorder()
    producer = _Producer("s", [1000] * 10)
    with trio.fail_after(20):
        async with _sites(recorder, consume_hook=lose_at_2) as (tx, receivers):
            cut.append(receivers[0])
            rc, _ = await tx.stream_objects(
                CHANNEL, TOPIC, {"stream": "s"}, ["rx0"], producer, None, max_in_flight=4
            )
    assert rc == ReturnCode.COMMUNICATION_ERROR
    # Replies the receiver had queued may be lost with the connection; the
    # stream ends at the first object whose reply says so.
    rcs = producer.rcs("rx0")
    ok = len(rcs) - 1
    assert ok <= 2
    assert rcs == [ReturnCode.OK] * ok + [ReturnCode.COMMUNICATION_ERROR]
    log = recorder.session("rx0", "s")
    assert log.rcs("finalize") == [ReturnCode.COMMUNICATION_ERROR]
    assert recorder.all_problems() == []


@pytest.mark.parametrize("bad", [0, -1, 65, 2.0, True, "4"])
async def test_max_in_flight_must_be_an_int_from_1_to_64(bad: Any) -> None:
    recorder = Recorder()
    with trio.fail_after(10):
        async with _sites(recorder) as (tx, _):
            with pytest.raises(ValueError, match="max_in_flight"):
                await tx.stream_objects(
                    CHANNEL, TOPIC, {"stream": "s"}, ["rx0"], _Producer("s", [1]), None,
                    max_in_flight=bad,
                )  # fmt: skip
    assert recorder.sessions == {}


# ------------------------------------------------------------------ property

FAULTS = ["none", "process_end", "consumer_stop", "consumer_raise", "abort", "produce_raise"]


async def _run_case(
    window: int, count: int, targets: int, fault: str, at: int
) -> tuple[Recorder, _Producer, str | None, list[str]]:
    fl_ctx = FLContext(identity_name="tx")

    async def producer_hook(phase: str, seq: int) -> None:
        if fault == "abort" and phase == "process_replies" and seq == at:
            fl_ctx.get_run_abort_signal().trigger("stop")
        if fault == "produce_raise" and phase == "produce" and seq == at:
            raise RuntimeError("produce failed")

    async def consume_hook(site: str, stream: str, seq: int, *args: Any) -> Any:
        if site == "rx0" and seq == at:
            if fault == "consumer_stop":
                return STOP
            if fault == "consumer_raise":
                raise RuntimeError("consume failed")
        return None

    recorder = Recorder()
    producer = _Producer(
        "s", [100 * (i % 3) + 40_000 * (i % 2) for i in range(count)],
        end_at=at if fault == "process_end" else -1, hook=producer_hook,
    )  # fmt: skip
    names = [f"rx{i}" for i in range(targets)]
    rc: str | None = None
    with trio.fail_after(30):
        async with _sites(recorder, targets=targets, consume_hook=consume_hook) as (tx, _):
            try:
                rc, _ = await tx.stream_objects(
                    CHANNEL, TOPIC, {"stream": "s"}, names, producer, fl_ctx,
                    max_in_flight=window,
                )  # fmt: skip
            except RuntimeError:
                rc = None
    return recorder, producer, rc, names


@given(
    window=st.integers(1, 6),
    count=st.integers(0, 8),
    targets=st.integers(1, 2),
    fault=st.sampled_from(FAULTS),
    at=st.integers(0, 7),
)
def test_any_window_and_fault_point_keeps_order_and_finalizes_once(
    window: int, count: int, targets: int, fault: str, at: int
) -> None:
    recorder, producer, rc, names = trio.run(_run_case, window, count, targets, fault, at)
    assert recorder.all_problems() == []
    assert producer.problems == []
    produced = producer.next_seq
    # The window bounds what is unanswered, and replies are processed in order.
    assert max(producer.in_flight_at_produce, default=0) <= window - 1
    assert len(producer.replies) <= produced
    for index, replies in enumerate(producer.replies):
        assert sorted(replies) == names
        for name in names:
            ack = replies[name].get("ack")
            assert ack is None or ack == index
    for name in names:
        log = recorder.session(name, "s")
        # Each target consumed a prefix of what was produced, in order ...
        assert log.seqs == list(range(len(log.seqs)))
        assert len(log.seqs) <= produced
        # ... and its session, if one was opened, finalized exactly once.
        if log.count("get_consumer"):
            assert len(log.rcs("finalize")) == 1
    fired = at < count or (fault == "produce_raise" and at == count)
    if fault == "none" or not fired:
        assert rc == ReturnCode.OK
        assert len(producer.replies) == count
        for name in names:
            assert recorder.session(name, "s").seqs == list(range(count))
    elif fault == "process_end":
        assert rc == ReturnCode.OK
        assert len(producer.replies) == at + 1
        for name in names:
            assert at + 1 <= len(recorder.session(name, "s").seqs) <= produced
    elif fault == "abort":
        assert rc == ReturnCode.TASK_ABORTED
        assert len(producer.replies) == at + 1
    elif fault == "produce_raise":
        assert rc is None
        assert len(producer.replies) <= at
    else:  # consumer_stop / consumer_raise on rx0
        assert recorder.session("rx0", "s").seqs == list(range(at + 1))
        end_rc = ReturnCode.OK if fault == "consumer_stop" else ReturnCode.EXECUTION_EXCEPTION
        assert recorder.session("rx0", "s").rcs("finalize") == [end_rc]
        if targets == 1:
            assert rc == end_rc
            assert len(producer.replies) == at + 1
        else:
            assert rc == ReturnCode.OK
            assert len(producer.replies) == count
