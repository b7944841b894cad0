"""WebSocket: ``ws://host:port/path``, and over TLS ``wss://host:port/path``.

For networks that let only HTTP(S) out, through proxies that forward
WebSocket upgrades. The engine's frames are carried unchanged: they form one
byte stream, cut into binary WebSocket messages of at most
:data:`MESSAGE_SIZE` bytes each, with no regard for frame boundaries (see
docs/protocol.md, "WebSocket"). :class:`WebSocketStream` presents that byte
stream to the engine as a ``trio.abc.Stream``.

The WebSocket layer is ``trio-websocket``, with every bound it has set here
rather than left at its defaults: the largest message accepted
(:data:`MESSAGE_SIZE`, a peer's bigger message closes the connection with
code 1009 and raises :class:`RemoteProtocolError`), the number of whole
messages its reader queues before it stops reading the socket
(:data:`MESSAGE_QUEUE_SIZE`), and the size of its socket reads
(:data:`RECEIVE_SIZE`). So one connection holds at most about
``(MESSAGE_QUEUE_SIZE + 2) * MESSAGE_SIZE + RECEIVE_SIZE`` received bytes in
this layer, whatever the peer sends.

Each WebSocket connection has a reader task (trio-websocket's). A listener
runs it in the accepted connection's own task; a dialer runs it in the
site's nursery (:attr:`TransportConfig.nursery`), in a task that ends when
the stream is closed. Errors of the reader are kept and reported by the
stream's methods, never raised into a nursery.

``wss://`` is TLS first (the ``tls://`` transport's handshake, certificates
and refusals), then the WebSocket upgrade inside it; the site checks a
peer's certificate against the name it claims exactly as on ``tls://``,
through :attr:`WebSocketStream.tls_stream`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, cast
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from .._errors import HandshakeError, RemoteProtocolError
from .._tls import describe_tls_error
from ._base import ConnectionHandler, Transport, TransportConfig, split_url
from ._tcp import TcpTransport
from ._tls import TlsTransport

__all__ = [
    "MESSAGE_QUEUE_SIZE",
    "MESSAGE_SIZE",
    "RECEIVE_SIZE",
    "WebSocketStream",
    "WebSocketTransport",
]

logger = logging.getLogger(__name__)

#: Most stream bytes in one binary message, sent or accepted (part of the
#: protocol: a peer's larger message is refused). One constant rather than a
#: site option so that sites with different ``max_frame_size`` interoperate.
MESSAGE_SIZE: Final = 1024 * 1024
#: Whole messages trio-websocket's reader queues before it stops reading the socket.
MESSAGE_QUEUE_SIZE: Final = 4
#: Bytes trio-websocket asks the socket for per read.
RECEIVE_SIZE: Final = 256 * 1024
#: Seconds ``aclose`` waits for the peer to answer our close frame.
CLOSE_TIMEOUT: Final = 1.0

#: Close codes (RFC 6455, section 7.4.1).
_NORMAL, _GOING_AWAY, _UNSUPPORTED_DATA, _ABNORMAL, _TOO_BIG = 1000, 1001, 1003, 1006, 1009


class WebSocketStream(trio.abc.Stream):
    """A byte stream over one WebSocket connection: bytes in, binary messages out.

    ``send_all`` cuts its bytes into messages of at most :data:`MESSAGE_SIZE`;
    ``receive_some`` returns the bytes of binary messages in order, ``b""``
    once the peer closed the WebSocket normally.

    Error handling:
        A text message, or a message larger than :data:`MESSAGE_SIZE`, makes
        ``receive_some`` close the WebSocket (code 1003 or 1009), log a
        warning and raise :class:`RemoteProtocolError`. A connection lost
        without a close frame, or closed by the peer with an error code,
        raises ``trio.BrokenResourceError``; using the stream after
        ``aclose`` raises ``trio.ClosedResourceError``.
    """

    def __init__(
        self,
        connection: WebSocketConnection,
        transport_stream: trio.abc.Stream,
        reader: _Reader,
        *,
        where: str,
    ) -> None:
        self._ws = connection
        self._reader = reader
        #: The TCP or TLS stream the WebSocket runs on.
        self.transport_stream = transport_stream
        self._where = where
        #: The message being handed out, and how much of it has been.
        self._message = b""
        self._offset = 0
        self._closed = False
        self._sending = False
        self._receiving = False
        self._refused: RemoteProtocolError | None = None
        #: Set once ``aclose`` has closed the transport stream.
        self.finished = trio.Event()

    @property
    def tls_stream(self) -> trio.SSLStream[trio.abc.Stream] | None:
        """The TLS layer under the WebSocket (``wss://``): the site checks its peer certificate."""
        stream = self.transport_stream
        return stream if isinstance(stream, trio.SSLStream) else None

    # ----------------------------------------------------------- sending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this WebSocket stream")
        self._sending = True
        try:
            if not data:
                await trio.lowlevel.checkpoint()
                return
            if isinstance(data, bytes) and len(data) <= MESSAGE_SIZE:
                await self._send(data)
                return
            view = memoryview(data).cast("B")
            for start in range(0, len(view), MESSAGE_SIZE):
                await self._send(bytes(view[start : start + MESSAGE_SIZE]))
        finally:
            self._sending = False

    async def _send(self, message: bytes) -> None:
        try:
            await self._ws.send_message(message)
        except ConnectionClosed as exc:
            if self._closed:
                raise trio.ClosedResourceError("the WebSocket stream is closed") from None
            raise trio.BrokenResourceError(
                f"WebSocket {self._where} closed: {_describe(exc)}"
            ) from exc

    async def wait_send_all_might_not_block(self) -> None:
        """Returns at once: trio-websocket offers no such wait (``send_all`` may block)."""
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket stream is closed")
        await trio.lowlevel.checkpoint()

    # --------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this WebSocket stream")
        self._receiving = True
        try:
            while len(self._message) == self._offset:
                if self._refused is not None:
                    raise self._refused
                try:
                    message = await self._ws.get_message()
                except ConnectionClosed as exc:
                    return await self._ended(exc)
                if isinstance(message, str):
                    await self._refuse(
                        _UNSUPPORTED_DATA,
                        f"the peer {self._where} sent a text message "
                        f"(fedstream uses binary messages only)",
                    )
                self._message, self._offset = message, 0
            message, start = self._message, self._offset
            end = len(message) if max_bytes is None else min(len(message), start + max_bytes)
            if end == len(message):
                self._message, self._offset = b"", 0
                if start == 0:
                    return message  # the whole message: no copy
            else:
                self._offset = end
            return message[start:end]
        finally:
            self._receiving = False

    async def _ended(self, exc: ConnectionClosed) -> bytes:
        """What ``receive_some`` makes of the WebSocket's end: ``b""`` or an error."""
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket stream is closed") from None
        reason = exc.reason
        code = reason.code if reason is not None else _ABNORMAL
        # trio-websocket's reader refused a message larger than MESSAGE_SIZE
        # (it sent close 1009 and closed its queue: ClosedResourceError),
        # as opposed to the peer closing with 1009 (EndOfChannel).
        if code == _TOO_BIG and isinstance(exc.__context__, trio.ClosedResourceError):
            await self._refuse(
                _TOO_BIG,
                f"the peer {self._where} sent a WebSocket message larger than {MESSAGE_SIZE} bytes",
            )
        if code in (_NORMAL, _GOING_AWAY):
            return b""
        raise trio.BrokenResourceError(f"WebSocket {self._where} closed: {_describe(exc)}")

    async def _refuse(self, code: int, message: str) -> NoReturn:
        """Close the WebSocket with ``code`` (bounded), log, and raise the typed error."""
        error = RemoteProtocolError(message)
        self._refused = error
        logger.warning("refused a WebSocket message: %s", message)
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose(code, message[:120])
        raise error

    # ----------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Say close and wait for the answer (while the reader runs, at most
        :data:`CLOSE_TIMEOUT`), then close the socket.

        Always closes, even when cancelled.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            with trio.move_on_after(CLOSE_TIMEOUT) as waiting:
                # Only the reader can see the answer: stop waiting once it ends
                # (say, because the site that ran it is shutting down).
                self._reader.watch(waiting)
                await self._ws.aclose()
        finally:
            await trio.aclose_forcefully(self.transport_stream)
            self.finished.set()


