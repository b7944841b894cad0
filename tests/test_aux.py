"""Aux messages on the async Site: one-object streams on the reserved aux channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from engine_helpers import AcceptingFactory
from fedstream import (
    FLContext,
    ReservedHeaderKey,
    ReturnCode,
    Shareable,
    Site,
    UnknownTargetError,
    make_reply,
    open_site,
)
from fedstream._engine._aux import AUX_CHANNEL

OK = ReturnCode.OK


@asynccontextmanager
async def trio_sites(**opts: Any) -> AsyncIterator[tuple[Site, Site, Site]]:
    """A hub ``server`` with two clients that dialed it."""
    async with (
        open_site("server", listen="tcp://127.0.0.1:0", **opts) as server,
        open_site("a", connect=[server.address], **opts) as a,  # type: ignore[list-item]
        open_site("b", connect=[server.address], **opts) as b,  # type: ignore[list-item]
    ):
        with trio.fail_after(5):
            await server.wait_for_peers(["a", "b"])
        yield server, a, b


async def test_sync_and_async_handlers_reply_per_site_with_the_peer_in_context() -> None:
    seen: list[tuple[str, str, Any]] = []

    def sync_handler(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        seen.append((topic, fl_ctx.get_peer_context().get_identity_name(), fl_ctx.get_engine()))
        reply = make_reply(OK, {"from": fl_ctx.get_identity_name()})
        reply["double"] = request["n"] * 2
        return reply

    async def async_handler(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        await trio.sleep(0)
        return Shareable({"triple": request["n"] * 3})

    with trio.fail_after(20):
        async with trio_sites() as (server, a, b):
            a.register_aux_message_handler("calc", sync_handler)
            b.register_aux_message_handler("calc", async_handler)
            replies = await server.send_aux_request(
                ["a", "b"], "calc", Shareable({"n": 7}), 5.0, None
            )
    assert set(replies) == {"a", "b"}
    assert replies["a"]["double"] == 14
    assert replies["a"].get_header("from") == "a"
    assert replies["a"].get_return_code() == OK
    assert replies["b"]["triple"] == 21
    assert seen == [("calc", "server", a)]


async def test_unknown_topics_failing_handlers_and_none_replies() -> None:
    def boom(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        raise ValueError("bad request")

    with trio.fail_after(20):
        async with trio_sites() as (server, a, b):
            a.register_aux_message_handler("boom", boom)
            b.register_aux_message_handler("boom", lambda t, r, c: None)
            boomed = await server.send_aux_request(["a", "b"], "boom", Shareable(), 5.0, None)
            unknown = await server.send_aux_request(["a"], "nope", Shareable(), 5.0, None)
            with pytest.raises(UnknownTargetError):
                await server.send_aux_request(["zed"], "boom", Shareable(), 5.0, None)
            optional = await server.send_aux_request(
                ["a", "zed"], "nope", Shareable(), 5.0, None, optional=True
            )
    assert boomed["a"].get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "bad request" in boomed["a"].get_header(ReservedHeaderKey.ERROR)
    assert boomed["b"].get_return_code() == OK
    assert unknown["a"].get_return_code() == ReturnCode.TOPIC_UNKNOWN
    assert optional["zed"].get_return_code() == ReturnCode.COMMUNICATION_ERROR
    assert optional["a"].get_return_code() == ReturnCode.TOPIC_UNKNOWN


async def test_the_aux_channel_is_reserved_and_wildcards_never_capture_it() -> None:
    calls: list[Any] = []

    class Spy(AcceptingFactory):
        async def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> Any:  # type: ignore[override]
            calls.append(stream_ctx)
            return await super().get_consumer(stream_ctx, fl_ctx)

    with trio.fail_after(20):
        async with trio_sites() as (server, a, _b):
            with pytest.raises(ValueError, match="reserved"):
                a.register_stream_processing(AUX_CHANNEL, "t", AcceptingFactory())
            with pytest.raises(ValueError, match="reserved"):
                await server.stream_objects(AUX_CHANNEL, "t", {}, ["a"], None, None)  # type: ignore[arg-type]
            a.register_stream_processing("*", "*", Spy())
            a.register_aux_message_handler("hi", lambda t, r, c: make_reply(OK))
            replies = await server.send_aux_request(["a"], "hi", Shareable(), 5.0, None)
            unknown = await server.send_aux_request(["a"], "other", Shareable(), 5.0, None)
    assert replies["a"].get_return_code() == OK
    assert unknown["a"].get_return_code() == ReturnCode.TOPIC_UNKNOWN
    assert calls == []


async def test_aux_requests_obey_the_stream_limits() -> None:
    with trio.fail_after(20):
        async with trio_sites(max_object_size=64 * 1024) as (server, a, _b):
            a.register_aux_message_handler("big", lambda t, r, c: make_reply(OK))
            replies = await server.send_aux_request(
                ["a"], "big", Shareable({"blob": bytes(100_000)}), 5.0, None
            )
    assert replies["a"].get_return_code() == ReturnCode.BAD_REQUEST_DATA


async def test_a_slow_handler_gets_a_timeout_reply(autojump_clock: trio.testing.MockClock) -> None:
    async def slow(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        await trio.sleep(100)
        return make_reply(OK)

    async with (
        open_site("rx", listen="memory://aux-timeout") as rx,
        open_site("tx", connect=["memory://aux-timeout"], peer_timeout=1000) as tx,
    ):
        rx.register_aux_message_handler("slow", slow)
        start = trio.current_time()
        replies = await tx.send_aux_request(["rx"], "slow", Shareable(), 3.0, None)
        assert replies["rx"].get_return_code() == ReturnCode.TIMEOUT
        assert trio.current_time() - start < 50


async def test_fire_and_forget_returns_at_once_and_still_delivers() -> None:
    got = trio.Event()

    async def handler(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        got.set()
        return make_reply(OK)

    with trio.fail_after(20):
        async with trio_sites() as (server, a, _b):
            a.register_aux_message_handler("note", handler)
            assert await server.send_aux_request(["a"], "note", Shareable(), 0, None) == {}
            await got.wait()
