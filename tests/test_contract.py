"""Pin the streaming API to the shape of ``nvflare.apis.streaming``.

FLARE code subclasses these classes and calls them by keyword, so every
parameter name, its position, its kind and its default is part of the
contract. These tests fail on any drift.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from fedstream._api import (
    ConsumerFactory,
    ObjectConsumer,
    ObjectProducer,
    StreamableEngine,
    StreamContextKey,
)
from fedstream._context import FLContext
from fedstream._shareable import Shareable

P = inspect.Parameter
POS = P.POSITIONAL_OR_KEYWORD
EMPTY = P.empty

# (class, method, [(name, kind, default), ...]) including ``self``.
SIGNATURES: list[tuple[type, str, list[tuple[str, Any, Any]]]] = [
    (
        ConsumerFactory,
        "get_consumer",
        [("self", POS, EMPTY), ("stream_ctx", POS, EMPTY), ("fl_ctx", POS, EMPTY)],
    ),
    (
        ConsumerFactory,
        "return_consumer",
        [
            ("self", POS, EMPTY),
            ("consumer", POS, EMPTY),
            ("stream_ctx", POS, EMPTY),
            ("fl_ctx", POS, EMPTY),
        ],
    ),
    (
        ObjectConsumer,
        "consume",
        [
            ("self", POS, EMPTY),
            ("shareable", POS, EMPTY),
            ("stream_ctx", POS, EMPTY),
            ("fl_ctx", POS, EMPTY),
        ],
    ),
    (
        ObjectConsumer,
        "finalize",
        [("self", POS, EMPTY), ("stream_ctx", POS, EMPTY), ("fl_ctx", POS, EMPTY)],
    ),
    (
        ObjectProducer,
        "process_replies",
        [
            ("self", POS, EMPTY),
            ("replies", POS, EMPTY),
            ("stream_ctx", POS, EMPTY),
            ("fl_ctx", POS, EMPTY),
        ],
    ),
    (
        ObjectProducer,
        "produce",
        [("self", POS, EMPTY), ("stream_ctx", POS, EMPTY), ("fl_ctx", POS, EMPTY)],
    ),
    (
        StreamableEngine,
        "register_stream_processing",
        [
            ("self", POS, EMPTY),
            ("channel", POS, EMPTY),
            ("topic", POS, EMPTY),
            ("factory", POS, EMPTY),
            ("stream_done_cb", POS, None),
            ("cb_kwargs", P.VAR_KEYWORD, EMPTY),
        ],
    ),
    (StreamableEngine, "shutdown_streamer", [("self", POS, EMPTY)]),
    (
        StreamableEngine,
        "stream_objects",
        [
            ("self", POS, EMPTY),
            ("channel", POS, EMPTY),
            ("topic", POS, EMPTY),
            ("stream_ctx", POS, EMPTY),
            ("targets", POS, EMPTY),
            ("producer", POS, EMPTY),
            ("fl_ctx", POS, EMPTY),
            ("optional", POS, False),
            ("secure", POS, False),
        ],
    ),
    (
        StreamableEngine,
        "stream_done_cb_signature",
        [
            ("self", POS, EMPTY),
            ("stream_ctx", POS, EMPTY),
            ("fl_ctx", POS, EMPTY),
            ("kwargs", P.VAR_KEYWORD, EMPTY),
        ],
    ),
]


@pytest.mark.parametrize(
    ("cls", "method", "expected"),
    SIGNATURES,
    ids=[f"{c.__name__}.{m}" for c, m, _ in SIGNATURES],
)
def test_signature_matches_seed(
    cls: type, method: str, expected: list[tuple[str, Any, Any]]
) -> None:
    sig = inspect.signature(getattr(cls, method))
    actual = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    assert actual == expected


@pytest.mark.parametrize(
    ("cls", "abstract"),
    [
        (ConsumerFactory, {"get_consumer"}),
        (ObjectConsumer, {"consume"}),
        (ObjectProducer, {"process_replies", "produce"}),
        (
            StreamableEngine,
            {"register_stream_processing", "shutdown_streamer", "stream_objects"},
        ),
    ],
)
def test_abstract_methods(cls: type, abstract: set[str]) -> None:
    assert cls.__abstractmethods__ == frozenset(abstract)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        cls()


def test_no_extra_public_methods() -> None:
    """The ABCs add nothing FLARE subclasses could collide with."""
    seed = {c: {m for cc, m, _ in SIGNATURES if cc is c} for c, _, _ in SIGNATURES}
    for cls, methods in seed.items():
        public = {n for n in vars(cls) if not n.startswith("_")}
        assert public == methods, cls.__name__


def test_stream_context_keys() -> None:
    assert StreamContextKey.CHANNEL == "__channel__"
    assert StreamContextKey.TOPIC == "__topic__"
    assert StreamContextKey.RC == "__RC__"
    assert StreamContextKey.END_STREAM == "__end_stream__"


class _Consumer(ObjectConsumer):
    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        return True, None


class _Factory(ConsumerFactory):
    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _Consumer()


class _Producer(ObjectProducer):
    def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        return None, 1.0

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        return None


class _Engine(StreamableEngine):
    def register_stream_processing(
        self,
        channel: str,
        topic: str,
        factory: ConsumerFactory,
        stream_done_cb: Any = None,
        **cb_kwargs: Any,
    ) -> None:
        pass

    def shutdown_streamer(self) -> None:
        pass

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
        return "done"


def test_minimal_subclasses_instantiate_and_defaults_are_noops() -> None:
    fl_ctx = FLContext()
    ctx: dict[str, Any] = {}
    factory = _Factory()
    consumer = factory.get_consumer(ctx, fl_ctx)
    assert isinstance(consumer, _Consumer)
    assert consumer.consume(Shareable(), ctx, fl_ctx) == (True, None)
    assert consumer.finalize(ctx, fl_ctx) is None  # type: ignore[func-returns-value]
    assert factory.return_consumer(consumer, ctx, fl_ctx) is None  # type: ignore[func-returns-value]
    assert ctx == {}

    producer = _Producer()
    assert producer.produce(ctx, fl_ctx) == (None, 1.0)
    assert producer.process_replies({}, ctx, fl_ctx) is None

    engine = _Engine()
    assert engine.stream_objects("ch", "tp", ctx, ["site-1"], producer, fl_ctx) == "done"
    assert engine.stream_done_cb_signature(ctx, fl_ctx, extra=1) is None  # type: ignore[func-returns-value]
