"""The sans-io stream state (``_wire/_stream.py``) driven without trio.

A Hypothesis ``RuleBasedStateMachine`` plays both sides of one stream
session over two in-order queues (one per direction, as on a connection):
the opener starts up to ``max_in_flight`` objects ahead of their replies and
sends their bytes within its credit; the receiver takes them, grants credit,
replies in order (whole, free replies and replies in chunks within the reply
credit the opener grants back), possibly with ``last``; either side aborts,
the opener ends, the receiver says DONE, and frames cross in flight in every
order the rules allow. Invariants: an honest pair never trips a check, both
windows are conserved and never overdrawn, no more than ``max_in_flight``
objects are unanswered, objects arrive whole and in order, replies come back
in order, the receiver's outcome is decided once, and DONE carries it.

The directed tests then feed each side each kind of broken frame sequence:
each raises :class:`StreamViolation` with ``BAD_REQUEST_DATA`` (marked
connection-level where the frame's bytes cannot be placed) and ends that
side's stream; random frame sequences raise nothing else.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fedstream import LocalProtocolError, ReturnCode
from fedstream._wire import Abort, Chunk, Credit, Data, Done, End, Reply
from fedstream._wire._frames import FREE_REPLY_MAX
from fedstream._wire._stream import (
    ABORT_RCS,
    DROPPED,
    MAX_IN_FLIGHT,
    ObjectComplete,
    OpenerStream,
    ReceiverStream,
    ReplyComplete,
    StreamAborted,
    StreamDone,
    StreamEnded,
    StreamState,
    StreamViolation,
    abort_rc,
)
from strategies import at_most

BAD = ReturnCode.BAD_REQUEST_DATA
OK = ReturnCode.OK
SID = 7
MAX_OBJECT = 4000
abort_rcs = st.sampled_from(sorted(ABORT_RCS))
OPEN, ENDED, DONE = StreamState.OPEN, StreamState.ENDED, StreamState.DONE


def _object_bytes(frame: Any) -> int:
    return len(frame.body) if isinstance(frame, (Data, Chunk)) else 0


def _reply_bytes(frame: Any) -> int:
    if isinstance(frame, Chunk):
        return len(frame.body)
    if isinstance(frame, Reply) and not (
        frame.size <= FREE_REPLY_MAX and len(frame.body) == frame.size
    ):
        return len(frame.body)
    return 0


class StreamSession(RuleBasedStateMachine):
    @initialize(
        window=st.sampled_from([0, 64, 300, 1024]),
        reply_window=st.sampled_from([0, 700, 4000]),
        step=st.integers(1, 600),
        max_in_flight=st.sampled_from([1, 2, 4]),
    )
    def open(self, window: int, reply_window: int, step: int, max_in_flight: int) -> None:
        self.window = window
        self.reply_window = reply_window
        self.max_in_flight = max_in_flight
        reply_step = min(step, max(1, reply_window))
        self.opener = OpenerStream(
            SID,
            window=window,
            reply_window=reply_window,
            credit_step=reply_step,
            max_in_flight=max_in_flight,
        )
        self.receiver = ReceiverStream(
            SID,
            window=window,
            reply_window=reply_window,
            max_object_size=MAX_OBJECT,
            credit_step=min(step, max(1, window)),
        )
        self.to_receiver: deque[Any] = deque()
        self.to_opener: deque[Any] = deque()
        self.sizes: list[int] = []
        self.completed: list[tuple[int, int]] = []
        self.receiver_events: list[Any] = []
        self.opener_events: list[Any] = []
        self.reply_sizes: dict[int, tuple[int, bool]] = {}
        self.decided: str | None = None

    # ---- the opener

    @precondition(lambda self: self.opener.can_start())
    @rule(size=st.integers(0, MAX_OBJECT), first=st.integers(0, MAX_OBJECT))
    def start_object(self, size: int, first: int) -> None:
        n = int(min(first, size, self.opener.credit))
        self.to_receiver.append(self.opener.data(size, bytes(n), "c", "t", {}))
        self.sizes.append(size)

    @precondition(lambda self: self.opener.room() >= 1)
    @rule(n=st.integers(1, MAX_OBJECT))
    def send_chunk(self, n: int) -> None:
        self.to_receiver.append(self.opener.chunk(bytes(int(min(n, self.opener.room())))))

    # Endings draw a ``go`` and act on one draw in several, so that sessions
    # live long enough to pipeline, send chunked replies and exhaust credit.

    @precondition(lambda self: self.opener.state is OPEN and self.opener.cur_seq < 0)
    @rule(go=st.integers(0, 3))
    def end(self, go: int) -> None:
        if go == 0:
            self.to_receiver.append(self.opener.end())

    @precondition(lambda self: self.opener.state is OPEN)
    @rule(rc=abort_rcs, go=st.integers(0, 9))
    def opener_aborts(self, rc: str, go: int) -> None:
        if go == 0:
            self.to_receiver.append(self.opener.abort(rc, "test", "opener"))

    @rule()
    def grant_reply(self) -> None:
        credit = self.opener.grant_reply()
        if credit is not None:
            self.to_receiver.append(credit)

    @precondition(lambda self: self.to_opener)
    @rule()
    def deliver_to_opener(self) -> None:
        event = self.opener.receive(self.to_opener.popleft())
        if event is not None and event is not DROPPED:
            self.opener_events.append(event)

    # ---- the receiver

    @precondition(lambda self: self.to_receiver)
    @rule()
    def deliver_to_receiver(self) -> None:
        event = self.receiver.receive(self.to_receiver.popleft())
        if event is None or event is DROPPED:
            return
        self.receiver_events.append(event)
        if isinstance(event, ObjectComplete):
            self.completed.append((event.seq, event.size))

    @rule()
    def grant(self) -> None:
        credit = self.receiver.grant()
        if credit is not None:
            self.to_opener.append(credit)

    def _may_reply(self) -> bool:
        r = self.receiver
        replying = r.state is OPEN or (r.state is ENDED and r.end_received)
        return replying and r._reply_size < 0 and r.next_reply < r.next_seq

    @precondition(lambda self: self._may_reply())
    @rule(
        size=st.one_of(st.integers(0, 300), st.integers(FREE_REPLY_MAX - 10, 6000)),
        first=st.integers(0, 6000),
        whole=st.booleans(),
        last=st.integers(0, 4).map(lambda n: n == 0),
    )
    def reply(self, size: int, first: int, whole: bool, last: bool) -> None:
        r = self.receiver
        if r.next_reply >= r.completed:
            last = True  # an early reply (to an object still arriving) ends the session
        if whole and size <= FREE_REPLY_MAX:
            first = size  # free: no reply credit needed
        else:
            first = int(min(first, size, r.reply_credit))
            if first == size and size <= FREE_REPLY_MAX:
                first = max(0, size - 1)
        frame = r.reply(size, last=last, body=bytes(first))
        self.reply_sizes[frame.seq] = (size, last)
        self.to_opener.append(frame)

    @precondition(lambda self: self.receiver._reply_size >= 0 and self.receiver.reply_credit >= 1)
    @rule(n=st.integers(1, 6000))
    def reply_chunk(self, n: int) -> None:
        r = self.receiver
        n = int(min(n, r.reply_credit, r._reply_size - r._reply_got))
        self.to_opener.append(r.reply_chunk(bytes(n)))

    @precondition(lambda self: self.receiver.state is OPEN)
    @rule(rc=st.sampled_from([*sorted(ABORT_RCS), "MY_OWN_RC"]), go=st.integers(0, 9))
    def receiver_aborts(self, rc: str, go: int) -> None:
        if go == 0:
            self.to_opener.append(self.receiver.abort(rc, "test", "receiver"))

    @precondition(lambda self: self.receiver.state is ENDED and self.receiver._reply_size < 0)
    @rule(consumer_rc=st.sampled_from([OK, "CONSUMER_RC"]))
    def done(self, consumer_rc: str) -> None:
        # The consumer's rc decides only a session its own last reply ended.
        self.to_opener.append(self.receiver.done(self.receiver.rc or consumer_rc))

    # ---- invariants

    @invariant()
    def credit_is_never_overdrawn(self) -> None:
        for value in (
            self.opener.credit,
            self.receiver.credit,
            self.opener.reply_credit,
            self.receiver.reply_credit,
        ):
            assert value >= 0

    @invariant()
    def the_windows_are_conserved(self) -> None:
        # Every byte of a window is somewhere: with the sender, on the way,
        # received and not granted yet, or granted and on the way back.
        if self.window and self.receiver.state is OPEN:
            queued = sum(_object_bytes(f) for f in self.to_receiver)
            returning = sum(f.increment for f in self.to_opener if isinstance(f, Credit))
            held = self.opener.credit + queued + self.receiver.ungranted + returning
            assert held == self.window
        if self.reply_window and self.opener.state is OPEN:
            queued = sum(_reply_bytes(f) for f in self.to_opener)
            returning = sum(f.increment for f in self.to_receiver if isinstance(f, Credit))
            held = self.receiver.reply_credit + queued + self.opener._reply_ungranted + returning
            assert held == self.reply_window

    @invariant()
    def no_more_than_the_window_is_in_flight(self) -> None:
        assert self.opener.next_seq - self.opener.next_reply <= self.max_in_flight
        assert self.receiver.next_seq - self.receiver.next_reply <= self.max_in_flight

    @invariant()
    def objects_arrive_whole_and_in_order(self) -> None:
        assert [seq for seq, _ in self.completed] == list(range(len(self.completed)))
        assert [size for _, size in self.completed] == self.sizes[: len(self.completed)]

    @invariant()
    def replies_come_back_in_order(self) -> None:
        got = [e for e in self.opener_events if isinstance(e, ReplyComplete)]
        assert [e.seq for e in got] == list(range(len(got)))
        for e in got:
            assert (e.size, e.last) == self.reply_sizes[e.seq]

    @invariant()
    def the_outcome_is_decided_once(self) -> None:
        rc = self.receiver.rc
        if self.receiver.state is ENDED and rc is not None:
            if self.decided is None:
                self.decided = rc
            assert rc == self.decided
        if self.receiver.state is DONE and self.decided is not None:
            assert rc == self.decided

    @invariant()
    def the_outcome_is_agreed(self) -> None:
        ended = [e for e in self.receiver_events if isinstance(e, StreamEnded)]
        if ended:
            assert len(ended) == 1
            assert ended[0].count == len(self.sizes) == self.receiver.completed
        done = [e for e in self.opener_events if isinstance(e, StreamDone)]
        assert len(done) <= 1
        if done:
            assert self.opener.state is DONE
            assert done[0].rc == self.receiver.rc == self.opener.rc
            assert not self.to_opener
        aborted = [e for e in self.receiver_events if isinstance(e, StreamAborted)]
        if aborted:
            assert len(aborted) == 1
            assert aborted[0].rc == self.receiver.rc
            assert aborted[0].by == "opener"


StreamSession.TestCase.settings = at_most(100, stateful_step_count=60)
test_stream_session = StreamSession.TestCase


# ------------------------------------------------------------------ receiver checks


def _receiver(window: int = 100, max_in_flight: int = MAX_IN_FLIGHT) -> ReceiverStream:
    return ReceiverStream(
        SID, window=window, max_object_size=MAX_OBJECT, max_in_flight=max_in_flight
    )


def _data(seq: int, size: int, body: int) -> Data:
    return Data(SID, seq, size, "c", "t", {} if seq == 0 else None, bytes(body))


#: Broken sequences that end the session only, with BAD_REQUEST_DATA.
SESSION_BROKEN = {
    "END counts too many": [_data(0, 5, 5), End(SID, 2)],
    "END counts too few": [_data(0, 5, 5), End(SID, 0)],
    "END mid-object": [_data(0, 50, 10), End(SID, 0)],
    "DATA skips a seq": [_data(1, 5, 5)],
    "DATA repeats seq 0": [_data(0, 5, 5), _data(0, 5, 5)],
    "DATA mid-object": [_data(0, 50, 10), _data(1, 5, 5)],
    "DATA beyond max_in_flight": [_data(0, 5, 5), _data(1, 5, 5), _data(2, 5, 5)],
    "DATA over max_object_size": [_data(0, MAX_OBJECT + 1, 0)],
    "ABORT with OK": [Abort(SID, "OK")],
    "ABORT with no rc": [Abort(SID, "")],
    "ABORT with a long rc": [Abort(SID, "X" * 10_000)],
    "ABORT with a receiver's rc": [Abort(SID, ReturnCode.TOPIC_UNKNOWN)],
}

#: Broken sequences whose last frame cannot be placed: the connection closes.
CONNECTION_BROKEN = {
    "CHUNK at the wrong offset": [_data(0, 50, 10), Chunk(SID, 0, 11, bytes(5))],
    "CHUNK of another object": [_data(0, 50, 10), Chunk(SID, 1, 10, bytes(5))],
    "CHUNK beyond the object": [_data(0, 50, 10), Chunk(SID, 0, 10, bytes(41))],
    "CHUNK without DATA": [Chunk(SID, 0, 0, bytes(5))],
    "CHUNK of a whole object": [_data(0, 5, 5), Chunk(SID, 0, 5, bytes(1))],
    "bytes beyond the window": [_data(0, 500, 60), Chunk(SID, 0, 60, bytes(41))],
    "DATA tail beyond the window": [_data(0, 500, 101)],
}


@pytest.mark.parametrize(
    ("frames", "connection"),
    [(f, False) for f in SESSION_BROKEN.values()] + [(f, True) for f in CONNECTION_BROKEN.values()],
    ids=[*SESSION_BROKEN, *CONNECTION_BROKEN],
)
def test_a_broken_stream_is_bad_request_data(frames: list[Any], connection: bool) -> None:
    receiver = _receiver(max_in_flight=2)
    *good, bad = frames
    for frame in good:
        assert receiver.receive(frame) is not DROPPED
    with pytest.raises(StreamViolation) as info:
        receiver.receive(bad)
    assert info.value.rc == BAD
    assert info.value.connection is connection
    assert receiver.state is ENDED
    assert receiver.rc == BAD
    # The stream is over: later frames are dropped, and DONE carries the rc.
    assert receiver.receive(End(SID, 0)) is DROPPED
    assert receiver.receive(Chunk(SID, 0, 0, b"late")) is DROPPED
    assert receiver.receive(Abort(SID, ReturnCode.TIMEOUT)) is DROPPED
    assert receiver.grant() is None
    assert receiver.done(BAD) == Done(SID, BAD)


def test_a_valid_end_and_abort() -> None:
    receiver = _receiver()
    assert receiver.receive(_data(0, 5, 5)) == ObjectComplete(0, 5)
    assert receiver.reply(3, last=False, body=b"abc").seq == 0
    assert receiver.receive(End(SID, 1)) == StreamEnded(1)
    assert receiver.rc == OK
    # An ABORT may still follow END: the opener gave up while we consumed.
    assert receiver.receive(Abort(SID, ReturnCode.TASK_ABORTED, "bye", "S")) == StreamAborted(
        ReturnCode.TASK_ABORTED, "bye", "S"
    )
    assert receiver.rc == ReturnCode.TASK_ABORTED
    other = _receiver()
    assert other.receive(Abort(SID, ReturnCode.TIMEOUT, "slow", "S")) == StreamAborted(
        ReturnCode.TIMEOUT, "slow", "S"
    )
    assert other.rc == ReturnCode.TIMEOUT
    assert abort_rc(ReturnCode.TIMEOUT) == ReturnCode.TIMEOUT
    assert abort_rc(OK) is None


def test_objects_and_replies_in_flight_are_bounded_by_max_in_flight() -> None:
    receiver = _receiver(window=0, max_in_flight=3)
    for seq in range(3):
        assert receiver.on_data(_data(seq, 5, 5)) == ObjectComplete(seq, 5)
    assert receiver.reply(2, last=False, body=b"ok").seq == 0
    assert receiver.on_data(_data(3, 5, 5)) == ObjectComplete(3, 5)
    with pytest.raises(StreamViolation, match="waiting for replies"):
        receiver.on_data(_data(4, 5, 5))
    opener = OpenerStream(SID, window=0, max_in_flight=2)
    opener.data(1, b"a")
    opener.data(1, b"b")
    assert not opener.can_start()
    with pytest.raises(LocalProtocolError, match="cannot start"):
        opener.data(1, b"c")
    assert opener.on_reply(Reply(SID, 0, 2, False, b"ok")) == ReplyComplete(0, 2, False)
    assert opener.can_start()


def test_the_credit_is_granted_in_steps_and_withheld_on_request() -> None:
    receiver = ReceiverStream(SID, window=100, max_object_size=MAX_OBJECT, credit_step=40)
    assert receiver.on_data(_data(0, 90, 30)) is None
    assert receiver.grant() is None  # less than a step
    assert receiver.on_chunk(Chunk(SID, 0, 30, bytes(30))) is None
    assert receiver.grant(withhold=True) is None
    assert receiver.grant() == Credit(SID, 60)
    assert receiver.credit == 100
    # Without flow control nothing is granted and nothing is overdrawn.
    free = _receiver(window=0)
    assert free.on_data(_data(0, MAX_OBJECT, MAX_OBJECT)) == ObjectComplete(0, MAX_OBJECT)
    assert free.grant() is None


def test_replies_use_reply_credit_unless_small_and_whole() -> None:
    receiver = ReceiverStream(SID, window=0, max_object_size=MAX_OBJECT, reply_window=100)
    receiver.on_data(_data(0, 5, 5))
    receiver.on_data(_data(1, 5, 5))
    receiver.reply(FREE_REPLY_MAX, last=False, body=bytes(FREE_REPLY_MAX))
    assert receiver.reply_credit == 100  # free
    receiver.reply(5000, last=False, body=bytes(60))
    assert receiver.reply_credit == 40
    with pytest.raises(LocalProtocolError, match="reply credit"):
        receiver.reply_chunk(bytes(41))
    receiver.on_credit(Credit(SID, 4940))
    assert receiver.reply_chunk(bytes(4940)) == Chunk(SID, 1, 60, bytes(4940))
    assert receiver.next_reply == 2
    with pytest.raises(LocalProtocolError, match="waiting for a reply"):
        receiver.reply(0, last=False)


# ------------------------------------------------------------------ opener checks


def _opener(objects: int = 1, reply_window: int = 100) -> OpenerStream:
    opener = OpenerStream(
        SID, window=0, reply_window=reply_window, max_in_flight=2, max_reply_size=5000
    )
    for _ in range(objects):
        opener.data(5, bytes(5))
    return opener


OPENER_BROKEN: dict[str, tuple[list[Any], bool]] = {
    "REPLY out of order": ([_opener(2), Reply(SID, 1, 3, False, b"abc")], False),
    "REPLY to an object not sent": ([_opener(0), Reply(SID, 0, 3, False, b"abc")], False),
    "REPLY over max_object_size": ([_opener(1), Reply(SID, 0, 6000, False, bytes(10))], False),
    "REPLY inside a reply": (
        [_opener(2), Reply(SID, 0, 4500, False, bytes(10)), Reply(SID, 1, 3, False, b"abc")],
        False,
    ),
    "reply CHUNK at the wrong offset": (
        [_opener(1), Reply(SID, 0, 4500, False, bytes(10)), Chunk(SID, 0, 11, bytes(5))],
        True,
    ),
    "reply CHUNK beyond the reply": (
        [_opener(1), Reply(SID, 0, 4500, False, bytes(10)), Chunk(SID, 0, 10, bytes(4491))],
        True,
    ),
    "reply CHUNK of no reply": ([_opener(1), Chunk(SID, 0, 0, bytes(5))], True),
    "reply bytes beyond the reply credit": (
        [_opener(1), Reply(SID, 0, 4500, False, bytes(101))],
        True,
    ),
}


@pytest.mark.parametrize(
    ("frames", "connection"), list(OPENER_BROKEN.values()), ids=list(OPENER_BROKEN)
)
def test_the_opener_refuses_a_broken_reply_sequence(frames: list[Any], connection: bool) -> None:
    opener, *good, bad = frames
    for frame in good:
        opener.receive(frame)
    with pytest.raises(StreamViolation) as info:
        opener.receive(bad)
    assert info.value.rc == BAD
    assert info.value.connection is connection
    assert opener.state is ENDED
    assert opener.rc == BAD
    # Whatever crosses our ending is dropped; DONE still comes.
    assert opener.receive(Reply(SID, 5, 3, False, b"abc")) is DROPPED
    assert opener.receive(Done(SID, BAD)) == StreamDone(BAD)
    assert opener.receive(Done(SID, BAD)) is DROPPED


def test_the_opener_follows_last_abort_and_done() -> None:
    opener = _opener(2)
    assert opener.on_reply(Reply(SID, 0, 2, True, b"no")) == ReplyComplete(0, 2, True)
    assert opener.state is ENDED
    assert opener.on_reply(Reply(SID, 1, 2, False, b"ok")) is DROPPED
    assert opener.on_done(Done(SID, "CONSUMER_RC")) == StreamDone("CONSUMER_RC")
    assert opener.rc == "CONSUMER_RC"
    aborted = _opener(1)
    assert aborted.on_abort(Abort(SID, "MY_RC", "why", "R")) == StreamAborted("MY_RC", "why", "R")
    assert aborted.rc == "MY_RC"
    ended = _opener(1)
    assert ended.end() == End(SID, 1)
    # A reply to an object in flight when we ended: dropped, its credit given back.
    assert ended.on_reply(Reply(SID, 0, 4500, False, bytes(80))) is DROPPED
    assert ended.grant_reply() == Credit(SID, 80)


def test_local_misuse_is_a_local_error() -> None:
    opener = OpenerStream(SID, window=10)
    with pytest.raises(LocalProtocolError, match="not sending"):
        opener.chunk(b"x")
    opener.data(50, bytes(10))
    with pytest.raises(LocalProtocolError, match="credit"):
        opener.chunk(b"x")
    with pytest.raises(LocalProtocolError, match="cannot end"):
        opener.end()
    with pytest.raises(LocalProtocolError, match="return code"):
        opener.abort("OK")
    with pytest.raises(LocalProtocolError, match="max_in_flight"):
        OpenerStream(SID, window=0, max_in_flight=MAX_IN_FLIGHT + 1)
    receiver = _receiver()
    with pytest.raises(LocalProtocolError, match="not ended"):
        receiver.done(OK)
    with pytest.raises(LocalProtocolError, match="waiting for a reply"):
        receiver.reply(0, last=False)
    receiver.end(ReturnCode.TIMEOUT)
    receiver.done(ReturnCode.TIMEOUT)
    with pytest.raises(LocalProtocolError, match="already sent"):
        receiver.done(ReturnCode.TIMEOUT)


# ------------------------------------------------------------------ garbage in

_to_receiver = st.one_of(
    st.builds(_data, st.integers(0, 3), st.integers(0, 200), st.integers(0, 200)),
    st.builds(Chunk, st.just(SID), st.integers(0, 3), st.integers(0, 200), st.binary(max_size=100)),
    st.builds(End, st.just(SID), st.integers(0, 4)),
    st.builds(Abort, st.just(SID), st.one_of(abort_rcs, st.text(max_size=5))),
    st.builds(Credit, st.just(SID), st.integers(0, 100)),
)

_to_opener = st.one_of(
    st.builds(
        Reply,
        st.just(SID),
        st.integers(0, 3),
        st.integers(0, 200),
        st.booleans(),
        st.binary(max_size=100),
    ).filter(lambda f: len(f.body) <= f.size),
    st.builds(Chunk, st.just(SID), st.integers(0, 3), st.integers(0, 200), st.binary(max_size=100)),
    st.builds(Abort, st.just(SID), st.text(max_size=5)),
    st.builds(Done, st.just(SID), st.text(max_size=5)),
    st.builds(Credit, st.just(SID), st.integers(0, 100)),
)


@at_most(200)
@given(frames=st.lists(_to_receiver, max_size=12), window=st.sampled_from([0, 100]))
def test_any_frame_sequence_raises_only_stream_violations(frames: list[Any], window: int) -> None:
    """Garbage in: events or :class:`StreamViolation`, and after one, nothing more."""
    receiver = _receiver(window, max_in_flight=2)
    violations: list[StreamViolation] = []
    for frame in frames:
        try:
            receiver.receive(frame)
        except StreamViolation as exc:
            violations.append(exc)
            assert receiver.state is ENDED
        assert receiver.credit >= 0
    assert len(violations) <= 1
    assert all(v.rc == BAD for v in violations)


@at_most(200)
@given(frames=st.lists(_to_opener, max_size=12), objects=st.integers(0, 2))
def test_any_reply_sequence_raises_only_stream_violations(frames: list[Any], objects: int) -> None:
    opener = _opener(objects, reply_window=150)
    violations: list[StreamViolation] = []
    for frame in frames:
        try:
            opener.receive(frame)
        except StreamViolation as exc:
            violations.append(exc)
            assert opener.state is not OPEN
        assert opener.reply_credit >= 0
    assert all(v.rc == BAD for v in violations)
