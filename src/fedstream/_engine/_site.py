"""A site: one named participant that listens, dials, sends and receives streams.

``open_site`` owns a nursery in which everything of the site runs: listeners,
one task per connection, and (inside each connection's nursery) the receiver
sessions the peer opened. ``stream_objects`` runs in the caller's task, so the
caller's cancel scopes apply to it as well.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, TypedDict

import trio

from .. import _streamers
from .._api import ConsumerFactory, ObjectProducer, StreamContextKey
from .._context import FLContext, Signal
from .._errors import (
    ConnectionLostError,
    FedstreamError,
    HandshakeError,
    RemoteProtocolError,
    SiteClosedError,
    UnknownTargetError,
)
from .._flare import adapt_factory, adapt_producer, bridge_abort_signal
from .._ratelimit import RateLimit
from .._shareable import ReturnCode, Shareable
from .._tls import TLSConfig, describe_tls_error, proven_names
from .._transport import Transport, TransportConfig, make_transport, split_url
from .._wire import (
    DEFAULT_MAX_FRAME_SIZE,
    Data,
    Done,
    ErrorCode,
    FrameProtocol,
    GoAway,
    Hello,
    encode_frame,
)
from ._aux import AUX_CHANNEL, AuxEndpoint
from ._budget import SiteBudget
from ._callbacks import CallbackRunner, SyncMode, current_session
from ._connection import Connection
from ._handshake import accept_handshake, dial_handshake
from ._options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FINALIZE_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_OBJECT_SIZE,
    DEFAULT_MAX_PENDING_HANDSHAKES,
    DEFAULT_MAX_RECEIVE_BUFFER,
    DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER,
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_MAX_THREADS,
    DEFAULT_PEER_TIMEOUT,
    DEFAULT_RECEIVE_PROGRESS_TIMEOUT,
    DEFAULT_RECONNECT_MAX_DELAY,
    DEFAULT_RECONNECT_MIN_DELAY,
    DEFAULT_WINDOW,
    SiteOptions,
)
from ._reader import ReceiveHandler
from ._receiver import ReceiverSession, Registration
from ._sender import MAX_IN_FLIGHT, StreamSession, TargetLink
from ._stats import ConnectionStats

if TYPE_CHECKING:  # Unpack for **kwargs is in typing from Python 3.11 (PEP 692)
    from typing_extensions import Unpack

__all__ = ["Site", "SiteKeywords", "open_site", "serve_site"]

logger = logging.getLogger(__name__)

#: At most one warning per this many seconds about refused TLS handshakes.
_REFUSAL_LOG_INTERVAL = 10.0

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
        self._runner = CallbackRunner(
            options.sync_callbacks, options.max_threads, grace=options.finalize_timeout
        )
        #: Bytes of received objects held for all peers together.
        self._receive_budget = SiteBudget(options.max_receive_buffer)
        self._registrations: dict[tuple[str, str], Registration] = {}
        self._connections: dict[str, Connection] = {}
        self._reserved: set[str] = set()
        self._senders: set[StreamSession] = set()
        self._changed = trio.Event()
        self._closing = False
        self._closed = trio.Event()
        self._addresses: list[str] = []
        self._transports: dict[str, Transport] = {}
        #: Mutually authenticated connections (see ``_is_mutual``): the links
        #: ``secure=True`` accepts.
        self._mutual: set[Connection] = set()
        #: Links this site dialed and keeps re-dialing, by URL.
        self._dialers: dict[str, _Dialer] = {}
        #: Incoming connections whose handshake is under way.
        self._pending_handshakes = 0
        #: Any client can make a listener refuse its TLS handshake: warn once
        #: per interval, with a count of the refusals in between.
        self._refusals = RateLimit(_REFUSAL_LOG_INTERVAL)
        #: What ``fl_ctx.get_engine()`` returns in this site's callbacks.
        self._engine: Any = self
        self._aux = AuxEndpoint(self)
        self._registrations[(AUX_CHANNEL, _WILDCARD)] = Registration(self._aux.factory)

    # ------------------------------------------------------------- state

    @property
    def address(self) -> str:
        """The first URL this site listens on (port 0 resolved).

        Raises:
            FedstreamError: the site listens nowhere (it only dials, or
                ``listen`` has not returned yet).
        """
        if not self._addresses:
            raise FedstreamError(f"site {self.name!r} is not listening anywhere")
        return self._addresses[0]

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

    def _transport(self, url: str) -> Transport:
        """This site's transport for ``url``'s scheme, made on first use."""
        scheme = split_url(url)[0]
        transport = self._transports.get(scheme)
        if transport is None:
            config = TransportConfig(
                tls=self.options.tls,
                handshake_timeout=self.options.handshake_timeout,
                nursery=self._nursery,
            )
            transport = self._transports[scheme] = make_transport(scheme, config)
        return transport

    async def listen(self, url: str) -> str:
        """Accept connections on ``url``; return the URL actually bound."""
        self._check_open()
        transport = self._transport(url)
        _rate_limit_accept_errors()
        bound: str = await self._nursery.start(
            transport.serve, url, functools.partial(self._handle_incoming, transport)
        )
        self._addresses.append(bound)
        logger.info("site %s listening on %s", self.name, bound)
        return bound

    async def connect(self, url: str) -> str:
        """Dial the site at ``url`` and return its name.

        With ``reconnect`` (the default), the site dials ``url`` again, with
        jittered exponential backoff between ``reconnect_min_delay`` and
        ``reconnect_max_delay``, whenever that link is lost, until the site
        shuts down. Calling ``connect`` for a URL that is waiting to be
        re-dialed dials it at once instead; if that dial fails, the URL
        goes on being re-dialed.

        Raises:
            ConnectionLostError: the address cannot be reached.
            HandshakeError: the peer refused (for example because a site with
                this name is already connected to it), its certificate does
                not prove the name it claims, or it spoke nonsense.
        """
        self._check_open()
        waiting = self._dialers.get(url)
        if waiting is not None and not waiting.connected:
            waiting.scope.cancel()
            del self._dialers[url]
        try:
            link = await self._dial(url)
        except (ConnectionLostError, HandshakeError):
            if waiting is not None and not waiting.connected:
                # The re-dialer we cancelled for this one dial takes over again.
                self._nursery.start_soon(self._keep_dialing, url, None)
            raise
        if self.options.reconnect:
            await self._nursery.start(self._keep_dialing, url, link)
        else:
            await self._nursery.start(self._run_connection, *link, True, url)
        return link[2].site

    async def _dial(self, url: str) -> tuple[trio.abc.Stream, FrameProtocol, Hello, bool]:
        """Open a link to ``url`` and exchange HELLOs; the peer's name ends up reserved.

        Returns the stream, its protocol, the peer's HELLO and whether the
        link is mutually authenticated.
        """
        self._check_open()
        transport = self._transport(url)
        try:
            with trio.fail_after(self.options.handshake_timeout):
                stream = await transport.connect(url)
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {url}: {exc!r}") from exc
        except trio.TooSlowError as exc:
            raise ConnectionLostError(
                f"cannot connect to {url}: no answer (TLS included, if tls://) within "
                f"handshake_timeout ({self.options.handshake_timeout} s)"
            ) from exc
        protocol = FrameProtocol(max_frame_size=self.options.max_frame_size)
        proven = proven_names(stream)
        try:
            try:
                hello = await dial_handshake(
                    stream,
                    protocol,
                    protocol.hello(self.name, limits=self._hello_limits(proven)),
                    limit=self.options.handshake_timeout,
                )
            except HandshakeError as exc:
                broke = exc.__cause__
                if isinstance(stream, trio.SSLStream):
                    # TLS 1.3: the listener checks our certificate after our
                    # side of the TLS handshake is done; its refusal arrives here.
                    if isinstance(broke, (trio.BrokenResourceError, OSError)):
                        raise HandshakeError(
                            f"TLS link to {url} broke during the handshake: "
                            f"{describe_tls_error(broke)}"
                        ) from exc
                    raise
                if exc.code is not None:  # the peer answered with a refusal
                    raise
                raise HandshakeError(
                    f"{exc} (if {url} listens with TLS, dial it as tls://)"
                ) from exc
            problem, code = self._name_problem(hello.site, proven)
            if problem:
                problem = f"{url}: {problem}"
                with trio.move_on_after(1):
                    await stream.send_all(protocol.send(GoAway(code, problem)))
                raise HandshakeError(problem, code=code)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            raise
        self._reserved.add(hello.site)
        return stream, protocol, hello, self._is_mutual(hello, proven)

    async def _keep_dialing(
        self,
        url: str,
        link: tuple[trio.abc.Stream, FrameProtocol, Hello, bool] | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the link to ``url``; each time it is lost, dial again until it is back.

        With ``link=None`` the link is down already, and re-dialing starts at once.

        The backoff starts again from ``reconnect_min_delay`` only after a
        link that lasted ``reconnect_max_delay``: a link that keeps dropping
        at once (say, two processes with one certificate taking turns) is
        re-dialed ever more slowly.
        """
        dialer = _Dialer()
        self._dialers[url] = dialer
        delay = self.options.reconnect_min_delay
        try:
            with dialer.scope:
                while True:
                    if link is None:
                        try:
                            link, delay = await self._redial(url, delay)
                        except SiteClosedError:  # shutting down, before our task is cancelled
                            return
                    dialer.connected = True
                    started = trio.current_time()
                    await self._run_connection(*link, True, url, task_status=task_status)
                    task_status = trio.TASK_STATUS_IGNORED
                    link = None
                    dialer.connected = False
                    if self._closing:
                        return
                    if trio.current_time() - started >= self.options.reconnect_max_delay:
                        delay = self.options.reconnect_min_delay
        finally:
            if self._dialers.get(url) is dialer:
                del self._dialers[url]

    async def _redial(
        self, url: str, delay: float
    ) -> tuple[tuple[trio.abc.Stream, FrameProtocol, Hello, bool], float]:
        """Dial ``url`` until it answers, waiting a jittered, doubling delay before each try.

        Returns the link and the delay to start from if it is lost again.
        """
        for attempt in itertools.count(1):
            # Jitter keeps many sites that lost the same peer from dialing in step.
            await trio.sleep(random.uniform(delay / 2, delay))
            delay = min(2 * delay, self.options.reconnect_max_delay)
            try:
                link = await self._dial(url)
            except SiteClosedError:
                raise
            except (ConnectionLostError, HandshakeError) as exc:
                level = logging.WARNING if attempt == 1 or attempt % 10 == 0 else logging.DEBUG
                logger.log(
                    level, "site %s: re-dial %d of %s failed: %s", self.name, attempt, url, exc
                )
                continue
            logger.info("site %s: link to %s is back after %d re-dials", self.name, url, attempt)
            return link, delay
        raise AssertionError("unreachable")

    def _hello_limits(self, proven: frozenset[str] | None) -> dict[str, int]:
        """Our HELLO's limits; ``tls_peer_verified`` tells the peer we checked its
        certificate against our CA (the other half of "mutual")."""
        limits = self.options.limits()
        tls = self.options.tls
        if tls is not None and tls.mutual and proven is not None:
            limits["tls_peer_verified"] = 1
        return limits

    def _is_mutual(self, hello: Hello, proven: frozenset[str] | None) -> bool:
        """Whether a link is mutually authenticated: we checked the peer's certificate
        against our CA and it proves the peer's name, and the peer says it checked ours."""
        tls = self.options.tls
        return (
            tls is not None
            and tls.mutual
            and proven is not None
            and hello.site in proven
            and hello.limits.get("tls_peer_verified") == 1
        )

    def _name_problem(
        self, name: str, proven: frozenset[str] | None = None
    ) -> tuple[str, ErrorCode]:
        """Why a peer claiming ``name`` is refused (``""`` if it is not), and the GOAWAY code.

        ``proven`` holds the names the peer's certificate proves, or is
        ``None`` when no certificate proved anything (plain TCP,
        or a listener that does not ask dialers for certificates).
        """
        if proven is not None and name not in proven:
            shown = ", ".join(map(repr, sorted(proven))) or "no name"
            return (
                f"the peer claims site name {name!r} but its certificate proves {shown}",
                ErrorCode.IDENTITY_MISMATCH,
            )
        if name == self.name:
            return f"peer uses our own site name {name!r}", ErrorCode.DUPLICATE_SITE
        if name in self._connections or name in self._reserved:
            return (
                f"a site named {name!r} is already connected to {self.name!r}",
                ErrorCode.DUPLICATE_SITE,
            )
        if self._closing:
            return f"site {self.name!r} is shutting down", ErrorCode.SHUTDOWN
        return "", ErrorCode.NO_ERROR

    async def _handle_incoming(self, transport: Transport, stream: trio.abc.Stream) -> None:
        try:
            await self._accept(transport, stream)
        except Exception:
            logger.exception("site %s: error while serving an incoming connection", self.name)

    async def _accept(self, transport: Transport, stream: trio.abc.Stream) -> None:
        """Admit, upgrade (TLS), exchange HELLOs, then serve an incoming connection.

        Everything up to a valid HELLO counts against
        ``max_pending_handshakes``, the transport's own handshake included.
        """
        limit = self.options.max_pending_handshakes
        if self._pending_handshakes >= limit:
            # Refused at once rather than queued: a queued connection would
            # still hold its descriptor, which is what such a flood exhausts.
            logger.debug("refusing a connection: %d handshakes pending", limit)
            if not transport.upgrades:  # a TLS peer could not read a GOAWAY
                with trio.move_on_after(1):
                    try:
                        await stream.send_all(_TOO_MANY_HANDSHAKES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            await trio.aclose_forcefully(stream)
            return
        self._pending_handshakes += 1
        try:
            try:
                stream = await transport.upgrade(stream)
            except HandshakeError as exc:
                suppressed = self._refusals.allow()
                if suppressed is None:
                    logger.debug("site %s refused a connection: %s", self.name, exc)
                else:
                    logger.warning(
                        "site %s refused a connection: %s "
                        "(%d more refused since the last such warning)",
                        self.name,
                        exc,
                        suppressed,
                    )
                return
            accepted = await self._handshake(stream)
        finally:
            self._pending_handshakes -= 1
        if accepted is not None:
            await self._run_connection(stream, *accepted, False, "")

    async def _handshake(self, stream: trio.abc.Stream) -> tuple[FrameProtocol, Hello, bool] | None:
        """The acceptor's handshake: the peer's protocol state, its HELLO and
        whether the link is mutually authenticated, or ``None`` (the stream
        closed) if it failed."""
        protocol = FrameProtocol(max_frame_size=self.options.max_frame_size)
        reserved: list[str] = []
        proven = proven_names(stream)

        def decide(hello: Hello) -> Hello | GoAway:
            old = self._connections.get(hello.site)
            if old is not None and old in self._mutual:
                if not old.dialer and self._is_mutual(hello, proven):
                    # The same certified site dials us again: it restarted or
                    # lost the link, and the old one is dead or about to be.
                    # Whoever holds the key is that site, so the new link wins at
                    # once. (Links we dialed are not replaced: two sites dialing
                    # each other would take turns forever.)
                    logger.warning(
                        "site %s: %r connected again with its certificate; dropping its old link",
                        self.name,
                        hello.site,
                    )
                    old.lose(f"replaced by a new link from {hello.site!r}")
            elif old is not None and self._is_mutual(hello, proven):
                # A name proven by a certificate beats the same name merely
                # claimed (plain TCP, or TLS without a client certificate).
                logger.warning(
                    "site %s: %r proved its name with a certificate; dropping the link "
                    "that claimed it without one",
                    self.name,
                    hello.site,
                )
                old.lose(f"replaced by a link from {hello.site!r} proven by its certificate")
            problem, code = self._name_problem(hello.site, proven)
            if problem:
                logger.warning("refusing connection: %s", problem)
                return GoAway(code, problem)
            self._reserved.add(hello.site)
            reserved.append(hello.site)
            return protocol.hello(self.name, limits=self._hello_limits(proven))

        try:
            hello = await accept_handshake(
                stream, protocol, decide, limit=self.options.handshake_timeout
            )
        except HandshakeError as exc:
            hint = ""
            if not isinstance(stream, trio.SSLStream) and isinstance(
                exc.__cause__, RemoteProtocolError
            ):
                hint = " (not a fedstream peer, or a TLS client dialing a plain listener?)"
            logger.warning("incoming handshake failed on %s: %s%s", self.name, exc, hint)
            for name in reserved:
                self._reserved.discard(name)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            return None
        return protocol, hello, self._is_mutual(hello, proven)

    async def _run_connection(
        self,
        stream: trio.abc.Stream,
        protocol: FrameProtocol,
        hello: Hello,
        mutual: bool,
        dialer: bool,
        url: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        conn = Connection(
            stream,
            protocol,
            hello,
            local=self.name,
            dialer=dialer,
            options=self.options,
            url=url,
            site_budget=self._receive_budget,
        )
        conn.on_open = self._open_receiver
        conn.on_lost = self._forget
        self._reserved.discard(conn.peer)
        self._connections[conn.peer] = conn
        if mutual:
            self._mutual.add(conn)
        self._notify()
        logger.info(
            "site %s connected to %s%s",
            self.name,
            conn.peer,
            " (mutual TLS)" if mutual else "",
        )
        try:
            await conn.run(task_status=task_status)
        finally:
            self._mutual.discard(conn)
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
        logger.info("stream %s/%s from %s started", frame.channel, frame.topic, conn.peer)
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
        logger.info(
            "stream %s/%s from %s ended: %s",
            session.channel,
            session.topic,
            session.conn.peer,
            session.rc,
        )
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
        *,
        max_in_flight: int = 1,
    ) -> tuple[str, Any]:
        """Stream the producer's objects to ``targets``; return ``(rc, result)``.

        See ``docs/semantics.md`` for every way a stream can end.

        ``max_in_flight`` (1 to 64) is how many objects may be sent before the
        oldest one's replies are in. The default, 1, is the FLARE contract's
        stop-and-wait: ``produce`` is called only after ``process_replies``
        saw the previous object's replies. With more, the stream is
        *pipelined*: for producers that do not need an object's replies to
        produce the next, over links whose round trip is long. Objects still
        reach every consumer in order, one at a time, and ``process_replies``
        is still called once per object, in order; docs/semantics.md says
        what happens to the objects in flight when the stream ends early.

        Raises:
            UnknownTargetError: ``targets`` is empty, or names a site that is
                not connected (with ``optional=True`` missing targets get a
                ``COMMUNICATION_ERROR`` reply instead, unless all are missing).
            SiteClosedError: the site is shut down.
            FedstreamError: ``secure=True`` and some target is not on a
                mutually authenticated TLS link (nothing was produced or sent).
            ValueError: the producer returned something invalid, or
                ``max_in_flight`` is not an int from 1 to 64.
            Exception: whatever ``produce`` or ``process_replies`` raised.
        """
        if channel == AUX_CHANNEL:
            raise ValueError(f"channel {AUX_CHANNEL!r} is reserved for aux messages")
        return await self._stream_objects(
            channel,
            topic,
            stream_ctx,
            targets,
            producer,
            fl_ctx,
            optional,
            secure,
            max_in_flight=max_in_flight,
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
        *,
        max_in_flight: int = 1,
    ) -> tuple[str, Any]:
        self._check_open()
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or not 1 <= max_in_flight <= MAX_IN_FLIGHT
        ):
            raise ValueError(
                f"max_in_flight must be an int from 1 to {MAX_IN_FLIGHT}, not {max_in_flight!r}"
            )
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
            self._check_secure([t for t in names if t not in missing])
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
            max_in_flight=max_in_flight,
        )
        self._senders.add(session)
        logger.info("stream %s/%s to %s started", channel, topic, ", ".join(names))
        rc: str | None = None
        try:
            rc, result = await session.run()
            return rc, result
        finally:
            logger.info(
                "stream %s/%s to %s ended: %s", channel, topic, ", ".join(names), rc or "raised"
            )
            for link in links:
                link.conn.senders.pop(link.sid, None)
            self._senders.discard(session)
            self._notify()

    def _check_secure(self, targets: list[str]) -> None:
        """``secure=True``: every target must be on a mutually authenticated TLS link."""
        exposed = [t for t in targets if self._connections[t] not in self._mutual]
        if exposed:
            raise FedstreamError(
                f"secure=True needs a mutually authenticated TLS link to every target; "
                f"{', '.join(map(repr, exposed))} "
                f"{'is' if len(exposed) == 1 else 'are'} not on one (see docs/semantics.md)"
            )

    # ------------------------------------------- files and containers

    async def stream_file(
        self,
        channel: str,
        topic: str,
        targets: Sequence[str],
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        transfer_id: str | None = None,
        chunk_size: int = _streamers.DEFAULT_FILE_CHUNK,
        object_timeout: float = _streamers.DEFAULT_OBJECT_TIMEOUT,
        progress: Callable[[int], Any] | None = None,
        fl_ctx: FLContext | None = None,
    ) -> _streamers.FileResult:
        """Stream one file to sites that run :meth:`register_file_receiver`.

        The receiver checks the SHA-256 of the whole content and only then
        renames its partial file into place. ``name`` (default: the file's
        own name) is the relative path the receivers store it under.
        Restarted with the same ``transfer_id`` after an interruption, the
        transfer continues from what each receiver already holds (checked
        against this file's SHA-256 prefix); the default id is random, so a
        transfer without one starts from zero. ``progress(offset)`` is called
        after each chunk is acknowledged. Never raises for a failed target:
        see :class:`FileResult`'s ``rc`` and ``targets``.

        Raises:
            OSError: the file cannot be read.
            ValueError: a bad ``name``, ``chunk_size`` or ``timeout``.
            UnknownTargetError, SiteClosedError: as :meth:`stream_objects`.
        """
        return await _streamers.stream_file(
            self,
            channel,
            topic,
            targets,
            path,
            name=name,
            transfer_id=transfer_id,
            chunk_size=chunk_size,
            object_timeout=object_timeout,
            progress=progress,
            fl_ctx=fl_ctx,
        )

    async def stream_directory(
        self,
        channel: str,
        topic: str,
        targets: Sequence[str],
        path: str | os.PathLike[str],
        *,
        transfer_id: str | None = None,
        chunk_size: int = _streamers.DEFAULT_FILE_CHUNK,
        object_timeout: float = _streamers.DEFAULT_OBJECT_TIMEOUT,
        progress: Callable[[int], Any] | None = None,
        fl_ctx: FLContext | None = None,
    ) -> list[_streamers.FileResult]:
        """Stream every regular file under ``path``, one :meth:`stream_file` each.

        Names are relative paths that start with the directory's own name
        (``data/a/b.bin``); files go in sorted order. ``progress`` gets the
        bytes done over all files.
        """
        return await _streamers.stream_directory(
            self,
            channel,
            topic,
            targets,
            path,
            transfer_id=transfer_id,
            chunk_size=chunk_size,
            object_timeout=object_timeout,
            progress=progress,
            fl_ctx=fl_ctx,
        )

    def register_file_receiver(
        self,
        channel: str,
        topic: str,
        directory: str | os.PathLike[str],
        *,
        on_file: Callable[[_streamers.ReceivedFile], Any] | None = None,
        name_policy: _streamers.NamePolicy | str = _streamers.NamePolicy.OVERWRITE,
        on_progress: Callable[[str, str, int, int], Any] | None = None,
    ) -> None:
        """Receive file streams into ``directory`` (created if missing).

        Names that would leave ``directory`` (``..``, absolute paths, symbolic
        links pointing outside) are refused with ``BAD_REQUEST_DATA``.
        ``on_file(ReceivedFile)`` runs once per stream, however it ended.
        ``name_policy`` says what happens when the final name exists
        (:class:`NamePolicy`). ``on_progress(peer, name, received, size)``
        runs after each chunk is written.
        """
        _streamers.register_file_receiver(
            self,
            channel,
            topic,
            directory,
            on_file=on_file,
            name_policy=name_policy,
            on_progress=on_progress,
        )

    async def stream_container(
        self,
        channel: str,
        topic: str,
        targets: Sequence[str],
        container: dict[Any, Any] | list[Any] | set[Any],
        *,
        object_timeout: float = _streamers.DEFAULT_OBJECT_TIMEOUT,
        fl_ctx: FLContext | None = None,
    ) -> _streamers.ContainerResult:
        """Stream a ``dict``, ``list`` or ``set`` one entry per object.

        Keys and values must be CBOR-encodable (see the README); the
        receivers rebuild the container with :meth:`register_container_receiver`.
        Dict keys and set members must still be hashable after the wire's
        round trip (a tuple arrives as a list): each is checked before
        anything is sent, and the first that is not raises ``ValueError``.
        """
        return await _streamers.stream_container(
            self, channel, topic, targets, container, object_timeout=object_timeout, fl_ctx=fl_ctx
        )

    def register_container_receiver(
        self,
        channel: str,
        topic: str,
        on_container: Callable[[_streamers.ReceivedContainer], Any],
        *,
        max_entries: int = _streamers.DEFAULT_CONTAINER_MAX_ENTRIES,
        max_bytes: int = _streamers.DEFAULT_CONTAINER_MAX_BYTES,
    ) -> None:
        """Rebuild streamed containers; ``on_container`` runs once per stream.

        It gets the container only when the stream ended ``OK``. A stream
        with more than ``max_entries`` entries (default 10 million), or whose
        entries hold more than ``max_bytes`` (default 1 GiB: the length of
        text and bytes, ``nbytes`` of arrays, 8 per other value), ends with
        ``BAD_REQUEST_DATA`` and the container is dropped.
        """
        _streamers.register_container_receiver(
            self, channel, topic, on_container, max_entries=max_entries, max_bytes=max_bytes
        )

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


