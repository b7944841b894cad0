"""Transports: how a site listens for and dials byte streams.

A transport turns a URL into a ``trio.abc.Stream``. The engine never looks
below that interface (plain TCP streams merely get a faster path), so TLS
and WebSocket transports plug in by scheme. Each site makes its own
transports from the registered factories (:func:`make_transport`).

The WebSocket transport is imported on first use (trio-websocket and wsproto
cost about 50 ms at start-up, which every CLI command and ``import fedstream``
would otherwise pay).
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ._ws import WebSocketStream, WebSocketTransport


def _lazy_ws(config: TransportConfig) -> Transport:
    from ._ws import ws_factory

    return ws_factory(config)


def _lazy_wss(config: TransportConfig) -> Transport:
    from ._ws import wss_factory

    return wss_factory(config)


register_transport("ws", _lazy_ws)
register_transport("wss", _lazy_wss)


def __getattr__(name: str) -> Any:
    if name in ("WebSocketStream", "WebSocketTransport"):
        from . import _ws

        return getattr(_ws, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
