"""fedstream: NVIDIA FLARE-style object streaming on trio.

Everything public is importable from here; modules whose names start with an
underscore are internal.
"""

import logging

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
from ._streamers import (
    ContainerResult,
    FileResult,
    NamePolicy,
    ReceivedContainer,
    ReceivedFile,
)
from ._tls import TLSConfig
from ._version import __version__

# The library never configures logging; without a handler of the
# application's, its records go nowhere (rather than to stderr, unformatted).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "END_RESULT",
    "END_RESULTS",
    "ConnectionLostError",
    "ConnectionStats",
    "ConsumerFactory",
    "ContainerResult",
    "FLContext",
    "FedstreamError",
    "FileResult",
    "HandshakeError",
    "LocalProtocolError",
    "NamePolicy",
    "ObjectConsumer",
    "ObjectProducer",
    "ObjectTooLargeError",
    "ProtocolError",
    "ReceivedContainer",
    "ReceivedFile",
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
