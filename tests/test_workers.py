"""The worker-thread pool behind plain callbacks (``_engine/_workers.py``).

What ``trio.to_thread.run_sync`` guaranteed the engine, the pool must too:
a bound on threads whatever the load, cancellation that waits out a grace
period and then abandons (logged), contexts copied in, ``trio.from_thread``
usable from the callback, exceptions with their tracebacks, awaitables
refused, and no thread left behind once the site is closed.
"""

from __future__ import annotations

import contextvars
import gc
import itertools
import logging
import socket
import threading
import traceback
import warnings
from typing import Any

import pytest
import trio
import trio.testing

from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    open_site,
)
from fedstream._engine import _workers
from fedstream._engine._callbacks import CallbackRunner, current_session
from fedstream._engine._workers import WorkerPool

_ids = itertools.count()

_var: contextvars.ContextVar[str] = contextvars.ContextVar("test_workers_var", default="unset")


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fedstream-callback-")]


async def _wait_for(predicate: Any, limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.005)


# ================================================================ results


async def test_results_exceptions_and_tracebacks_come_back_to_the_task() -> None:
    pool = WorkerPool(4)

    def deep_failure() -> None:
        raise ValueError("from the thread")

    def call() -> None:
        deep_failure()

    assert await pool.run(lambda: 41 + 1, 1.0) == 42
    with pytest.raises(ValueError, match="from the thread") as info:
        await pool.run(call, 1.0)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "call" in frames
    assert "deep_failure" in frames
    await pool.aclose()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_keyboard_interrupt_and_system_exit_reach_the_task_and_the_pool_lives_on(
    exc_type: type[BaseException],
) -> None:
    pool = WorkerPool(1)

    def call() -> None:
        raise exc_type()

    with pytest.raises(exc_type):
        await pool.run(call, 1.0)
    # The one thread survived it and serves the next call.
    assert await pool.run(threading.get_ident, 1.0) != threading.get_ident()
    assert pool.threads == 1
    await pool.aclose()


async def test_a_plain_callback_returning_an_awaitable_is_refused_without_a_warning() -> None:
    pool = WorkerPool(1)

    async def later() -> None:
        pass  # pragma: no cover

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="returned an awaitable"):
            await pool.run(later, 1.0)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    await pool.aclose()


async def test_the_callback_runs_in_a_copy_of_the_task_context() -> None:
    runner = CallbackRunner()
    _var.set("from the task")
    session = object()
    token = current_session.set(session)
    try:

        def call() -> tuple[str, object]:
            seen = (_var.get(), current_session.get())
            _var.set("changed in the thread")
            return seen

        assert await runner(call) == ("from the task", session)
        assert _var.get() == "from the task"  # the thread's change stays there
    finally:
        current_session.reset(token)
        await runner.aclose()


async def test_a_thread_hands_its_work_for_trio_in_before_its_result() -> None:
    """Work the callback queued with run_sync_soon runs before the caller
    resumes (an abort signal's listener ends the session before consume's
    reply could be sent), on the fast path too."""
    pool = WorkerPool(2)
    token = trio.lowlevel.current_trio_token()
    order: list[str] = []

    def call() -> None:
        token.run_sync_soon(order.append, "queued by the callback")

    for _ in range(20):
        order.clear()
        await pool.run(call, 1.0)
        order.append("caller resumed")
        assert order == ["queued by the callback", "caller resumed"]
    await pool.aclose()


