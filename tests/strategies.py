"""Hypothesis strategies and small helpers shared by the wire tests.

The frame strategies produce only records that ``FrameProtocol.send`` accepts:
unsigned integers fit in 64 bits, text is valid Unicode, maps have ``str``
keys, and a DATA/REPLY body is never longer than its ``size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from fedstream._shareable import Shareable
from fedstream._wire import (
    OUT_OF_BAND_MIN,
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    ErrorCode,
    Frame,
    FrameProtocol,
    GoAway,
    Hello,
    Ping,
    Pong,
    Reply,
)

U64_MAX = 2**64 - 1

# ----------------------------------------------------------------- scalars

#: Unsigned 64-bit integers, with the edges drawn often.
uints = st.one_of(
    st.sampled_from([0, 1, 23, 24, 255, 256, 2**32 - 1, 2**32, U64_MAX - 1, U64_MAX]),
    st.integers(min_value=0, max_value=U64_MAX),
)

#: Any Unicode text (hypothesis leaves out lone surrogates, which UTF-8 cannot carry).
texts = st.text(max_size=40)
#: Text with characters outside the BMP and combining marks drawn often.
unicode_texts = st.one_of(
    texts,
    st.sampled_from(
        [
            "",
            "\u00e9t\u00e9",
            "\u6a21\u578b",
            "\U0001f680\U0001f9e0",
            "a\u0301",
            "\x00nul",
            "\ufeffbom",
        ]
    ),
)
site_names = unicode_texts.filter(bool)


def _pattern(n: int) -> bytes:
    """``n`` deterministic, non-constant bytes (cheap to build, easy to compare)."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


#: Bodies from empty to a few hundred KiB (large ones are cheap patterned bytes).
bodies = st.one_of(
    st.binary(max_size=64),
    st.integers(min_value=0, max_value=300_000).map(_pattern),
)
#: Bodies small enough to feed one byte at a time.
small_bodies = st.binary(max_size=48)

# ------------------------------------------------------- CBOR-able values

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=U64_MAX),
    st.floats(allow_nan=False),
    unicode_texts,
    st.binary(max_size=32),
)

#: Values a stream context or a DONE result may hold (shallow enough for the head).
ctx_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(unicode_texts, inner, max_size=4),
    ),
    max_leaves=12,
)
#: A DATA ``ctx``: ``None`` or a ``str``-keyed map.
ctxs = st.one_of(st.none(), st.dictionaries(unicode_texts, ctx_values, max_size=5))

# ----------------------------------------------------------------- frames


@st.composite
def _sized(draw: st.DrawFn, body_strategy: st.SearchStrategy[bytes]) -> tuple[int, bytes]:
    body = draw(body_strategy)
    extra = draw(st.one_of(st.just(0), st.integers(min_value=0, max_value=U64_MAX)))
    return min(len(body) + extra, U64_MAX), body


def hellos(version: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[Hello]:
    """HELLO records; ``version`` defaults to the one we speak."""
    return st.builds(
        Hello,
        version=version if version is not None else st.just(PROTOCOL_VERSION),
        site=site_names,
        limits=st.dictionaries(
            st.one_of(
                st.sampled_from(["max_object_size", "window", "heartbeat_ms"]),
                unicode_texts.filter(lambda k: k != "max_frame_size"),
            ),
            uints,
            max_size=4,
        ),
        features=st.lists(unicode_texts, max_size=4),
    )


goaways = st.builds(
    GoAway,
    code=st.one_of(st.sampled_from([int(c) for c in ErrorCode]), uints),
    message=unicode_texts,
)
pings = st.builds(Ping, opaque=uints)
pongs = st.builds(Pong, opaque=uints)


def datas(body_strategy: st.SearchStrategy[bytes] = bodies) -> st.SearchStrategy[Data]:
    return _sized(body_strategy).flatmap(
        lambda sb: st.builds(
            Data,
            sid=uints,
            seq=uints,
            size=st.just(sb[0]),
            channel=unicode_texts,
            topic=unicode_texts,
            ctx=ctxs,
            body=st.just(sb[1]),
        )
    )


def chunks(body_strategy: st.SearchStrategy[bytes] = bodies) -> st.SearchStrategy[Chunk]:
    return st.builds(Chunk, sid=uints, seq=uints, offset=uints, body=body_strategy)


def replies(body_strategy: st.SearchStrategy[bytes] = bodies) -> st.SearchStrategy[Reply]:
    return _sized(body_strategy).flatmap(
        lambda sb: st.builds(
            Reply,
            sid=uints,
            seq=uints,
            size=st.just(sb[0]),
            last=st.booleans(),
            body=st.just(sb[1]),
        )
    )


ends = st.builds(End, sid=uints, count=uints)
aborts = st.builds(Abort, sid=uints, rc=unicode_texts, reason=unicode_texts, by=unicode_texts)
dones = st.builds(Done, sid=uints, rc=unicode_texts, result=ctx_values)
credits = st.builds(Credit, sid=uints, increment=uints)


def stream_frames(body_strategy: st.SearchStrategy[bytes] = bodies) -> st.SearchStrategy[Frame]:
    """Any frame that may follow the handshake, except GOAWAY."""
    return st.one_of(
        pings,
        pongs,
        datas(body_strategy),
        chunks(body_strategy),
        replies(body_strategy),
        ends,
        aborts,
        dones,
        credits,
    )


#: Every frame type's strategy (HELLO with our version), keyed by record class.
FRAME_STRATEGIES: dict[type[Frame], st.SearchStrategy[Any]] = {
    Hello: hellos(),
    GoAway: goaways,
    Ping: pings,
    Pong: pongs,
    Data: datas(),
    Chunk: chunks(),
    Reply: replies(),
    End: ends,
    Abort: aborts,
    Done: dones,
    Credit: credits,
}

# ---------------------------------------------------------- payload values

#: Byte-string lengths around the out-of-band threshold.
blob_sizes = st.one_of(
    st.sampled_from([0, 1, OUT_OF_BAND_MIN - 1, OUT_OF_BAND_MIN, OUT_OF_BAND_MIN + 1]),
    st.integers(min_value=0, max_value=2 * OUT_OF_BAND_MIN),
)


@st.composite
def blobs(draw: st.DrawFn) -> bytes | bytearray | memoryview:
    """A bytes-like value in any of the forms ``encode_object`` accepts."""
    data = _pattern(draw(blob_sizes))
    kind = draw(st.sampled_from(["bytes", "bytearray", "memoryview", "strided"]))
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "strided":
        doubled = bytearray(2 * len(data))
        doubled[::2] = data
        return memoryview(doubled)[::2]
    return data


_payload_leaves = st.one_of(_leaves, blobs())


def _payload_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(unicode_texts, inner, max_size=4),
        st.builds(Shareable, st.dictionaries(unicode_texts, inner, max_size=3)),
    )


