"""A site's own worker threads for plain user callbacks.

Why not ``trio.to_thread.run_sync``: on the default path every object costs
one worker-thread hop per side, and to_thread's per-call machinery (a
``CapacityLimiter`` round with its own checkpoint, trio's ``ThreadCache``,
the message loop that serves ``trio.from_thread`` through the waiting task)
costs more than the hand-off itself. A hop here is:

* the task hands the job to an idle thread of the pool (releasing the lock
  that thread sleeps on: one wake-up), or starts a thread if fewer than
  ``max_threads`` exist, or else queues the job, holding no thread, for the
  next thread that finishes one;
* the thread runs the call in a copy of the task's context and hands the
  outcome back. If the task is parked, that is one ``TrioToken.run_sync_soon``
  that reschedules it (the second wake-up). If trio had nothing else to run
  and no other call of the pool was in flight when the job was handed over,
  the task instead waits for the thread on a lock, for at most
  :data:`FAST_WAIT` seconds, before parking: a quick callback then returns
  without trio's wake-up socket, its ``epoll_wait`` and two scheduler rounds
  (a third to a half of a hop's cost, measured in-process). That wait can
  delay other tasks' I/O by at most ``FAST_WAIT``, and only when trio was
  idle anyway; with other calls in flight it is skipped, since blocking the
  trio thread then costs the other sessions more than it saves this one.

Whatever the callback queued for trio with ``run_sync_soon`` (an abort
signal's listener ending the session, say) runs before the task resumes,
on either path: the engine relies on that order to see a session ended by
its own callback before acting on the callback's result.

Threads are reused most-recently-idle first (a warm thread, usually the one
the same session used for its previous hop), leave after
:data:`IDLE_TIMEOUT` seconds without work, and all leave when the pool is
closed (:meth:`WorkerPool.aclose`), except those still running a callback,
which leave when it returns.

``trio.from_thread.run`` / ``run_sync`` / ``check_cancelled`` work inside a
callback without a ``trio_token``, as in a thread of ``trio.to_thread``
started with ``abandon_on_cancel=True``: the thread carries trio's record of
the run it serves.
"""

from __future__ import annotations

import collections
import contextvars
import inspect
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

import outcome
import sniffio
import trio

#: trio's per-thread record of the run a worker thread serves: with it set,
#: trio.from_thread works in the thread without a trio_token. (Private to
#: trio; tests/test_workers.py pins the behaviour. Without it, callbacks
#: still reach trio by passing trio_token.)
_TRIO_THREAD_DATA: Any
try:
    from trio._threads import PARENT_TASK_DATA as _TRIO_THREAD_DATA
except ImportError:  # pragma: no cover - another trio layout
    _TRIO_THREAD_DATA = None

__all__ = ["FAST_WAIT", "IDLE_TIMEOUT", "WorkerPool", "not_awaitable"]

logger = logging.getLogger(__name__)

#: Seconds a task waits on a lock for its job's thread (when trio had nothing
#: else to run and no other call of the pool was in flight) before it parks
#: and lets trio wait for the thread instead. A hop's median is about 50 us
#: on a busy 2-core VM; 99.7% of them returned within this bound.
FAST_WAIT: Final = 0.0005
#: Seconds an idle thread waits for a job before it leaves.
IDLE_TIMEOUT: Final = 10.0
#: Seconds :meth:`WorkerPool.aclose` waits for its idle threads to leave.
CLOSE_TIMEOUT: Final = 5.0

_QUEUED, _RUNNING, _DONE, _DROPPED = range(4)

_names = itertools.count()


class _Job:
    """One call: where it is, and who waits for its outcome.

    ``state`` moves QUEUED -> RUNNING -> DONE, or QUEUED -> DROPPED (its task
    was cancelled before a thread took it); it and ``parked`` change only
    under the pool's lock. ``task`` and ``returned`` are touched only in the
    trio thread.
    """

    __slots__ = (
        "call",
        "cancel_register",
        "context",
        "done",
        "outcome",
        "parked",
        "returned",
        "state",
        "task",
        "token",
    )

    def __init__(
        self,
        call: Callable[[], Any],
        context: contextvars.Context,
        token: trio.lowlevel.TrioToken,
        task: trio.lowlevel.Task,
    ) -> None:
        self.call = call
        self.context = context
        self.token = token
        self.state = _QUEUED
        self.outcome: outcome.Outcome[Any] | None = None
        #: The task waiting for the outcome; None once it stopped waiting.
        self.task: trio.lowlevel.Task | None = task
        #: Whether the task parked in trio (the thread then reschedules it).
        self.parked = False
        #: Released by the thread when it returns, for a task in its fast wait.
        self.done: threading.Lock | None = None
        #: Set when the call returns, for a cancelled task waiting out its grace.
        self.returned: trio.Event | None = None
        #: For trio.from_thread.check_cancelled in the thread.
        self.cancel_register: list[Any] = [None]


