"""Per-peer limits: how many streams a peer may open and how many bytes it can make us hold.

* ``max_streams_per_peer``: a stream beyond it is refused at its first object
  with ``SERVICE_UNAVAILABLE``, promptly and without a consumer; the
  connection and the peer's other streams carry on, and the refusals cost
  one warning, not one per stream.
* ``max_receive_buffer_per_peer``: the accounting class on its own (examples
  and a Hypothesis state machine), then whole sites: streams whose objects
  do not all fit at once still all complete intact, the bytes held never
  exceed the budget plus one object, and a consumer that holds an object
  stalls the peer's other streams (credit withheld, nothing more arrives)
  until it takes the object, or until their senders time out.

Memory sites run on ``autojump_clock`` with async callbacks; one test runs
over real loopback TCP with plain callbacks in worker threads.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine_helpers import (
    CHANNEL,
    TOPIC,
    AsyncRecordingFactory,
    AsyncRecordingProducer,
    Recorder,
    RecordingFactory,
    SyncRecordingProducer,
    engine_leaks,
    make_done_cb,
    reply_rc,
)
from fedstream import FLContext, ObjectConsumer, ReturnCode, Site, SiteOptions, open_site
from fedstream._engine._budget import ObjectHolds, ReceiveBudget, SiteBudget, Ticket
from fedstream._engine._connection import Connection
from fedstream._engine._options import (
    DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER,
    DEFAULT_MAX_STREAMS_PER_PEER,
)
from fedstream._shareable import ReservedHeaderKey
from strategies import at_most

KIB = 1024
OK = ReturnCode.OK
UNAVAILABLE = ReturnCode.SERVICE_UNAVAILABLE
#: Encoded size of a ``make_object`` object beyond its payload bytes (upper bound).
OVERHEAD = 200

_ids = itertools.count()


def memory_url() -> str:
    return f"memory://limits-{next(_ids)}"


# ============================================================ options


def test_defaults_allow_a_thousand_concurrent_streams_and_a_gibibyte() -> None:
    options = SiteOptions()
    assert options.max_streams_per_peer == DEFAULT_MAX_STREAMS_PER_PEER >= 1000
    assert options.max_receive_buffer_per_peer == DEFAULT_MAX_RECEIVE_BUFFER_PER_PEER == 1 << 30
    # Every bound is finite with the defaults, whatever peers do.
    assert options.max_receive_buffer == 2 << 30
    assert options.max_threads == 40


LIMITS = [
    "max_streams_per_peer",
    "max_receive_buffer_per_peer",
    "max_receive_buffer",
    "max_threads",
]


@pytest.mark.parametrize("name", LIMITS)
@pytest.mark.parametrize("bad", [0, -1, -(1 << 40), 1.5, True, "8"])
def test_limits_must_be_positive_integers(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        SiteOptions(**{name: bad})


@pytest.mark.parametrize("name", LIMITS)
async def test_open_site_validates_the_limits_before_doing_anything(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        async with open_site("x", listen=memory_url(), **{name: 0}):
            pytest.fail("the site must not start")  # pragma: no cover


def test_a_limit_of_one_is_allowed() -> None:
    options = SiteOptions(max_streams_per_peer=1, max_receive_buffer_per_peer=1)
    assert (options.max_streams_per_peer, options.max_receive_buffer_per_peer) == (1, 1)


# ============================================================ the accounting class


class Session:
    """What a receiving session gives the budget: a callback that re-grants credit."""

    def __init__(self, budget: ReceiveBudget, max_size: int = 1 << 62) -> None:
        self.resumed = 0
        self.holds = ObjectHolds(budget, max_size, self.resume)

    def resume(self) -> None:
        self.resumed += 1


def test_objects_that_fit_are_admitted_at_once() -> None:
    budget = ReceiveBudget(100)
    a, b = Session(budget), Session(budget)
    a.holds.add(40)
    b.holds.add(60)
    assert (budget.held, budget.waiting, budget.waits) == (100, 0, 0)
    assert not a.holds.withholding
    assert not b.holds.withholding
    a.holds.take()
    b.holds.take()
    assert (budget.held, budget.peak) == (0, 100)
    assert a.resumed == b.resumed == 0


def test_object_that_does_not_fit_waits_until_room_frees() -> None:
    budget = ReceiveBudget(100)
    a, b = Session(budget), Session(budget)
    a.holds.add(60)
    b.holds.add(50)
    assert b.holds.withholding
    assert (budget.held, budget.waiting, budget.waits) == (60, 1, 1)
    a.holds.take()
    assert not b.holds.withholding
    assert b.resumed == 1
    assert (budget.held, budget.waiting) == (50, 0)


def test_object_larger_than_the_budget_gets_in_alone() -> None:
    budget = ReceiveBudget(100)
    a, b, c = Session(budget), Session(budget), Session(budget)
    a.holds.add(500)  # nothing held: admitted although larger than the budget
    assert (budget.held, a.holds.withholding) == (500, False)
    b.holds.add(1)  # anything else waits while it is held
    assert b.holds.withholding
    a.holds.take()
    assert (budget.held, b.resumed) == (1, 1)
    c.holds.add(500)  # with something held, the large one waits for everything to go
    assert c.holds.withholding
    b.holds.take()
    assert (budget.held, c.resumed, budget.peak) == (500, 1, 500)


def test_early_bytes_are_bounded_per_connection_and_site_wide() -> None:
    """Bytes that arrive for objects not admitted yet count against a bound
    as large as each budget, and move into the object's own count once it
    is admitted."""
    site = SiteBudget(1000)
    one, two = ReceiveBudget(100, site), ReceiveBudget(10_000, site)
    holder, a, b = Session(one), Session(one), Session(one)
    assert a.holds.hold_early(500)  # nothing announced: nothing to count
    holder.holds.add(100)
    a.holds.add(60)  # waits
    assert a.holds.hold_early(60)
    b.holds.add(60)  # waits
    assert b.holds.hold_early(40)
    assert not b.holds.hold_early(1)  # 101 > 100 on this connection: refused, not counted
    assert (one.early, one.refused, site.early) == (100, 1, 100)
    b.holds.release()
    assert (one.early, site.early) == (60, 60)
    holder.holds.take()  # a's object is admitted: its early bytes are in its size now
    assert (one.early, one.held, site.early) == (0, 60, 0)
    # Site-wide: another connection's waiting objects share the site's bound.
    big, c = Session(two), Session(two)
    big.holds.add(940)  # site: 60 + 940 = 1000 held
    c.holds.add(500)  # waits for the site's budget
    assert c.holds.hold_early(1000)
    assert not c.holds.hold_early(1)  # the site's bound is used up
    assert (two.early, two.refused, site.early) == (1000, 1, 1000)
    c.holds.release()
    assert (two.early, site.early) == (0, 0)


def test_waiting_objects_are_admitted_first_come_first_served() -> None:
    budget = ReceiveBudget(100)
    a, big, small = Session(budget), Session(budget), Session(budget)
    a.holds.add(60)
    big.holds.add(50)
    small.holds.add(10)  # would fit, but must not overtake the one waiting before it
    assert big.holds.withholding
    assert small.holds.withholding
    a.holds.take()
    assert (big.resumed, small.resumed, budget.held, budget.waiting) == (1, 1, 60, 0)


def test_object_consumed_before_it_was_admitted_frees_its_place_and_resumes() -> None:
    # A small object can arrive whole within the stream's window while it waits.
    budget = ReceiveBudget(100)
    a, b, c = Session(budget), Session(budget), Session(budget)
    a.holds.add(100)
    b.holds.add(10)
    c.holds.add(10)
    b.holds.take()
    assert (b.resumed, b.holds.withholding) == (1, False)
    assert (budget.held, budget.waiting) == (100, 1)
    a.holds.take()
    assert (c.resumed, budget.held) == (1, 10)


def test_release_drops_a_sessions_objects_and_admits_the_next() -> None:
    budget = ReceiveBudget(100)
    a, b, c, d = Session(budget), Session(budget), Session(budget), Session(budget)
    a.holds.add(60)
    a.holds.add(30)  # a misbehaving sender: two objects at once
    b.holds.add(50)
    c.holds.add(50)
    d.holds.add(50)
    c.holds.release()  # a waiting session ends: it leaves the queue
    assert (budget.held, budget.waiting) == (90, 2)
    a.holds.release()
    assert (budget.held, budget.waiting) == (100, 0)
    assert (a.resumed, b.resumed, c.resumed, d.resumed) == (0, 1, 0, 1)


def test_the_site_budget_bounds_all_peers_together_first_come_first_served() -> None:
    site = SiteBudget(100)
    peers = [ReceiveBudget(100, site) for _ in range(3)]
    a, b, c = (Session(p) for p in peers)
    a.holds.add(70)  # fits both budgets
    b.holds.add(50)  # fits its peer's budget, not the site's: waits
    c.holds.add(10)  # would fit the site, but must not overtake b
    assert (site.held, b.holds.withholding, c.holds.withholding) == (70, True, True)
    assert [p.waiting for p in peers] == [0, 1, 1]
    a.holds.take()
    assert (b.resumed, c.resumed, site.held, site.peak) == (1, 1, 60, 70)
    assert [p.held for p in peers] == [0, 50, 10]
    b.holds.take()
    c.holds.take()
    assert site.held == 0


def test_a_peer_waiting_on_its_own_budget_does_not_hold_up_the_site() -> None:
    site = SiteBudget(100)
    one, other = ReceiveBudget(50, site), ReceiveBudget(50, site)
    a, b, c = Session(one), Session(one), Session(other)
    a.holds.add(40)
    b.holds.add(20)  # over its peer's budget (40 + 20 > 50), not the site's
    c.holds.add(30)
    assert (b.holds.withholding, c.holds.withholding, site.held) == (True, False, 70)
    a.holds.release()
    assert (b.resumed, site.held) == (1, 50)


def test_one_object_larger_than_the_site_budget_gets_in_alone() -> None:
    site = SiteBudget(100)
    a, b = Session(ReceiveBudget(1000, site)), Session(ReceiveBudget(1000, site))
    a.holds.add(500)
    b.holds.add(1)
    assert (site.held, b.holds.withholding) == (500, True)
    a.holds.take()
    assert (site.held, b.resumed) == (1, 1)


def test_objects_over_max_object_size_are_not_counted() -> None:
    budget = ReceiveBudget(100)
    s = Session(budget, max_size=10)
    s.holds.add(11)  # the session refuses it and ends
    assert (budget.held, budget.waiting, s.holds.withholding) == (0, 0, False)
    s.holds.take()  # nothing to take: harmless
    s.holds.release()
    assert budget.held == 0


class BudgetMachine(RuleBasedStateMachine):
    """Random objects started, consumed and dropped by a few sessions on one budget.

    The model knows only the order in which objects started; the checks are
    the budget's promises: within the limit unless one object is alone,
    first come first served, nobody left waiting when the oldest waiting
    object would fit, and a session that stops waiting always gets to grant
    the credit it withheld.
    """

    SESSIONS = 4

    @initialize(limit=st.integers(1, 1000))
    def start(self, limit: int) -> None:
        self.budget = ReceiveBudget(limit)
        self.sessions = [Session(self.budget) for _ in range(self.SESSIONS)]
        #: Open objects in the order they started: (session index, ticket).
        self.open: list[tuple[int, Ticket]] = []
        self.max_held = 0
        self.withholding = [False] * self.SESSIONS
        self.resumed = [0] * self.SESSIONS
        self.released: set[int] = set()

    def before(self) -> None:
        self.withholding = [s.holds.withholding for s in self.sessions]
        self.resumed = [s.resumed for s in self.sessions]
        self.released = set()

    def after(self) -> None:
        for i, session in enumerate(self.sessions):
            assert session.holds.withholding == self._newest_waits(i)
            if self.withholding[i] and not session.holds.withholding and i not in self.released:
                assert session.resumed > self.resumed[i], f"session {i} lost its withheld credit"
        self.max_held = max(self.max_held, self.budget.held)

    def _newest_waits(self, i: int) -> bool:
        mine = [t for j, t in self.open if j == i]
        return bool(mine) and not mine[-1].admitted

    @rule(i=st.integers(0, SESSIONS - 1), size=st.integers(0, 1500))
    def add(self, i: int, size: int) -> None:
        self.before()
        self.sessions[i].holds.add(size)
        self.open.append((i, self.sessions[i].holds._tickets[-1]))
        self.after()

    @rule(i=st.integers(0, SESSIONS - 1))
    def take(self, i: int) -> None:
        mine = [k for k, (j, _) in enumerate(self.open) if j == i]
        self.before()
        self.sessions[i].holds.take()
        if mine:
            del self.open[mine[0]]
        self.after()

    @rule(i=st.integers(0, SESSIONS - 1))
    def release(self, i: int) -> None:
        self.before()
        self.sessions[i].holds.release()
        self.open = [(j, t) for j, t in self.open if j != i]
        self.released.add(i)
        self.after()

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "budget"):
            return
        admitted = [t for _, t in self.open if t.admitted]
        waiting = [t for _, t in self.open if not t.admitted]
        assert self.budget.held == sum(t.size for t in admitted)
        assert self.budget.waiting == len(waiting)
        assert self.budget.peak == self.max_held
        # Within the limit, unless one object is alone (empty ones aside).
        assert self.budget.held <= self.budget.limit or self.budget.held == max(
            t.size for t in admitted
        )
        # First come, first served: the admitted objects precede every waiting one.
        flags = [t.admitted for _, t in self.open]
        assert flags == sorted(flags, reverse=True)
        # Nobody waits for nothing: the oldest waiting object does not fit.
        if waiting:
            held = self.budget.held
            assert held > 0
            assert held + waiting[0].size > self.budget.limit


BudgetMachine.TestCase.settings = at_most(100, stateful_step_count=40)
TestBudgetMachine = BudgetMachine.TestCase


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


# ============================================================ max_receive_buffer_per_peer


@asynccontextmanager
async def memory_sites(**rx_options: Any) -> AsyncIterator[tuple[Site, Site]]:
    url = memory_url()
    rx_options.setdefault("chunk_size", 16 * KIB)  # at most the window
    async with (
        open_site("rx", listen=url, **rx_options) as rx,
        open_site("tx", connect=[url]) as tx,
    ):
        await rx.wait_for_peers(["tx"])
        yield rx, tx


async def run_streams(
    tx: Site, sizes: dict[str, list[int]], *, timeout: float = 60.0
) -> tuple[dict[str, tuple[str, Any]], dict[str, AsyncRecordingProducer]]:
    results: dict[str, tuple[str, Any]] = {}
    producers = {tag: AsyncRecordingProducer(tag, s, timeout=timeout) for tag, s in sizes.items()}

    async def one(tag: str) -> None:
        results[tag] = await tx.stream_objects(
            CHANNEL, TOPIC, {"stream": tag}, ["rx"], producers[tag], None
        )

    async with trio.open_nursery() as nursery:
        for tag in sizes:
            nursery.start_soon(one, tag)
    return results, producers


def check_delivered(rec: Recorder, sizes: dict[str, list[int]]) -> None:
    """Every object arrived, in order, with the bytes that were sent, and every session ended OK."""
    assert rec.all_problems() == []
    for tag, expected in sizes.items():
        log = rec.sessions[("rx", tag)]
        assert log.seqs == list(range(len(expected)))
        assert log.sizes == expected
        assert log.rcs("finalize") == [OK]


async def test_streams_that_do_not_fit_together_all_complete_within_the_budget(
    autojump_clock: trio.abc.Clock,
) -> None:
    budget = 500 * KIB
    # Each stream's objects are larger than its window, so a waiting stream
    # really stalls; together they need several times the budget, and one
    # object is larger than the whole budget.
    sizes = {f"s{k}": [(150 + 37 * ((k * 3 + i) % 5)) * KIB for i in range(3)] for k in range(6)}
    sizes["huge"] = [20 * KIB, 700 * KIB, 20 * KIB]
    largest = max(max(s) for s in sizes.values()) + OVERHEAD
    rec = Recorder()
    with trio.fail_after(120):
        async with memory_sites(window=64 * KIB, max_receive_buffer_per_peer=budget) as (rx, tx):
            rx.register_stream_processing(CHANNEL, TOPIC, AsyncRecordingFactory(rec, "rx"))
            conn = rx_connection(rx)
            results, _ = await run_streams(tx, sizes)
            (stats,) = rx.stats()
            waits = conn.receive_budget.waits
    assert results == {tag: (OK, None) for tag in sizes}
    check_delivered(rec, sizes)
    assert waits > 0  # objects really had to wait for each other
    assert 2 * 150 * KIB <= stats.receive_buffered_peak <= budget + largest
    assert (stats.receive_buffered, stats.objects_waiting) == (0, 0)


class GatedFactory(AsyncRecordingFactory):
    """Hands out consumers at once, except for the stream tagged ``slow``: that one
    waits for ``gate`` in ``get_consumer``, so its first object sits unconsumed."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__(rec, "rx")
        self.gate = trio.Event()

    async def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        if stream_ctx["stream"] == "slow":
            await self.gate.wait()
        return self._new(stream_ctx)


