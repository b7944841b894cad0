"""Reconnection: a site re-dials the links it dialed, and a certified site takes its name back.

Real loopback sockets (``tcp://`` and ``tls://``), short backoff bounds.
"""

from __future__ import annotations

import math
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
import trio.testing

import fedstream
from engine_helpers import CHANNEL, TOPIC, AsyncRecordingProducer, Recorder, make_factory
from fedstream import (
    ConsumerFactory,
    HandshakeError,
    ObjectConsumer,
    ReturnCode,
    Site,
    SiteOptions,
    open_site,
)
from site_helpers import send, serve
from tls_certs import deployment

OK = ReturnCode.OK
FAST = {"reconnect_min_delay": 0.05, "reconnect_max_delay": 0.2}


def site(name: str, scheme: str, **kwargs: Any) -> AbstractAsyncContextManager[Site]:
    if scheme in ("tls", "wss"):
        kwargs["tls"] = deployment().config(name)
    return open_site(name, **kwargs)


@pytest.mark.parametrize("scheme", ["tcp", "tls", "ws", "wss"])
async def test_the_dialer_is_back_once_the_server_restarts(scheme: str) -> None:
    recorder = Recorder()
    with trio.fail_after(20):
        async with site("server", scheme, listen=f"{scheme}://127.0.0.1:0") as server:
            url = server.address or ""
            serve(recorder, server)
            async with site("site-1", scheme, connect=[url], **FAST) as site1:
                assert await send(site1, "before", ["server"]) == (OK, None)
                await server.shutdown_streamer()
                while site1.peers:
                    await trio.sleep(0.01)
                # The port stays ours: the same URL comes back.
                async with site("server", scheme, listen=url) as again:
                    serve(recorder, again)
                    await site1.wait_for_peers(["server"])
                    await again.wait_for_peers(["site-1"])
                    assert await send(site1, "after", ["server"]) == (OK, None)
    assert recorder.sessions[("server", "before")].seqs == [0, 1, 2]
    assert recorder.sessions[("server", "after")].seqs == [0, 1, 2]


@pytest.mark.parametrize("scheme", ["tcp", "tls", "ws", "wss"])
async def test_a_stream_in_flight_ends_and_the_next_one_works_after_the_link_is_back(
    scheme: str,
) -> None:
    recorder = Recorder()
    stuck = trio.Event()

    async def hold(site_name: str, stream: str, seq: int, *rest: Any) -> None:
        if stream == "cut" and seq == 1:
            stuck.set()
            await trio.sleep_forever()

    with trio.fail_after(20):
        async with site("server", scheme, listen=f"{scheme}://127.0.0.1:0") as server:
            server.register_stream_processing(
                CHANNEL, TOPIC, make_factory(recorder, "server", is_async=True, consume_hook=hold)
            )
            async with site("site-1", scheme, connect=[server.address or ""], **FAST) as site1:
                await server.wait_for_peers(["site-1"])
                outcome: list[Any] = []

                async def cut_stream() -> None:
                    outcome.append(await send(site1, "cut", ["server"]))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cut_stream)
                    await stuck.wait()
                    # The link dies under the stream, without a goodbye.
                    server._connections["site-1"].lose("test: link lost")
                assert outcome == [(ReturnCode.COMMUNICATION_ERROR, None)]
                await site1.wait_for_peers(["server"])
                assert await send(site1, "next", ["server"]) == (OK, None)
    assert recorder.sessions[("server", "next")].seqs == [0, 1, 2]
    assert recorder.sessions[("server", "cut")].rcs("finalize") == [ReturnCode.COMMUNICATION_ERROR]
    assert recorder.all_problems() == []


async def test_no_redial_without_reconnect() -> None:
    with trio.fail_after(10):
        async with (
            site("server", "tcp", listen="tcp://127.0.0.1:0") as server,
            site("site-1", "tcp", connect=[server.address or ""], reconnect=False) as site1,
        ):
            await server.wait_for_peers(["site-1"])
            server._connections["site-1"].lose("test: link lost")
            with trio.move_on_after(0.5):
                await site1.wait_for_peers(["gone"])
            assert site1.peers == []
            assert server.peers == []


