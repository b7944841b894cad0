"""Aux messages: one-object streams on a reserved channel.

FLARE's ``send_aux_request`` / ``register_aux_message_handler`` are built on
streams rather than on a frame of their own: a request is a stream of one
object on :data:`AUX_CHANNEL` whose topic is the aux topic; the receiving
site's handler runs as that stream's consumer and its return value is the
consumer's (last) reply; ``send_aux_request`` returns the replies
``process_replies`` saw. So aux traffic gets the same limits, flow control,
timeouts and hostile-input handling as any stream.

Every site registers the reserved channel for itself, which is why a user's
``"*"`` channel never sees aux requests, and refuses user registrations on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from .._api import ConsumerFactory, ObjectConsumer, ObjectProducer
from .._context import FLContext
from .._flare import to_shareable
from .._shareable import ReservedHeaderKey, ReturnCode, Shareable, make_reply

if TYPE_CHECKING:
    from ._site import Site

__all__ = ["AUX_CHANNEL", "AuxEndpoint"]

logger = logging.getLogger(__name__)

#: The app channel aux requests travel on; user registrations on it are refused.
AUX_CHANNEL: Final = "__fedstream_aux__"


class _RequestProducer(ObjectProducer):
    """Sends the one request and keeps the replies to it."""

    def __init__(self, request: Shareable, timeout: float) -> None:
        self.request: Shareable | None = request
        self.timeout = timeout
        self.replies: dict[str, Shareable] | None = None

    async def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        request, self.request = self.request, None
        return None if request is None else (request, self.timeout)

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies = dict(replies)
        return self.replies


class _HandlerConsumer(ObjectConsumer):
    def __init__(self, endpoint: AuxEndpoint) -> None:
        self.endpoint = endpoint

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        topic = str(stream_ctx.get("__topic__", ""))
        return False, await self.endpoint.handle(topic, shareable, fl_ctx)


class _HandlerFactory(ConsumerFactory):
    def __init__(self, endpoint: AuxEndpoint) -> None:
        self.endpoint = endpoint

    async def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _HandlerConsumer(self.endpoint)


class AuxEndpoint:
    """A site's aux handlers, and the sending of aux requests."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.handlers: dict[str, Callable[..., Any]] = {}
        self.factory = _HandlerFactory(self)

    def register(self, topic: str, message_handle_func: Callable[..., Any]) -> None:
        if not isinstance(topic, str) or not topic:
            raise TypeError("aux topic must be a non-empty string")
        if not callable(message_handle_func):
            raise TypeError("message_handle_func must be callable")
        self.handlers[topic] = message_handle_func

    async def handle(self, topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        handler = self.handlers.get(topic) or self.handlers.get("*")
        if handler is None:
            logger.warning("site %s: no aux handler for topic %r", self.site.name, topic)
            return make_reply(ReturnCode.TOPIC_UNKNOWN)
        self.site._set_engine(fl_ctx)
        try:
            reply = await self.site._runner(handler, topic, request, fl_ctx)
        except Exception as exc:
            logger.exception("aux handler for topic %r failed", topic)
            return make_reply(
                ReturnCode.EXECUTION_EXCEPTION,
                {ReservedHeaderKey.ERROR: f"{type(exc).__name__}: {exc}"[:1000]},
            )
        if reply is None:
            return make_reply(ReturnCode.OK)
        reply = to_shareable(reply)
        if not isinstance(reply, Shareable):
            logger.error("aux handler for %r returned %s, not a Shareable", topic, type(reply))
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return reply

    async def send(
        self,
        targets: Sequence[str],
        topic: str,
        request: Shareable,
        timeout: float,
        fl_ctx: FLContext | None,
        optional: bool = False,
        secure: bool = False,
    ) -> dict[str, Shareable]:
        if not isinstance(topic, str) or not topic:
            raise TypeError("aux topic must be a non-empty string")
        request = to_shareable(request)
        if not isinstance(request, Shareable):
            raise TypeError(f"request must be a Shareable, not {type(request).__name__}")
        names = [targets] if isinstance(targets, str) else list(targets)
        if not timeout or timeout <= 0:
            # FLARE's fire-and-forget form: send in the background, return no replies.
            self.site._nursery.start_soon(
                self._send_quietly, names, topic, request, fl_ctx, optional, secure
            )
            return {}
        producer = _RequestProducer(request, float(timeout))
        rc, _ = await self.site._stream_objects(
            AUX_CHANNEL, topic, {}, names, producer, fl_ctx, optional, secure
        )
        replies = producer.replies
        if replies is None:
            replies = {name: make_reply(rc) for name in names}
        return replies

    async def _send_quietly(
        self,
        names: list[str],
        topic: str,
        request: Shareable,
        fl_ctx: FLContext | None,
        optional: bool,
        secure: bool,
    ) -> None:
        try:
            await self.send(
                names, topic, request, self.site.options.peer_timeout, fl_ctx, optional, secure
            )
        except Exception as exc:
            logger.info("fire-and-forget aux request %r to %s failed: %s", topic, names, exc)
