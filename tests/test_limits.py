"""Per-peer limits: how many streams a peer may open.

``max_streams_per_peer``: a stream beyond it is refused at its first object
with ``SERVICE_UNAVAILABLE``, promptly and without a consumer; the connection
and the peer's other streams carry on, and the refusals cost one warning,
not one per stream. Memory sites run on ``autojump_clock`` with async
callbacks.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import trio

from engine_helpers import (
    CHANNEL,
    TOPIC,
    AsyncRecordingFactory,
    AsyncRecordingProducer,
    Recorder,
    engine_leaks,
    make_done_cb,
    reply_rc,
)
from fedstream import ReturnCode, Site, SiteOptions, open_site
from fedstream._engine._connection import Connection
from fedstream._engine._options import DEFAULT_MAX_STREAMS_PER_PEER
from fedstream._shareable import ReservedHeaderKey

OK = ReturnCode.OK
UNAVAILABLE = ReturnCode.SERVICE_UNAVAILABLE

_ids = itertools.count()


def memory_url() -> str:
    return f"memory://limits-{next(_ids)}"


# ============================================================ options


def test_default_allows_a_thousand_concurrent_streams() -> None:
    assert SiteOptions().max_streams_per_peer == DEFAULT_MAX_STREAMS_PER_PEER >= 1000


@pytest.mark.parametrize("name", ["max_streams_per_peer"])
@pytest.mark.parametrize("bad", [0, -1, -(1 << 40), 1.5, True, "8"])
def test_limits_must_be_positive_integers(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        SiteOptions(**{name: bad})


@pytest.mark.parametrize("name", ["max_streams_per_peer"])
async def test_open_site_validates_the_limits_before_doing_anything(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        async with open_site("x", listen=memory_url(), **{name: 0}):
            pytest.fail("the site must not start")  # pragma: no cover


def test_a_limit_of_one_is_allowed() -> None:
    assert SiteOptions(max_streams_per_peer=1).max_streams_per_peer == 1


# ============================================================ max_streams_per_peer


class GateHook:
    """A consume hook that waits for ``gate``; ``arrived`` fires once ``count`` consumes wait."""

    def __init__(self, count: int) -> None:
        self.gate = trio.Event()
        self.arrived = trio.Event()
        self.count = count
        self.waiting = 0

    async def __call__(self, *args: Any) -> None:
        self.waiting += 1
        if self.waiting >= self.count:
            self.arrived.set()
        await self.gate.wait()


def rx_connection(rx: Site) -> Connection:
    (conn,) = rx._connections.values()
    return conn


async def test_streams_over_max_streams_per_peer_are_refused_promptly(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    hook = GateHook(3)
    url = memory_url()
    results: dict[str, tuple[str, Any]] = {}
    producers: dict[str, AsyncRecordingProducer] = {}
    caplog.set_level(logging.DEBUG, logger="fedstream")
    with trio.fail_after(60):
        async with (
            open_site("rx", listen=url, max_streams_per_peer=3) as rx,
            open_site("tx", connect=[url]) as tx,
        ):
            factory = AsyncRecordingFactory(rec, "rx", consume_hook=hook)
            rx.register_stream_processing(
                CHANNEL, TOPIC, factory, make_done_cb(True), recorder=rec, site="rx"
            )
            await rx.wait_for_peers(["tx"])

            async def stream(tag: str, sizes: list[int]) -> None:
                producers[tag] = AsyncRecordingProducer(tag, sizes)
                results[tag] = await tx.stream_objects(
                    CHANNEL, TOPIC, {"stream": tag}, ["rx"], producers[tag], None
                )

            async with trio.open_nursery() as nursery:
                for k in range(3):
                    nursery.start_soon(stream, f"open-{k}", [1000, 50_000])
                await hook.arrived.wait()
                assert len(rx_connection(rx).receivers) == 3
                # Three sessions are open and busy: the next streams are refused
                # at once, with no timer running out first.
                started = trio.current_time()
                async with trio.open_nursery() as refused:
                    for k in range(4):
                        refused.start_soon(stream, f"refused-{k}", [1000, 2000])
                assert trio.current_time() - started < 1.0
                assert len(rx_connection(rx).receivers) == 3
                hook.gate.set()
            # Slots free up once sessions end: a new stream gets in.
            await stream("later", [10])
            assert engine_leaks([rx, tx]) == []

    for k in range(4):
        tag = f"refused-{k}"
        assert results[tag] == (UNAVAILABLE, None)
        (replies,) = producers[tag].replies  # one object answered, then the stream ended
        reply = replies["rx"]
        assert reply_rc(reply) == UNAVAILABLE
        assert "max_streams_per_peer" in reply.get_header(ReservedHeaderKey.ERROR)
        assert ("rx", tag) not in rec.sessions  # no consumer, no callbacks
    for tag in ["open-0", "open-1", "open-2", "later"]:
        assert results[tag] == (OK, None)
        log = rec.sessions[("rx", tag)]
        assert log.count("get_consumer") == 1
        assert log.rcs("finalize") == [OK]  # exactly once
        assert log.rcs("stream_done_cb") == [OK]
        assert log.rcs("return_consumer") == [OK]
    assert rec.all_problems() == []
    # One warning for the burst of refusals, not one per refused stream.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "max_streams_per_peer" in warnings[0].getMessage()