class _Worker:
    __slots__ = ("job", "thread", "wake")

    def __init__(self) -> None:
        self.job: _Job | None = None
        #: Held while the thread sleeps; released to hand it ``job`` (None: leave).
        self.wake = threading.Lock()
        self.wake.acquire()
        self.thread: threading.Thread | None = None


class WorkerPool:
    """At most ``max_threads`` threads running plain callbacks for one site.

    Error handling:
        Whatever the call raises (``BaseException`` included) is raised in
        the calling task, with its traceback. A call whose task stopped
        waiting has its outcome dropped (an exception is logged at debug).

    Resource handling:
        Every thread, idle, busy or abandoned, counts under ``max_threads``
        until it leaves. A task waiting for a thread holds none. After
        :meth:`aclose`, a thread leaves as soon as it has no job.
    """

    def __init__(self, max_threads: float, *, fast_wait: float = FAST_WAIT) -> None:
        if not (max_threads >= 1):
            raise ValueError("max_threads must be at least 1")
        self.max_threads = max_threads
        self.fast_wait = fast_wait
        self._lock = threading.Lock()
        #: Threads alive, busy or idle (bounded by max_threads).
        self._threads = 0
        #: Idle threads, the most recently idle last.
        self._idle: list[_Worker] = []
        #: Jobs waiting for a thread, oldest first.
        self._queue: collections.deque[_Job] = collections.deque()
        self._closed = False
        #: Threads told to leave by aclose that have not left yet.
        self._leaving = 0
        #: Set (through the token) when the last of those has left.
        self._all_left: trio.Event | None = None
        self._token_at_close: trio.lowlevel.TrioToken | None = None

    @property
    def threads(self) -> int:
        """Threads alive now (for tests and statistics)."""
        return self._threads

    @trio.lowlevel.enable_ki_protection
    async def run(self, call: Callable[[], Any], grace: float) -> Any:
        """Run ``call()`` in a thread of the pool and return its result.

        Cancelled while the job waits for a thread, the call never runs.
        Cancelled while it runs: with ``grace <= 0`` the task raises
        ``Cancelled`` at once, leaving the thread to finish; otherwise it
        waits (shielded) up to ``grace`` seconds for the call to return,
        then logs that it abandons the thread, and raises ``Cancelled``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        context = contextvars.copy_context()
        if context.get(sniffio.current_async_library_cvar, None) is not None:
            context.run(sniffio.current_async_library_cvar.set, None)
        job = _Job(call, context, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        # (Read without the lock: a hint. Another call in flight means other
        # sessions are active, whose I/O a blocked trio thread would delay.)
        fast_wait = (
            self.fast_wait > 0
            and self._threads == len(self._idle)
            and _trio_is_idle(self.fast_wait)
        )
        if fast_wait:
            job.done = threading.Lock()
            job.done.acquire()
        worker: _Worker | None = None
        start = False
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
                worker.job = job
                job.state = _RUNNING
            elif self._threads < self.max_threads:
                self._threads += 1
                job.state = _RUNNING
                start = True
            else:
                self._queue.append(job)
        if worker is not None:
            worker.wake.release()
        elif start:
            self._start_thread(job)
        if fast_wait and job.state == _RUNNING:
            assert job.done is not None
            job.done.acquire(timeout=self.fast_wait)  # releases the GIL
        with self._lock:
            finished = job.state == _DONE
            job.parked = True
        if finished:
            if trio.lowlevel.current_statistics().run_sync_soon_queue_size == 0:
                job.task = None
                assert job.outcome is not None
                # A schedule point, as every trio call that may block gives
                # (the cancellation point was taken on the way in): a loop of
                # quick callbacks must not starve the other tasks.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return job.outcome.unwrap()
            # The call queued work for trio (an abort signal's listener, say):
            # that work runs first, as it would if the thread had delivered.
            job.token.run_sync_soon(_deliver, job)

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            job.cancel_register[0] = raise_cancel
            with self._lock:
                state = job.state
                if state == _QUEUED:
                    self._queue.remove(job)
                    job.state = _DROPPED
                elif state == _DONE:
                    # Its outcome is on the way (run_sync_soon): take it.
                    return trio.lowlevel.Abort.FAILED
            job.task = None
            if state == _RUNNING and grace > 0:
                # Set by _deliver when the call returns.
                job.returned = trio.Event()
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            return await trio.lowlevel.wait_task_rescheduled(abort)
        except trio.Cancelled:
            returned = job.returned
            if returned is None:
                raise  # never ran, or the caller abandons it at once
            with trio.CancelScope(shield=True), trio.move_on_after(grace):
                await returned.wait()
            if not returned.is_set():
                logger.error(
                    "%s did not return within %s s of its session ending: abandoning its thread",
                    getattr(call, "func", call),
                    grace,
                )
            raise

    async def aclose(self) -> None:
        """Tell every thread to leave once it has no job, and wait (bounded)
        for the idle ones to be gone.

        Threads busy with a callback (an abandoned one, or one that is
        closing its own site) leave when it returns. Calls made after this
        still run, each in a thread that leaves afterwards.
        """
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            for worker in idle:
                worker.job = None
            # (Once closed, no thread goes idle again: only the first call finds any.)
            if idle:
                self._leaving = len(idle)
                self._all_left = all_left = trio.Event()
                self._token_at_close = trio.lowlevel.current_trio_token()
        if not idle:
            return
        for worker in idle:
            worker.wake.release()
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await all_left.wait()
        for worker in idle:
            if worker.thread is not None:
                # Past the pool's code: only the thread's own exit is left.
                worker.thread.join(0.1)

    # ------------------------------------------------------------ threads

    def _start_thread(self, job: _Job) -> None:
        worker = _Worker()
        worker.job = job
        worker.wake.release()
        thread = threading.Thread(
            target=self._work,
            args=(worker,),
            name=f"fedstream-callback-{next(_names)}",
            daemon=True,
        )
        worker.thread = thread
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads -= 1
                job.state = _DROPPED
            raise

    def _work(self, worker: _Worker) -> None:
        data = _TRIO_THREAD_DATA
        if data is not None:
            data.abandon_on_cancel = True  # from_thread.run goes to the system nursery
            data.task_register = [None]
        while True:
            # Sleep until handed a job (or told to leave), at most IDLE_TIMEOUT.
            if not worker.wake.acquire(timeout=IDLE_TIMEOUT):
                with self._lock:
                    if worker in self._idle:
                        self._idle.remove(worker)
                        self._threads -= 1
                        return
                worker.wake.acquire()  # a job, or leave, is being handed over
            job = worker.job
            if job is None:
                self._leave()
                return
            leaving = False
            while job is not None:
                if data is not None:
                    data.token = job.token
                    data.cancel_register = job.cancel_register
                result = outcome.capture(job.context.run, not_awaitable_call, job.call)
                with self._lock:
                    job.state = _DONE
                    job.outcome = result
                    parked = job.parked
                    # This thread's next job, or it is idle (or leaves) from now on.
                    done = job
                    job = worker.job = self._queue.popleft() if self._queue else None
                    if job is not None:
                        job.state = _RUNNING
                    elif self._closed:
                        self._threads -= 1
                        leaving = True
                    else:
                        self._idle.append(worker)
                # The waiting task is woken last, right before this thread
                # blocks: it then finds the GIL free instead of waiting for it.
                _hand_back(done, parked)
            if leaving:
                return

    def _leave(self) -> None:
        """Account for a thread told to leave by :meth:`aclose`."""
        with self._lock:
            self._threads -= 1
            self._leaving -= 1
            last = self._leaving == 0
        if last and self._all_left is not None and self._token_at_close is not None:
            try:
                self._token_at_close.run_sync_soon(self._all_left.set)
            except trio.RunFinishedError:
                pass


def _hand_back(job: _Job, parked: bool) -> None:
    """In the worker thread: wake the task waiting for ``job``'s outcome."""
    if not parked:
        if job.done is not None:
            job.done.release()
        return
    try:
        job.token.run_sync_soon(_deliver, job)
    except trio.RunFinishedError:
        _drop(job)