async def wait_for(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.01)


@pytest.mark.parametrize("sender_gives_up", [False, True], ids=["resume", "timeout"])
async def test_a_consumer_holding_an_object_stalls_the_other_streams(
    autojump_clock: trio.abc.Clock, sender_gives_up: bool
) -> None:
    window = 64 * KIB
    budget = 300 * KIB
    slow = 250 * KIB
    sizes = {"b": [200 * KIB, 200 * KIB], "c": [200 * KIB, 200 * KIB]}
    rec = Recorder()
    factory = GatedFactory(rec)
    with trio.fail_after(120):
        async with memory_sites(window=window, max_receive_buffer_per_peer=budget) as (rx, tx):
            rx.register_stream_processing(CHANNEL, TOPIC, factory)
            conn = rx_connection(rx)
            async with trio.open_nursery() as nursery:
                slow_result: list[tuple[str, Any]] = []

                async def run_slow() -> None:
                    slow_result.append(
                        await tx.stream_objects(
                            CHANNEL,
                            TOPIC,
                            {"stream": "slow"},
                            ["rx"],
                            AsyncRecordingProducer("slow", [slow]),
                            None,
                        )
                    )

                nursery.start_soon(run_slow)
                # The slow stream's object arrives whole and waits for its consumer.
                await wait_for(lambda: conn.receivers and conn.receive_budget.held > slow)
                (slow_sid,) = conn.receivers
                others: list[Any] = []

                async def run_others() -> None:
                    others.append(
                        await run_streams(tx, sizes, timeout=8.0 if sender_gives_up else 60.0)
                    )

                nursery.start_soon(run_others)
                await trio.sleep(2.0)
                before = rx.stats()[0]
                await trio.sleep(2.0)
                during = rx.stats()[0]
                # Credit is withheld: each other stream got at most its window
                # in, and nothing more arrives (bar heartbeats).
                assert during.objects_waiting == 2
                assert slow < during.receive_buffered <= slow + OVERHEAD
                assert during.bytes_received - before.bytes_received < 100
                waiting = [s for s in during.streams if s.sid != slow_sid]
                assert len(waiting) == 2
                for s in waiting:
                    assert s.objects == 0
                    assert s.credit is not None
                    assert 0 < s.credit <= window
                assert rec.sessions.keys() <= {("rx", "b"), ("rx", "c")}
                assert all(log.count("consume") == 0 for log in rec.sessions.values())
                if sender_gives_up:
                    await trio.sleep(10.0)  # past the senders' 8 s no-progress timeout
                    # The timed-out sessions ended and gave up their places.
                    after = rx.stats()[0]
                    assert after.objects_waiting == 0
                    assert after.receive_buffered == during.receive_buffered
                    assert [s.sid for s in after.streams] == [slow_sid]
                factory.gate.set()
            ((results, producers),) = others
            (stats,) = rx.stats()
            assert engine_leaks([rx, tx]) == []
    assert slow_result == [(OK, None)]
    assert (stats.receive_buffered, stats.objects_waiting) == (0, 0)
    assert rec.sessions[("rx", "slow")].sizes == [slow]
    assert stats.receive_buffered_peak <= budget + slow + OVERHEAD
    if sender_gives_up:
        assert results == {"b": (ReturnCode.TIMEOUT, None), "c": (ReturnCode.TIMEOUT, None)}
        for tag in sizes:
            assert producers[tag].rcs("rx") == [ReturnCode.TIMEOUT]
            assert rec.sessions[("rx", tag)].rcs("finalize") == [ReturnCode.TIMEOUT]
    else:
        assert results == {"b": (OK, None), "c": (OK, None)}
        check_delivered(rec, {"slow": [slow], **sizes})


