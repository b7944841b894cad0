"""The one exception hierarchy of fedstream.

Every error fedstream raises on purpose derives from :class:`FedstreamError`.
Where a builtin exception means the same thing, the leaf inherits it too, so
``except ValueError`` keeps working for callers who do not know fedstream.

OS and CBOR errors are translated once, at the boundary where they occur, and
chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "ConnectionLostError",
    "FedstreamError",
    "HandshakeError",
    "LocalProtocolError",
    "ObjectTooLargeError",
    "ProtocolError",
    "RemoteProtocolError",
    "SiteClosedError",
    "UnknownTargetError",
]


class FedstreamError(Exception):
    """Root of every error fedstream raises on purpose."""


class ProtocolError(FedstreamError):
    """The wire protocol was violated.

    Never raised directly: see :class:`LocalProtocolError` (this side misused
    the API) and :class:`RemoteProtocolError` (the peer sent something
    invalid).
    """

    def __init__(self, msg: str, *, error_code: int = 1) -> None:
        super().__init__(msg)
        #: The GOAWAY code that describes this error on the wire.
        self.error_code = error_code


class LocalProtocolError(ProtocolError, ValueError):
    """This side tried to send something the protocol does not allow.

    For example a frame field of the wrong type, or a frame larger than the
    peer's ``max_frame_size``. This is a bug in the caller, not in the peer.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid fedstream frame sequence.

    The connection that carried them is closed; other connections and
    sessions are not affected.
    """


class ObjectTooLargeError(LocalProtocolError):
    """An object is larger than the configured ``max_object_size``."""


class HandshakeError(FedstreamError):
    """The HELLO exchange failed: version mismatch, duplicate or invalid site name,
    timeout, or the peer closed before completing it."""

    def __init__(self, msg: str, *, code: int | None = None) -> None:
        super().__init__(msg)
        #: The GOAWAY code of the refusal when one side refused the other
        #: (``ErrorCode.DUPLICATE_SITE``, ``IDENTITY_MISMATCH``, ...);
        #: ``None`` when the handshake failed otherwise (timeout, broken
        #: link, bytes that are not a fedstream HELLO).
        self.code = code


class SiteClosedError(FedstreamError):
    """The local site is shut down (or shutting down); you closed it."""


class ConnectionLostError(FedstreamError, ConnectionError):
    """The connection to a peer broke: the peer closed it, crashed, or went silent."""


class UnknownTargetError(FedstreamError, ValueError):
    """A stream names a target site that is not connected, or no target at all."""
