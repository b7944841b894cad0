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
    StreamContext,
    StreamContextKey,
    stream_done_cb_signature,
)
from ._blocking import BlockingSite
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
from ._shareable import ReservedHeaderKey, ReturnCode, Shareable, make_copy, make_reply
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
    "BlockingSite",
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
    "StreamContext",
    "StreamContextKey",
    "StreamStats",
    "StreamableEngine",
    "SyncMode",
    "TLSConfig",
    "UnknownTargetError",
    "__version__",
    "make_copy",
    "make_reply",
    "open_site",
    "serve_site",
    "stream_done_cb_signature",
]
