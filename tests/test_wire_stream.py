"""The sans-io stream state (``_wire/_stream.py``) driven without trio.

A Hypothesis ``RuleBasedStateMachine`` plays both sides of one stream
session over two in-order queues (one per direction, as on a connection):
the opener starts objects and sends their bytes within its credit, the
receiver takes them, grants credit, replies (possibly with ``last``),
either side aborts, the opener ends, the receiver says DONE, and frames
cross in flight in every order the rules allow. Invariants: an honest
opener never trips the receiver's checks, credit is conserved, objects
arrive whole and in order, replies come back in order, and once DONE
arrives both sides agree on the outcome.

The directed tests then feed the receiver (and the opener) each kind of
broken frame sequence: each raises :class:`StreamViolation` with
``BAD_REQUEST_DATA`` and ends that side's stream, and random frame
sequences raise nothing else.
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

from fedstream import ReturnCode
from fedstream._wire import Abort, Chunk, Credit, Data, Done, End, Reply
from fedstream._wire._stream import (
    ABORT_RCS,
    ObjectComplete,
    OpenerStream,
    ReceiverStream,
    ReplyComplete,
    StreamAborted,
    StreamDone,
    StreamEnded,
    StreamState,
    StreamViolation,
)
from strategies import at_most

BAD = ReturnCode.BAD_REQUEST_DATA
SID = 7
MAX_OBJECT = 4000
abort_rcs = st.sampled_from(sorted(ABORT_RCS))


def _body(frame: Any) -> int:
    return len(frame.body) if isinstance(frame, (Data, Chunk)) else 0


class StreamSession(RuleBasedStateMachine):
    @initialize(window=st.sampled_from([0, 64, 300, 1024]), step=st.integers(1, 600))
    def open(self, window: int, step: int) -> None:
        self.window = window
        self.opener = OpenerStream(SID, window=window)
        self.receiver = ReceiverStream(
            SID, window=window, max_object_size=MAX_OBJECT, credit_step=min(step, max(1, window))
        )
        self.to_receiver: deque[Any] = deque()
        self.to_opener: deque[Any] = deque()
        self.sizes: list[int] = []
        self.completed: list[tuple[int, int]] = []
        self.replies: list[int] = []
        self.receiver_events: list[Any] = []
        self.opener_events: list[Any] = []
        self.reply_sizes: dict[int, tuple[int, bool]] = {}

    # ---- the opener

    @precondition(lambda self: self.opener.can_start())
    @rule(size=st.integers(0, MAX_OBJECT), first=st.integers(0, MAX_OBJECT))
    def start_object(self, size: int, first: int) -> None:
        n = int(min(first, size, self.opener.credit))
        self.to_receiver.append(self.opener.data(size, bytes(n)))
        self.sizes.append(size)

    @precondition(lambda self: self.opener.room() > 0)
    @rule(n=st.integers(1, MAX_OBJECT))
    def send_chunk(self, n: int) -> None:
        self.to_receiver.append(self.opener.chunk(bytes(min(n, self.opener.room()))))

    @precondition(
        lambda self: (
            self.opener.state is StreamState.OPEN
            and self.opener.current is None
            and self.opener.awaiting is None
        )
    )
    @rule()
    def end(self) -> None:
        self.to_receiver.append(self.opener.end())

    @precondition(lambda self: self.opener.state is StreamState.OPEN)
    @rule(rc=abort_rcs)
    def opener_aborts(self, rc: str) -> None:
        self.to_receiver.append(self.opener.abort(rc, "test", "opener"))

    @precondition(lambda self: self.to_opener)
    @rule()
    def deliver_to_opener(self) -> None:
        self.opener_events += self.opener.receive(self.to_opener.popleft())

    # ---- the receiver

    @precondition(lambda self: self.to_receiver)
    @rule()
    def deliver_to_receiver(self) -> None:
        events = self.receiver.receive(self.to_receiver.popleft())
        self.receiver_events += events
        self.completed += [(e.seq, e.size) for e in events if isinstance(e, ObjectComplete)]

    @rule()
    def grant(self) -> None:
        credit = self.receiver.grant()
        if credit is not None:
            self.to_opener.append(credit)

    @precondition(
        lambda self: (
            self.receiver.state is not StreamState.DONE
            and self.receiver.next_reply < self.receiver.completed
        )
    )
    @rule(size=st.integers(0, 500), first=st.integers(0, 500), last=st.booleans())
    def reply(self, size: int, first: int, last: bool) -> None:
        first = min(first, size)
        frame = self.receiver.reply(size, last=last, body=bytes(first))
        self.reply_sizes[frame.seq] = (size, last)
        self.to_opener.append(frame)
        if first < size:
            self.to_opener.append(Chunk(SID, frame.seq, first, bytes(size - first)))

    @precondition(lambda self: self.receiver.state is StreamState.OPEN)
    @rule(rc=abort_rcs)
    def receiver_aborts(self, rc: str) -> None:
        self.to_opener.append(self.receiver.abort(rc, "test", "receiver"))

    @precondition(lambda self: self.receiver.state is StreamState.ENDED)
    @rule()
    def done(self) -> None:
        self.to_opener.append(self.receiver.done(self.receiver.rc or ReturnCode.OK))

    # ---- invariants

    @invariant()
    def credit_is_never_overdrawn(self) -> None:
        assert self.opener.credit >= 0
        assert self.receiver.credit >= 0
        if self.window and self.receiver.state is StreamState.OPEN:
            # Every byte of the window is somewhere: with the opener, on the
            # way, received and not granted yet, or granted and on the way back.
            queued = sum(_body(f) for f in self.to_receiver)
            returning = sum(f.increment for f in self.to_opener if isinstance(f, Credit))
            held = self.opener.credit + queued + self.receiver._ungranted + returning
            assert held == self.window

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
    def the_outcome_is_agreed(self) -> None:
        ended = [e for e in self.receiver_events if isinstance(e, StreamEnded)]
        if ended:
            assert ended[0].count == len(self.sizes) == self.receiver.completed
            assert self.receiver.rc == ReturnCode.OK
        if self.opener.state is StreamState.DONE:
            done = [e for e in self.opener_events if isinstance(e, StreamDone)]
            assert len(done) == 1
            assert done[0].rc == self.receiver.rc == self.opener.rc
            assert not self.to_opener
        aborted = [e for e in self.receiver_events if isinstance(e, StreamAborted)]
        if aborted:
            assert aborted[0].rc == self.receiver.rc
            assert aborted[0].by == "opener"


StreamSession.TestCase.settings = at_most(100, stateful_step_count=60)
test_stream_session = StreamSession.TestCase


# ------------------------------------------------------------------ hostile


def _receiver(window: int = 100) -> ReceiverStream:
    return ReceiverStream(SID, window=window, max_object_size=MAX_OBJECT)


def _data(seq: int, size: int, body: int) -> Data:
    return Data(SID, seq, size, "c", "t", {} if seq == 0 else None, bytes(body))


BROKEN = {
    "END counts too many": [_data(0, 5, 5), End(SID, 2)],
    "END counts too few": [_data(0, 5, 5), End(SID, 0)],
    "END mid-object": [_data(0, 50, 10), End(SID, 0)],
    "DATA skips a seq": [_data(1, 5, 5)],
    "DATA mid-object": [_data(0, 50, 10), _data(1, 5, 5)],
    "DATA before the reply": [_data(0, 5, 5), _data(1, 5, 5)],
    "DATA over max_object_size": [_data(0, MAX_OBJECT + 1, 0)],
    "DATA tail beyond its size": [_data(0, 5, 6)],
    "CHUNK at the wrong offset": [_data(0, 50, 10), Chunk(SID, 0, 11, bytes(5))],
    "CHUNK of another object": [_data(0, 50, 10), Chunk(SID, 1, 10, bytes(5))],
    "CHUNK beyond the object": [_data(0, 50, 10), Chunk(SID, 0, 10, bytes(41))],
    "CHUNK without DATA": [Chunk(SID, 0, 0, bytes(5))],
    "bytes beyond the window": [_data(0, 500, 60), Chunk(SID, 0, 60, bytes(41))],
    "ABORT with OK": [Abort(SID, "OK")],
    "ABORT with no rc": [Abort(SID, "")],
    "ABORT with a long rc": [Abort(SID, "X" * 10_000)],
}


@pytest.mark.parametrize("frames", list(BROKEN.values()), ids=list(BROKEN))
def test_a_broken_stream_is_bad_request_data(frames: list[Any]) -> None:
    receiver = _receiver()
    *good, bad = frames
    for frame in good:
        receiver.receive(frame)
    with pytest.raises(StreamViolation) as info:
        receiver.receive(bad)
    assert info.value.rc == BAD
    assert receiver.state is StreamState.ENDED
    assert receiver.rc == BAD
    # The stream is over: later frames are dropped, and DONE carries the rc.
    assert receiver.receive(End(SID, 0)) == []
    assert receiver.done(BAD) == Done(SID, BAD)


def test_a_valid_end_and_abort() -> None:
    receiver = _receiver()
    assert receiver.receive(_data(0, 5, 5)) == [ObjectComplete(0, 5)]
    assert receiver.reply(3, last=False).seq == 0
    assert receiver.receive(End(SID, 1)) == [StreamEnded(1)]
    assert receiver.rc == ReturnCode.OK
    other = _receiver()
    assert other.receive(Abort(SID, ReturnCode.TIMEOUT, "slow", "S")) == [
        StreamAborted(ReturnCode.TIMEOUT, "slow", "S")
    ]
    assert other.rc == ReturnCode.TIMEOUT


def test_the_opener_refuses_a_broken_reply_sequence() -> None:
    opener = OpenerStream(SID, window=0)
    opener.data(5, bytes(5))
    with pytest.raises(StreamViolation):
        opener.receive(Reply(SID, 1, 0, False))
    opener = OpenerStream(SID, window=0)
    opener.data(5, bytes(5))
    opener.receive(Reply(SID, 0, 10, False, bytes(4)))
    with pytest.raises(StreamViolation):
        opener.receive(Chunk(SID, 0, 5, bytes(6)))
    opener = OpenerStream(SID, window=0)
    opener.receive(Done(SID, ReturnCode.OK))
    with pytest.raises(StreamViolation):
        opener.receive(Credit(SID, 5))


def test_local_misuse_is_a_local_error() -> None:
    opener = OpenerStream(SID, window=10)
    with pytest.raises(ValueError, match="not sending"):
        opener.chunk(b"x")
    opener.data(50, bytes(10))
    with pytest.raises(ValueError, match="credit"):
        opener.chunk(b"x")
    with pytest.raises(ValueError, match="cannot end"):
        opener.end()
    with pytest.raises(ValueError, match="return code"):
        opener.abort("OK")
    receiver = _receiver()
    with pytest.raises(ValueError, match="not ended"):
        receiver.done(ReturnCode.OK)
    with pytest.raises(ValueError, match="waiting for a reply"):
        receiver.reply(0, last=False)


_frames = st.one_of(
    st.builds(_data, st.integers(0, 3), st.integers(0, 200), st.integers(0, 200)),
    st.builds(Chunk, st.just(SID), st.integers(0, 3), st.integers(0, 200), st.binary(max_size=100)),
    st.builds(End, st.just(SID), st.integers(0, 4)),
    st.builds(Abort, st.just(SID), st.one_of(abort_rcs, st.text(max_size=5))),
)


@at_most(200)
@given(frames=st.lists(_frames, max_size=12), window=st.sampled_from([0, 100]))
def test_any_frame_sequence_raises_only_stream_violations(frames: list[Any], window: int) -> None:
    """Garbage in: events or :class:`StreamViolation`, and after one, nothing more."""
    receiver = _receiver(window)
    violations: list[StreamViolation] = []
    for frame in frames:
        try:
            receiver.receive(frame)
        except StreamViolation as exc:
            violations.append(exc)
            assert receiver.state is StreamState.ENDED
        assert receiver.credit >= 0
    assert len(violations) <= 1
    assert all(v.rc == BAD for v in violations)
