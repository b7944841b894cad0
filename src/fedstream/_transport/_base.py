"""The transport interface and the scheme registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import trio

__all__ = ["ConnectionHandler", "Transport", "get_transport", "register_transport", "split_url"]

#: Called with each accepted stream; owns it and must close it.
ConnectionHandler = Callable[[trio.abc.Stream], Awaitable[None]]


class Transport(ABC):
    """Dials and listens for byte streams named by URLs of one scheme."""

    #: The URL scheme this transport serves, e.g. ``"tcp"``.
    scheme: str

    @abstractmethod
    async def connect(self, url: str) -> trio.abc.Stream:
        """Open a stream to ``url``.

        Raises:
            OSError: the peer cannot be reached.
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
        URL actually bound (port 0 replaced by the real port).
        """


_REGISTRY: dict[str, Transport] = {}


def register_transport(transport: Transport) -> None:
    """Make ``transport`` serve URLs of its scheme (replacing any previous one)."""
    _REGISTRY[transport.scheme] = transport


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


def get_transport(url: str) -> Transport:
    """The transport registered for ``url``'s scheme.

    Raises:
        ValueError: no transport serves that scheme.
    """
    scheme = split_url(url)[0]
    try:
        return _REGISTRY[scheme]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"no transport for scheme {scheme!r} (known: {known})") from None
