"""A site: one named participant that listens, dials, sends and receives streams.

``open_site`` owns a nursery in which everything of the site runs: listeners,
one task per connection, and (inside each connection's nursery) the receiver
sessions the peer opened. ``stream_objects`` runs in the caller's task, so the
caller's cancel scopes apply to it as well.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypedDict

import trio

from .._api import ConsumerFactory, ObjectProducer, StreamContextKey
from .._context import FLContext, Signal
from .._errors import (
    ConnectionLostError,
    FedstreamError,
    HandshakeError,
    SiteClosedError,
    UnknownTargetError,
)
from .._flare import adapt_factory, adapt_producer, bridge_abort_signal
from .._shareable import ReturnCode, Shareable
from .._transport import get_transport
from .._wire import DEFAULT_MAX_FRAME_SIZE, Data, Done, ErrorCode, FrameProtocol, GoAway, Hello
from ._aux import AUX_CHANNEL, AuxEndpoint
from ._callbacks import CallbackRunner, SyncMode, current_session
from ._connection import Connection, ReceiveHandler, accept_handshake, dial_handshake
from ._options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FINALIZE_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_OBJECT_SIZE,
    DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER,
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_PEER_TIMEOUT,
    DEFAULT_WINDOW,
    SiteOptions,
)
from ._receiver import ReceiverSession, Registration
from ._sender import StreamSession, TargetLink
from ._stats import ConnectionStats

if TYPE_CHECKING:  # Unpack for **kwargs is in typing from Python 3.11 (PEP 692)
    from typing_extensions import Unpack

__all__ = ["Site", "SiteKeywords", "open_site", "serve_site"]

logger = logging.getLogger(__name__)

_WILDCARD = "*"
#: FLARE's ``ReservedKey.ENGINE``: the ``fl_ctx`` property ``get_engine`` reads.
_ENGINE = "__engine__"


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 255 or not name.isprintable():
        raise ValueError(
            f"site name must be a non-empty printable string of at most 255 "
            f"characters, not {name!r}"
        )
    return name


class Site:
    """A running site. Get one from :func:`open_site` or :func:`serve_site`.

    The trio counterpart of FLARE's ``StreamableEngine``: the same method
    names and parameters, with ``stream_objects`` and ``shutdown_streamer``
    as coroutines.
    """

    def __init__(self, name: str, nursery: trio.Nursery, options: SiteOptions) -> None:
        self.name = _check_name(name)
        self.options = options
        self._nursery = nursery
        self._runner = CallbackRunner(options.sync_callbacks, options.max_threads)
        self._registrations: dict[tuple[str, str], Registration] = {}
        self._connections: dict[str, Connection] = {}
        self._reserved: set[str] = set()
        self._senders: set[StreamSession] = set()
        self._changed = trio.Event()
        self._closing = False
        self._closed = trio.Event()
        self._addresses: list[str] = []
        #: What ``fl_ctx.get_engine()`` returns in this site's callbacks.
        self._engine: Any = self
        self._aux = AuxEndpoint(self)
        self._registrations[(AUX_CHANNEL, _WILDCARD)] = Registration(self._aux.factory)

    # ------------------------------------------------------------- state

    @property
    def address(self) -> str | None:
        """The first URL this site listens on (port 0 resolved), or ``None``."""
        return self._addresses[0] if self._addresses else None

    @property
    def addresses(self) -> list[str]:
        """Every URL this site listens on."""
        return list(self._addresses)

    @property
    def peers(self) -> list[str]:
        """Names of the sites connected right now."""
        return sorted(self._connections)

    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> tuple[ConnectionStats, ...]:
        """A frozen snapshot of every connection and its stream sessions."""
        return tuple(conn.stats() for _, conn in sorted(self._connections.items()))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_peers(self, names: Iterable[str]) -> None:
        """Return once every site in ``names`` is connected.

        Bound the wait with ``trio.fail_after`` or ``trio.move_on_after``.

        Raises:
            SiteClosedError: this site shut down while waiting.
        """
        wanted = set(names)
        while not wanted <= self._connections.keys():
            if self._closing:
                raise SiteClosedError(f"site {self.name!r} is shut down")
            await self._changed.wait()

    # ------------------------------------------------------- registration

    def register_stream_processing(
        self,
        channel: str,
        topic: str,
        factory: ConsumerFactory,
        stream_done_cb: Callable[..., Any] | None = None,
        consumed_cb: Callable[..., Any] | None = None,
        **cb_kwargs: Any,
    ) -> None:
        """Handle streams on ``channel``/``topic`` with consumers from ``factory``.

        ``"*"`` matches any channel or topic; an exact match wins over a
        wildcard, and registering the same pair again replaces it.
        ``stream_done_cb(stream_ctx, fl_ctx, **cb_kwargs)`` runs after each
        session's ``finalize``; ``consumed_cb((keep_going, reply), stream_ctx,
        fl_ctx, **cb_kwargs)`` after each ``consume``, as in FLARE. Either may
        be ``async``. A factory written against nvflare's base classes (or
        any object with ``get_consumer``) is accepted.

        Raises:
            ValueError: ``channel`` is the reserved aux channel.
        """
        factory = adapt_factory(factory)
        if not isinstance(factory, ConsumerFactory):
            raise TypeError(f"factory must be a ConsumerFactory, not {type(factory).__name__}")
        if not isinstance(channel, str) or not isinstance(topic, str):
            raise TypeError("channel and topic must be strings")
        if channel == AUX_CHANNEL:
            raise ValueError(f"channel {AUX_CHANNEL!r} is reserved for aux messages")
        self._registrations[(channel, topic)] = Registration(
            factory, stream_done_cb, consumed_cb, dict(cb_kwargs)
        )

    def _lookup(self, channel: str, topic: str) -> Registration | None:
        for key in (
            (channel, topic),
            (channel, _WILDCARD),
            (_WILDCARD, topic),
            (_WILDCARD, _WILDCARD),
        ):
            reg = self._registrations.get(key)
            if reg is not None:
                return reg
        return None

    # -------------------------------------------------------- connections

    async def listen(self, url: str) -> str:
        """Accept connections on ``url``; return the URL actually bound."""
        self._check_open()
        transport = get_transport(url)
        bound: str = await self._nursery.start(transport.serve, url, self._handle_incoming)
        self._addresses.append(bound)
        logger.info("site %s listening on %s", self.name, bound)
        return bound

    async def connect(self, url: str) -> str:
        """Dial the site at ``url`` and return its name.

        Raises:
            ConnectionLostError: the address cannot be reached.
            HandshakeError: the peer refused (for example because a site with
                this name is already connected to it) or spoke nonsense.
        """
        self._check_open()
        transport = get_transport(url)
        try:
            with trio.fail_after(self.options.handshake_timeout):
                stream = await transport.connect(url)
        except (OSError, trio.TooSlowError) as exc:
            raise ConnectionLostError(f"cannot connect to {url}: {exc!r}") from exc
        protocol = FrameProtocol(max_frame_size=self.options.max_frame_size)
        try:
            hello = await dial_handshake(
                stream,
                protocol,
                protocol.hello(self.name, limits=self.options.limits()),
                limit=self.options.handshake_timeout,
            )
            problem = self._name_problem(hello.site)
            if problem:
                with trio.move_on_after(1):
                    await stream.send_all(protocol.send(GoAway(ErrorCode.DUPLICATE_SITE, problem)))
                raise HandshakeError(problem)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            raise
        self._reserved.add(hello.site)
        await self._nursery.start(self._run_connection, stream, protocol, hello, True, url)
        return hello.site

    def _name_problem(self, name: str) -> str:
        if name == self.name:
            return f"peer uses our own site name {name!r}"
        if name in self._connections or name in self._reserved:
            return f"a site named {name!r} is already connected to {self.name!r}"
        if self._closing:
            return f"site {self.name!r} is shutting down"
        return ""

    async def _handle_incoming(self, stream: trio.abc.Stream) -> None:
        try:
            await self._accept(stream)
        except Exception:
            logger.exception("site %s: error while serving an incoming connection", self.name)

    async def _accept(self, stream: trio.abc.Stream) -> None:
        protocol = FrameProtocol(max_frame_size=self.options.max_frame_size)
        reserved: list[str] = []

        def decide(hello: Hello) -> Hello | GoAway:
            problem = self._name_problem(hello.site)
            if problem:
                logger.warning("refusing connection: %s", problem)
                code = ErrorCode.SHUTDOWN if self._closing else ErrorCode.DUPLICATE_SITE
                return GoAway(code, problem)
            self._reserved.add(hello.site)
            reserved.append(hello.site)
            return protocol.hello(self.name, limits=self.options.limits())

        try:
            hello = await accept_handshake(
                stream, protocol, decide, limit=self.options.handshake_timeout
            )
        except HandshakeError as exc:
            logger.warning("incoming handshake failed on %s: %s", self.name, exc)
            for name in reserved:
                self._reserved.discard(name)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            return
        await self._run_connection(stream, protocol, hello, False, "")

    async def _run_connection(
        self,
        stream: trio.abc.Stream,
        protocol: FrameProtocol,
        hello: Hello,
        dialer: bool,
        url: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        conn = Connection(
            stream, protocol, hello, local=self.name, dialer=dialer, options=self.options, url=url
        )
        conn.on_open = self._open_receiver
        conn.on_lost = self._forget
        self._reserved.discard(conn.peer)
        self._connections[conn.peer] = conn
        self._notify()
        logger.info("site %s connected to %s", self.name, conn.peer)
        try:
            await conn.run(task_status=task_status)
        finally:
            if self._connections.get(conn.peer) is conn:
                del self._connections[conn.peer]
            self._notify()

    def _forget(self, conn: Connection) -> None:
        """A lost peer leaves ``peers`` at once, so it can connect again."""
        if self._connections.get(conn.peer) is conn:
            del self._connections[conn.peer]
            self._notify()

    def _open_receiver(self, conn: Connection, frame: Data) -> ReceiveHandler | None:
        if frame.size > self.options.max_object_size:
            # Refused before any consumer exists: nothing to finalize.
            message = (
                f"object of {frame.size} bytes exceeds max_object_size "
                f"{self.options.max_object_size} of {self.name!r}"
            )
            conn.reject(frame.sid, 0, ReturnCode.BAD_REQUEST_DATA, message)
            conn.send_control(Done(frame.sid, ReturnCode.BAD_REQUEST_DATA, None))
            return None
        reg = self._lookup(frame.channel, frame.topic)
        if reg is None or self._closing:
            rc = ReturnCode.SERVICE_UNAVAILABLE if self._closing else ReturnCode.TOPIC_UNKNOWN
            conn.reject(
                frame.sid,
                0,
                rc,
                f"no consumer for channel {frame.channel!r} topic {frame.topic!r} on {self.name!r}"
                if not self._closing
                else f"site {self.name!r} is shutting down",
            )
            conn.send_control(Done(frame.sid, rc, None))
            return None
        session = ReceiverSession(
            conn,
            frame,
            reg,
            site_name=self.name,
            runner=self._runner,
            on_finished=self._receiver_finished,
        )
        self._set_engine(session.fl_ctx)
        conn.nursery.start_soon(self._guard, session.run, conn)
        return session

    async def _guard(self, fn: Callable[[], Any], conn: Connection) -> None:
        try:
            await fn()
        except Exception:
            logger.exception(
                "internal error in a session with %s; closing that connection", conn.peer
            )
            conn.lose("internal error")

    def _receiver_finished(self, session: ReceiverSession) -> None:
        if session.conn.receivers.get(session.sid) is session:
            del session.conn.receivers[session.sid]
        self._notify()

    # ------------------------------------------------------------ sending

    async def stream_objects(
        self,
        channel: str,
        topic: str,
        stream_ctx: dict[str, Any] | None,
        targets: Sequence[str],
        producer: ObjectProducer,
        fl_ctx: FLContext | None,
        optional: bool = False,
        secure: bool = False,
    ) -> tuple[str, Any]:
        """Stream the producer's objects to ``targets``; return ``(rc, result)``.

        See ``docs/semantics.md`` for every way a stream can end.

        Raises:
            UnknownTargetError: ``targets`` is empty, or names a site that is
                not connected (with ``optional=True`` missing targets get a
                ``COMMUNICATION_ERROR`` reply instead, unless all are missing).
            SiteClosedError: the site is shut down.
            FedstreamError: ``secure=True`` over a transport without TLS.
            ValueError: the producer returned something invalid.
            Exception: whatever ``produce`` or ``process_replies`` raised.
        """
        if channel == AUX_CHANNEL:
            raise ValueError(f"channel {AUX_CHANNEL!r} is reserved for aux messages")
        return await self._stream_objects(
            channel, topic, stream_ctx, targets, producer, fl_ctx, optional, secure
        )

    async def _stream_objects(
        self,
        channel: str,
        topic: str,
        stream_ctx: dict[str, Any] | None,
        targets: Sequence[str],
        producer: ObjectProducer,
        fl_ctx: FLContext | None,
        optional: bool = False,
        secure: bool = False,
    ) -> tuple[str, Any]:
        self._check_open()
        producer = adapt_producer(producer)
        if not isinstance(producer, ObjectProducer):
            raise TypeError(f"producer must be an ObjectProducer, not {type(producer).__name__}")
        if isinstance(targets, str) or not targets:
            raise UnknownTargetError("targets must be a non-empty list of site names")
        names = list(targets)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate targets in {names!r}")
        missing = [t for t in names if t not in self._connections]
        if missing and (not optional or len(missing) == len(names)):
            raise UnknownTargetError(
                f"not connected to {', '.join(map(repr, missing))} (connected: {self.peers})"
            )
        if secure:
            raise FedstreamError(
                "secure=True needs an encrypted, authenticated transport; "
                "this site's connections are plain"
            )
        stream_ctx = {} if stream_ctx is None else stream_ctx
        if fl_ctx is None:
            fl_ctx = FLContext(identity_name=self.name, engine=self._engine)
        elif not isinstance(fl_ctx.get_run_abort_signal(), Signal):
            bridge_abort_signal(fl_ctx)  # an nvflare FLContext's poll-only signal
        stream_ctx[StreamContextKey.CHANNEL] = channel
        stream_ctx[StreamContextKey.TOPIC] = topic
        links = [
            TargetLink(self._connections[t], t, channel, topic) for t in names if t not in missing
        ]
        session = StreamSession(
            site_name=self.name,
            channel=channel,
            topic=topic,
            stream_ctx=stream_ctx,
            links=links,
            missing=missing,
            producer=producer,
            fl_ctx=fl_ctx,
            runner=self._runner,
            finalize_timeout=self.options.finalize_timeout,
        )
        self._senders.add(session)
        try:
            return await session.run()
        finally:
            for link in links:
                link.conn.senders.pop(link.sid, None)
            self._senders.discard(session)
            self._notify()

    def _set_engine(self, fl_ctx: FLContext) -> None:
        if fl_ctx.get_engine() is None:
            fl_ctx.set_prop(_ENGINE, self._engine, private=True, sticky=False)

    # ---------------------------------------------------------- aux messages

    def register_aux_message_handler(
        self, topic: str, message_handle_func: Callable[..., Any]
    ) -> None:
        """Answer aux requests on ``topic`` with ``message_handle_func``.

        The handler is called as ``message_handle_func(topic, request,
        fl_ctx)`` (plain or ``async``) and returns the reply Shareable
        (``None`` means an ``OK`` reply; an exception, an
        ``EXECUTION_EXCEPTION`` reply). ``fl_ctx.get_peer_context()`` names
        the requesting site. Topic ``"*"`` catches topics with no handler of
        their own; a request for an unknown topic gets ``TOPIC_UNKNOWN``.
        Registering a topic again replaces its handler.
        """
        self._aux.register(topic, message_handle_func)

    async def send_aux_request(
        self,
        targets: Sequence[str],
        topic: str,
        request: Shareable,
        timeout: float,  # noqa: ASYNC109 - FLARE's signature; a no-progress bound
        fl_ctx: FLContext | None,
        optional: bool = False,
        secure: bool = False,
    ) -> dict[str, Shareable]:
        """Send ``request`` to each target's aux handler for ``topic``; return ``{site: reply}``.

        The request travels as a one-object stream on the reserved aux
        channel, so ``timeout`` is its no-progress timeout and every stream
        limit applies. A target that failed is answered by a reply with the
        failure's return code (``TIMEOUT``, ``TOPIC_UNKNOWN``, ...). A
        ``timeout`` of 0 or less sends in the background and returns ``{}``
        at once (FLARE's fire-and-forget form).

        Raises:
            UnknownTargetError, SiteClosedError, FedstreamError: as ``stream_objects``.
        """
        return await self._aux.send(targets, topic, request, timeout, fl_ctx, optional, secure)

    # ----------------------------------------------------------- shutdown

    def _check_open(self) -> None:
        if self._closing:
            raise SiteClosedError(f"site {self.name!r} is shut down")

    async def shutdown_streamer(self) -> None:
        """Stop every stream with ``SERVICE_UNAVAILABLE`` and close the site.

        Sending streams return ``(SERVICE_UNAVAILABLE, None)``; receiving
        sessions finalize with that rc, and peers are told. Waits (bounded
        by ``finalize_timeout``) for all of it, then says GOAWAY to every peer.
        Idempotent; safe to call from any task of the site's trio run.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        logger.info("site %s shutting down", self.name)
        # Called from one of this site's own callbacks, the caller's session
        # cannot end before this returns: don't wait for it.
        me = current_session.get()
        rc = ReturnCode.SERVICE_UNAVAILABLE
        reason = f"site {self.name!r} shut down"
        with trio.CancelScope(shield=True):
            waiting: list[TargetLink] = []
            for session in list(self._senders):
                session.stop(rc, reason)
                if session is me:
                    waiting = session.abort_targets_now(rc, reason)
            for conn in list(self._connections.values()):
                for receiver in list(conn.receivers.values()):
                    if isinstance(receiver, ReceiverSession):
                        receiver.end(rc, tell_sender=True)

            def busy() -> bool:
                return any(s is not me for s in self._senders) or any(
                    r is not me for c in self._connections.values() for r in c.receivers.values()
                )

            with trio.move_on_after(2 * self.options.finalize_timeout):
                while busy():
                    await self._changed.wait()
                for link in waiting:
                    await link.done.wait()
            async with trio.open_nursery() as nursery:
                for conn in list(self._connections.values()):
                    nursery.start_soon(conn.aclose, ErrorCode.SHUTDOWN, "site shut down")
            self._nursery.cancel_scope.cancel()
            self._notify()
        self._closed.set()

    aclose = shutdown_streamer


class SiteKeywords(TypedDict, total=False):
    """The engine options of :func:`open_site`, for typing :func:`serve_site`'s ``**options``."""

    max_frame_size: int
    max_object_size: int
    chunk_size: int
    window: int
    heartbeat_interval: float
    peer_timeout: float
    handshake_timeout: float
    finalize_timeout: float
    sync_callbacks: SyncMode | str
    max_threads: float
    max_streams_per_peer: int
    max_receive_buffer_per_peer: int


@asynccontextmanager
async def open_site(
    name: str,
    *,
    listen: str | Sequence[str] | None = None,
    connect: Sequence[str] = (),
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_object_size: int = DEFAULT_MAX_OBJECT_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    window: int = DEFAULT_WINDOW,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    peer_timeout: float = DEFAULT_PEER_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    finalize_timeout: float = DEFAULT_FINALIZE_TIMEOUT,
    sync_callbacks: SyncMode | str = SyncMode.THREAD,
    max_threads: float = math.inf,
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
    max_receive_buffer_per_peer: int = DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER,
) -> AsyncIterator[Site]:
    """Run a site for the duration of the ``async with`` block.

    Args:
        name: this site's unique name.
        listen: URL(s) to accept connections on, e.g. ``"tcp://127.0.0.1:0"``.
        connect: URLs of sites to dial at start.
        max_frame_size: largest frame accepted (bytes).
        max_object_size: largest object accepted; larger ones get an error reply.
        chunk_size: object bytes per frame when sending.
        window: per-stream bytes a peer may send before we grant more credit.
        heartbeat_interval: idle seconds before a PING.
        peer_timeout: seconds of silence after which a peer counts as lost.
        handshake_timeout: seconds allowed for the HELLO exchange.
        finalize_timeout: bound on each end-of-stream step and on the
            sender's wait for receivers to finalize.
        sync_callbacks: ``"thread"`` (default) runs plain user callbacks in
            worker threads; ``"inline"`` runs them in the trio task.
        max_threads: most worker threads used at once for sync callbacks.
        max_streams_per_peer: most receiving sessions one peer may have open
            on this site at once. A stream beyond it is refused with a
            ``SERVICE_UNAVAILABLE`` reply before any consumer is made; the
            peer's other streams carry on.
        max_receive_buffer_per_peer: bytes of received objects one peer may
            make this site hold, counted by announced size from an object's
            first frame until ``consume`` is called. Past it, that peer's
            streams get no more credit (their senders stall, and time out if
            that lasts) until objects are consumed; an object that does not
            fit waits its turn, and one larger than the whole budget is let
            in alone. A waiting stream can still send what its credit
            allowed (one ``window`` at most), so the bytes actually held
            stay within this (or one larger object) plus one ``window`` per
            waiting stream.

    Resource handling:
        On exit (normal, error or cancellation) the site shuts down as by
        :meth:`Site.shutdown_streamer`: every session ends in a defined way
        and every consumer's ``finalize`` runs before the block is left.
    """
    options = SiteOptions(
        max_frame_size=max_frame_size,
        max_object_size=max_object_size,
        chunk_size=chunk_size,
        window=window,
        heartbeat_interval=heartbeat_interval,
        peer_timeout=peer_timeout,
        handshake_timeout=handshake_timeout,
        finalize_timeout=finalize_timeout,
        sync_callbacks=SyncMode(sync_callbacks),
        max_threads=max_threads,
        max_streams_per_peer=max_streams_per_peer,
        max_receive_buffer_per_peer=max_receive_buffer_per_peer,
    )
    _check_name(name)
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        # Listeners and connections run in an inner nursery, so that shutting
        # the site down cancels them and never the body of this block.
        services: trio.Nursery = await nursery.start(_run_services)
        site = Site(name, services, options)
        try:
            for url in [listen] if isinstance(listen, str) else list(listen or ()):
                await site.listen(url)
            for url in connect:
                await site.connect(url)
            yield site
        except Exception as exc:
            # Re-raised below, outside the nursery, so callers see their own
            # exception rather than an ExceptionGroup.
            error = exc
        finally:
            await site.shutdown_streamer()
    if error is not None:
        raise error


async def _run_services(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as services:
        task_status.started(services)
        await trio.sleep_forever()


async def serve_site(
    name: str,
    *,
    listen: str | Sequence[str] | None = None,
    connect: Sequence[str] = (),
    task_status: trio.TaskStatus[Site] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[SiteKeywords],
) -> None:
    """Run a site until cancelled, for callers that manage their own nursery.

    ``await nursery.start(serve_site, "server", listen=...)`` returns the
    :class:`Site` once it listens and has dialed ``connect``. It returns when
    the site is shut down (``site.shutdown_streamer()``) and shuts the site
    down when cancelled. Options are those of :func:`open_site`.
    """
    async with open_site(name, listen=listen, connect=connect, **options) as site:
        task_status.started(site)
        await site._closed.wait()