async def test_a_restarted_site_with_the_same_certificate_takes_its_name_back_at_once() -> None:
    """The server still holds the old link (it has not noticed the loss yet)."""
    old_rec, new_rec = Recorder(), Recorder()
    with trio.fail_after(15):
        async with (
            site("server", "tls", listen="tls://127.0.0.1:0") as server,
            site("site-1", "tls", connect=[server.address or ""], reconnect=False) as old,
        ):
            serve(old_rec, old)
            await server.wait_for_peers(["site-1"])
            async with site("site-1", "tls", connect=[server.address or ""]) as new:
                serve(new_rec, new)
                assert server.peers == ["site-1"]
                assert await send(server, "s", ["site-1"], secure=True) == (OK, None)
                while old.peers:
                    await trio.sleep(0.01)
    assert ("site-1", "s") not in old_rec.sessions
    assert new_rec.sessions[("site-1", "s")].seqs == [0, 1, 2]


async def test_over_plain_tcp_a_second_site_with_a_connected_name_is_still_refused() -> None:
    with trio.fail_after(15):
        async with (
            site("server", "tcp", listen="tcp://127.0.0.1:0") as server,
            site("site-1", "tcp", connect=[server.address or ""]) as first,
            site("site-1", "tcp") as second,
        ):
            await server.wait_for_peers(["site-1"])
            with pytest.raises(HandshakeError, match="already connected"):
                await second.connect(server.address or "")
            assert first.peers == ["server"]


async def test_a_redial_due_while_the_site_shuts_down_ends_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shutdown waits for a slow finalize; the re-dial timer fires meanwhile."""
    finalizing = trio.Event()

    class SlowFinalize(ObjectConsumer):
        async def consume(self, shareable: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            return True, None

        async def finalize(self, stream_ctx: Any, fl_ctx: Any) -> None:
            finalizing.set()
            with trio.CancelScope(shield=True):
                await trio.sleep(5)

    class Factory(ConsumerFactory):
        async def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> Any:  # type: ignore[override]
            return SlowFinalize()

    hold = trio.Event()
    with trio.fail_after(60):
        async with (
            open_site("gone", listen="memory://reconnect-gone") as gone,
            open_site("peer", listen="memory://reconnect-peer") as peer,
            open_site("a", connect=["memory://reconnect-gone", "memory://reconnect-peer"]) as a,
        ):
            a.register_stream_processing(CHANNEL, TOPIC, Factory())
            await peer.wait_for_peers(["a"])
            await gone.shutdown_streamer()
            async with trio.open_nursery() as nursery:
                producer = AsyncRecordingProducer("s", [10, 10], hook=_hold_second(hold))
                nursery.start_soon(
                    peer.stream_objects, CHANNEL, TOPIC, {"stream": "s"}, ["a"], producer, None
                )
                # a's session from peer is open; a's link to gone waits to be re-dialed.
                while not a._connections["peer"].receivers:
                    await trio.sleep(0.01)
                await a.shutdown_streamer()  # the re-dial falls due in the 5 s it waits
                assert finalizing.is_set()
                hold.set()
            assert a.closed


def _hold_second(hold: trio.Event) -> Any:
    async def hook(where: str, seq: int) -> None:
        if where == "produce" and seq == 1:
            await hold.wait()

    return hook


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"reconnect_min_delay": 0}, ValueError),
        ({"reconnect_min_delay": 2.0, "reconnect_max_delay": 1.0}, ValueError),
        ({"reconnect_min_delay": math.inf, "reconnect_max_delay": math.inf}, ValueError),
        ({"reconnect_max_delay": math.inf}, ValueError),
        ({"tls": "site.crt"}, TypeError),
    ],
)
def test_reconnect_and_tls_options_are_checked(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        SiteOptions(**options)


async def test_a_failed_connect_on_a_url_being_redialed_keeps_it_redialed() -> None:
    """``connect(url)`` for a URL waiting to be re-dialed "dials at once instead"
    (docs/semantics.md, Reconnection). If that one dial fails, the URL must
    still be re-dialed: today the re-dialer was cancelled first, so the site
    never reconnects when the peer comes back."""
    with trio.fail_after(20):
        async with fedstream.open_site("server", listen="tcp://127.0.0.1:0") as server:
            url = server.address
            async with fedstream.open_site(
                "site-1", connect=[url], reconnect_min_delay=0.05, reconnect_max_delay=0.2
            ) as site1:
                await server.shutdown_streamer()
                while site1.peers:
                    await trio.sleep(0.01)
                await trio.sleep(0.3)  # the link's task has ended: the URL waits to be re-dialed
                assert not site1._dialers[url].connected
                with pytest.raises(fedstream.ConnectionLostError):
                    await site1.connect(url)
                async with fedstream.open_site("server", listen=url):
                    with trio.move_on_after(3):
                        await site1.wait_for_peers(["server"])
                    assert site1.peers == ["server"]