#: Values a Shareable may hold: nested containers, blobs and nested Shareables.
payload_values = st.recursive(_payload_leaves, _payload_containers, max_leaves=10)


@st.composite
def shareables(draw: st.DrawFn) -> Shareable:
    """A ``Shareable`` with user data and headers."""
    body = draw(
        st.dictionaries(
            unicode_texts.filter(lambda k: k != "__headers__"), payload_values, max_size=5
        )
    )
    s = Shareable(body)
    for key, value in draw(st.dictionaries(unicode_texts, ctx_values, max_size=3)).items():
        s.set_header(key, value)
    return s


def expected_payload(value: Any) -> Any:
    """What ``decode_object`` must give back for ``value``: bytes-likes become ``bytes``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) if not isinstance(value, memoryview) else value.tobytes()
    if isinstance(value, Shareable):
        return Shareable({k: expected_payload(v) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: expected_payload(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [expected_payload(v) for v in value]
    return value


def assert_same_payload(got: Any, want: Any, path: str = "$") -> None:
    """Deep equality that also checks container and byte-string types."""
    if isinstance(want, dict):
        assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
        assert list(got) == list(want), f"{path}: keys differ"
        for key in want:
            assert_same_payload(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, list):
        assert type(got) is list, f"{path}: {type(got).__name__} is not list"
        assert len(got) == len(want), f"{path}: length differs"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_payload(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
        assert got == want, f"{path}: {got!r:.80} != {want!r:.80}"


# ---------------------------------------------------------------- helpers


def _profile_name() -> str:
    # settings.get_current_profile_name() is recent (pyproject allows 6.100).
    getter = getattr(settings, "get_current_profile_name", None)
    if getter is not None:
        return str(getter())
    return str(getattr(settings, "_current_profile", ""))


def at_most(max_examples: int, **kwargs: Any) -> settings:
    """Settings that cap the example count at ``max_examples`` in the everyday profiles.

    In ``ci`` and ``dev`` (and any other profile) the count is
    ``min(max_examples, profile's)``, so a slow test runs fewer examples than
    the profile allows but never more. The ``thorough`` profile exists to
    raise example counts, so there the cap does not apply and every test
    runs the profile's ``max_examples``. ``stateful_step_count`` (if given)
    is treated the same way.
    """
    profile = settings.default
    if _profile_name() == "thorough":
        kwargs.pop("stateful_step_count", None)
        return settings(max_examples=profile.max_examples, **kwargs)
    if "stateful_step_count" in kwargs:
        kwargs["stateful_step_count"] = min(
            kwargs["stateful_step_count"], profile.stateful_step_count
        )
    return settings(max_examples=min(max_examples, profile.max_examples), **kwargs)


def normalized(frame: Any) -> Any:
    """``frame`` with its body (if any) as ``bytes``, so records compare by value."""
    if isinstance(frame, Frame) and frame.HAS_BODY:
        return dataclasses.replace(frame, body=bytes(frame.body))  # type: ignore[call-arg]
    return frame


def open_pair(*, max_frame_size: int | None = None) -> tuple[FrameProtocol, FrameProtocol]:
    """Two protocols that have exchanged HELLOs, so either may send anything."""
    kwargs = {} if max_frame_size is None else {"max_frame_size": max_frame_size}
    a = FrameProtocol(**kwargs)
    b = FrameProtocol(**kwargs)
    a_hello = a.send(a.hello("site-a"))
    b_hello = b.send(b.hello("site-b"))
    a.receive_data(b_hello)
    b.receive_data(a_hello)
    assert isinstance(a.next_event(), Hello)
    assert isinstance(b.next_event(), Hello)
    return a, b


def drain(protocol: FrameProtocol) -> tuple[list[Frame], Any]:
    """Pull frames until ``next_event`` returns a marker; return them and the marker."""
    frames: list[Frame] = []
    while True:
        event = protocol.next_event()
        if not isinstance(event, Frame):
            return frames, event
        frames.append(event)
