"""The sending side of one stream: produce, fan out, collect replies, repeat.

:class:`StreamSession` drives the producer. One
:class:`~._target.TargetLink` per target (``_target.py``) holds that
target's state on its connection and sends each object to it. For each
object the session starts one delivery per live target in a nursery, so a
slow target does not delay the others, and waits for all of them before
``process_replies``.

A pipelined stream (``max_in_flight`` above 1) sends up to that many
objects before the oldest one's replies are in, and collects them in order.

At the end, every live target is told END (normal) or ABORT (with the rc),
and the sender waits, bounded by ``finalize_timeout``, for each reachable
target's DONE: ``stream_objects`` returns only after the receivers finalized.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from .._api import ObjectProducer, StreamContextKey
from .._context import FLContext
from .._errors import ConnectionLostError, LocalProtocolError
from .._flare import from_flare
from .._shareable import ReturnCode, Shareable, make_reply
from .._wire import Data, EncodedObject, encode_object
from .._wire._stream import MAX_IN_FLIGHT
from ._callbacks import current_session, not_awaitable
from ._target import END_RESULT, TargetLink

if TYPE_CHECKING:
    from ._callbacks import CallbackRunner

__all__ = ["END_RESULT", "END_RESULTS", "MAX_IN_FLIGHT", "StreamSession", "TargetLink"]

logger = logging.getLogger(__name__)

#: Sender ``stream_ctx`` key: ``{target: stream_done_cb result}`` for every
#: target whose result was truthy, filled in before ``stream_objects`` returns.
END_RESULTS: Final = "__end_results__"

#: Stands for "no object produced yet" in the producer loop.
_NOT_PRODUCED: Final = object()

#: Objects up to this size go in one frame even when they have out-of-band
#: buffers: copying them together costs less than a frame more per part (on
#: both sides), and they stay within the receiver's staging buffer.
_COALESCE_MAX: Final = 128 * 1024


class StreamSession:
    """One ``stream_objects`` call: the producer loop and its targets."""

    def __init__(
        self,
        *,
        site_name: str,
        channel: str,
        topic: str,
        stream_ctx: dict[str, Any],
        links: Sequence[TargetLink],
        missing: Sequence[str],
        producer: ObjectProducer,
        fl_ctx: FLContext,
        runner: CallbackRunner,
        finalize_timeout: float,
        max_in_flight: int = 1,
    ) -> None:
        self.site_name = site_name
        #: Objects that may be sent before the oldest one's replies are in.
        self.max_in_flight = max_in_flight
        self.channel = channel
        self.topic = topic
        self.stream_ctx = stream_ctx
        self.links = list(links)
        self.missing = list(missing)
        self.producer = producer
        self.fl_ctx = fl_ctx
        self.runner = runner
        self.finalize_timeout = finalize_timeout
        self.scope = trio.CancelScope()
        self._stop_rc: str | None = None
        self._stop_reason = ""
        self._delivery_error: Exception | None = None

    def stop(self, rc: str, reason: str) -> None:
        """Cancel the stream from outside (abort signal, site shutdown)."""
        if self._stop_rc is None:
            self._stop_rc = rc
            self._stop_reason = reason
        self.scope.cancel()

    def _stopped(self) -> str | None:
        """The rc :meth:`stop` set, if it was called (possibly while a callback ran)."""
        return self._stop_rc

    def abort_targets_now(self, rc: str, reason: str) -> list[TargetLink]:
        """Tell every live target at once (for a shutdown that cannot wait for
        this session's own ending); return the links whose DONE to wait for."""
        waiting = []
        for link in self.links:
            if link.ended_rc is None and link.opened and not link.conn.closed.is_set():
                link.conn.send_control(link.abort_frame(rc, reason, self.site_name))
                waiting.append(link)
        return waiting

    async def run(self) -> tuple[str, Any]:
        signal = self.fl_ctx.get_run_abort_signal()
        token = trio.lowlevel.current_trio_token()

        def on_abort(_signal: Any) -> None:
            token.run_sync_soon(self.stop, ReturnCode.TASK_ABORTED, "abort signal triggered")

        unregister = signal.add_listener(on_abort)
        session_token = current_session.set(self)
        error: BaseException | None = None
        rc: str = ReturnCode.OK
        result: Any = None
        normal_end = False
        try:
            with self.scope:
                try:
                    rc, result, normal_end = await self._loop(signal)
                except Exception as exc:
                    error = exc
                    rc = ReturnCode.EXECUTION_EXCEPTION
                    self._stop_reason = f"producer failed: {type(exc).__name__}: {exc}"
            if self._stop_rc is not None and rc != self._stop_rc:
                # Stopped from outside (abort listener, shutdown): that is the outcome.
                rc, result, normal_end = self._stop_rc, None, False
            elif signal.triggered and normal_end:
                rc, result, normal_end = ReturnCode.TASK_ABORTED, result, False
        except BaseException:
            # Cancelled by the caller's own scope (or interrupted): the
            # receivers must not mistake that for a completed stream.
            rc, normal_end = ReturnCode.TASK_ABORTED, False
            self._stop_reason = self._stop_reason or "cancelled by the sender"
            raise
        finally:
            unregister()
            with trio.CancelScope(shield=True):
                await self._close_targets(rc, normal_end)
            for link in self.links:
                link.release()
            current_session.reset(session_token)
        if error is not None:
            raise error
        return rc, result

    async def _loop(self, signal: Any) -> tuple[str, Any, bool]:
        seq = 0
        wire_ctx = {k: v for k, v in self.stream_ctx.items() if k != StreamContextKey.END_STREAM}
        check_encodable(wire_ctx)
        for link in self.links:
            # The context travels in the first DATA head: it must meet this
            # peer's frame limit and depth rules before anything is produced.
            try:
                link.conn.protocol.send_parts(
                    Data(link.sid, 0, 0, self.channel, self.topic, wire_ctx)
                )
            except LocalProtocolError as exc:
                raise LocalProtocolError(
                    f"stream_ctx cannot be sent to {link.name}: {exc}"
                ) from exc
        if self.max_in_flight > 1:
            return await self._pipelined_loop(signal, wire_ctx)
        producer = self.producer
        # Plain produce and process_replies share one worker-thread hop per
        # object: process_replies of one object, then produce of the next.
        one_hop = self.runner.one_hop(producer.produce, producer.process_replies)
        produced: Any = _NOT_PRODUCED
        while True:
            if signal.triggered:
                return ReturnCode.TASK_ABORTED, None, False
            if produced is _NOT_PRODUCED:
                produced = await self.runner(producer.produce, self.stream_ctx, self.fl_ctx)
            if signal.triggered:  # produce itself may have fired it
                return ReturnCode.TASK_ABORTED, None, False
            stopped = self._stopped()
            if stopped is not None:
                # Stopped while produce ran (it may have shut its own site
                # down without a checkpoint since): no producer callback
                # runs after a stop.
                return stopped, None, False
            shareable, timeout = _check_produced(produced)
            produced = _NOT_PRODUCED
            if shareable is None:
                return ReturnCode.OK, None, True
            replies: dict[str, Shareable] = {}
            ctx = wire_ctx if seq == 0 else None
            await self._to_live_targets(
                self._deliver, replies, seq, _encode(shareable), timeout, ctx
            )
            for link in self.links:
                if link.name not in replies:
                    replies[link.name] = make_reply(link.ended_rc or ReturnCode.ERROR)
            for name in self.missing:
                replies[name] = make_reply(ReturnCode.COMMUNICATION_ERROR)
            seq += 1
            stopped = self._stopped()
            if stopped is not None:
                return stopped, None, False
            if one_hop:
                outcome, produced = await self.runner.call_plain(
                    self._replies_then_produce, replies, signal
                )
            else:
                outcome = await self.runner(
                    producer.process_replies, replies, self.stream_ctx, self.fl_ctx
                )
            if outcome is not None:
                if signal.triggered:
                    return ReturnCode.TASK_ABORTED, outcome, False
                return (ReturnCode.OK if outcome else ReturnCode.ERROR), outcome, True
            if produced is _NOT_PRODUCED and self._all_ended():
                # (An object already produced is still offered: its targets'
                # replies say they ended, and the stream ends after it.)
                return self._all_ended_rc(), None, True

    async def _pipelined_loop(self, signal: Any, wire_ctx: dict[str, Any]) -> tuple[str, Any, bool]:
        """Keep up to ``max_in_flight`` objects sent ahead of their replies.

        Each object goes to every live target as soon as it is produced
        (while the window is not full); then the oldest object's replies are
        collected and passed to ``process_replies``, in order, once each.
        The stream ends after the object whose ``process_replies`` result or
        replies end it: objects produced after that one get no
        ``process_replies`` call (see docs/semantics.md, pipelined streams).
        """
        for link in self.links:
            link.pipeline(self.max_in_flight)
        # (seq, timeout, replies known at once) per object in flight, oldest first.
        in_flight: collections.deque[tuple[int, float, dict[str, Shareable]]] = collections.deque()
        producer = self.producer
        one_hop = self.runner.one_hop(producer.produce, producer.process_replies)
        produced: Any = _NOT_PRODUCED
        seq = 0
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < self.max_in_flight:
                if signal.triggered:
                    return ReturnCode.TASK_ABORTED, None, False
                if produced is _NOT_PRODUCED:
                    produced = await self.runner(producer.produce, self.stream_ctx, self.fl_ctx)
                if signal.triggered:
                    return ReturnCode.TASK_ABORTED, None, False
                stopped = self._stopped()
                if stopped is not None:
                    return stopped, None, False
                shareable, timeout = _check_produced(produced)
                produced = _NOT_PRODUCED
                if shareable is None:
                    exhausted = True
                    break
                replies: dict[str, Shareable] = {}
                ctx = wire_ctx if seq == 0 else None
                await self._to_live_targets(
                    self._send, replies, seq, _encode(shareable), timeout, ctx
                )
                in_flight.append((seq, timeout, replies))
                seq += 1
                if self._all_ended():
                    break  # nothing more can go anywhere
            if not in_flight:
                return ReturnCode.OK, None, True
            oldest, timeout, replies = in_flight.popleft()
            waiting = [link for link in self.links if link.name not in replies]
            if len(waiting) == 1:
                await self._collect(waiting[0], replies, oldest, timeout)
            elif waiting:
                async with trio.open_nursery() as nursery:
                    for link in waiting:
                        nursery.start_soon(self._collect, link, replies, oldest, timeout)
            for name in self.missing:
                replies[name] = make_reply(ReturnCode.COMMUNICATION_ERROR)
            if one_hop and not exhausted:
                # The window has room again: the next produce joins this hop.
                outcome, produced = await self.runner.call_plain(
                    self._replies_then_produce, replies, signal
                )
            else:
                outcome = await self.runner(
                    producer.process_replies, replies, self.stream_ctx, self.fl_ctx
                )
            if outcome is not None:
                if signal.triggered:
                    return ReturnCode.TASK_ABORTED, outcome, False
                return (ReturnCode.OK if outcome else ReturnCode.ERROR), outcome, True
            if signal.triggered:
                return ReturnCode.TASK_ABORTED, None, False
            if all(link.ended_rc is not None and not link.replies_waiting() for link in self.links):
                # Every target ended, and no reply behind this object is left
                # to report (replies run ahead of process_replies).
                return self._all_ended_rc(), None, True

    async def _send(
        self,
        link: TargetLink,
        replies: dict[str, Shareable],
        seq: int,
        encoded: EncodedObject,
        no_progress: float,
        ctx: dict[str, Any] | None,
    ) -> None:
        """Send one object of a pipelined stream; a failure is its reply at once."""
        try:
            failed = await link.deliver(
                seq, encoded, no_progress, self.channel, self.topic, ctx, wait_reply=False
            )
        except ConnectionLostError:
            link.on_connection_lost()
            failed = make_reply(ReturnCode.COMMUNICATION_ERROR)
        except Exception as exc:
            if self._delivery_error is None:
                self._delivery_error = exc
            failed = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if failed is not None:
            replies[link.name] = failed

    async def _collect(
        self, link: TargetLink, replies: dict[str, Shareable], seq: int, no_progress: float
    ) -> None:
        try:
            replies[link.name] = await link.await_reply(seq, no_progress)
        except ConnectionLostError:
            link.on_connection_lost()
            replies[link.name] = make_reply(ReturnCode.COMMUNICATION_ERROR)

    def _replies_then_produce(self, replies: dict[str, Shareable], signal: Any) -> tuple[Any, Any]:
        """In a worker thread: ``process_replies``, then (if the stream goes on)
        the next ``produce``; returns ``(outcome, produced)``.

        ``produced`` is :data:`_NOT_PRODUCED` when the stream does not go on
        (``process_replies`` ended it, the abort signal fired, every target
        ended).
        """
        producer = self.producer
        outcome = not_awaitable(producer.process_replies(replies, self.stream_ctx, self.fl_ctx))
        if outcome is not None or signal.triggered or self._all_ended():
            return outcome, _NOT_PRODUCED
        return None, not_awaitable(producer.produce(self.stream_ctx, self.fl_ctx))

    def _all_ended(self) -> bool:
        return all(link.ended_rc is not None for link in self.links)

    async def _to_live_targets(
        self,
        step: Callable[..., Awaitable[None]],
        replies: dict[str, Shareable],
        seq: int,
        encoded: EncodedObject,
        no_progress: float,
        ctx: dict[str, Any] | None,
    ) -> None:
        """Run ``step`` (deliver or send one object) for every live target at
        once; with one target, without a task. Raises what a step recorded in
        ``_delivery_error``."""
        live = [link for link in self.links if link.ended_rc is None]
        if len(live) == 1:
            await step(live[0], replies, seq, encoded, no_progress, ctx)
        else:
            async with trio.open_nursery() as nursery:
                for link in live:
                    nursery.start_soon(step, link, replies, seq, encoded, no_progress, ctx)
        if self._delivery_error is not None:
            raise self._delivery_error

    async def _deliver(
        self,
        link: TargetLink,
        replies: dict[str, Shareable],
        seq: int,
        encoded: EncodedObject,
        no_progress: float,
        ctx: dict[str, Any] | None,
    ) -> None:
        try:
            reply = await link.deliver(seq, encoded, no_progress, self.channel, self.topic, ctx)
            assert reply is not None
            replies[link.name] = reply
        except ConnectionLostError:
            link.on_connection_lost()
            replies[link.name] = make_reply(ReturnCode.COMMUNICATION_ERROR)
        except Exception as exc:
            # Raised again after every delivery finished, as itself (not as
            # an ExceptionGroup from the delivery nursery).
            if self._delivery_error is None:
                self._delivery_error = exc
            replies[link.name] = make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _all_ended_rc(self) -> str:
        """Every target ended its session: OK if all did so cleanly, else the first failure."""
        for link in self.links:
            if link.ended_rc != ReturnCode.OK:
                return link.ended_rc or ReturnCode.ERROR
        return ReturnCode.OK

    async def _close_targets(self, rc: str, normal_end: bool) -> None:
        """Tell every live target how the stream ended and wait for their DONE."""
        async with trio.open_nursery() as nursery:
            for link in self.links:
                if link.ended_rc is None and link.opened:
                    if normal_end:
                        nursery.start_soon(link._tell, link.end_frame())
                    else:
                        nursery.start_soon(
                            link._tell, link.abort_frame(rc, self._stop_reason, self.site_name)
                        )
        with trio.move_on_after(self.finalize_timeout):
            for link in self.links:
                if link.opened:
                    await link.done.wait()
        results = {link.name: link.done_result for link in self.links if link.done_result}
        if results:
            self.stream_ctx[END_RESULTS] = results
        for link in self.links:
            link.conn.senders.pop(link.sid, None)


def _encode(shareable: Shareable) -> EncodedObject:
    """Encode a produced object once for all targets; a small object with
    out-of-band parts is joined into one part (one write per target)."""
    encoded = encode_object(shareable)
    if len(encoded.parts) > 1 and encoded.size <= _COALESCE_MAX:
        encoded = EncodedObject((memoryview(encoded.to_bytes()),), encoded.size)
    return encoded


def check_encodable(stream_ctx: dict[str, Any]) -> None:
    """Raise a clear error now if the stream context cannot go on the wire."""
    try:
        encode_object(stream_ctx)
    except LocalProtocolError as exc:
        raise LocalProtocolError(f"stream_ctx cannot be sent: {exc}") from exc
    if not all(isinstance(key, str) for key in stream_ctx):
        raise LocalProtocolError("stream_ctx keys must be strings")


def _check_produced(produced: Any) -> tuple[Shareable | None, float]:
    if produced is None:
        return None, 0.0
    if not isinstance(produced, tuple) or len(produced) != 2:
        raise ValueError(f"produce must return (Shareable, timeout) or None, not {produced!r:.100}")
    shareable, timeout = produced
    if shareable is None:
        return None, 0.0
    shareable = from_flare(shareable)  # an nvflare Shareable, headers kept
    if not isinstance(shareable, Shareable):
        raise ValueError(f"produce returned {type(shareable).__name__}, not a Shareable")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not (0 < timeout < math.inf)
    ):
        raise ValueError(f"produce returned timeout {timeout!r}; it must be a positive number")
    return shareable, float(timeout)
