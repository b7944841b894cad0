"""``BlockingSite``: a :class:`~fedstream.Site` for code that is not written for trio.

The site runs in its own thread, under its own ``trio.run``; each blocking
method hands its call to that run with ``trio.from_thread.run`` and the run's
token, and waits for the result. That makes the methods safe from any thread
at once, and from inside the site's own (plain, worker-thread) callbacks,
which are worker threads of that very run. Only a callback the site runs in
the trio thread itself (``sync_callbacks="inline"``, or an ``async def``)
cannot block on the site; it gets a clear error instead of a deadlock.

Every blocking operation goes through :meth:`BlockingSite._call`, the one
bridge to the trio thread.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ._api import ConsumerFactory, ObjectProducer, StreamableEngine
from ._context import FLContext
from ._engine import Site, open_site
from ._errors import FedstreamError, SiteClosedError
from ._flare import register_engine_class
from ._shareable import Shareable
from ._streamers import ContainerResult, FileResult, ReceivedContainer

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._engine._site import SiteKeywords

__all__ = ["BlockingSite"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The BlockingSite whose trio run this context belongs to (copied into the
#: worker threads that run its callbacks).
_running_engine: contextvars.ContextVar[BlockingSite | None] = contextvars.ContextVar(
    "fedstream_blocking_site", default=None
)

#: Seconds allowed for the site to start (listen and dial its ``connect`` URLs).
DEFAULT_START_TIMEOUT = 30.0


class BlockingSite(StreamableEngine):
    """A site with FLARE's synchronous ``StreamableEngine`` methods.

    ::

        with fedstream.BlockingSite("server", listen="tcp://127.0.0.1:0") as server:
            server.wait_for_peers(["site-1"], timeout=10.0)
            rc, result = server.stream_objects(channel, topic, {}, ["site-1"],
                                               producer, server.new_context())

    It is a :class:`fedstream.StreamableEngine` and, when ``nvflare`` is
    installed, also an ``nvflare.apis.streaming.StreamableEngine`` (a virtual
    subclass), so FLARE's streamers accept it from ``fl_ctx.get_engine()``.

    The options are those of :func:`fedstream.open_site`. Plain callbacks run
    in worker threads (the default ``sync_callbacks="thread"``), where they
    may call this site's blocking methods.

    Resource handling:
        ``close()`` (or leaving the ``with`` block) shuts the site down as
        ``Site.shutdown_streamer`` does, bounded by ``finalize_timeout``, and
        joins the thread, waiting at most ``close_timeout`` seconds for it.
        Called from one of the site's own callbacks, it shuts the site down
        but cannot wait for the thread, which ends when the callback returns.
    """

    def __init__(
        self,
        name: str,
        *,
        listen: str | Sequence[str] | None = None,
        connect: Sequence[str] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        close_timeout: float | None = None,
        **options: Unpack[SiteKeywords],
    ) -> None:
        register_engine_class(type(self))
        self._name = name
        self._site: Site | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        finalize = float(options.get("finalize_timeout", 10.0))
        self._close_timeout = 4 * finalize + 10 if close_timeout is None else close_timeout
        self._thread = threading.Thread(
            target=self._run,
            args=(listen, connect, options),
            name=f"fedstream-site-{name}",
            daemon=True,
        )
        self._thread.start()
        if not self._started.wait(start_timeout):
            self._closed = True
            raise FedstreamError(f"site {name!r} did not start within {start_timeout} s")
        error = self._startup_error()
        if error is not None:
            self._thread.join(self._close_timeout)
            self._closed = True
            raise error

    # ------------------------------------------------------------ the thread

    def _startup_error(self) -> BaseException | None:
        return self._error

    def _run(self, listen: Any, connect: Any, options: dict[str, Any]) -> None:
        try:
            trio.run(self._main, listen, connect, options)
        except BaseException as exc:  # reported to the constructor if still waiting
            if not self._started.is_set():
                self._error = exc
            else:
                logger.exception("site %s stopped with an error", self._name)
        finally:
            self._started.set()

    async def _main(self, listen: Any, connect: Any, options: dict[str, Any]) -> None:
        _running_engine.set(self)
        async with open_site(self._name, listen=listen, connect=connect, **options) as site:
            site._engine = self
            self._site = site
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._started.set()
                await self._stop.wait()
                await site.shutdown_streamer()

    def _call(self, async_fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await async_fn(*args, **kwargs)`` in the site's trio thread and return its result.

        Raises:
            SiteClosedError: the site is closed (or closes before the call runs).
            RuntimeError: called from the site's own trio thread, where
                blocking would deadlock.
        """
        token = self._token
        if token is None or self._closed:
            raise SiteClosedError(f"site {self._name!r} is closed")
        if self._in_trio_thread():
            raise RuntimeError(
                f"blocking call on site {self._name!r} from its own trio thread; "
                "use the async Site methods there, or plain callbacks (run in worker threads)"
            )
        try:
            return trio.from_thread.run(
                functools.partial(async_fn, *args, **kwargs), trio_token=token
            )
        except trio.RunFinishedError as exc:
            raise SiteClosedError(f"site {self._name!r} is closed") from exc

    def _call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        token = self._token
        if token is None or self._closed:
            raise SiteClosedError(f"site {self._name!r} is closed")
        if self._in_trio_thread():
            return fn(*args)
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=token)
        except trio.RunFinishedError as exc:
            raise SiteClosedError(f"site {self._name!r} is closed") from exc

    def _in_trio_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _from_own_callback(self) -> bool:
        return _running_engine.get() is self

    @property
    def site(self) -> Site:
        """The async :class:`~fedstream.Site` underneath (use it only from its trio thread)."""
        if self._site is None:
            raise SiteClosedError(f"site {self._name!r} is closed")
        return self._site

    # ------------------------------------------------------------ state

    @property
    def name(self) -> str:
        return self._name

    @property
    def address(self) -> str:
        """The first URL the site listens on (port 0 resolved).

        Raises:
            FedstreamError: the site listens nowhere (as :attr:`Site.address`).
        """
        return self.site.address

    @property
    def addresses(self) -> list[str]:
        return self._site.addresses if self._site is not None else []

    @property
    def peers(self) -> list[str]:
        """Names of the sites connected right now."""
        return self._call_sync(lambda: self.site.peers) if not self._closed else []

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_for_peers(self, names: Iterable[str], timeout: float = 10.0) -> None:
        """Return once every site in ``names`` is connected.

        Raises:
            TimeoutError: they were not all connected within ``timeout`` seconds.
            SiteClosedError: the site shut down while waiting.
        """
        wanted = list(names)

        async def wait() -> None:
            with trio.move_on_after(timeout) as scope:
                await self.site.wait_for_peers(wanted)
            if scope.cancelled_caught:
                missing = sorted(set(wanted) - set(self.site.peers))
                raise TimeoutError(f"not connected to {missing} after {timeout} s")

        self._call(wait)

    def connect(self, url: str) -> str:
        """Dial the site at ``url``; return its name."""
        return self._call(lambda: self.site.connect(url))

    def new_context(self) -> FLContext:
        """A fresh context for this site: ``get_engine()`` is this site, identity set."""
        return FLContext(identity_name=self._name, engine=self)

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Drop an event: FLARE components fire events (log events, mostly) through
        their engine, and fedstream has no event bus. Logged at debug level."""
        logger.debug("site %s: event %r dropped (no event bus)", self._name, event_type)

    # ------------------------------------------------------------ streaming

    def register_stream_processing(
        self,
        channel: str,
        topic: str,
        factory: ConsumerFactory,
        stream_done_cb: Callable[..., Any] | None = None,
        consumed_cb: Callable[..., Any] | None = None,
        **cb_kwargs: Any,
    ) -> None:
        """As :meth:`fedstream.Site.register_stream_processing`."""
        self._call_sync(
            functools.partial(
                self.site.register_stream_processing,
                channel,
                topic,
                factory,
                stream_done_cb,
                consumed_cb,
                **cb_kwargs,
            )
        )

    def stream_objects(
        self,
        channel: str,
        topic: str,
        stream_ctx: dict[str, Any],
        targets: list[str],
        producer: ObjectProducer,
        fl_ctx: FLContext,
        optional: bool = False,
        secure: bool = False,
    ) -> tuple[str, Any]:
        """Stream the producer's objects to ``targets``; block until done; return ``(rc, result)``.

        As :meth:`fedstream.Site.stream_objects`, including its errors.
        """
        return self._call(
            self.site.stream_objects,
            channel,
            topic,
            stream_ctx,
            targets,
            producer,
            fl_ctx,
            optional,
            secure,
        )

    def stream_no_wait(
        self,
        channel: str,
        topic: str,
        stream_ctx: dict[str, Any],
        targets: list[str],
        producer: ObjectProducer,
        fl_ctx: FLContext,
        optional: bool = False,
        secure: bool = False,
    ) -> concurrent.futures.Future[tuple[str, Any]]:
        """Start ``stream_objects`` in the site's thread; return a Future of ``(rc, result)``.

        The Future fails with the error ``stream_objects`` would raise, or
        with :class:`SiteClosedError` if the site closes first.
        """
        future: concurrent.futures.Future[tuple[str, Any]] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()

        async def run() -> None:
            try:
                result = await self.site.stream_objects(
                    channel, topic, stream_ctx, targets, producer, fl_ctx, optional, secure
                )
            except Exception as exc:
                future.set_exception(exc)
            except BaseException:
                future.set_exception(SiteClosedError(f"site {self._name!r} closed"))
                raise
            else:
                future.set_result(result)

        def start() -> None:
            if self._nursery is None or self.site.closed:
                raise SiteClosedError(f"site {self._name!r} is closed")
            self._nursery.start_soon(run)

        self._call_sync(start)
        return future

    # ------------------------------------------------------------ aux

    def register_aux_message_handler(
        self, topic: str, message_handle_func: Callable[..., Any]
    ) -> None:
        """As :meth:`fedstream.Site.register_aux_message_handler`."""
        self._call_sync(self.site.register_aux_message_handler, topic, message_handle_func)

    def send_aux_request(
        self,
        targets: Sequence[str],
        topic: str,
        request: Shareable,
        timeout: float,
        fl_ctx: FLContext | None,
        optional: bool = False,
        secure: bool = False,
    ) -> dict[str, Shareable]:
        """As :meth:`fedstream.Site.send_aux_request`, blocking; returns ``{site: reply}``."""
        return self._call(
            self.site.send_aux_request, targets, topic, request, timeout, fl_ctx, optional, secure
        )

    # ------------------------------------------------ files and containers
    #
    # Each takes the same options as its async counterpart on Site (keyword
    # only there too), so they are passed through unchanged.

    def stream_file(
        self,
        channel: str,
        topic: str,
        targets: Sequence[str],
        path: str | os.PathLike[str],
        **options: Any,
    ) -> FileResult:
        """As :meth:`fedstream.Site.stream_file`, blocking."""
        return self._call(self.site.stream_file, channel, topic, targets, path, **options)

    def stream_directory(
        self,
        channel: str,
        topic: str,
        targets: Sequence[str],
        path: str | os.PathLike[str],
        **options: Any,
    ) -> list[FileResult]:
        """As :meth:`fedstream.Site.stream_directory`, blocking."""
        return self._call(self.site.stream_directory, channel, topic, targets, path, **options)

    def register_file_receiver(
        self, channel: str, topic: str, directory: str | os.PathLike[str], **options: Any
    ) -> None:
        """As :meth:`fedstream.Site.register_file_receiver` (callbacks run in worker threads)."""
        self._call_sync(
            functools.partial(
                self.site.register_file_receiver, channel, topic, directory, **options
            )
        )

    def stream_container(
        self,
        channel: str,
        topic: str,
        targets: Sequence[str],
        container: dict[Any, Any] | list[Any] | set[Any],
        **options: Any,
    ) -> ContainerResult:
        """As :meth:`fedstream.Site.stream_container`, blocking."""
        return self._call(self.site.stream_container, channel, topic, targets, container, **options)

    def register_container_receiver(
        self,
        channel: str,
        topic: str,
        on_container: Callable[[ReceivedContainer], Any],
        **options: Any,
    ) -> None:
        """As :meth:`fedstream.Site.register_container_receiver`."""
        self._call_sync(
            functools.partial(
                self.site.register_container_receiver, channel, topic, on_container, **options
            )
        )

    # ------------------------------------------------------------ closing

    def shutdown_streamer(self) -> None:
        """Stop every stream with ``SERVICE_UNAVAILABLE`` and close the site (as :meth:`close`)."""
        self.close()

    def close(self) -> None:
        """Shut the site down and join its thread (bounded). Idempotent."""
        if self._closed:
            return
        if self._in_trio_thread():
            raise RuntimeError("close() a BlockingSite from outside its own trio thread")
        if self._token is not None and self._site is not None:
            try:
                self._call(self.site.shutdown_streamer)
                trio.from_thread.run_sync(self._request_stop, trio_token=self._token)
            except (SiteClosedError, trio.RunFinishedError):
                pass
        self._closed = True
        if self._from_own_callback():
            return  # the thread ends once this callback returns
        self._thread.join(self._close_timeout)
        if self._thread.is_alive():
            logger.error(
                "site %s: thread still running %s s after close", self._name, self._close_timeout
            )

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def __enter__(self) -> BlockingSite:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.address}"
        return f"<BlockingSite {self._name!r} {state}>"