class _Dialer:
    """A link this site keeps dialing: its task's cancel scope, and whether it is up."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.connected = False


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
    receive_progress_timeout: float
    sync_callbacks: SyncMode | str
    max_threads: float
    max_streams_per_peer: int
    max_receive_buffer_per_peer: int
    tls: TLSConfig | None
    reconnect: bool
    reconnect_min_delay: float
    reconnect_max_delay: float
    max_receive_buffer: int
    max_pending_handshakes: int


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
    receive_progress_timeout: float = DEFAULT_RECEIVE_PROGRESS_TIMEOUT,
    sync_callbacks: SyncMode | str = SyncMode.THREAD,
    max_threads: float = DEFAULT_MAX_THREADS,
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
    max_receive_buffer_per_peer: int = DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER,
    tls: TLSConfig | None = None,
    reconnect: bool = True,
    reconnect_min_delay: float = DEFAULT_RECONNECT_MIN_DELAY,
    reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
    max_receive_buffer: int = DEFAULT_MAX_RECEIVE_BUFFER,
    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES,
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
        receive_progress_timeout: seconds a partly received object may go
            without a byte of it arriving, while it has credit, before its
            session ends with ``TIMEOUT`` (default 60), however alive the
            connection is otherwise.
        sync_callbacks: ``"thread"`` (default) runs plain user callbacks in
            worker threads; ``"inline"`` runs them in the trio task.
        max_threads: most worker threads used at once for plain callbacks
            (default 40, trio's own limit; ``math.inf`` for none); a session
            waiting for a thread holds none, whatever peers open.
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
            allowed (one ``window`` at most); those early bytes are bounded
            by as much again (streams past it are refused with
            ``SERVICE_UNAVAILABLE``), so the bytes actually held stay within
            twice this (or one larger object).
        tls: this site's certificate, key and CA, for ``tls://`` URLs (see
            :class:`TLSConfig`). A peer on a TLS link must claim the name its
            certificate proves.
        reconnect: re-dial each link this site dialed whenever it is lost,
            until the site shuts down.
        reconnect_min_delay: seconds before the first re-dial; the delay
            doubles after each failed one (each delay jittered down by up
            to half).
        reconnect_max_delay: the longest delay between two re-dials.
        max_receive_buffer: the same budget for all peers together (default
            2 GiB; site names cost nothing, so the per-peer budget alone does
            not bound a site). An object is admitted only when it fits both,
            or when the site holds nothing else.
        max_pending_handshakes: incoming connections whose HELLO is not in
            yet, at once (default 128); each holds a few KiB until then. One
            more is refused at once (GOAWAY ``NO_ERROR``, "try again") and
            closed, so a flood of silent connections holds no descriptors.

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
        receive_progress_timeout=receive_progress_timeout,
        sync_callbacks=SyncMode(sync_callbacks),
        max_threads=max_threads,
        max_streams_per_peer=max_streams_per_peer,
        max_receive_buffer_per_peer=max_receive_buffer_per_peer,
        tls=tls,
        reconnect=reconnect,
        reconnect_min_delay=reconnect_min_delay,
        reconnect_max_delay=reconnect_max_delay,
        max_receive_buffer=max_receive_buffer,
        max_pending_handshakes=max_pending_handshakes,
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
            await site._runner.aclose()
    if error is not None:
        raise error


_TOO_MANY_HANDSHAKES: Final = encode_frame(
    GoAway(ErrorCode.NO_ERROR, "too many connections waiting for their HELLO; try again")
)[0]

#: At most one log record per this many seconds about accept() failing for
#: lack of resources (trio logs and retries every 0.1 s).
_ACCEPT_ERROR_LOG_INTERVAL = 10.0


class _AcceptErrorFilter(logging.Filter):
    """Passes one of trio's accept-retry records per interval, without its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._limit = RateLimit(_ACCEPT_ERROR_LOG_INTERVAL)

    def filter(self, record: logging.LogRecord) -> bool:
        suppressed = self._limit.allow()
        if suppressed is None:
            return False
        record.msg = f"{record.msg} ({suppressed} more since the last such message)"
        record.exc_info = None
        record.exc_text = None
        return True


def _rate_limit_accept_errors() -> None:
    """Rate-limit trio's log of accept() failures such as EMFILE (installed once)."""
    trio_logger = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, _AcceptErrorFilter) for f in trio_logger.filters):
        trio_logger.addFilter(_AcceptErrorFilter())


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
