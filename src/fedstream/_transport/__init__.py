"""Transports: how a site listens for and dials byte streams.

A transport turns a URL into a ``trio.abc.Stream``. The engine never looks
below that interface (plain TCP streams merely get a faster path), so TLS
and WebSocket transports plug in by scheme. Each site makes its own
transports from the registered factories (:func:`make_transport`).
"""

from ._base import (
    Transport,
    TransportConfig,
    TransportFactory,
    make_transport,
    register_transport,
    split_url,
    transport_schemes,
)
from ._memory import MemoryTransport
from ._tcp import TcpTransport
from ._tls import TlsTransport
from ._ws import WebSocketStream, WebSocketTransport

__all__ = [
    "MemoryTransport",
    "TcpTransport",
    "TlsTransport",
    "Transport",
    "TransportConfig",
    "TransportFactory",
    "WebSocketStream",
    "WebSocketTransport",
    "make_transport",
    "register_transport",
    "split_url",
    "transport_schemes",
]