# ============================================================ over TCP


async def test_budget_over_tcp_with_consumers_in_threads() -> None:
    budget = 1024 * KIB
    sizes = {f"t{k}": [(400 + 150 * ((k + i) % 3)) * KIB for i in range(3)] for k in range(5)}
    largest = max(max(s) for s in sizes.values()) + OVERHEAD
    rec = Recorder()
    results: dict[str, tuple[str, Any]] = {}
    with trio.fail_after(60):
        async with (
            open_site(
                "rx",
                listen="tcp://127.0.0.1:0",
                window=256 * KIB,
                chunk_size=64 * KIB,
                max_receive_buffer_per_peer=budget,
            ) as rx,
            open_site("tx", connect=[rx.address or ""]) as tx,
        ):
            rx.register_stream_processing(CHANNEL, TOPIC, RecordingFactory(rec, "rx"))
            await rx.wait_for_peers(["tx"])
            conn = rx_connection(rx)

            async def one(tag: str) -> None:
                results[tag] = await tx.stream_objects(
                    CHANNEL,
                    TOPIC,
                    {"stream": tag},
                    ["rx"],
                    SyncRecordingProducer(tag, sizes[tag], timeout=30.0),
                    None,
                )

            async with trio.open_nursery() as nursery:
                for tag in sizes:
                    nursery.start_soon(one, tag)
            (stats,) = rx.stats()
            waits = conn.receive_budget.waits
    assert results == {tag: (OK, None) for tag in sizes}
    check_delivered(rec, sizes)
    assert waits > 0
    assert stats.receive_buffered_peak <= budget + largest
    assert (stats.receive_buffered, stats.objects_waiting) == (0, 0)


