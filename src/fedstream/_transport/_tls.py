"""TLS over TCP: ``tls://host:port``.

Streams are ``trio.SSLStream``s. A dialer's TLS handshake is complete when
:meth:`TlsTransport.connect` returns. A listener hands each TCP stream to the
site as soon as it is accepted, and the site runs the TLS handshake through
:meth:`TlsTransport.upgrade` as the first step of its own acceptance, so
that connections in the TLS handshake count against the site's
``max_pending_handshakes`` and one beyond it is closed before any TLS.

While pending, a connection holds little: no TLS state exists until the
peer has sent its first bytes (a silent peer holds a socket and a task), and
OpenSSL releases its record buffers while they are empty (CPython sets
``SSL_MODE_RELEASE_BUFFERS``).
"""

from __future__ import annotations

import logging
import ssl

import trio

from .._errors import HandshakeError
from .._tls import TLSConfig, describe_tls_error
from ._base import Transport, TransportConfig, register_transport, split_url
from ._tcp import TcpTransport

__all__ = ["TlsTransport"]

logger = logging.getLogger(__name__)


class TlsTransport(TcpTransport):
    """TLS 1.2+ over TCP with this site's certificate; mutual when the config has a CA."""

    scheme = "tls"
    upgrades = True

    def __init__(self, tls: TLSConfig, *, handshake_timeout: float) -> None:
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self._server_context = tls.server_context()
        self._client_context = tls.client_context()

    async def connect(self, url: str) -> trio.abc.Stream:
        _, host, _ = split_url(url)
        stream = await super().connect(url)
        ssl_stream = trio.SSLStream(stream, self._client_context, server_hostname=host)
        deadline = trio.current_time() + self.handshake_timeout
        await self._handshake(ssl_stream, f"with {url}", deadline)
        return ssl_stream

    async def upgrade(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        """The listener's TLS handshake on an accepted TCP stream.

        It waits for the peer's first bytes before it makes any TLS state, so
        a peer that stays silent costs a socket and a task, not an SSL object.
        """
        deadline = trio.current_time() + self.handshake_timeout
        where = "from an unknown peer"
        if isinstance(stream, trio.SocketStream):
            try:
                host, port = stream.socket.getpeername()[:2]
                where = f"from {host}:{port}"
            except OSError:
                pass
            try:
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(stream.socket)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        ssl_stream = trio.SSLStream(stream, self._server_context, server_side=True)
        await self._handshake(ssl_stream, where, deadline)
        return ssl_stream

    async def _handshake(
        self, stream: trio.SSLStream[trio.abc.Stream], where: str, deadline: float
    ) -> None:
        """Complete the TLS handshake by ``deadline``, or close the stream and raise."""
        problem = ""
        try:
            with trio.move_on_at(deadline) as scope:
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                    problem = describe_tls_error(exc)
            if scope.cancelled_caught:
                problem = f"no TLS handshake within {self.handshake_timeout} s"
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if problem:
            await trio.aclose_forcefully(stream)
            raise HandshakeError(f"TLS handshake {where} failed: {problem}")


def _tls(config: TransportConfig) -> Transport:
    if config.tls is None:
        raise ValueError("tls:// needs certificates: pass tls=fedstream.TLSConfig(cert, key, ca)")
    return TlsTransport(config.tls, handshake_timeout=config.handshake_timeout)


register_transport("tls", _tls)
