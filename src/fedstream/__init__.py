"""fedstream: NVIDIA FLARE-style object streaming on trio.

Everything public is importable from here; modules whose names start with an
underscore are internal.
"""

from ._api import (
    ConsumerFactory,
    ObjectConsumer,
    ObjectProducer,
    StreamableEngine,
    StreamContextKey,
)
from ._context import FLContext, Signal
from ._engine import (
    END_RESULT,
    END_RESULTS,
    ConnectionStats,
    Site,
    SiteOptions,
    StreamStats,
    SyncMode,
    open_site,
    serve_site,
)
from ._errors import (
    ConnectionLostError,
    FedstreamError,
    HandshakeError,
    LocalProtocolError,
    ObjectTooLargeError,
    ProtocolError,
    RemoteProtocolError,
    SiteClosedError,
    UnknownTargetError,
)
from ._shareable import ReservedHeaderKey, ReturnCode, Shareable, make_reply
from ._tls import TLSConfig
from ._version import __version__

__all__ = [
    "END_RESULT",
    "END_RESULTS",
    "ConnectionLostError",
    "ConnectionStats",
    "ConsumerFactory",
    "FLContext",
    "FedstreamError",
    "HandshakeError",
    "LocalProtocolError",
    "ObjectConsumer",
    "ObjectProducer",
    "ObjectTooLargeError",
    "ProtocolError",
    "RemoteProtocolError",
    "ReservedHeaderKey",
    "ReturnCode",
    "Shareable",
    "Signal",
    "Site",
    "SiteClosedError",
    "SiteOptions",
    "StreamContextKey",
    "StreamStats",
    "StreamableEngine",
    "SyncMode",
    "TLSConfig",
    "UnknownTargetError",
    "__version__",
    "make_reply",
    "open_site",
    "serve_site",
]