async def test_a_hop_wakes_trio_at_most_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A returning call reaches its task through one run_sync_soon at most
    (none when the task was still waiting on its lock)."""
    pool = WorkerPool(2)
    await pool.run(int, 1.0)  # the thread exists
    token = trio.lowlevel.current_trio_token()
    real = type(token).run_sync_soon
    sent = [0]

    def counting(self: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
        sent[0] += 1
        real(self, fn, *args, **kwargs)

    monkeypatch.setattr(type(token), "run_sync_soon", counting)
    calls = 50
    for _ in range(calls):
        await pool.run(int, 1.0)
    monkeypatch.undo()
    assert sent[0] <= calls
    await pool.aclose()


async def test_consecutive_hops_of_one_task_reuse_one_warm_thread() -> None:
    pool = WorkerPool(8)
    idents = {await pool.run(threading.get_ident, 1.0) for _ in range(30)}
    assert len(idents) == 1
    assert pool.threads == 1
    await pool.aclose()


# ================================================================ trio.from_thread


async def test_trio_from_thread_works_in_a_callback_without_a_token() -> None:
    pool = WorkerPool(2)
    _var.set("task value")
    event = trio.Event()

    async def in_trio(x: int) -> tuple[int, str]:
        await trio.sleep(0)
        return x * 2, _var.get()

    def call() -> tuple[Any, ...]:
        doubled = trio.from_thread.run(in_trio, 21)
        trio.from_thread.run_sync(event.set)
        seven = trio.from_thread.run_sync(lambda: 7)
        trio.from_thread.check_cancelled()  # not cancelled: returns
        return doubled, seven

    assert await pool.run(call, 1.0) == ((42, "task value"), 7)
    assert event.is_set()
    await pool.aclose()


async def test_trio_from_thread_with_a_token_works_in_a_callback() -> None:
    pool = WorkerPool(1)
    token = trio.lowlevel.current_trio_token()

    async def in_trio() -> str:
        await trio.sleep(0)
        return "ok"

    assert await pool.run(lambda: trio.from_thread.run(in_trio, trio_token=token), 1.0) == "ok"
    await pool.aclose()


async def test_from_thread_check_cancelled_sees_the_session_cancelled() -> None:
    pool = WorkerPool(1)
    started = threading.Event()
    seen: list[str] = []

    def call() -> None:
        started.set()
        for _ in range(500):
            try:
                trio.from_thread.check_cancelled()
            except trio.Cancelled:
                seen.append("cancelled")
                return
            threading.Event().wait(0.01)

    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:

            async def caller() -> None:
                await pool.run(call, 5.0)

            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait, 5)
            nursery.cancel_scope.cancel()
    assert seen == ["cancelled"]
    await pool.aclose()


# ================================================================ bounds


async def test_threads_stay_within_max_threads_under_many_concurrent_callers() -> None:
    """30 callers, 3 threads: never more than 3 calls at once nor 3 threads,
    callers waiting for a thread hold none, and every call runs once."""
    max_threads, callers = 3, 30
    pool = WorkerPool(max_threads)
    baseline = len(_pool_threads())
    lock = threading.Lock()
    running = [0]
    peak = [0]
    ran: list[int] = []

    def call(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.005)
        with lock:
            running[0] -= 1
            ran.append(i)
        return i

    results: list[int] = []
    max_seen = [0]

    async def caller(i: int) -> None:
        results.append(await pool.run(lambda: call(i), 5.0))
        max_seen[0] = max(max_seen[0], len(_pool_threads()) - baseline, pool.threads)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(callers):
                nursery.start_soon(caller, i)
    assert sorted(results) == list(range(callers))
    assert sorted(ran) == list(range(callers))
    assert peak[0] <= max_threads
    assert max_seen[0] <= max_threads
    await pool.aclose()
    assert len(_pool_threads()) == baseline


async def test_a_call_cancelled_while_waiting_for_a_thread_never_runs() -> None:
    pool = WorkerPool(1)
    release = threading.Event()
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run, lambda: release.wait(10), 5.0)
        await _wait_for(lambda: pool.threads == 1)
        with trio.move_on_after(0.05):
            await pool.run(lambda: ran.append("cancelled one"), 5.0)
        nursery.start_soon(pool.run, lambda: ran.append("next one"), 5.0)
        await trio.sleep(0.02)
        release.set()
    assert ran == ["next one"]
    await pool.aclose()


async def test_unbounded_max_threads_is_accepted() -> None:
    pool = WorkerPool(float("inf"))
    assert await pool.run(lambda: "ok", 1.0) == "ok"
    await pool.aclose()


# ================================================================ cancellation


async def test_a_cancelled_call_is_waited_for_within_its_grace() -> None:
    pool = WorkerPool(1)
    release = threading.Event()
    returned: list[str] = []

    def call() -> None:
        release.wait(10)
        returned.append("returned")

    async def cancel_then_release(scope: trio.CancelScope) -> None:
        await trio.sleep(0.05)
        scope.cancel()
        await trio.sleep(0.2)
        release.set()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(cancel_then_release, scope)
            await pool.run(call, 5.0)
    waited = trio.current_time() - start
    assert scope.cancelled_caught
    assert returned == ["returned"]  # it had returned when the caller went on
    assert 0.2 <= waited < 4.0
    await pool.aclose()


async def test_a_call_that_overstays_its_grace_is_abandoned_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = WorkerPool(2)
    release = threading.Event()
    try:
        start = trio.current_time()
        with trio.move_on_after(0.05):
            await pool.run(lambda: release.wait(10), 0.2)
        waited = trio.current_time() - start
        assert 0.2 <= waited < 3.0
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("abandoning its thread" in message for message in errors)
        # The abandoned thread still counts until it returns.
        assert pool.threads == 1
    finally:
        release.set()
    await pool.aclose()
    await _wait_for(lambda: pool.threads == 0)


async def test_abandon_on_cancel_returns_at_once_and_drops_the_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=_workers.__name__)
    pool = WorkerPool(1)
    release = threading.Event()

    def call() -> None:
        release.wait(10)
        raise RuntimeError("nobody listens")

    start = trio.current_time()
    with trio.move_on_after(0.05):
        await pool.run(call, 0.0)
    assert trio.current_time() - start < 1.0
    release.set()
    await _wait_for(lambda: any("nobody waits" in r.getMessage() for r in caplog.records), limit=5)
    # The thread is free again.
    assert await pool.run(lambda: "next", 1.0) == "next"
    await pool.aclose()


# ================================================================ thread lifetime


async def test_idle_threads_leave_after_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_workers, "IDLE_TIMEOUT", 0.05)
    pool = WorkerPool(4)
    await pool.run(int, 1.0)
    assert pool.threads == 1
    await _wait_for(lambda: pool.threads == 0)
    # A new call starts a new thread.
    assert await pool.run(lambda: "again", 1.0) == "again"
    await pool.aclose()


async def test_after_aclose_a_busy_thread_leaves_when_its_call_returns() -> None:
    pool = WorkerPool(2)
    baseline = len(_pool_threads())
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run, lambda: release.wait(10), 5.0)
        await _wait_for(lambda: pool.threads == 1)
        await pool.run(int, 1.0)  # a second, idle thread
        await pool.aclose()
        assert pool.threads == 1  # the idle one left at once
        release.set()
    await _wait_for(lambda: pool.threads == 0)
    await _wait_for(lambda: len(_pool_threads()) == baseline)
    # Calls after aclose still run, and leave no thread behind.
    assert await pool.run(lambda: "late", 1.0) == "late"
    await _wait_for(lambda: len(_pool_threads()) == baseline)


class _Producer(ObjectProducer):
    def __init__(self, count: int) -> None:
        self.count = count

    def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        if self.count == 0:
            return None
        self.count -= 1
        return Shareable(n=self.count), 10.0

    def process_replies(self, replies: dict[str, Shareable], *args: Any) -> Any:
        return None


class _Consumer(ObjectConsumer):
    def consume(self, shareable: Shareable, *args: Any) -> tuple[bool, Shareable | None]:
        return True, None


class _Factory(ConsumerFactory):
    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _Consumer()


async def test_no_worker_thread_is_left_once_open_site_exits() -> None:
    before = threading.active_count()
    url = f"memory://workers-{next(_ids)}"
    with trio.fail_after(20):
        async with (
            open_site("rx", listen=url) as rx,
            open_site("tx", connect=[url]) as tx,
        ):
            rx.register_stream_processing("c", "t", _Factory())
            await rx.wait_for_peers(["tx"])
            results: list[Any] = []

            async def stream() -> None:
                results.append(await tx.stream_objects("c", "t", {}, ["rx"], _Producer(5), None))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(stream)
            assert results == [(ReturnCode.OK, None)] * 4
            assert _pool_threads()
    # aclose waits for the threads to leave the pool's code and joins each
    # for 0.1 s; on a loaded machine a thread's own exit may take longer.
    await _wait_for(lambda: _pool_threads() == [])
    assert threading.active_count() == before


async def test_quick_calls_in_a_row_still_let_other_tasks_run() -> None:
    """A call that returns within the fast wait still gives trio a schedule
    point: a task whose socket became readable meanwhile runs after a call
    or two, not after the whole loop (review: it waited 300 calls)."""
    pool = WorkerPool(1, fast_wait=0.05)
    plain_a, plain_b = socket.socketpair()
    a, b = plain_a, trio.socket.from_stdlib_socket(plain_b)
    woke_after: list[int] = []
    calls = [0]

    async def reader() -> None:
        await b.recv(1)
        woke_after.append(calls[0])

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                a.send(b"x")  # readable now; trio learns it at its next I/O poll
                for _ in range(200):
                    await pool.run(lambda: None, grace=0)
                    calls[0] += 1
                    if woke_after:
                        break
                nursery.cancel_scope.cancel()
    finally:
        a.close()
        b.close()
        await pool.aclose()
    assert woke_after, "the reader never ran during 200 quick calls"
    assert woke_after[0] <= 5