async def test_a_shared_stream_waiting_for_the_budget_keeps_its_bytes_on_the_sender(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While other streams share the connection, a stream whose object waits for
    the budget stops at the shared in-flight bound, not at its window: what it
    has not sent waits on the sender, and it all goes once the object is
    admitted."""
    window = 256 * KIB
    budget = 300 * KIB
    slow = 250 * KIB
    within = 200 * KIB  # more than a credit step and a chunk, less than the window
    rec = Recorder()
    factory = GatedFactory(rec)
    results: dict[str, tuple[str, Any]] = {}
    with trio.fail_after(120):
        async with memory_sites(window=window, max_receive_buffer_per_peer=budget) as (rx, tx):
            rx.register_stream_processing(CHANNEL, TOPIC, factory)
            conn = rx_connection(rx)
            tx_conn = tx._connections["rx"]
            assert within > tx_conn.shared_in_flight
            producers = {
                tag: AsyncRecordingProducer(tag, [size], timeout=60.0)
                for tag, size in (("slow", slow), ("within", within))
            }

            async def run(tag: str) -> None:
                results[tag] = await tx.stream_objects(
                    CHANNEL, TOPIC, {"stream": tag}, ["rx"], producers[tag], None
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "slow")
                await wait_for(lambda: conn.receive_budget.held > slow)
                nursery.start_soon(run, "within")
                await wait_for(lambda: conn.receive_budget.waiting == 1)
                await trio.sleep(5)  # time for the sender to send all it may
                link = tx_conn.senders[max(tx_conn.senders)]  # the later stream
                unacknowledged = link.bytes_sent - link.credited
                assert 0 < unacknowledged <= tx_conn.shared_in_flight
                assert link.bytes_sent < within
                factory.gate.set()
    assert results == {"slow": (OK, None), "within": (OK, None)}
    check_delivered(rec, {"slow": [slow], "within": [within]})
