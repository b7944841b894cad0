"""Calling user code: coroutine functions in trio, plain functions in a thread."""

from __future__ import annotations

import contextvars
import enum
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["CallbackRunner", "SyncMode", "current_session"]

#: The session (sending or receiving) whose callbacks run in this context.
#: trio copies contexts into worker threads and back through trio.from_thread,
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

    def __init__(self, mode: SyncMode = SyncMode.THREAD, max_threads: float = 40) -> None:
        self.mode = SyncMode(mode)
        self._limiter = trio.CapacityLimiter(max_threads)
        # Whether each callback is a coroutine function, keyed by the function
        # behind a bound method: the check is on the per-object hot path.
        self._async: dict[Any, bool] = {}

    async def __call__(
        self, fn: Callable[..., Any], *args: Any, abandon_on_cancel: bool = False, **kwargs: Any
    ) -> Any:
        key = getattr(fn, "__func__", fn)
        is_async = self._async.get(key)
        if is_async is None:
            is_async = self._async[key] = _is_async(fn)
            if len(self._async) > 4096:
                self._async.clear()
        if is_async:
            return await fn(*args, **kwargs)
        if self.mode is SyncMode.INLINE:
            result = fn(*args, **kwargs)
        else:
            result = await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs),
                limiter=self._limiter,
                abandon_on_cancel=abandon_on_cancel,
            )
        if inspect.isawaitable(result):
            result = await result
        return result


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )
