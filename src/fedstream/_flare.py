"""NVIDIA FLARE interoperability, active only when ``nvflare`` is installed.

fedstream never imports ``nvflare`` by itself: importing it costs about a
third of a second and hundreds of modules. Everything here is keyed on
``sys.modules``: an nvflare object can only reach fedstream after nvflare was
imported, so until then none of this does anything. The one exception is
:class:`~fedstream.BlockingSite`, which imports ``nvflare.apis.streaming``
(when installed) to register itself as a virtual subclass of FLARE's
``StreamableEngine``, because FLARE's streamers check that with
``isinstance`` and may be imported after the engine was made.

What FLARE code needs, and how it gets it:

* ``isinstance(x, nvflare Shareable / FLContext)``: once nvflare is loaded,
  ``fedstream.Shareable(...)`` and ``fedstream.FLContext(...)`` make
  instances of a subclass of both the fedstream class and the nvflare one
  (:func:`flare_shareable_class`, :func:`flare_context_class`). fedstream's
  methods come first in the MRO; the fedstream classes implement FLARE's
  whole method surface, so no nvflare method runs on fedstream state.
* Producers, consumers and factories written against nvflare's base classes
  are wrapped at the site's boundary (:func:`adapt_producer`,
  :func:`adapt_factory`); the wrappers turn nvflare Shareables into
  fedstream ones, keeping their headers.
* An nvflare ``FLContext`` passed to ``stream_objects`` carries a poll-only
  ``Signal``. :func:`bridge_abort_signal` gives that signal (and its parents)
  fedstream's listener support in place, so a ``trigger`` from any thread
  cancels the stream at once, with no polling.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

from ._api import ConsumerFactory, ObjectConsumer, ObjectProducer

if TYPE_CHECKING:
    from ._context import FLContext
    from ._shareable import Shareable

__all__ = [
    "adapt_factory",
    "adapt_producer",
    "bridge_abort_signal",
    "flare_context_class",
    "flare_shareable_class",
    "from_flare",
    "nvflare_installed",
    "register_engine_class",
    "to_shareable",
]

logger = logging.getLogger(__name__)

#: FLARE's ``ReservedKey.RUN_ABORT_SIGNAL``.
_RUN_ABORT_SIGNAL = "__run_abort_signal__"

_lock = threading.Lock()
_classes: dict[str, type] = {}


def nvflare_installed() -> bool:
    """Whether ``nvflare`` can be imported (without importing it)."""
    if "nvflare" in sys.modules:  # None there means imports of it are blocked
        return sys.modules["nvflare"] is not None
    try:
        return importlib.util.find_spec("nvflare") is not None
    except (ImportError, ValueError):
        return False


def _combined(name: str, module: str, attr: str, ours: type) -> type | None:
    cls = _classes.get(name)
    if cls is not None:
        return cls
    mod = sys.modules.get(module)
    theirs = getattr(mod, attr, None) if mod is not None else None
    if not isinstance(theirs, type):
        return None
    with _lock:
        cls = _classes.get(name)
        if cls is None:
            cls = type(attr, (ours, theirs), {"__module__": "fedstream", "__qualname__": attr})
            _classes[name] = cls
    return cls


def flare_shareable_class() -> type[Shareable] | None:
    """``fedstream.Shareable`` + ``nvflare.apis.shareable.Shareable``, once nvflare is loaded."""
    from ._shareable import Shareable

    return _combined("shareable", "nvflare.apis.shareable", "Shareable", Shareable)


def flare_context_class() -> type[FLContext] | None:
    """``fedstream.FLContext`` + ``nvflare.apis.fl_context.FLContext``, once nvflare is loaded."""
    from ._context import FLContext

    return _combined("context", "nvflare.apis.fl_context", "FLContext", FLContext)


def register_engine_class(cls: type) -> None:
    """Make ``cls`` a virtual subclass of ``nvflare.apis.streaming.StreamableEngine``.

    Imports nvflare's streaming API if nvflare is installed; does nothing otherwise.
    """
    if not nvflare_installed():
        return
    try:
        streaming = importlib.import_module("nvflare.apis.streaming")
    except Exception:  # a broken nvflare install must not break fedstream
        logger.warning("nvflare is installed but cannot be imported", exc_info=True)
        return
    streaming.StreamableEngine.register(cls)


# ------------------------------------------------------------ objects


def to_shareable(value: Any) -> Any:
    """Return ``value`` as a fedstream Shareable if it is some other dict (an nvflare one)."""
    from ._shareable import Shareable

    if value is None or isinstance(value, Shareable) or not isinstance(value, dict):
        return value
    return Shareable(value)


def from_flare(value: Any) -> Any:
    """Return an nvflare ``Shareable`` as a fedstream one (headers kept); anything else as is."""
    mod = sys.modules.get("nvflare.apis.shareable")
    flare_cls = getattr(mod, "Shareable", None) if mod is not None else None
    if flare_cls is not None and isinstance(value, flare_cls):
        return to_shareable(value)
    return value


def _is_foreign(obj: object, ours: type, methods: tuple[str, ...]) -> bool:
    return not isinstance(obj, ours) and all(callable(getattr(obj, m, None)) for m in methods)


class _ProducerAdapter(ObjectProducer):
    """Presents a duck-typed (e.g. nvflare) producer as a fedstream ObjectProducer."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def produce(self, stream_ctx: dict[str, Any], fl_ctx: Any) -> Any:
        produced = self.inner.produce(stream_ctx, fl_ctx)
        if isinstance(produced, tuple) and len(produced) == 2:
            return to_shareable(produced[0]), produced[1]
        return produced

    def process_replies(
        self, replies: dict[str, Any], stream_ctx: dict[str, Any], fl_ctx: Any
    ) -> Any:
        return self.inner.process_replies(replies, stream_ctx, fl_ctx)


class _ConsumerAdapter(ObjectConsumer):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def consume(self, shareable: Any, stream_ctx: dict[str, Any], fl_ctx: Any) -> Any:
        result = self.inner.consume(shareable, stream_ctx, fl_ctx)
        if isinstance(result, tuple) and len(result) == 2:
            return result[0], to_shareable(result[1])
        return result

    def finalize(self, stream_ctx: dict[str, Any], fl_ctx: Any) -> Any:
        finalize = getattr(self.inner, "finalize", None)
        return finalize(stream_ctx, fl_ctx) if finalize is not None else None


class _FactoryAdapter(ConsumerFactory):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: Any) -> Any:
        return _adapt_consumer(self.inner.get_consumer(stream_ctx, fl_ctx))

    def return_consumer(self, consumer: Any, stream_ctx: dict[str, Any], fl_ctx: Any) -> Any:
        give_back = getattr(self.inner, "return_consumer", None)
        if give_back is None:
            return None
        if isinstance(consumer, _ConsumerAdapter):
            consumer = consumer.inner
        return give_back(consumer=consumer, stream_ctx=stream_ctx, fl_ctx=fl_ctx)


def adapt_producer(producer: Any) -> Any:
    """A fedstream producer unchanged; a duck-typed one (nvflare's) wrapped; else unchanged."""
    if _is_foreign(producer, ObjectProducer, ("produce", "process_replies")):
        return _ProducerAdapter(producer)
    return producer


def _adapt_consumer(consumer: Any) -> Any:
    if _is_foreign(consumer, ObjectConsumer, ("consume",)):
        return _ConsumerAdapter(consumer)
    return consumer


def adapt_factory(factory: Any) -> Any:
    """A fedstream factory unchanged; a duck-typed one (nvflare's) wrapped; else unchanged."""
    if _is_foreign(factory, ConsumerFactory, ("get_consumer",)):
        return _FactoryAdapter(factory)
    return factory


# ------------------------------------------------------------ signals


def bridge_abort_signal(fl_ctx: Any) -> Any:
    """Make ``fl_ctx``'s abort signal one the engine can listen to; return it.

    A fedstream :class:`~fedstream.Signal` is returned as is. A context
    without a signal gets a fresh one (FLARE's own engine always sets one).
    A FLARE ``Signal`` (poll-only) is given fedstream's signal behaviour in
    place: its class becomes a subclass of both, so it stays an instance of
    the nvflare class, keeps its value and parent, and its ``trigger`` now
    wakes listeners. Its ancestors are converted the same way.
    """
    from ._context import Signal

    signal = fl_ctx.get_run_abort_signal()
    if isinstance(signal, Signal):
        return signal
    if signal is None:
        signal = Signal()
        put = getattr(fl_ctx, "set_run_abort_signal", None)
        if put is not None:
            put(signal)
        else:
            fl_ctx.put(key=_RUN_ABORT_SIGNAL, value=signal, private=True, sticky=False)
        return signal
    level = signal
    while level is not None and not isinstance(level, Signal):
        _convert_signal(level)
        level = getattr(level, "_parent", None)
    return signal


def _convert_signal(signal: Any) -> None:
    from ._context import Signal

    theirs = type(signal)
    required = ("_triggered", "_value", "_trigger_time", "_parent", "trigger", "reset")
    if not all(hasattr(signal, a) for a in required):
        raise TypeError(f"abort signal of type {theirs.__name__} is not a Signal")
    with _lock:
        cls = _classes.get(f"signal:{theirs.__module__}.{theirs.__qualname__}")
        if cls is None:
            cls = type(theirs.__name__, (Signal, theirs), {"__module__": theirs.__module__})
            _classes[f"signal:{theirs.__module__}.{theirs.__qualname__}"] = cls
        if not isinstance(signal, Signal):
            signal._lock = threading.Lock()
            signal._listeners = {}
            signal.__class__ = cls
