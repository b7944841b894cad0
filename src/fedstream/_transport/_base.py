"""The transport interface and the scheme registry.

The registry holds *factories*, not transports: each site makes its own
transport objects from its own :class:`TransportConfig`, so one process can
run sites with different certificates side by side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

if TYPE_CHECKING:
    from .._tls import TLSConfig

__all__ = [
    "ConnectionHandler",
    "Transport",
    "TransportConfig",
    "TransportFactory",
    "make_transport",
    "register_transport",
    "split_url",
    "transport_schemes",
]

#: Called with each accepted stream, before the transport's own handshake
#: (see :meth:`Transport.upgrade`); owns the stream and must close it.
ConnectionHandler = Callable[[trio.abc.Stream], Awaitable[None]]


@dataclass(frozen=True)
class TransportConfig:
    """What a site tells the transports it makes."""

    #: Certificates for ``tls://``; ``None`` when the site has none.
    tls: TLSConfig | None = None
    #: Bound on a transport-level handshake (TLS, WebSocket upgrade), per connection.
    handshake_timeout: float = 10.0
    #: Where a transport runs the tasks a dialed stream needs for its whole
    #: life (a WebSocket's reader): the site's nursery. ``None`` for
    #: transports made outside a site; those cannot dial ``ws://``.
    nursery: trio.Nursery | None = None


class Transport(ABC):
    """Dials and listens for byte streams named by URLs of one scheme."""

    #: The URL scheme this transport serves, e.g. ``"tcp"``.
    scheme: str
    #: Whether :meth:`upgrade` runs a handshake of the transport's own. A
    #: stream turned away before it is upgraded then gets no fedstream bytes:
    #: its peer expects the transport's handshake first.
    upgrades: bool = False

    @abstractmethod
    async def connect(self, url: str) -> trio.abc.Stream:
        """Open a stream to ``url``.

        Raises:
            OSError: the peer cannot be reached.
            HandshakeError: the peer was reached but the transport's own
                handshake (TLS) failed.
        """

    @abstractmethod
    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept streams on ``url`` and run ``handler`` for each, until cancelled.

        Calls ``task_status.started(bound_url)`` once it is accepting, with the
        URL actually bound (port 0 replaced by the real port). Each stream
        reaches ``handler`` (in its own task) as soon as it is accepted,
        before the transport's own handshake: the handler completes that
        with :meth:`upgrade`, so that the site counts and bounds the whole
        acceptance, and can turn a connection away before spending anything
        on it.
        """

    async def upgrade(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        """Complete the transport's own handshake on a stream :meth:`serve`
        handed to its handler; return the stream to speak fedstream on.

        Bounded by the config's ``handshake_timeout``. The default has no
        handshake and returns ``stream`` itself.

        Raises:
            HandshakeError: the handshake failed or timed out (``stream`` is
                closed by then).
        """
        return stream


#: Makes a site's transport for one scheme.
TransportFactory = Callable[[TransportConfig], Transport]

_REGISTRY: dict[str, TransportFactory] = {}


def register_transport(scheme: str, factory: TransportFactory) -> None:
    """Make ``factory`` build the transport for URLs of ``scheme`` (replacing any previous one)."""
    _REGISTRY[scheme] = factory


def transport_schemes() -> list[str]:
    """The URL schemes a site can listen on and dial, sorted."""
    return sorted(_REGISTRY)


def split_url(url: str) -> tuple[str, str, int | None]:
    """Split ``scheme://host:port`` into its parts; raise ``ValueError`` if malformed."""
    parts = urlsplit(url)
    if not parts.scheme:
        raise ValueError(f"{url!r} is not a URL (expected scheme://host:port)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} has an invalid port") from exc
    return parts.scheme, parts.hostname or parts.netloc, port


def make_transport(scheme: str, config: TransportConfig) -> Transport:
    """A new transport for ``scheme``, configured by ``config``.

    Raises:
        ValueError: no transport serves that scheme, or ``config`` does not
            suit it (``tls://`` without certificates).
    """
    try:
        factory = _REGISTRY[scheme]
    except KeyError:
        known = ", ".join(transport_schemes())
        raise ValueError(f"no transport for scheme {scheme!r} (known: {known})") from None
    return factory(config)
