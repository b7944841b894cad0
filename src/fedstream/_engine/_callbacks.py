"""Calling user code: coroutine functions in trio, plain functions in a thread
(of the site's own pool, :mod:`._workers`)."""

from __future__ import annotations

import contextvars
import enum
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from ._workers import WorkerPool, not_awaitable

__all__ = ["CallbackRunner", "SyncMode", "current_session", "not_awaitable"]

#: The session (sending or receiving) whose callbacks run in this context.
#: Contexts are copied into worker threads, and back through trio.from_thread,
#: so a callback that calls into the site is recognised wherever it runs.
current_session: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "fedstream_current_session", default=None
)

logger = logging.getLogger(__name__)


class SyncMode(str, enum.Enum):
    """How a site runs plain (non-``async``) user callbacks."""

    #: In a worker thread, so a callback that blocks stalls nothing else (default).
    THREAD = "thread"
    #: Directly in the trio task: fastest, but a blocking callback stalls the site.
    INLINE = "inline"


class CallbackRunner:
    """Runs user callbacks the way the site was configured to.

    ``async def`` callbacks are awaited in the calling task, so cancelling the
    session cancels them at once. Plain callbacks run in a worker thread (or
    inline, with :attr:`SyncMode.INLINE`); a thread cannot be interrupted, so
    cancellation takes effect when it returns, which keeps the guarantee that
    ``finalize`` never overlaps ``consume``.
    """

    def __init__(
        self, mode: SyncMode = SyncMode.THREAD, max_threads: float = 40, grace: float = 30.0
    ) -> None:
        self.mode = SyncMode(mode)
        self._pool = WorkerPool(max_threads)
        #: How long a cancelled plain callback's thread is waited for before
        #: it is abandoned (``finalize_timeout``).
        self.grace = grace
        # Whether each callback is a coroutine function, keyed by the function
        # behind a bound method: the check is on the per-object hot path.
        self._async: dict[Any, bool] = {}

    def is_async(self, fn: Callable[..., Any]) -> bool:
        """Whether ``fn`` is a coroutine function (cached: this is on the hot path)."""
        key = getattr(fn, "__func__", fn)
        is_async = self._async.get(key)
        if is_async is None:
            is_async = self._async[key] = _is_async(fn)
            if len(self._async) > 4096:
                self._async.clear()
        return is_async

    def one_hop(self, *fns: Callable[..., Any]) -> bool:
        """Whether plain callbacks ``fns`` should run together in one worker-thread
        hop (:meth:`call_plain`): all of them are plain and run in threads."""
        return self.mode is SyncMode.THREAD and not any(self.is_async(fn) for fn in fns)

    async def __call__(
        self, fn: Callable[..., Any], *args: Any, abandon_on_cancel: bool = False, **kwargs: Any
    ) -> Any:
        if self.is_async(fn):
            return await fn(*args, **kwargs)
        return await self.call_plain(fn, *args, abandon_on_cancel=abandon_on_cancel, **kwargs)

    async def call_plain(
        self, fn: Callable[..., Any], *args: Any, abandon_on_cancel: bool = False, **kwargs: Any
    ) -> Any:
        """Run the plain function ``fn`` as a plain callback (no coroutine check).

        The engine uses it for a function of its own that calls several user
        callbacks in a row, so they cost one thread hop together.
        """
        if self.mode is SyncMode.INLINE:
            result = fn(*args, **kwargs)
        else:
            result = await self._in_thread(
                functools.partial(fn, *args, **kwargs), 0.0 if abandon_on_cancel else self.grace
            )
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _in_thread(self, call: Callable[[], Any], grace: float) -> Any:
        """Run ``call`` in a worker thread; once cancelled, wait up to ``grace``
        seconds for it to return, then abandon the thread.

        A thread cannot be interrupted. Waiting for it keeps a callback from
        overlapping the session's ``finalize``; abandoning it after ``grace``
        keeps a callback that blocks forever and ignores the abort signal from
        holding its session (and the site's exit) forever. An abandoned thread
        still holds its place under ``max_threads`` until it returns. A call
        cancelled while it waits for a thread never runs.
        """
        return await self._pool.run(call, grace)

    async def aclose(self) -> None:
        """Let the worker threads go: idle ones now (waited for, bounded),
        busy ones when their callback returns."""
        await self._pool.aclose()


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )
