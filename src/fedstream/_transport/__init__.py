"""Transports: how a site listens for and dials byte streams.

A transport turns a URL into a ``trio.abc.Stream``. The engine never looks
below that interface, so TLS and WebSocket transports plug in by scheme.
"""

from ._base import Transport, get_transport, register_transport
from ._memory import MemoryTransport
from ._tcp import TcpTransport

__all__ = ["MemoryTransport", "TcpTransport", "Transport", "get_transport", "register_transport"]
