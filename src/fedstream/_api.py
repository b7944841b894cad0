"""The streaming API contract, shaped exactly like ``nvflare.apis.streaming``.

Code written against FLARE's streaming API subclasses these classes; the
class names, method names, parameter names, parameter order, defaults and the
split between abstract and concrete methods are FLARE's
(``tests/test_contract.py`` pins them), so porting such code is a change of
imports. Code that keeps subclassing nvflare's own classes needs no change
at all: the engine accepts nvflare producers, consumers, factories,
``Shareable``s and ``FLContext``s as they are (``tests/test_flare.py`` runs
FLARE's own streamers on :class:`~fedstream.BlockingSite`).

The roles:

* An :class:`ObjectProducer` on the sending site produces a sequence of
  :class:`~fedstream._shareable.Shareable` objects and judges the receivers'
  replies to each one.
* On each receiving site, a :class:`ConsumerFactory` registered for an app
  channel and topic hands out one fresh :class:`ObjectConsumer` per stream,
  which consumes the objects and replies to each.
* A :class:`StreamableEngine` connects the two: ``stream_objects`` on the
  sender, ``register_stream_processing`` on the receivers.

Sync or async
-------------
Any of ``produce``, ``process_replies``, ``consume``, ``finalize``,
``get_consumer``, ``return_consumer`` and a ``stream_done_cb`` may be written
either as a plain ``def`` or as an ``async def``; the engine looks at which it
is given:

* A coroutine function is awaited in the trio run loop, inside the stream
  session's cancel scope. When the session is aborted, times out or loses its
  peer, the callback is cancelled at its next checkpoint. This is the cheap
  and responsive choice for callbacks that do I/O with trio.
* A plain function runs in a worker thread of the site's own pool,
  so a blocking callback (reading a file, running a model) does not stall
  the other sessions. Python cannot interrupt a thread, so the engine cannot
  stop a sync callback when the session ends: long-running sync callbacks
  should check ``fl_ctx.get_run_abort_signal().triggered`` and return early,
  exactly as FLARE asks.

The type hints below describe the plain-``def`` form, as in FLARE.

Where the engine lives
----------------------
fedstream's trio ``Site`` mirrors :class:`StreamableEngine` with ``async``
methods of the same names and parameters (``await site.stream_objects(...)``);
it does not subclass it, because an ``async def`` cannot honour a sync
abstract method. :class:`~fedstream.BlockingSite`, which runs a ``Site`` in a
background thread for code that is not written for trio, implements
:class:`StreamableEngine` itself (and, with nvflare installed, counts as
nvflare's ``StreamableEngine`` too), so it can be passed wherever FLARE
expects a streaming engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, Final

from ._context import FLContext
from ._shareable import Shareable

__all__ = [
    "ConsumerFactory",
    "ObjectConsumer",
    "ObjectProducer",
    "StreamContext",
    "StreamContextKey",
    "StreamableEngine",
    "stream_done_cb_signature",
]

#: The type of ``stream_ctx``: FLARE spells it ``StreamContext``, an alias of ``dict``.
StreamContext = dict


class StreamContextKey:
    """Keys the engine sets in every ``stream_ctx`` dict.

    ``stream_ctx`` is an app-defined dict that travels with the stream; the
    engine adds these entries so a consumer can tell which app channel and
    topic it is serving and how the stream ended.
    """

    CHANNEL: Final[str] = "__channel__"
    TOPIC: Final[str] = "__topic__"
    #: The return code the stream ended with, for ``finalize`` and ``stream_done_cb``.
    RC: Final[str] = "__RC__"
    #: Marks the last object of a stream.
    END_STREAM: Final[str] = "__end_stream__"


class ObjectConsumer(ABC):
    """Processes the objects of one stream on a receiving site.

    A consumer serves exactly one stream; its factory makes a new one for each.
    """

    @abstractmethod
    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None] | Awaitable[tuple[bool, Shareable | None]]:
        """Handle one received object and say whether the stream should go on.

        Args:
            shareable: the object that arrived.
            stream_ctx: the stream's context dict.
            fl_ctx: the context of this stream on this site.

        Returns:
            ``(keep_going, reply)``. ``reply`` goes back to the producer, which
            sees it in ``process_replies``; it may be ``None`` when there is
            nothing to say. ``keep_going=False`` tells the engine this
            consumer wants no more objects.

        The channel and topic in ``stream_ctx`` are the app's own; they are not
        the message headers the transport uses to route messages.
        """

    def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Awaitable[None] | None:
        """Clean up after the stream; called exactly once, however it ended.

        ``stream_ctx[StreamContextKey.RC]`` tells whether it ended with ``OK``
        or with an error, abort or timeout. The default does nothing.
        """
        return None


class ConsumerFactory(ABC):
    """Creates an :class:`ObjectConsumer` for each new stream on a channel/topic."""

    @abstractmethod
    def get_consumer(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> ObjectConsumer | Awaitable[ObjectConsumer]:
        """Return the consumer for a stream that has just started.

        Called once per stream, when its first object arrives. Several streams
        may be live at once, so return a new consumer each time rather than a
        shared one.

        Args:
            stream_ctx: the new stream's context dict.
            fl_ctx: the context of this stream on this site.
        """

    def return_consumer(
        self, consumer: ObjectConsumer, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Awaitable[None] | None:
        """Take back a consumer whose stream has finished (after its ``finalize``).

        Lets a factory pool or account for its consumers. The default does
        nothing.

        Args:
            consumer: the consumer ``get_consumer`` returned for this stream.
            stream_ctx: the stream's context dict.
            fl_ctx: the context of this stream on this site.
        """
        return None


class ObjectProducer(ABC):
    """Produces the objects of one stream on the sending site."""

    @abstractmethod
    def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float] | Awaitable[tuple[Shareable | None, float]]:
        """Return the next object to send and how long to wait for its replies.

        Returns:
            ``(shareable, timeout)``: ``timeout`` is in seconds and bounds the
            wait for every target's reply to this object. A ``None`` shareable
            ends the stream.

        A sync producer that may take long must watch
        ``fl_ctx.get_run_abort_signal()`` and return promptly once it is
        triggered.
        """

    @abstractmethod
    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        """Judge the replies to the object just sent, and decide whether to go on.

        Args:
            replies: one reply per target, keyed by site name.
            stream_ctx: the stream's context dict.
            fl_ctx: the context of this stream on this site.

        Returns:
            ``None`` to keep streaming. Anything else ends the stream, and
            ``stream_objects`` returns it as the stream's result.
        """


def stream_done_cb_signature(stream_ctx: dict[str, Any], fl_ctx: FLContext, **kwargs: Any) -> None:
    """Document the signature of a ``stream_done_cb``; it is never called.

    Args:
        stream_ctx: the context of the stream that ended; ``stream_ctx[StreamContextKey.RC]``
            says how.
        fl_ctx: the context of that stream on the receiving site (the same
            object its consumer's ``finalize`` got).
        kwargs: the ``cb_kwargs`` given to ``register_stream_processing``.

    Returns:
        Anything; a truthy result is sent to the sender (see ``END_RESULT``).
    """
    return None


class StreamableEngine(ABC):
    """What an engine must offer to send and receive object streams."""

    @abstractmethod
    def register_stream_processing(
        self,
        channel: str,
        topic: str,
        factory: ConsumerFactory,
        stream_done_cb: Callable[..., Any] | None = None,
        **cb_kwargs: Any,
    ) -> None:
        """Serve incoming streams on an app channel and topic with ``factory``.

        Each new stream on ``channel``/``topic`` gets its own consumer from
        ``factory.get_consumer``, since streams can overlap.

        Args:
            channel: the app channel.
            topic: the app topic.
            factory: makes one consumer per stream.
            stream_done_cb: called on this (receiving) site when a stream
                ends, as ``stream_done_cb(stream_ctx, fl_ctx, **cb_kwargs)``;
                see :meth:`stream_done_cb_signature`.
            cb_kwargs: extra keyword arguments for ``stream_done_cb``.
        """

    @abstractmethod
    def shutdown_streamer(self) -> None:
        """Stop streaming: end the live streams and release the streamer's resources."""

    @abstractmethod
    def stream_objects(
        self,
        channel: str,
        topic: str,
        stream_ctx: dict[str, Any],
        targets: list[str],
        producer: ObjectProducer,
        fl_ctx: FLContext,
        optional: bool = False,
        secure: bool = False,
    ) -> Any:
        """Send the objects ``producer`` makes to every site in ``targets``.

        Args:
            channel: the app channel of the stream.
            topic: the app topic of the stream.
            stream_ctx: the stream's context dict; it is sent to the receivers.
            targets: names of the receiving sites.
            producer: makes the objects and judges the replies.
            fl_ctx: the context of this stream on this site.
            optional: whether the stream is optional: if so, a failure to
                deliver it is not treated as an error.
            secure: whether to ask for end-to-end (peer-to-peer) security.

        Returns:
            The first non-``None`` value ``producer.process_replies`` returns.
        """

    def stream_done_cb_signature(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext, **kwargs: Any
    ) -> None:
        """Document the signature of a ``stream_done_cb``; it is never called.

        FLARE spells this as the module-level function
        :func:`stream_done_cb_signature`, which fedstream exports too.

        Args:
            stream_ctx: the context of the stream that ended.
            fl_ctx: the context of that stream on the receiving site.
            kwargs: the ``cb_kwargs`` given to ``register_stream_processing``.
        """
        return None