def _describe(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "connection lost"
    text = f"code {reason.code} ({reason.name})"
    return f"{text}: {reason.reason}" if reason.reason else text


class _Watched(trio.abc.Stream):
    """The dialer's stream as trio-websocket sees it: the same bytes, but the
    error that broke it is kept (trio-websocket drops it), so a failed upgrade
    can say why."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.error: trio.BrokenResourceError | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            self.error = exc
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self.error = exc
            raise

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Reader:
    """Stands in for the nursery trio-websocket starts its reader task in.

    The reader runs in ``nursery`` but never raises into it: its error is
    kept (a rejected upgrade raises :class:`ConnectionRejected` there). The
    cancel scopes it watches are cancelled when it ends, so a wait for an
    answer that only it could see (the upgrade's, the close's) stops at once.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._watchers: list[trio.CancelScope] = []
        self.error: Exception | None = None
        self.ended = False

    def watch(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the reader ends (now, if it has)."""
        if self.ended:
            scope.cancel()
        else:
            self._watchers.append(scope)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        self._nursery.start_soon(self._run, fn, *args)

    async def _run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            self.error = exc
            logger.debug("WebSocket reader ended with %r", exc)
        finally:
            self.ended = True
            for scope in self._watchers:
                scope.cancel()
            self._watchers.clear()


class WebSocketTransport(Transport):
    """``ws://`` over TCP, or ``wss://`` over the ``tls://`` transport's TLS."""

    upgrades = True

    def __init__(self, scheme: str, config: TransportConfig) -> None:
        self.scheme = scheme
        self.handshake_timeout = config.handshake_timeout
        self._nursery = config.nursery
        self._inner: TcpTransport
        if scheme == "wss":
            if config.tls is None:
                raise ValueError(
                    "wss:// needs certificates: pass tls=fedstream.TLSConfig(cert, key, ca)"
                )
            self._inner = TlsTransport(config.tls, handshake_timeout=config.handshake_timeout)
        else:
            self._inner = TcpTransport()

    # ------------------------------------------------------------- dialing

    async def connect(self, url: str) -> trio.abc.Stream:
        """Dial ``url``: TCP (and TLS for ``wss://``), then the WebSocket upgrade.

        Without a port, ``ws://`` dials port 80 and ``wss://`` port 443.

        Raises:
            OSError: the host cannot be reached.
            HandshakeError: the TLS handshake failed, the listener refused the
                upgrade (an HTTP status such as 404 for a wrong path), or no
                upgrade completed within ``handshake_timeout``.
        """
        if self._nursery is None:
            raise RuntimeError("a WebSocket dialer needs TransportConfig.nursery")
        _, host, port = split_url(url)
        if port is None:  # HTTP's defaults
            port = 443 if self.scheme == "wss" else 80
        resource = _resource(url)
        stream = await self._inner.connect(f"{self.scheme}://{_host_header(host, port)}")
        try:
            ws: WebSocketStream = await self._nursery.start(
                self._run_dialed, stream, url, _host_header(host, port), resource
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return ws

    async def _run_dialed(
        self,
        stream: trio.abc.Stream,
        url: str,
        host: str,
        resource: str,
        *,
        task_status: trio.TaskStatus[WebSocketStream],
    ) -> None:
        """Upgrade ``stream``, hand the result over, and run its reader until it is closed."""
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            opening = trio.CancelScope(deadline=trio.current_time() + self.handshake_timeout)
            reader = _Reader(nursery)
            reader.watch(opening)
            connection: WebSocketConnection | None = None
            watched = _Watched(stream)
            with opening:
                connection = await wrap_client_stream(
                    cast(trio.Nursery, reader),
                    cast(trio.SocketStream, watched),
                    host,
                    resource,
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    max_message_size=MESSAGE_SIZE,
                    receive_buffer_size=RECEIVE_SIZE,
                )
            if connection is None or reader.ended:
                why = _why(reader, broken=watched.error, tls=isinstance(stream, trio.SSLStream))
                error = HandshakeError(f"WebSocket upgrade with {url} failed: {why}")
                nursery.cancel_scope.cancel()
            else:
                ws = WebSocketStream(connection, stream, reader, where=f"at {url}")
                task_status.started(ws)
                await ws.finished.wait()
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    # ----------------------------------------------------------- listening

    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept TCP connections for ``url`` and hand them to ``handler`` at once.

        The handler (the site) then calls :meth:`upgrade`, which runs the TLS
        handshake (``wss://``) and the WebSocket upgrade, so both count
        against the site's ``max_pending_handshakes``. Requests for another
        path get HTTP 404.
        """
        path = urlsplit(url).path or "/"

        async def accepted(stream: trio.abc.Stream) -> None:
            await handler(_Accepted(stream, path))

        async with trio.open_nursery() as nursery:
            bound: str = await nursery.start(self._inner.serve, url, accepted)
            task_status.started(f"{self.scheme}://{bound.split('://', 1)[1]}{path}")

    async def upgrade(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        """The listener's side: TLS for ``wss://``, then the WebSocket upgrade.

        Raises:
            HandshakeError: either failed or did not complete in time (the
                stream is closed).
        """
        if not isinstance(stream, _Accepted):
            raise TypeError("upgrade() takes a stream this transport accepted")
        if self._nursery is None:
            raise RuntimeError("a WebSocket listener needs TransportConfig.nursery")
        path, raw = stream.path, stream.stream
        raw = await self._inner.upgrade(raw)  # closes the stream itself when it fails
        try:
            ws: WebSocketStream = await self._nursery.start(self._run_accepted, raw, path)
        except BaseException:
            await trio.aclose_forcefully(raw)
            raise
        return ws

    async def _run_accepted(
        self, stream: trio.abc.Stream, path: str, *, task_status: trio.TaskStatus[WebSocketStream]
    ) -> None:
        """Answer the upgrade, hand the result over, and run its reader until it is closed."""
        where = _peer_of(stream)
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            opening = trio.CancelScope(deadline=trio.current_time() + self.handshake_timeout)
            reader = _Reader(nursery)
            reader.watch(opening)
            connection: WebSocketConnection | None = None
            problem = ""
            with opening:
                request = await wrap_server_stream(
                    cast(trio.Nursery, reader),
                    stream,
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    max_message_size=MESSAGE_SIZE,
                    receive_buffer_size=RECEIVE_SIZE,
                )
                if request.path.split("?", 1)[0] != path:
                    problem = f"it asked for path {request.path[:200]!r}, not {path!r} (HTTP 404)"
                    await request.reject(404, body=b"no fedstream site at this path\n")
                else:
                    connection = await request.accept()
            if connection is None and not problem:
                problem = _why(reader, server=True)
            if connection is None:
                error = HandshakeError(f"refused a WebSocket connection from {where}: {problem}")
                nursery.cancel_scope.cancel()
            else:
                ws = WebSocketStream(connection, stream, reader, where=f"from {where}")
                task_status.started(ws)
                await ws.finished.wait()
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error


class _Accepted(trio.abc.Stream):
    """An accepted TCP (or, before its handshake, TLS) stream, with the path
    its listener serves, until :meth:`WebSocketTransport.upgrade` upgrades it.

    Only closing matters before the upgrade (a site over its pending limit
    closes it); the other methods pass through.
    """

    def __init__(self, stream: trio.abc.Stream, path: str) -> None:
        self.stream = stream
        self.path = path

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


def _why(
    reader: _Reader,
    *,
    server: bool = False,
    broken: BaseException | None = None,
    tls: bool = False,
) -> str:
    """Why a WebSocket upgrade did not complete, from how its reader ended
    (and, for a dialer, the error that broke its stream, if one did)."""
    error = reader.error
    if isinstance(error, ConnectionRejected):
        return f"the listener answered HTTP {error.status_code} instead of upgrading"
    if error is not None:
        who = "the dialer's request" if server else "the listener's answer"
        return f"{who} is not a WebSocket upgrade (not a WebSocket peer?): {error!r}"
    if not reader.ended:
        return "no WebSocket upgrade within handshake_timeout"
    if server:
        return "malformed WebSocket upgrade request (answered HTTP 400), or the peer hung up"
    if broken is not None and tls:
        # TLS 1.3: a listener that refuses our certificate says so after our
        # side of the TLS handshake is done, on the first read.
        return f"the TLS link broke: {describe_tls_error(broken)}"
    if broken is not None:
        return f"the connection broke: {broken}"
    return "the listener closed the connection during the upgrade (not a WebSocket listener?)"


def _resource(url: str) -> str:
    parts = urlsplit(url)
    resource = parts.path or "/"
    return f"{resource}?{parts.query}" if parts.query else resource


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(stream: trio.abc.Stream) -> str:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        try:
            host, port = inner.socket.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            pass
    return "an unknown peer"


def ws_factory(config: TransportConfig) -> Transport:
    """The ``ws://`` transport (registered lazily by :mod:`fedstream._transport`)."""
    return WebSocketTransport("ws", config)


def wss_factory(config: TransportConfig) -> Transport:
    """The ``wss://`` transport (registered lazily by :mod:`fedstream._transport`)."""
    return WebSocketTransport("wss", config)
