"""TLS over TCP: ``tls://host:port``.

Streams are ``trio.SSLStream``s whose TLS handshake is complete before the
site sees them, bounded by the site's ``handshake_timeout``. A listener runs
each accepted connection's TLS handshake in that connection's own task, so
a slow or hostile peer never holds up another; a failed one is logged and
closed without reaching the site.
"""

from __future__ import annotations

import logging
import ssl

import trio

from .._errors import HandshakeError
from .._ratelimit import RateLimit
from .._tls import TLSConfig, describe_tls_error
from ._base import ConnectionHandler, Transport, TransportConfig, register_transport, split_url
from ._tcp import TcpTransport

__all__ = ["TlsTransport"]

logger = logging.getLogger(__name__)

#: At most one warning per this many seconds, per listening site, about
#: refused TLS handshakes (any client can cause them); the rest go to debug.
REFUSAL_LOG_INTERVAL = 10.0


class TlsTransport(TcpTransport):
    """TLS 1.2+ over TCP with this site's certificate; mutual when the config has a CA."""

    scheme = "tls"

    def __init__(self, tls: TLSConfig, *, handshake_timeout: float) -> None:
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self._server_context = tls.server_context()
        self._client_context = tls.client_context()
        self._refusals = RateLimit(REFUSAL_LOG_INTERVAL)

    async def connect(self, url: str) -> trio.abc.Stream:
        _, host, _ = split_url(url)
        stream = await super().connect(url)
        ssl_stream = trio.SSLStream(stream, self._client_context, server_hostname=host)
        try:
            await self._handshake(ssl_stream, f"with {url}", HandshakeError)
        except BaseException:  # the caller's deadline included: never leak the socket
            await trio.aclose_forcefully(ssl_stream)
            raise
        return ssl_stream

    async def _handshake(
        self, stream: trio.SSLStream[trio.abc.Stream], where: str, error: type[Exception]
    ) -> None:
        """Complete the TLS handshake within the timeout, or close the stream and raise."""
        limit = self.handshake_timeout
        problem = ""
        with trio.move_on_after(limit) as scope:
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                problem = describe_tls_error(exc)
        if scope.cancelled_caught:
            problem = f"no TLS handshake within {limit} s"
        if problem:
            await trio.aclose_forcefully(stream)
            raise error(f"TLS handshake {where} failed: {problem}")

    def _accepting(self, handler: ConnectionHandler) -> ConnectionHandler:
        async def accept(stream: trio.abc.Stream) -> None:
            where = "from an unknown peer"
            if isinstance(stream, trio.SocketStream):
                try:
                    host, port = stream.socket.getpeername()[:2]
                    where = f"from {host}:{port}"
                except OSError:
                    pass
            ssl_stream = trio.SSLStream(stream, self._server_context, server_side=True)
            try:
                await self._handshake(ssl_stream, where, _Refused)
            except _Refused as exc:
                suppressed = self._refusals.allow()
                if suppressed is None:
                    logger.debug("refused a connection: %s", exc)
                else:
                    logger.warning(
                        "refused a connection: %s (%d more refused since the last such warning)",
                        exc,
                        suppressed,
                    )
                return
            await handler(ssl_stream)

        return accept


class _Refused(Exception):
    """An incoming connection failed its TLS handshake (logged, never raised out)."""


def _tls(config: TransportConfig) -> Transport:
    if config.tls is None:
        raise ValueError("tls:// needs certificates: pass tls=fedstream.TLSConfig(cert, key, ca)")
    return TlsTransport(config.tls, handshake_timeout=config.handshake_timeout)


register_transport("tls", _tls)