def _deliver(job: _Job) -> None:
    """In the trio thread: hand the outcome to the waiting task, if any."""
    task = job.task
    if task is not None:
        job.task = None
        assert job.outcome is not None
        trio.lowlevel.reschedule(task, job.outcome)
    else:
        if job.returned is not None:
            job.returned.set()
        _drop(job)


def _drop(job: _Job) -> None:
    result = job.outcome
    if isinstance(result, outcome.Error) and not isinstance(result.error, trio.Cancelled):
        logger.debug("a callback nobody waits for any more raised", exc_info=result.error)


def not_awaitable(result: Any) -> Any:
    """Refuse an awaitable returned by a plain callback in a worker thread
    (closing a coroutine, so that it warns of nothing)."""
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise TypeError("a plain callback run in a worker thread returned an awaitable")
    return result


def not_awaitable_call(call: Callable[[], Any]) -> Any:
    """``call()``, refusing an awaitable result."""
    return not_awaitable(call())


def _trio_is_idle(horizon: float) -> bool:
    """Whether trio has nothing to run now, nor a deadline within ``horizon`` seconds."""
    stats = trio.lowlevel.current_statistics()
    return (
        stats.tasks_runnable == 0
        and stats.run_sync_soon_queue_size == 0
        and not stats.seconds_to_next_deadline < horizon
    )
