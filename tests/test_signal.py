"""Signal: FLARE semantics, thread safety, and trio wakeups without polling."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from fedstream._context import FLContext, Signal

HANG_GUARD = 5


def _state(sig: Signal) -> tuple[bool, Any, float | None]:
    """Snapshot, so each check reads the signal afresh."""
    return sig.triggered, sig.value, sig.trigger_time


def test_trigger_and_reset() -> None:
    sig = Signal()
    assert _state(sig) == (False, None, None)

    before = time.time()
    sig.trigger("stop")
    triggered, value, when = _state(sig)
    assert (triggered, value) == (True, "stop")
    assert when is not None
    assert before <= when <= time.time()

    sig.reset()
    assert _state(sig) == (False, None, None)

    sig.reset("v")
    assert _state(sig) == (False, "v", None)


def test_trigger_default_value_is_true() -> None:
    sig = Signal()
    sig.trigger()
    assert sig.value is True


def test_parent_semantics() -> None:
    root = Signal()
    mid = Signal(root)
    leaf = Signal(mid)
    assert leaf.parent is mid

    leaf.trigger(1)
    assert [leaf.triggered, mid.triggered, root.triggered] == [True, False, False]
    leaf.reset()

    root.trigger("abort")
    assert mid.triggered
    # value and trigger_time describe the signal itself, not its ancestors
    assert _state(leaf) == (True, None, None)

    leaf.reset()
    assert leaf.triggered, "reset does not clear ancestors"
    root.reset()
    assert _state(leaf)[0] is False


async def test_wait_returns_immediately_if_triggered() -> None:
    sig = Signal()
    sig.trigger()
    with trio.fail_after(HANG_GUARD):
        await sig.wait()
    assert sig._listener_count() == 0


async def test_wait_woken_by_trigger_in_same_task_group() -> None:
    sig = Signal()
    woke = trio.Event()

    async def waiter() -> None:
        await sig.wait()
        woke.set()

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            assert sig._listener_count() == 1
            sig.trigger()
    assert woke.is_set()
    assert sig._listener_count() == 0


async def test_wait_woken_by_raw_os_thread() -> None:
    sig = Signal()
    release = threading.Event()

    def trigger_when_released() -> None:
        release.wait(HANG_GUARD)
        sig.trigger("t")

    thread = threading.Thread(target=trigger_when_released)
    thread.start()
    try:
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sig.wait)
                await trio.testing.wait_all_tasks_blocked()
                assert sig._listener_count() == 1
                release.set()
    finally:
        release.set()
        thread.join(HANG_GUARD)
    assert sig.value == "t"
    assert sig._listener_count() == 0


async def test_wait_woken_by_worker_thread() -> None:
    sig = Signal()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sig.wait)
            await trio.testing.wait_all_tasks_blocked()
            await trio.to_thread.run_sync(sig.trigger)
    assert sig.triggered


async def test_wait_woken_by_ancestor() -> None:
    root = Signal()
    leaf = Signal(Signal(root))
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leaf.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert root._listener_count() == 1
            root.trigger()
    assert root._listener_count() == 0
    assert leaf._listener_count() == 0


async def test_wait_woken_by_self_cleans_up_ancestors() -> None:
    root = Signal()
    leaf = Signal(root)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leaf.wait)
            await trio.testing.wait_all_tasks_blocked()
            leaf.trigger()
    assert not root.triggered
    assert root._listener_count() == 0
    assert leaf._listener_count() == 0


async def test_cancelled_wait_unregisters() -> None:
    root = Signal()
    leaf = Signal(root)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(leaf.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert leaf._listener_count() == 3
            assert root._listener_count() == 3
            nursery.cancel_scope.cancel()
    assert leaf._listener_count() == 0
    assert root._listener_count() == 0
    assert not leaf.triggered


async def test_wait_after_reset_blocks_again(autojump_clock: trio.testing.MockClock) -> None:
    sig = Signal()
    sig.trigger()
    sig.reset()
    with trio.move_on_after(60) as scope:
        await sig.wait()
    assert scope.cancelled_caught
    assert sig._listener_count() == 0


def test_trigger_after_run_finished_is_harmless() -> None:
    sig = Signal()

    async def main() -> None:
        # Leave a listener whose wakeup targets this run, then let the run end.
        token = trio.lowlevel.current_trio_token()

        def wake(_s: Signal) -> None:
            try:
                token.run_sync_soon(lambda: None)
            except trio.RunFinishedError:
                woke_after_run.append(True)

        sig.add_listener(wake)

    woke_after_run: list[bool] = []
    trio.run(main)
    sig.trigger()
    assert woke_after_run == [True]


def test_add_listener_fires_once() -> None:
    sig = Signal()
    calls: list[Signal] = []
    sig.add_listener(calls.append)
    assert calls == []
    sig.trigger()
    sig.trigger()
    assert calls == [sig]
    assert sig._listener_count() == 0


def test_add_listener_when_already_triggered_fires_in_caller_thread() -> None:
    root = Signal()
    leaf = Signal(root)
    root.trigger()
    threads: list[int] = []
    leaf.add_listener(lambda s: threads.append(threading.get_ident()))
    assert threads == [threading.get_ident()]
    assert root._listener_count() == 0
    assert leaf._listener_count() == 0


def test_listener_fires_once_when_child_and_parent_trigger() -> None:
    root = Signal()
    leaf = Signal(root)
    calls: list[Signal] = []
    leaf.add_listener(calls.append)
    leaf.trigger()
    root.trigger()
    assert calls == [leaf], "called with the signal it was added to, once"
    assert root._listener_count() == 0


def test_listener_fires_once_when_parent_triggers_during_child_trigger() -> None:
    """A trigger that runs while another one is delivering must not fire a listener twice."""
    root = Signal()
    leaf = Signal(root)
    calls: list[Signal] = []
    leaf.add_listener(lambda _s: root.trigger())
    leaf.add_listener(calls.append)
    leaf.trigger()
    assert calls == [leaf]


def test_unregister() -> None:
    root = Signal()
    leaf = Signal(root)
    calls: list[Signal] = []
    unregister = leaf.add_listener(calls.append)
    assert root._listener_count() == 1
    unregister()
    unregister()
    assert root._listener_count() == 0
    assert leaf._listener_count() == 0
    root.trigger()
    assert calls == []


def test_listener_rearmed_after_reset() -> None:
    sig = Signal()
    calls: list[Signal] = []
    sig.add_listener(calls.append)
    sig.trigger()
    sig.reset()
    sig.add_listener(calls.append)
    assert len(calls) == 1
    sig.trigger()
    assert len(calls) == 2


def test_raising_listener_is_logged_and_others_still_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sig = Signal()
    calls: list[Signal] = []

    def bad(_s: Signal) -> None:
        raise RuntimeError("boom")

    sig.add_listener(bad)
    sig.add_listener(calls.append)
    with caplog.at_level(logging.ERROR, logger="fedstream._context"):
        sig.trigger()
    assert calls == [sig]
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert str(errors[0]) == "boom"


def test_listener_may_reenter_signal() -> None:
    sig = Signal()
    seen: list[bool] = []

    def check_and_reset(s: Signal) -> None:
        seen.append(s.triggered)
        s.reset()

    sig.add_listener(check_and_reset)
    sig.trigger()
    assert seen == [True]
    assert not sig.triggered


def test_threads_registering_while_parent_triggers() -> None:
    """Every listener fires exactly once, whether added before or after the trigger."""
    root = Signal()
    counts: Counter[int] = Counter()
    counts_lock = threading.Lock()
    n_threads, per_thread = 8, 200
    start = threading.Barrier(n_threads + 1)

    def record(key: int, _signal: Signal) -> None:
        with counts_lock:
            counts[key] += 1

    def register(tid: int) -> None:
        start.wait(HANG_GUARD)
        for i in range(per_thread):
            key = tid * per_thread + i
            Signal(root).add_listener(functools.partial(record, key))

    threads = [threading.Thread(target=register, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    start.wait(HANG_GUARD)
    root.trigger()
    for t in threads:
        t.join(HANG_GUARD)
    assert len(counts) == n_threads * per_thread
    assert set(counts.values()) == {1}
    assert root._listener_count() == 0


async def test_many_threads_trigger_concurrently() -> None:
    sig = Signal()
    calls: list[Signal] = []
    sig.add_listener(calls.append)
    start = threading.Barrier(8)

    def trigger(value: int) -> None:
        start.wait(HANG_GUARD)
        sig.trigger(value)

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(8)]
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sig.wait)
            await trio.testing.wait_all_tasks_blocked()
            for t in threads:
                t.start()
    for t in threads:
        t.join(HANG_GUARD)
    assert calls == [sig]
    assert sig.value in range(8)
    assert sig._listener_count() == 0


def test_fl_context_always_has_a_signal() -> None:
    ctx = FLContext()
    sig = ctx.get_run_abort_signal()
    assert isinstance(sig, Signal)
    assert ctx.get_run_abort_signal() is sig
    assert FLContext().get_run_abort_signal() is not sig

    given = Signal()
    assert FLContext(given).get_run_abort_signal() is given
    other = Signal()
    ctx.set_run_abort_signal(other)
    assert ctx.get_run_abort_signal() is other


def test_fl_context_props() -> None:
    ctx = FLContext(identity_name="site-1", props={"a": 1})
    assert ctx.get_identity_name() == "site-1"
    assert FLContext().get_identity_name("anon") == "anon"
    assert ctx.get_prop("a") == 1
    assert ctx.get_prop("missing", 5) == 5

    assert ctx.set_prop("pub", "x", private=False) is True
    ctx.set_prop("priv", "y")
    public = ctx.get_all_public_props()
    assert public["pub"] == "x"
    assert "priv" not in public
    assert "a" not in public

    ctx.remove_prop("pub")
    ctx.remove_prop("never-set")
    assert ctx.get_prop("pub") is None

    ctx.set_identity_name("site-2")
    assert ctx.get_identity_name() == "site-2"

    assert ctx.get_job_id() is None
    ctx.set_prop("__run_num__", "job-7")
    assert ctx.get_job_id() == "job-7"
    assert ctx.get_engine("none") == "none"
    engine = object()
    ctx.set_prop("__engine__", engine)
    assert ctx.get_engine() is engine


def test_fl_context_peer_context() -> None:
    ctx = FLContext()
    assert ctx.get_peer_context() is None
    peer = FLContext(identity_name="server")
    ctx.set_peer_context(peer)
    assert ctx.get_peer_context() is peer
    ctx.set_peer_context(None)
    assert ctx.get_peer_context() is None


def test_fl_context_props_thread_safe() -> None:
    ctx = FLContext()

    def work(tid: int) -> None:
        for i in range(500):
            ctx.set_prop(f"{tid}-{i}", i, private=False)
            ctx.get_all_public_props()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD)
    assert len(ctx.get_all_public_props()) == 4 * 500
